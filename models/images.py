"""Safe image loading: any file a user points us at becomes an RGB PIL image or a one-line error.

Images come from users' folders, so they may be missing, corrupt, truncated, absurdly large or in
any PIL mode. Every failure becomes InputFileError (cannot read the file) or ImageError (read it,
but it is not a usable image), with the file name in the message.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bdecomp.errors import ImageError, InputFileError

#: File name endings treated as images when a directory is scanned (compare lower-cased).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)

#: Refuse images with more pixels than this before decoding them (64 Mpx ≈ 192 MB as RGB).
MAX_PIXELS: int = 64_000_000


def _check_file(p: Path) -> None:
    if not p.exists():
        raise InputFileError(f"{p}: no such file")
    if p.is_dir():
        raise InputFileError(f"{p}: is a directory, expected an image file")
    if not p.is_file():
        raise InputFileError(f"{p}: not a regular file")


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image in its own mode (no conversion), enforcing the pixel limit.

    The size is read from the header and checked before any pixel is decoded. Used directly for
    label masks, where the raw palette indices must be kept.
    """
    p = Path(path)
    _check_file(p)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        f = open(p, "rb")
    except OSError as e:
        raise InputFileError(f"{p}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            if p.stat().st_size == 0:
                raise ImageError(f"{p}: empty file")
            with warnings.catch_warnings():
                # PIL's plugins warn about damaged metadata ("Truncated File Read", bad EXIF, ...):
                # the pixels decide, and stderr stays one line. Its bomb check warns above
                # MAX_IMAGE_PIXELS; make that an error we convert.
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(f)
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageError(f"{p}: image has no pixels ({w}x{h})")
                if w * h > limit:
                    raise ImageError(f"{p}: image too large ({w}x{h} = {w * h} pixels, limit {limit})")
                img.load()
        except (ImageError, InputFileError):
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{p}: not a recognised image file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{p}: image too large (decompression bomb refused)") from None
        except MemoryError:
            raise ImageError(f"{p}: image too large to decode") from None
        except PermissionError as e:
            raise InputFileError(f"{p}: cannot read ({e.strerror or e})") from None
        except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, EOFError, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(f"{p}: corrupt or truncated image ({msg})") from None
    return img


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map integer/float pixel data of unknown range to 0..255 without clipping information away.

    Integer data that fits 0..255 is kept; data that fits 0..65535 is treated as 16-bit (>> 8);
    floats within [0, 1] are ×255; anything else is stretched min..max.
    """
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return (a >> 8).astype(np.uint8)
    return ((a - lo) * 255 // (hi - lo)).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    * Transparency (RGBA, LA, PA, P or RGB with a transparency key) is composited on black:
      transparent pixels become black instead of exposing whatever colour hides under alpha 0.
    * 16-bit greyscale (I;16, I;16B, I;16L) is reduced by >> 8; mode I and F are rescaled
      (see _scale_to_uint8), never clipped.
    * 1, L, P, CMYK, YCbCr, ... use PIL's conversion (CMYK without a colour profile).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    try:
        if mode in ("RGBa", "La"):  # premultiplied alpha: the colour is already "on black"
            a = np.asarray(img)
            return Image.fromarray(np.ascontiguousarray(a[..., :3] if mode == "RGBa" else np.repeat(a[..., :1], 3, 2)), "RGB")
        if mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            return _composite_on_black(img)
        if mode.startswith("I;16") or mode in ("I", "F"):
            g = _scale_to_uint8(np.asarray(img))
            return Image.fromarray(g, "L").convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        name = getattr(img, "filename", "") or "image"
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({e})") from None


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Load any image file as 8-bit RGB (first frame of animations; EXIF rotation is not applied,
    matching how the reference models were evaluated)."""
    img = open_image(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's note on palette transparency in bytes
            return to_rgb(img)
    except ImageError as e:
        raise ImageError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
