"""This machine's speed profile (decomposer/speed.py): measured once, cached, or read from a file.

Which side of a layer is faster, binary kernels or onnxruntime's fp32, depends on the CPU far
more than the kernels' own cost does: on an Intel Xeon with two AVX-512 FMA units onnxruntime ran
convolutions ~1.8x faster than the Zen 4 fit (speed.BUILTIN) predicts, while the kernels ran as
predicted, so the built-in profile picked the faster side in 92–95 of 120 cases there (116 of 120
on Zen 4), and YOLOv8n `--budget 16 --float-when-faster` ran at 0.80x of fp32 (0.99x with the
profile measured there).
So `convert --float-when-faster` measures the machine it runs on (one-thread timings of 20 layer
shapes × 6 settings, both sides, ~5 s), fits the profile's constants and caches them, keyed by
CPU, instruction set and library versions, so that later conversions on the same machine give
the same file byte for byte. A profile measured on another machine (`bdecomp speed-profile -o
FILE` on the deployment target) can be given instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bdecomp.decomposer import speed
from bdecomp.decomposer.speed import SpeedProfile
from bdecomp.errors import ConfigError, InputFileError

SHAPES = [(16, 16, 3, 32), (32, 32, 3, 16), (64, 64, 3, 8), (16, 64, 3, 55), (32, 128, 3, 27), (48, 192, 3, 13),
          (64, 256, 3, 13), (128, 128, 3, 28), (256, 256, 3, 14), (512, 512, 3, 7), (64, 64, 3, 56),
          (64, 16, 1, 55), (128, 32, 1, 27), (256, 48, 1, 13), (512, 64, 1, 13), (16, 64, 1, 55), (64, 256, 1, 13),
          (256, 256, 1, 14), (512, 1000, 1, 13), (32, 32, 1, 32)]  # (cin, cout, kernel, H = W), stride 1
SETTINGS = [(2, 4), (3, 4), (4, 4), (6, 4), (4, 8), (6, 8)]
RUNS = 12
ENV = "BDECOMP_SPEED_PROFILE"  # a profile file, or "builtin"; overrides the measured one


@dataclass(frozen=True)
class Case:
    """One layer shape at one setting, both sides measured (ms, one thread)."""

    cin: int
    cout: int
    ks: int
    hw: int
    k: int
    q: int
    decomposed_ms: float
    float_ms: float

    def estimates(self, profile: SpeedProfile) -> tuple[float, float]:
        taps, px = self.ks * self.ks, self.hw * self.hw
        return (profile.decomposed_ms(self.cin, self.cout, 1, taps, px, px, self.k, self.q),
                profile.float_ms(self.cin, self.cout, 1, taps, px))


def median_ms(f: Callable[[], object], runs: int) -> float:
    f()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def float_session(cin: int, cout: int, ks: int, hw: int, conv: bool, threads: int, rng: np.random.Generator):
    """An onnxruntime session of a 1×1 convolution (cin → cin) + Relu, then (with `conv`) the
    measured Conv + Relu, then a GlobalAveragePool. The difference of the two is the layer as it
    runs inside a network: the first convolution pays the change to onnxruntime's blocked layout
    and the pool leaves almost nothing to change back. Measured alone (Conv + Relu less a Relu),
    the changes made small layers look 13–24 % slower (16 → 16 channels 3×3 on 32×32: 0.036 vs
    0.027 ms) and large ones 2–4 %; ending on the Relu instead of a pool, a layer with fewer output
    than input channels came out near 0 ms (64 → 16 1×1 on 55×55: −0.009 ms, with the pool 0.034)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.standard_normal((cin, cin, 1, 1)).astype(np.float32) / cin, "p")]
    nodes = [helper.make_node("Conv", ["x", "p"], ["pc"]), helper.make_node("Relu", ["pc"], ["pr"])]
    last = "pr"
    if conv:
        inits += [numpy_helper.from_array(rng.standard_normal((cout, cin, ks, ks)).astype(np.float32), "w"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")]
        nodes += [helper.make_node("Conv", ["pr", "w", "b"], ["c"], pads=[ks // 2] * 4),
                  helper.make_node("Relu", ["c"], ["r"])]
        last = "r"
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    from bdecomp.runtime.model import session_options

    so = session_options(threads)  # as the runtime's segments: workers stop spinning after a run
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_conv(rng: np.random.Generator, cin: int, cout: int, ks: int, k: int, q: int):
    """A ks×ks convolution ('same' padding, stride 1) with random bases, coefficients and bias at (k, Q)."""
    from bdecomp import native

    depth = cin * ks * ks
    basis = rng.integers(0, 256, (cout, k, (depth + 7) // 8), dtype=np.uint8)
    return native.PackedConv(basis, rng.random((cout, k), dtype=np.float32), rng.random(cout, dtype=np.float32),
                             cin=cin, groups=1, kernel=(ks, ks), pads=(ks // 2,) * 4, bits=q,
                             zero_point=0, scale=0.1, act_min=0.0)


def measure_cases(shapes=SHAPES, settings=SETTINGS, runs: int = RUNS, threads: int = 1,
                  on_shape: Callable[[], None] | None = None) -> list[Case]:
    """Time every shape × setting on both sides: the native layer (quantize + pack, then the faster
    kernel family, as the runtime picks it) and onnxruntime's Conv + Relu (float_session)."""
    from bdecomp import native

    rng = np.random.default_rng(0)
    cases = []
    for cin, cout, ks, hw in shapes:
        x = rng.random((1, cin, hw, hw), dtype=np.float32)
        with_conv, relu_only = (float_session(cin, cout, ks, hw, c, threads, rng) for c in (True, False))
        t_float = (median_ms(lambda: with_conv.run(None, {"x": x}), runs)
                   - median_ms(lambda: relu_only.run(None, {"x": x}), runs))
        for k, q in settings:
            conv = random_conv(rng, cin, cout, ks, k, q)
            act = native.quantize_pack(x, scale=0.1, zero_point=0, bits=q, groups=1)
            t_pack = median_ms(lambda: native.quantize_pack(x, scale=0.1, zero_point=0, bits=q, groups=1), runs)
            t_dec = t_pack + min(median_ms(lambda fam=fam: conv.run(act, 1, hw, hw, family=fam, threads=threads), runs)
                                 for fam in conv.families(None))
            cases.append(Case(cin, cout, ks, hw, k, q, t_dec, t_float))
        if on_shape is not None:
            on_shape()
    return cases


def fit(cases: list[Case], machine: str, switch_ms: float = speed.BUILTIN.switch_ms) -> SpeedProfile:
    """The profile whose two time models fit these measurements best (speed.fit_profile)."""
    dec = [(speed.decomposed_features(c.cin, c.cout, 1, c.ks * c.ks, c.hw * c.hw, c.hw * c.hw, c.k, c.q),
            c.decomposed_ms) for c in cases]
    flt = {(c.cin, c.cout, c.ks, c.hw): (speed.float_features(c.cin, c.cout, 1, c.ks * c.ks, c.hw * c.hw), c.float_ms)
           for c in cases}  # one float timing per shape
    return speed.fit_profile(dec, list(flt.values()), switch_ms, machine)


def agreement(profile: SpeedProfile, cases: list[Case]) -> int:
    """In how many cases the profile picks the side that was measured faster."""
    hits = 0
    for c in cases:
        e_dec, e_float = c.estimates(profile)
        hits += (e_float < e_dec) == (c.float_ms < c.decomposed_ms)
    return hits


def machine_name() -> str:
    """The CPU's model name and the instruction set the kernels use here."""
    from bdecomp import native

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, kernels {native.default_isa()}"


def cache_path() -> Path:
    """Where this machine's measured profile is kept: $BDECOMP_CACHE_DIR, else $XDG_CACHE_HOME/bdecomp,
    else ~/.cache/bdecomp; one file per CPU, instruction set, library versions and build of the
    kernels (a rebuilt extension, e.g. with a new kernel family, is measured again)."""
    import onnxruntime as ort

    from bdecomp import __version__
    from bdecomp.native import _kernels

    base = os.environ.get("BDECOMP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bdecomp")
    build = hashlib.sha256(Path(_kernels.__file__).read_bytes()).hexdigest()[:16]
    key = json.dumps([machine_name(), __version__, ort.__version__, speed.PROFILE_FORMAT, build])
    return Path(base) / f"speed-profile-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def read(path: str | Path) -> SpeedProfile:
    """A profile file written by `bdecomp speed-profile -o` (or the cache)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read speed profile ({type(e).__name__})") from None
    return SpeedProfile.from_json(text, str(path))


def write(profile: SpeedProfile, path: str | Path) -> None:
    """Write a profile file atomically; InputFileError (one line) where that is not possible."""
    from bdecomp.decomposer.load import write_atomic

    try:
        write_atomic(profile.to_json().encode(), path)
    except OSError as e:
        raise InputFileError(f"{path}: cannot write the speed profile ({e.strerror or type(e).__name__})") from None


def write_cache(profile: SpeedProfile) -> Path | None:
    """Cache this machine's profile; None where the cache cannot be written (not an error: the
    profile is then measured again next time)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(profile, path)
    except (OSError, InputFileError):
        return None
    return path


def measure(progress: bool = True, runs: int | None = None) -> tuple[SpeedProfile, list[Case]]:
    """Measure this machine (one thread) and fit its profile; also returns the measured cases."""
    from tqdm import tqdm

    with tqdm(total=len(SHAPES), desc="measuring this CPU's speed profile", unit="shape", leave=False,
              dynamic_ncols=True, disable=None if progress else True) as bar:
        cases = measure_cases(SHAPES, SETTINGS, runs=runs or RUNS, on_shape=bar.update)
    try:
        return fit(cases, machine_name()), cases
    except ValueError as e:  # too few layers timed above 0 ms: the timings are noise
        raise ConfigError(f"could not measure this CPU's speed profile ({e}; is the machine busy?): measure "
                          "again with `bdecomp speed-profile --remeasure`, or use --speed-profile builtin or FILE") from None


def cached(measure_if_missing: bool, progress: bool = True) -> SpeedProfile | None:
    """This machine's cached profile; measured and cached first when missing and asked to."""
    path = cache_path()
    if path.exists():
        try:
            return read(path)
        except (ConfigError, InputFileError):
            pass  # a damaged cache file: measure again
    if not measure_if_missing:
        return None
    profile, _ = measure(progress)
    write_cache(profile)
    return profile


def resolve(spec: str | Path | SpeedProfile | None, measure_if_missing: bool, progress: bool = True) -> SpeedProfile:
    """The profile a conversion uses: `spec` (a SpeedProfile, a file, or "builtin"), else
    $BDECOMP_SPEED_PROFILE (the same), else this machine's (measured when missing if
    `measure_if_missing`, else the built-in one until it has been measured)."""
    if isinstance(spec, SpeedProfile):
        return spec
    spec = spec if spec is not None else os.environ.get(ENV) or None
    if spec is not None:
        return speed.BUILTIN if str(spec) == "builtin" else read(spec)
    return cached(measure_if_missing, progress) or speed.BUILTIN
