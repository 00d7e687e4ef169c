"""User-facing errors: each maps to one line on stderr and its own exit code in the CLI."""


class BdecompError(Exception):
    """Base class. Anything raised as a BdecompError is the user's input, not a bug."""

    exit_code = 1


class InputFileError(BdecompError):
    """A file that is missing, unreadable or a directory where a file was expected."""

    exit_code = 3


class ModelError(BdecompError):
    """A model that is not ONNX, truncated, fails the checker or has unusable shapes."""

    exit_code = 4


class DecomposedModelError(ModelError):
    """A decomposed file whose custom nodes are malformed."""

    exit_code = 5


class ImageError(BdecompError):
    """An image that cannot be decoded or is out of the accepted limits."""

    exit_code = 6


class ConfigError(BdecompError):
    """Bad options or a bad --layer-config file."""

    exit_code = 2
