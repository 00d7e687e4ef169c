"""How images reach a model's input: its element type and a fixed batch size.

Images are preprocessed in float32, one [1, ...] tensor each; a float16 / double model gets them
cast, and a model whose batch dimension is fixed to B > 1 gets them in chunks of B (the last one
padded by repeating its last image, the padding's outputs dropped)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx

from bdecomp.errors import ModelError

_FEED_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.DOUBLE: "float64"}


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single graph input that is not an initializer (the one images are fed to); ModelError
    for models bdecomp cannot feed."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"model has {len(inputs)} inputs; bdecomp handles single-input image models")
    return inputs[0]


def declared_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """A tensor's declared dims (None where symbolic or unknown), or None without a shape."""
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def model_input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """The image input's (name, shape), None for a dynamic dimension."""
    i = _image_input(model)
    return i.name, declared_dims(i) or []


def input_dtype(model: onnx.ModelProto) -> str:
    """numpy dtype name images are fed to the model's input in: images are preprocessed in float32
    and cast to what the graph declares (float16 and double models too)."""
    i = _image_input(model)
    et = i.type.tensor_type.elem_type
    if et not in _FEED_DTYPES:
        name = onnx.TensorProto.DataType.Name(et) if et in onnx.TensorProto.DataType.values() else et
        raise ModelError(f"model input {i.name!r} is of type {name}; bdecomp feeds float images "
                         "(float, float16 or double inputs)")
    return _FEED_DTYPES[et]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """B when the model's input declares a fixed batch dimension B > 1, else None."""
    dims = model_input(model)[1]
    return dims[0] if dims and dims[0] and dims[0] > 1 else None


def chunks(x: np.ndarray, batch: int | None):
    """(chunk, rows) over x: chunks of exactly `batch` rows (the last padded by repeating its last
    row) of which the first `rows` are real; x itself when batch is None or already fits."""
    if batch is None or len(x) == batch:
        yield x, len(x)
        return
    for i in range(0, len(x), batch):
        c = x[i:i + batch]
        n = len(c)
        if n < batch:
            c = np.concatenate([c, np.repeat(c[-1:], batch - n, axis=0)])
        yield c, n


def real_rows(y: np.ndarray, rows: int, batch: int | None) -> np.ndarray:
    """The first `rows` images of an output (or any tensor) with the batch as its first axis."""
    if batch is None or rows == batch or np.ndim(y) == 0 or np.shape(y)[0] != batch:
        return y
    return y[:rows]


def run_batched(run: Callable[[np.ndarray], Sequence[np.ndarray]], x: np.ndarray, batch: int | None) -> list:
    """run(x) for a model of fixed batch `batch` (None: any): chunked, padded, outputs joined."""
    if batch is None or len(x) == batch:
        return list(run(x))
    parts = [[real_rows(y, n, batch) for y in run(c)] for c, n in chunks(x, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def classes_first(y: np.ndarray, channels_last: bool) -> np.ndarray:
    """A model output with its class axis at 1: a channels-last model's dense output [N, H, W, C]
    (TensorFlow / Keras segmentation) becomes [N, C, H, W]; other outputs are returned as they are.
    Masks, mIoU, pixel agreement and the allocator's output errors all read classes on axis 1."""
    y = np.asarray(y)
    return y.transpose(0, 3, 1, 2) if channels_last and y.ndim == 4 else y


def dense_output(shape: Sequence[int | None], channels_last: bool) -> bool:
    """Whether an output of this shape holds a class map (segmentation) rather than one score
    vector per image: 4-D with a spatial size other than 1×1 (unknown sizes count as dense). A
    classifier that ends in GlobalAveragePool without Flatten gives [N, C, 1, 1] (channels-last
    [N, 1, 1, C]) and is a classifier."""
    if len(shape) != 4:
        return False
    hw = shape[1:3] if channels_last else shape[2:4]
    return any(d is None or d != 1 for d in hw)


TASKS = ("classification", "segmentation", "outputs")


def output_shape(model: onnx.ModelProto) -> list[int | None]:
    """The first graph output's declared dims (None where symbolic or unknown)."""
    return declared_dims(model.graph.output[0]) or []


def output_task(shape: Sequence[int | None], channels_last: bool, declared: str | None = None) -> str:
    """What a model's first output holds (TASKS): `declared` (its metadata's or the registry's)
    when that is one of them; else from the output's shape: a class map
    [N, C, H, W] with C > 1 is "segmentation"; one score vector per image ([N, C] with C > 1,
    or [N, C, 1, 1]) is "classification"; anything else is "outputs" — a detector head such as
    YOLO's [N, 84, 8400], a depth map [N, 1, H, W], a single score [N, 1]. No label scores those,
    so they are compared as tensors (SQNR, relative error), never as 705,600 "classes".
    An output of unknown rank counts as classification."""
    if declared in TASKS:
        return declared
    if len(shape) == 4:
        c = shape[3] if channels_last else shape[1]
        if c == 1:
            return "outputs"
        return "segmentation" if dense_output(shape, channels_last) else "classification"
    if len(shape) > 2 or (len(shape) == 2 and shape[1] == 1):
        return "outputs"
    return "classification"
