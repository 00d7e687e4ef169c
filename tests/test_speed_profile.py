"""Speed profiles: `--float-when-faster` decides with constants measured on the machine that
converts (or read from a file measured elsewhere), not with one CPU's constants for every CPU."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import save_model
from test_float_when_faster import convert, decomposed, shapes_model

from bdecomp.cli import main
from bdecomp.decomposer import speed
from bdecomp.errors import InputFileError
from bdecomp.runtime import speed_profile as sp

# few shapes for a quick measurement, each large enough that onnxruntime's layer (a difference of
# two timings) comes out above 0 ms even on 2 runs (64 → 64 channels on 8×8 and 128 → 32 1×1 on
# 27×27 did not, now and then)
SMALL_SHAPES = [(64, 64, 3, 16), (128, 128, 1, 28), (32, 32, 3, 32)]

FAST_FLOAT = replace(speed.BUILTIN, float_mac=speed.BUILTIN.float_mac / 1000, machine="fast float")
SLOW_FLOAT = replace(speed.BUILTIN, float_mac=speed.BUILTIN.float_mac * 1000, machine="slow float")


def synthetic_cases(profile: speed.SpeedProfile) -> list[sp.Case]:
    """The cases of a measurement whose times are exactly what `profile` estimates."""
    cases = []
    for cin, cout, ks, hw in sp.SHAPES:
        for k, q in sp.SETTINGS:
            c = sp.Case(cin, cout, ks, hw, k, q, 0.0, 0.0)
            cases.append(replace(c, decomposed_ms=c.estimates(profile)[0], float_ms=c.estimates(profile)[1]))
    return cases


@pytest.fixture
def model(tmp_path):
    return save_model(shapes_model(), tmp_path / "model.onnx")


def test_the_fit_recovers_the_constants_that_generated_the_timings():
    truth = replace(speed.BUILTIN, float_mac=speed.BUILTIN.float_mac / 1.6, dec_lane=3e-7, machine="x")
    fitted = sp.fit(synthetic_cases(truth), "x", truth.switch_ms)
    for name in ("dec_pixel", "dec_lane", "dec_input", "dec_work", "float_mac", "float_output", "float_pixel", "switch_ms"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert sp.agreement(fitted, synthetic_cases(truth)) == len(sp.SHAPES) * len(sp.SETTINGS)


def test_a_profile_reads_back_from_its_file_unchanged(tmp_path):
    sp.write(FAST_FLOAT, tmp_path / "p.json")
    assert sp.read(tmp_path / "p.json") == FAST_FLOAT


@pytest.mark.parametrize("text", ["not json", "[]", json.dumps({"format": 99}),
                                  speed.BUILTIN.to_json().replace('"float_mac": 1.73e-08', '"float_mac": -1.0')])
def test_a_bad_profile_file_fails_the_conversion_in_one_line(model, tmp_path, text):
    (tmp_path / "bad.json").write_text(text)
    r = CliRunner().invoke(main, ["convert", str(model), "-o", str(tmp_path / "o.onnx"), "-k", "4", "-q", "4",
                                  "--float-when-faster", "--speed-profile", str(tmp_path / "bad.json"), "--quiet"])
    assert r.exit_code != 0 and r.output.strip().count("\n") == 0 and "bad.json" in r.output
    assert not (tmp_path / "o.onnx").exists()


def test_float_when_faster_follows_the_profile_it_is_given(model, tmp_path):
    convert(model, tmp_path / "fast.onnx", float_when_faster=True, speed_profile=FAST_FLOAT)
    convert(model, tmp_path / "slow.onnx", float_when_faster=True, speed_profile=SLOW_FLOAT)
    assert decomposed(tmp_path / "fast.onnx") == set()
    assert decomposed(tmp_path / "slow.onnx") == {"narrow", "down", "wide"}


def test_a_conversion_that_leaves_every_layer_float_for_speed_says_so(model, tmp_path):
    fast = convert(model, tmp_path / "fast.onnx", float_when_faster=True, speed_profile=FAST_FLOAT)
    slow = convert(model, tmp_path / "slow.onnx", float_when_faster=True, speed_profile=SLOW_FLOAT)
    assert any("computes as the original" in n for n in fast.notes()) and "computes as the original" in fast.table()
    assert slow.notes() == []


def test_the_file_names_the_profile_that_decided(model, tmp_path):
    sp.write(FAST_FLOAT, tmp_path / "p.json")
    report = convert(model, tmp_path / "o.onnx", float_when_faster=True, speed_profile=tmp_path / "p.json")
    meta = {p.key: p.value for p in onnx.load(tmp_path / "o.onnx").metadata_props}
    assert json.loads(meta["bdecomp.options"])["speed_profile"] == "fast float"
    assert report.speed_profile.startswith("fast float")


def test_the_same_profile_gives_the_same_file_byte_for_byte(model, tmp_path):
    for name in ("a.onnx", "b.onnx"):
        convert(model, tmp_path / name, float_when_faster=True, speed_profile=speed.BUILTIN)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_this_machine_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(sp.ENV)
    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sp, "SHAPES", SMALL_SHAPES)
    monkeypatch.setattr(sp, "RUNS", 2)
    first = sp.resolve(None, measure_if_missing=True, progress=False)
    assert sp.cache_path().exists() and first.machine == sp.machine_name()
    assert first.float_mac > 0 and first.dec_work > 0

    def fail(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(sp, "measure_cases", fail)
    assert sp.resolve(None, measure_if_missing=True, progress=False) == first


def test_a_measurement_drowned_in_noise_is_a_one_line_error(monkeypatch, tmp_path):
    """onnxruntime's side is a difference of two timings; on a busy machine it can come out at or
    below 0 ms for most shapes, which leaves nothing to fit."""
    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sp, "measure_cases", lambda *a, **k: [
        sp.Case(c, c, 3, 8, 2, 4, decomposed_ms=0.1, float_ms=-0.01) for c in (16, 32, 64)])
    r = CliRunner().invoke(main, ["speed-profile", "--quiet"])
    assert r.exit_code != 0 and "could not measure this CPU's speed profile" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not sp.cache_path().exists()


def test_a_rebuilt_kernel_extension_has_its_own_cache_entry(monkeypatch, tmp_path):
    """A profile measured with other kernels (before a new kernel family, say) is not reused."""
    from bdecomp.native import _kernels

    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "cache"))
    here = sp.cache_path()
    other = tmp_path / "_kernels.so"
    other.write_bytes(Path(_kernels.__file__).read_bytes() + b"rebuilt")
    monkeypatch.setattr(_kernels, "__file__", str(other))
    assert sp.cache_path() != here and sp.cache_path().parent == here.parent


def test_without_float_when_faster_nothing_is_measured(monkeypatch, tmp_path):
    monkeypatch.delenv(sp.ENV)
    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sp, "measure_cases", lambda *a, **k: pytest.fail("measured"))
    assert sp.resolve(None, measure_if_missing=False) == speed.BUILTIN


def test_the_speed_profile_command_writes_a_profile_convert_can_read(monkeypatch, tmp_path):
    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sp, "SHAPES", SMALL_SHAPES)
    monkeypatch.setattr(sp, "RUNS", 2)
    r = CliRunner().invoke(main, ["speed-profile", "-o", str(tmp_path / "p.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "of 18 layer x setting cases" in r.output
    assert sp.read(tmp_path / "p.json") == sp.read(sp.cache_path())


def test_an_unwritable_profile_output_fails_in_one_line(tmp_path):
    sp.write(FAST_FLOAT, tmp_path / "ok.json")
    with pytest.raises(InputFileError, match="cannot write|does not exist"):
        sp.write(FAST_FLOAT, tmp_path / "missing" / "p.json")


def test_a_cache_that_cannot_be_written_is_not_an_error(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BDECOMP_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: no folder
    assert sp.write_cache(FAST_FLOAT) is None
