"""Reading and writing ONNX files with user-facing errors; writes are atomic."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bdecomp.errors import InputFileError, ModelError

MIN_OPSET = 13  # the decomposed ops' function bodies use opset-13 operators


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
        model = onnx.load(str(path), load_external_data=True)
    except DecodeError as e:
        raise ModelError(f"{path}: not an ONNX model or truncated ({e.__class__.__name__})") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: cannot parse ONNX: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes; truncated or another format)")
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
            raise ModelError(f"{path}: fails the ONNX checker: {first}") from None
    return model


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


def save_model(model: onnx.ModelProto, path: str | Path) -> int:
    """Serialise deterministically and write atomically; returns the byte size."""
    data = model.SerializeToString(deterministic=True)
    write_atomic(data, path)
    return len(data)
