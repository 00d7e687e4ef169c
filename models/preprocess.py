"""Image → network-input tensor, described by a small serialisable `Recipe`.

A model only scores well when it is fed exactly the pixels it was trained on (channel order,
value range, resize policy), so the recipe is data: it is stored next to a decomposed model
(`to_json`) and can be rebuilt from CLI flags (`recipe_with_overrides`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from bdecomp.errors import ConfigError
from bdecomp.models.images import load_image, to_rgb

RESIZE_MODES = ("direct", "short", "none")
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
_MAX_SIDE = 16384  # a network input larger than this is a typo, not a model


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    value = int(value)
    if not 1 <= value <= _MAX_SIDE:
        raise ConfigError(f"{what} must be between 1 and {_MAX_SIDE}, got {value}")
    return value


def _finite_triple(value: Any, what: str, nonzero: bool = False) -> tuple[float, float, float]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ConfigError(f"{what} must be three numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{what} must be three numbers, got {value!r}")
        f = float(v)
        if not math.isfinite(f) or (nonzero and f == 0.0):
            raise ConfigError(f"{what} values must be finite{' and non-zero' if nonzero else ''}, got {value!r}")
        out.append(f)
    return (out[0], out[1], out[2])


@dataclass(frozen=True)
class Recipe:
    """How to turn an RGB image into the float32 [1,3,H,W] tensor a model expects ([1,H,W,3] with
    channels_last, as TensorFlow / Keras exports take it; one channel, the image's luminance,
    with grayscale: mean[0] and std[0] apply to it).

    Order of operations: resize (per `resize`) → optional RGB→BGR swap → x / scale →
    (x − mean) / std, with mean/std given in the channel order actually fed (after the swap).
    Invalid values raise ConfigError at construction, so a bad recipe never reaches a model.
    """

    size: tuple[int, int]
    resize: str = "direct"
    resize_to: int | None = None
    interpolation: str = "bilinear"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bgr: bool = False
    channels_last: bool = False
    grayscale: bool = False

    def __post_init__(self) -> None:
        size = self.size.tolist() if isinstance(self.size, np.ndarray) else self.size
        if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
            raise ConfigError(f"recipe size must be (height, width), got {size!r}")
        object.__setattr__(self, "size", (_positive_int(size[0], "height"), _positive_int(size[1], "width")))
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.resize_to is not None:
            object.__setattr__(self, "resize_to", _positive_int(self.resize_to, "resize_to"))
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.integer, np.floating)):
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", _finite_triple(self.mean, "mean"))
        object.__setattr__(self, "std", _finite_triple(self.std, "std", nonzero=True))
        if not isinstance(self.bgr, (bool, np.bool_)):
            raise ConfigError(f"bgr must be true or false, got {self.bgr!r}")
        object.__setattr__(self, "bgr", bool(self.bgr))
        for flag in ("channels_last", "grayscale"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
            object.__setattr__(self, flag, bool(getattr(self, flag)))

    def to_json(self) -> str:
        """Compact JSON, stable key order, so it can be embedded in model metadata."""
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> "Recipe":
        """Inverse of `to_json`; anything malformed (bad JSON, unknown keys, bad values) is a ConfigError."""
        try:
            d = json.loads(s)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preprocessing recipe is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("preprocessing recipe must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"preprocessing recipe has unknown keys: {', '.join(unknown)}")
        if "size" not in d:
            raise ConfigError("preprocessing recipe has no size")
        try:
            return cls(**d)
        except TypeError as e:  # e.g. a list where a scalar belongs
            raise ConfigError(f"bad preprocessing recipe: {e}") from None


def _resize_geometry(w: int, h: int, recipe: Recipe) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Return ((new_w, new_h), crop box or None) for an input of w×h pixels."""
    out_h, out_w = recipe.size
    if recipe.resize == "none" and (h, w) == (out_h, out_w):
        return (w, h), None
    if recipe.resize in ("direct", "none"):
        return (out_w, out_h), None
    # "short": torchvision Resize(int) + CenterCrop semantics (long side truncated, crop offset rounded).
    short_target = recipe.resize_to if recipe.resize_to is not None else max(out_h, out_w)
    if w <= h:
        new_w, new_h = short_target, int(short_target * h / w)
    else:
        new_w, new_h = int(short_target * w / h), short_target
    if new_w < out_w or new_h < out_h:
        # A very elongated image (or a crop larger than resize_to): grow until the crop fits
        # rather than padding with pixels the network never saw.
        f = max(out_w / w, out_h / h)
        new_w, new_h = max(out_w, math.ceil(w * f)), max(out_h, math.ceil(h * f))
    left = int(round((new_w - out_w) / 2.0))
    top = int(round((new_h - out_h) / 2.0))
    return (new_w, new_h), (left, top, left + out_w, top + out_h)


def resize_image(image: Image.Image, recipe: Recipe) -> Image.Image:
    """Apply the recipe's geometry only (useful for showing what the network saw)."""
    (new_w, new_h), box = _resize_geometry(image.width, image.height, recipe)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), INTERPOLATIONS[recipe.interpolation])
    if box is not None:
        image = image.crop(box)
    return image


