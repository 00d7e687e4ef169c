"""Shared helpers for the test suite: where ../shared lives, and builders for small synthetic
ONNX models and calibration images (every op pattern in milliseconds, no downloads)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8

# `--float-when-faster` decides by a speed profile that convert would otherwise measure on (and
# cache for) the machine running the tests: pin the built-in one, so every machine makes the same
# decisions, and keep any cache out of the user's home (test_speed_profile.py measures on purpose)
# in a folder removed when the run ends (a bare mkdtemp left one behind per run).
os.environ["BDECOMP_SPEED_PROFILE"] = "builtin"
_CACHE_DIR = tempfile.TemporaryDirectory(prefix="bdecomp-test-cache-")
os.environ["BDECOMP_CACHE_DIR"] = _CACHE_DIR.name


# ---------------------------------------------------------------- ../shared


def shared_dir() -> Path:
    """The shared folder of real models and data: $BDECOMP_SHARED, else ../shared beside the
    repository. The path may not exist; use `require_shared` in tests that need it."""
    env = os.environ.get("BDECOMP_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


def require_shared(*parts: str) -> Path:
    """shared_dir()/parts, or skip the calling test cleanly when it is absent."""
    p = shared_dir().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared material not available: {p}")
    return p


@pytest.fixture
def shared() -> Path:
    """Fixture form of require_shared(): the shared folder, or skip."""
    return require_shared()


# ---------------------------------------------------------------- synthetic ONNX models


def _value_info(name: str, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else list(shape))


def make_model(nodes: Iterable[onnx.NodeProto], inits: Mapping[str, np.ndarray],
               input_shape: Sequence[int | str | None], output: str | Sequence[str] = "y", *,
               input_name: str = "x", output_shape: Sequence[int | str | None] | None = None,
               opset: int = OPSET, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    """A float32 model with one input `input_name` of `input_shape` (ints, or a str / None for a
    dynamic dimension), initializers from {name: array} and one or more float outputs.
    Nodes without a name get `<op>_<index>`, so layer configs can refer to them. Checked."""
    nodes = list(nodes)
    for i, n in enumerate(nodes):
        if not n.name:
            n.name = f"{n.op_type.lower()}{i}"
    outputs = [output] if isinstance(output, str) else list(output)
    graph = helper.make_graph(
        nodes, "synthetic", [_value_info(input_name, input_shape)],
        [_value_info(o, output_shape if len(outputs) == 1 else None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    # the checker wants output shapes: let shape inference fill those not given, keep the rest bare
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model)
    return model


def as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network computing in float16: weights, input and output."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def conv_node(x: str, w: str, y: str, b: str | None = None, name: str = "", **attrs) -> onnx.NodeProto:
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [y], name=name, **attrs)


def weights(rng: np.random.Generator, *shape: int, scale: float | None = None) -> np.ndarray:
    """He-style float32 weights [Cout, fan_in...] so activations keep a sane range layer to layer."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    s = np.sqrt(2.0 / fan_in) if scale is None else scale
    return (rng.standard_normal(shape) * s).astype(np.float32)


def run_onnx(model_or_path, x: np.ndarray) -> list[np.ndarray]:
    """Outputs of a model (proto or file) in stock onnxruntime."""
    import onnxruntime as ort

    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
        else Path(model_or_path).read_bytes()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})


def output_error(decomposed: str | Path, original: str | Path, images: Path) -> float:
    """Σ‖decomposed − original‖² / Σ‖original‖² over the outputs of the PNG images in `images`,
    preprocessed by the original's recipe; the decomposed file runs in bdecomp's runtime."""
    import bdecomp
    from bdecomp.decomposer.convert import resolve_recipe
    from bdecomp.models import preprocess

    recipe, _ = resolve_recipe(original, onnx.load(str(original)), None)
    m = bdecomp.load(decomposed)
    num = den = 0.0
    for x in (preprocess(p, recipe) for p in sorted(Path(images).glob("*.png"))):
        ref = run_onnx(original, x)[0]
        num += float(np.square(m.run(x)[0] - ref).sum())
        den += float(np.square(ref).sum())
    return num / den


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- calibration images


def make_images(folder: str | Path, n: int = 4, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    """`n` small random RGB PNGs (height, width = size) in `folder` (created), deterministic."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        # smooth gradients plus noise: values span the whole 0..255 range like photos do
        yy, xx = np.mgrid[0:h, 0:w]
        base = (np.stack([yy * 255 / max(h - 1, 1), xx * 255 / max(w - 1, 1), (yy + xx) * 127 / max(h + w - 2, 1)], -1))
        img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(folder / f"img{i:03d}.png")
    return folder


@pytest.fixture
def calib_dir(tmp_path) -> Path:
    """Four 16×16 PNG calibration images."""
    return make_images(tmp_path / "calib", 4, (16, 16))


def write_to_terminal_report(request, lines: Callable[[], list[str]]) -> None:
    """Write lines() to pytest's terminal report, outside output capture (so a module's summary is
    shown without -s); nothing when lines() is empty."""
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    text = lines() if tr is not None else []
    if not text:
        return
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        for line in text:
            tr.write_line(line)
