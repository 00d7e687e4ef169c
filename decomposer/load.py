"""Reading and writing ONNX files with user-facing errors; writes are atomic."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bdecomp.decomposer import ops
from bdecomp.decomposer.feed import declared_dims
from bdecomp.errors import InputFileError, ModelError

MIN_OPSET = ops.MIN_OPSET  # the decomposed ops' function bodies use opset-13 operator forms

#: Limits checked before anything is allocated: no CNN bdecomp handles comes near them, and a file
#: claiming more is corrupt or hostile.
MAX_INPUT_DIM = 1 << 16  # any one static dimension of the model input (batch included)
MAX_INPUT_ELEMS = 1 << 28  # elements of the model input per image (1 GiB of float32)
MAX_TENSOR_ELEMS = 1 << 31  # elements of one initializer (8 GiB of float32)
MAX_ACTIVATION_ELEMS = 1 << 30  # elements of one statically shaped intermediate tensor (4 GiB)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"{path}: no such file")
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{path}: permission denied")


def read_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Parse and check an ONNX file; raise InputFileError / ModelError with one clear line."""
    path = Path(path)
    _check_readable(path)
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise ModelError(f"{path}: not an ONNX model or truncated ({e.__class__.__name__})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: cannot parse ONNX: {_first_line(e)}") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes; truncated or another format)")
    _check_declared_sizes(model, path)  # before external data is read or anything is allocated
    newest = onnx.defs.onnx_opset_version()
    if default_opset(model) > newest:
        raise ModelError(f"{path}: opset {default_opset(model)} is newer than this onnx supports ({newest})")
    if any(_is_external(t) for t in model.graph.initializer):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as e:  # missing file, path outside the model's folder, short read, ...
            raise ModelError(f"{path}: cannot read its external data: {_first_line(e)}") from None
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise ModelError(f"{path}: fails the ONNX checker: {_first_line(e) or 'invalid model'}") from None
        except Exception as e:  # the checker itself can fail on corrupt protos
            raise ModelError(f"{path}: fails the ONNX checker: {_first_line(e) or type(e).__name__}") from None
        _check_inferred(model, path)
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _check_declared_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse absurd sizes a file declares (initializers, input dimensions) before allocating."""
    for t in model.graph.initializer:
        if any(d < 0 for d in t.dims):
            raise ModelError(f"{path}: initializer {t.name!r} has a negative dimension {list(t.dims)}")
        n = 1
        for d in t.dims:
            n *= d
        if n > MAX_TENSOR_ELEMS:
            raise ModelError(f"{path}: initializer {t.name!r} claims {n:,} elements {list(t.dims)} "
                             f"(limit {MAX_TENSOR_ELEMS:,})")
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = declared_dims(vi) or []
        for d in dims:
            if d is not None and d > MAX_INPUT_DIM:
                raise ModelError(f"{path}: input {vi.name!r} has dimension {d:,} in {_fmt(dims)} "
                                 f"(limit {MAX_INPUT_DIM:,})")
        per_image = 1
        for d in dims[1:]:
            per_image *= d or 1
        if per_image > MAX_INPUT_ELEMS:
            raise ModelError(f"{path}: input {vi.name!r} of shape {_fmt(dims)} has {per_image:,} elements per "
                             f"image (limit {MAX_INPUT_ELEMS:,})")


def _fmt(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


_STUB_MIN_ELEMS = 4096  # initializers this large are weights: inference needs their shape, not data


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large floating-point initializers reduced to name, type and shape, so that
    shape inference does not copy hundreds of MB of weights. Small ones (shape constants that
    data propagation reads) keep their data."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.BFLOAT16}
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    lg.sparse_initializer.extend(g.sparse_initializer)
    for t in g.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if t.data_type in float_types and n >= _STUB_MIN_ELEMS:
            stub = lg.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
        else:
            lg.initializer.append(t)
    return light


def _check_inferred(model: onnx.ModelProto, path: Path) -> None:
    """Strict shape and type inference (wrong types, negative pads, zero strides, ...) and a size
    limit on every statically shaped intermediate tensor (e.g. absurd pads)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_without_weights(model), check_type=True, strict_mode=True,
                                                     data_prop=True)
    except Exception as e:  # InferenceError, or a crash of inference on a corrupt graph
        raise ModelError(f"{path}: fails ONNX shape inference: {_first_line(e)}") from None
    g = inferred.graph
    for vi in list(g.value_info) + list(g.output):
        dims = declared_dims(vi)
        if not dims or None in dims:
            continue
        n = 1
        for d in dims:
            n *= d
        if n > MAX_ACTIVATION_ELEMS:
            raise ModelError(f"{path}: tensor {vi.name!r} would have shape {_fmt(dims)} ({n:,} elements, "
                             f"limit {MAX_ACTIVATION_ELEMS:,})")
    shapes = {vi.name: declared_dims(vi) for vi in list(g.value_info) + list(g.input)}
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        xs = shapes.get(node.input[0])
        if w is None or len(w.dims) < 3:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group < 1 or w.dims[0] % group:
            raise ModelError(f"{path}: Conv {node.name or node.output[0]!r}: group {group} does not divide its "
                             f"{w.dims[0]} output channels")
        if xs and len(xs) > 1 and xs[1] is not None and xs[1] != w.dims[1] * group:
            raise ModelError(f"{path}: Conv {node.name or node.output[0]!r}: input has {xs[1]} channels, weight "
                             f"{list(w.dims)} with group {group} expects {w.dims[1] * group}")


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def upgrade_opset(model: onnx.ModelProto, path: str | Path = "model") -> onnx.ModelProto:
    """Models below opset 13 are converted so the function bodies may use opset-13 operators."""
    if default_opset(model) >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter

        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises many types
        raise ModelError(f"{path}: opset {default_opset(model)} could not be upgraded to {MIN_OPSET}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def write_atomic(data: bytes, path: str | Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves no half file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputFileError(f"{path}: output folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        # mkstemp makes the file private (0600); give it what a plain open() would: the mode of
        # the file it replaces, else 0666 less the umask
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def model_bytes(path: str | Path) -> int:
    """Bytes of a model on disk: the .onnx file plus the external data files its initializers
    name (exporters such as torch.onnx's dynamo path keep the weights in a FILE.onnx.data)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return size
    files = {entry.value for t in model.graph.initializer if _is_external(t)
             for entry in t.external_data if entry.key == "location"}
    for name in sorted(files):
        f = path.parent / name
        size += f.stat().st_size if f.is_file() else 0
    return size


def save_model(model: onnx.ModelProto, path: str | Path) -> int:
    """Serialise deterministically and write atomically; returns the byte size."""
    data = model.SerializeToString(deterministic=True)
    write_atomic(data, path)
    return len(data)