def preprocess(image: Image.Image | str | Path, recipe: Recipe) -> np.ndarray:
    """Load (if given a path), convert to RGB, resize and normalise → float32 [1,3,H,W] (or
    [1,H,W,3] for a channels_last recipe), C-contiguous.

    Arithmetic is done in float64 and rounded once to float32, so constant images give exactly
    float32((v / scale − mean) / std).
    """
    img = load_image(image) if isinstance(image, (str, Path)) else to_rgb(image)
    img = resize_image(img, recipe)
    if recipe.grayscale:
        x = np.asarray(img.convert("L"), dtype=np.float64)[..., None]  # [H, W, 1]
        mean, std = recipe.mean[:1], recipe.std[:1]
    else:
        x = np.asarray(img, dtype=np.float64)  # [H, W, 3]
        mean, std = recipe.mean, recipe.std
        if recipe.bgr:
            x = x[..., ::-1]
    x = x / recipe.scale
    x = (x - np.asarray(mean)) / np.asarray(std)
    return np.ascontiguousarray((x if recipe.channels_last else x.transpose(2, 0, 1))[None], dtype=np.float32)


TORCHVISION = Recipe(
    size=(224, 224),
    resize="short",
    resize_to=256,
    interpolation="bilinear",
    scale=255.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


# ---------------------------------------------------------------- CLI overrides


def parse_size(value: str | int | Sequence[int]) -> tuple[int, int]:
    """'224' → (224, 224); '224,320', '224x320', '224X320' → (224, 320) as (H, W)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = _positive_int(value, "size")
        return (v, v)
    if isinstance(value, str):
        text = value.strip().lower().replace("x", ",")
        parts = [p.strip() for p in text.split(",")]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"bad size {value!r}: expected H, H,W or HxW") from None
    elif isinstance(value, Sequence):
        nums = list(value)
    else:
        raise ConfigError(f"bad size {value!r}: expected H, H,W or HxW")
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ConfigError(f"bad size {value!r}: expected H, H,W or HxW")
    return (_positive_int(nums[0], "height"), _positive_int(nums[1], "width"))


def parse_triple(value: str | float | Sequence[float], what: str = "value") -> tuple[float, float, float]:
    """'a,b,c' → (a, b, c); a single number is used for all three channels."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        nums: list[Any] = [value] * 3
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",")]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"bad {what} {value!r}: expected one or three numbers like 0.485,0.456,0.406") from None
    elif isinstance(value, Sequence):
        nums = list(value)
    else:
        raise ConfigError(f"bad {what} {value!r}: expected one or three numbers")
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3:
        raise ConfigError(f"bad {what} {value!r}: expected one or three numbers")
    return _finite_triple(nums, what)


def _parse_scale(value: str | float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad scale {value!r}: expected a positive number") from None
    if not math.isfinite(f) or f <= 0:
        raise ConfigError(f"bad scale {value!r}: expected a positive number")
    return f


def _parse_int(value: str | int, what: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"bad {what} {value!r}: expected a positive integer") from None
    return _positive_int(value, what)


def recipe_with_overrides(
    base: Recipe | None,
    *,
    size: str | int | Sequence[int] | None = None,
    resize: str | int | None = None,
    crop: str | int | Sequence[int] | None = None,
    mean: str | float | Sequence[float] | None = None,
    std: str | float | Sequence[float] | None = None,
    scale: str | float | None = None,
    bgr: bool | None = None,
    channels_last: bool | None = None,
    grayscale: bool | None = None,
) -> Recipe:
    """Apply CLI flags to a base recipe (TORCHVISION when the model is unknown).

    * size (--size H[,W]): network input; squash the whole image to it ("direct"), unless
      --resize is also given.
    * resize (--resize N): short side to N, then centre-crop to the size/crop.
    * crop (--crop H[,W]): centre crop to this size after a short-side resize (to --resize, the
      base's resize_to, or the crop's larger side). --size and --crop together must agree.
    * mean/std (--mean/--std a,b,c) in the order fed; scale (--scale F); bgr (--bgr);
      channels_last (--channels-last / --channels-first): feed [1,H,W,3]; grayscale (--grayscale /
      --rgb): feed one luminance channel.
    Options left as None keep the base's value.
    """
    r = base if base is not None else TORCHVISION
    changes: dict[str, Any] = {}
    size_t = parse_size(size) if size is not None else None
    crop_t = parse_size(crop) if crop is not None else None
    resize_n = _parse_int(resize, "resize") if resize is not None else None
    if size_t is not None and crop_t is not None and size_t != crop_t:
        raise ConfigError(f"--size {size_t[0]}x{size_t[1]} and --crop {crop_t[0]}x{crop_t[1]} disagree")
    if crop_t is not None:
        changes.update(size=crop_t, resize="short", resize_to=resize_n or r.resize_to or max(crop_t))
    elif resize_n is not None:
        changes.update(resize="short", resize_to=resize_n)
        if size_t is not None:
            changes["size"] = size_t
    elif size_t is not None:
        changes.update(size=size_t, resize="direct", resize_to=None)
    if mean is not None:
        changes["mean"] = parse_triple(mean, "mean")
    if std is not None:
        s = parse_triple(std, "std")
        if 0.0 in s:
            raise ConfigError(f"bad std {std!r}: values must be non-zero")
        changes["std"] = s
    if scale is not None:
        changes["scale"] = _parse_scale(scale)
    if bgr is not None:
        changes["bgr"] = bool(bgr)
    if channels_last is not None:
        changes["channels_last"] = bool(channels_last)
    if grayscale is not None:
        changes["grayscale"] = bool(grayscale)
    return replace(r, **changes) if changes else r
