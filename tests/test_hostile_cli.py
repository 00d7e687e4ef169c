"""Hostile input through the real command line: one line on stderr, a distinct exit code that is
neither 0 nor 70 (internal error), no traceback — for models that fail the checker, declare absurd
sizes, carry unknown ops, and decomposed files whose custom nodes are malformed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import bdecomp
from bdecomp.errors import DecomposedModelError, ImageError, ModelError

from conftest import make_images


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bdecomp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _assert_one_line_error(res: subprocess.CompletedProcess, code: int | None, *needles: str) -> None:
    assert res.returncode not in (0, 70), (res.returncode, res.stderr)
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("bdecomp: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def _model(nodes, inits=None, in_shape=(1, 3, 8, 8), out_shape=("n", "c", "h", "w"), opset=13, extra_inits=(),
           extra_opsets=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                          [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()] + list(extra_inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=8)


W = (np.random.default_rng(0).standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32)


def _huge_claim() -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend([10**6, 10**6, 1, 1])  # 10^12 elements, 16 bytes of data
    t.raw_data = bytes(16)
    return t


SOURCE_CASES = {
    "checker": (_model([helper.make_node("Conv", ["x", "w"], ["y"], foo=3)], {"w": W}), 4, "ONNX checker"),
    "absurd-dim": (_model([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": W}, in_shape=(1, 3, 10**9, 10**9)),
                   4, "dimension 1,000,000,000"),
    "absurd-weight": (_model([helper.make_node("Conv", ["x", "w"], ["y"])], extra_inits=[_huge_claim()]), 4,
                      "1,000,000,000,000 elements"),
    "absurd-pads": (_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[10**6] * 4)], {"w": W}), 4,
                    "would have shape"),
    "channel-mismatch": (_model([helper.make_node("Conv", ["x", "w"], ["y"])],
                                {"w": np.ones((4, 5, 3, 3), np.float32)}), 4, "channels"),
    "negative-pads": (_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[-1] * 4)], {"w": W}), 4,
                      "shape inference"),
    "future-opset": (_model([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": W}, opset=99), 4, "opset 99"),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_convert_refuses_hostile_source_models_in_one_line(tmp_path, case):
    model, code, needle = SOURCE_CASES[case]
    src = tmp_path / f"{case}.onnx"
    src.write_bytes(model.SerializeToString())
    _assert_one_line_error(_run("convert", src, "-o", tmp_path / "out.onnx", "--quiet", "-k", "2", "-q", "2"),
                           code, needle)
    assert not (tmp_path / "out.onnx").exists()


@pytest.fixture(scope="module")
def custom_op_model(tmp_path_factory) -> Path:
    """A Conv followed by an op of a custom domain nobody implements."""
    d = tmp_path_factory.mktemp("custom_op")
    m = _model([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Weird", ["c"], ["y"], domain="com.example")], {"w": W},
               extra_opsets=[helper.make_opsetid("com.example", 1)])
    p = d / "custom.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def test_convert_without_calibration_leaves_an_unknown_op_alone(tmp_path, custom_op_model):
    rep = bdecomp.convert(custom_op_model, tmp_path / "c.bd.onnx", bases=2, act_bits=2, progress=False, min_depth=0)
    assert [r.name for r in rep.layers] and (tmp_path / "c.bd.onnx").exists()
    out = onnx.load(str(tmp_path / "c.bd.onnx"))
    assert any(n.op_type == "Weird" and n.domain == "com.example" for n in out.graph.node)


def test_convert_with_calibration_of_an_unrunnable_model_fails_in_one_line(tmp_path, custom_op_model):
    calib = make_images(tmp_path / "calib", 1, (8, 8))
    res = _run("convert", custom_op_model, "-o", tmp_path / "o.onnx", "--quiet", "--calib", calib, "-k", "2",
               "--min-depth", "0")
    _assert_one_line_error(res, 4, "Weird")


# ------------------------------------------------------------------------- malformed decomposed files


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory) -> tuple[Path, Path]:
    """A converted Conv → Relu → Conv model (calibrated quantizers) and a test image."""
    d = tmp_path_factory.mktemp("decomposed")
    rng = np.random.default_rng(1)
    m = _model([helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["c1"], ["r1"]),
                helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])],
               {"w1": (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
                "w2": (rng.standard_normal((4, 8, 3, 3)) * 0.2).astype(np.float32)})
    src = d / "src.onnx"
    src.write_bytes(m.SerializeToString())
    calib = make_images(d / "calib", 2, (8, 8))
    out = d / "src.bd.onnx"
    bdecomp.convert(src, out, bases=2, act_bits=3, calib=calib, progress=False, min_depth=0)
    img = d / "img.png"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(img)
    return out, img


def _first(m: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.op_type == op)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(name, value)])


def _init(m: onnx.ModelProto, suffix: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name.endswith(suffix))


def _truncate_basis(m):
    t = _init(m, ".basis")
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[:, :, :-1]), t.name))


def _basis_dtype(m):
    t = _init(m, ".basis")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int32), t.name))


def _k_too_big(m):
    t = _init(m, ".basis")
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(np.concatenate([a] * 5, axis=1), t.name))  # k = 10 > 8


def _drop_functions(m):
    del m.functions[:]


DECOMPOSED_CASES = {
    "negative-pads": (lambda m: _set_attr(_first(m, "BinConv"), "pads", [-1, 0, 0, 0]), "pads"),
    "zero-strides": (lambda m: _set_attr(_first(m, "BinConv"), "strides", [0, 1]), "strides"),
    "group-not-dividing": (lambda m: _set_attr(_first(m, "BinConv"), "group", 3), "group"),
    "qmax-out-of-range": (lambda m: _set_attr(_first(m, "BinQuantize"), "qmax", 1000), "qmax"),
    "depth-mismatch": (lambda m: _set_attr(_first(m, "BinConv"), "depth", 26), "basis"),
    "weight-shape": (lambda m: _set_attr(_first(m, "BinConv"), "weight_shape", [8, 3, 3, 4]),
                     ("weight_shape", "shape inference")),
    "short-basis": (_truncate_basis, "basis"),
    "basis-dtype": (_basis_dtype, ("uint8", "shape inference")),
    "k-too-big": (_k_too_big, "k<=8"),
    "no-function-body": (_drop_functions, "function"),
}


@pytest.mark.parametrize("case", sorted(DECOMPOSED_CASES))
def test_malformed_decomposed_file_is_refused_by_load(tmp_path, decomposed, case):
    path, _ = decomposed
    m = onnx.load(str(path))
    mutate, needle = DECOMPOSED_CASES[case]
    mutate(m)
    bad = tmp_path / f"{case}.bd.onnx"
    bad.write_bytes(m.SerializeToString())
    with pytest.raises(ModelError) as e:  # DecomposedModelError or a checker / shape-inference ModelError
        bdecomp.load(bad)
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert any(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["negative-pads", "short-basis", "no-function-body"])
def test_infer_on_a_malformed_decomposed_file_fails_in_one_line(tmp_path, decomposed, case):
    path, img = decomposed
    m = onnx.load(str(path))
    DECOMPOSED_CASES[case][0](m)
    bad = tmp_path / f"{case}.bd.onnx"
    bad.write_bytes(m.SerializeToString())
    res = _run("infer", bad, img)
    _assert_one_line_error(res, None, bad.name)
    assert res.returncode in (ModelError.exit_code, DecomposedModelError.exit_code)


def test_infer_on_a_truncated_decomposed_file_fails_in_one_line(tmp_path, decomposed):
    path, img = decomposed
    bad = tmp_path / "cut.bd.onnx"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    _assert_one_line_error(_run("infer", bad, img), ModelError.exit_code, "cut.bd.onnx")


def test_infer_refuses_an_image_header_claiming_a_huge_size(tmp_path, decomposed):
    import struct
    import zlib

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    p = tmp_path / "bomb.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    _assert_one_line_error(_run("infer", decomposed[0], p), ImageError.exit_code, "bomb.png", "too large")


def test_infer_accepts_every_odd_but_valid_image_mode(tmp_path, decomposed):
    """CMYK JPEG, 16-bit grey PNG, palette PNG with transparency, LA, 1-bit: all classified."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    files = []
    for name, img, fmt in [("cmyk.jpg", rgb.convert("CMYK"), "JPEG"),
                           ("grey16.png", Image.frombytes("I;16", (7, 9), rng.integers(0, 65536, 63, dtype="<u2").tobytes()), "PNG"),
                           ("palette.png", rgb.convert("P"), "PNG"),
                           ("la.png", rgb.convert("LA"), "PNG"),
                           ("bw.png", rgb.convert("1"), "PNG"),
                           ("rgba.webp", rgb.convert("RGBA"), "WEBP")]:
        kw = {"transparency": 0} if name == "palette.png" else {}
        img.save(tmp_path / name, fmt, **kw)
        files.append(tmp_path / name)
    res = _run("infer", decomposed[0], *files, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == ""
