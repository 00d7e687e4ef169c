"""bdecomp: binary decomposition of pretrained CNNs, run with AND/popcount kernels.

    import bdecomp
    bdecomp.convert("model.onnx", "model.bd.onnx", bases=8, act_bits=8, calib="images/")
    outputs = bdecomp.load("model.bd.onnx").run(x)
"""
from bdecomp.errors import BdecompError

__all__ = ["convert", "load", "BdecompError"]
__version__ = "0.1.0"


def convert(*args, **kwargs):
    """Decompose an ONNX model; see bdecomp.decomposer.convert.convert."""
    from bdecomp.decomposer.convert import convert as _convert

    return _convert(*args, **kwargs)


def load(*args, **kwargs):
    """Load an ONNX model (decomposed or not) for inference; see bdecomp.runtime.model.load."""
    from bdecomp.runtime.model import load as _load

    return _load(*args, **kwargs)
