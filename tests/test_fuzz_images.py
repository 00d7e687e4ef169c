"""Hostile image files: whatever a user's folder holds, load_image gives an 8-bit RGB image or
raises ImageError / InputFileError, and preprocessing turns every RGB image into a finite
float32 [1, 3, H, W] tensor. Hypothesis draws the files (random bytes, truncated and bit-flipped
PNG/JPEG/BMP/GIF/TIFF/WebP, every PIL mode, odd sizes, headers claiming huge dimensions)."""
from __future__ import annotations

import collections
import faulthandler
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bdecomp.errors import ImageError, InputFileError  # noqa: E402
from bdecomp.models import images as images_mod  # noqa: E402
from bdecomp.models import load_image, preprocess  # noqa: E402
from bdecomp.models.preprocess import Recipe  # noqa: E402
from conftest import write_to_terminal_report  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
COUNTS: collections.Counter = collections.Counter()
RECIPE = Recipe(size=(16, 16))

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "La", "RGBa",
         "RGBX", "I;16", "I;16B", "I;16L", "I;16N"]
FORMATS = ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"]


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    write_to_terminal_report(request, lambda: ["", "fuzz_images: " + ", ".join(
        f"{k} {v}" for k, v in sorted(COUNTS.items()))] if COUNTS else [])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_images")


def _check(path: Path, kind: str) -> None:
    """load_image → RGB or ImageError/InputFileError; RGB → preprocess → finite float32."""
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        with warnings.catch_warnings(record=True) as caught:  # a warning would be a 2nd stderr line
            warnings.simplefilter("always")
            try:
                img = load_image(path)
            except (ImageError, InputFileError) as e:
                msg = str(e)
                assert "\n" not in msg and path.name in msg, msg
                assert not caught, [str(w.message) for w in caught]
                COUNTS[f"{kind}:rejected"] += 1
                return
            assert img.mode == "RGB", img.mode
            assert img.size[0] >= 1 and img.size[1] >= 1
            x = preprocess(img, RECIPE)
        assert not caught, [str(w.message) for w in caught]
        assert x.dtype == np.float32 and x.shape == (1, 3, 16, 16), x.shape
        assert np.all(np.isfinite(x))
        COUNTS[f"{kind}:ok"] += 1
    finally:
        faulthandler.cancel_dump_traceback_later()


def _pixels(draw, mode: str, w: int, h: int) -> Image.Image:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        return Image.frombytes(mode, (w, h), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (h, w), dtype=np.int32), "I")
    if mode == "F":
        a = rng.choice(np.array([0.0, 1.0, -5.0, 1e30, np.nan, np.inf, 0.5], np.float32), (h, w))
        return Image.fromarray(a.astype(np.float32), "F")
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=draw(st.integers(2, 256)))
        if draw(st.booleans()):
            img.info["transparency"] = draw(st.integers(0, 255))
        return img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        base = rgb.convert({"RGBA": "RGBA", "LA": "LA", "PA": "P", "La": "L", "RGBa": "RGB"}[mode])
        if mode == "PA":
            base = base.convert("PA")
        elif mode in ("La", "RGBa"):
            base = base.convert("LA" if mode == "La" else "RGBA").convert(mode)
        return base
    return rgb.convert(mode)


def _encode(img: Image.Image, fmt: str) -> bytes | None:
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # this format cannot hold this mode: nothing to test
    return buf.getvalue()


@settings(max_examples=250, **SETTINGS)
@given(data=st.data())
def test_valid_images_in_every_mode_become_rgb(workdir, data):
    mode = data.draw(st.sampled_from(MODES))
    w, h = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    img = _pixels(data.draw, mode, w, h)
    fmt = data.draw(st.sampled_from(FORMATS))
    raw = _encode(img, fmt)
    if raw is None:
        # the in-memory image itself must still convert (e.g. modes no encoder writes)
        rgb = images_mod.to_rgb(img)
        assert rgb.mode == "RGB" and rgb.size == (w, h)
        COUNTS["mode-only:ok"] += 1
        return
    p = workdir / f"valid.{fmt.lower()}"
    p.write_bytes(raw)
    _check(p, f"valid-{fmt}")


@settings(max_examples=250, **SETTINGS)
@given(data=st.data())
def test_truncated_and_flipped_images_are_rgb_or_image_error(workdir, data):
    mode = data.draw(st.sampled_from(["RGB", "L", "P", "RGBA", "CMYK", "I;16", "1"]))
    img = _pixels(data.draw, mode, data.draw(st.integers(1, 24)), data.draw(st.integers(1, 24)))
    fmt = data.draw(st.sampled_from(FORMATS))
    raw = _encode(img, fmt) or _encode(img.convert("RGB"), fmt)
    b = bytearray(raw)
    kind = data.draw(st.sampled_from(["truncate", "flip", "zero-tail", "garbage-tail"]))
    if kind == "truncate":
        b = b[: data.draw(st.integers(0, len(b) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 16))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "zero-tail":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i:] = bytes(len(b) - i)
    else:
        b += data.draw(st.binary(min_size=1, max_size=64))
    p = workdir / f"broken.{fmt.lower()}"
    p.write_bytes(bytes(b))
    _check(p, f"{kind}-{fmt}")


@settings(max_examples=150, **SETTINGS)
@given(blob=st.binary(max_size=512), ext=st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".tif", ".webp", ".ppm", ""]))
def test_random_bytes_are_rgb_or_image_error(workdir, blob, ext):
    p = workdir / f"random{ext}"
    p.write_bytes(blob)
    _check(p, "random-bytes")


def _png_header(w: int, h: int, bit_depth: int = 8, color: int = 2) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bmp_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 16, 2835, 2835, 0, 0) + b"\0" * 16)


def _gif_header(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
            + b"\x02\x02\x44\x01\x00;")


@settings(max_examples=120, **SETTINGS)
@given(w=st.sampled_from([0, 1, 2, 16, 1 << 14, 1 << 16, (1 << 31) - 1, (1 << 32) - 1, 100_000]),
       h=st.sampled_from([0, 1, 3, 1 << 14, 1 << 16, (1 << 31) - 1, 100_000]),
       fmt=st.sampled_from(["png", "bmp", "gif"]))
def test_headers_claiming_huge_or_zero_sizes_are_refused_before_decoding(workdir, w, h, fmt):
    if fmt == "gif":
        w, h = min(w, 65535), min(h, 65535)
    elif fmt == "bmp":
        w, h = min(w, 2**31 - 1), min(h, 2**31 - 1)
    raw = {"png": _png_header, "bmp": _bmp_header, "gif": _gif_header}[fmt](w, h)
    p = workdir / f"header.{fmt}"
    p.write_bytes(raw)
    _check(p, f"header-{fmt}")
    if w * h > images_mod.MAX_PIXELS or w == 0 or h == 0:
        with pytest.raises((ImageError, InputFileError)):
            load_image(p)


def test_zero_sized_images_that_pil_can_write_are_refused(workdir):
    for fmt in ("PNG", "TIFF", "BMP", "PPM"):
        raw = _encode(Image.new("RGB", (0, 0)), fmt) or _encode(Image.new("RGB", (5, 0)), fmt)
        if raw is None:
            continue
        p = workdir / f"zero.{fmt.lower()}"
        p.write_bytes(raw)
        with pytest.raises((ImageError, InputFileError)):
            load_image(p)
        COUNTS["zero-size:rejected"] += 1


def test_empty_file_directory_and_missing_file(workdir):
    (workdir / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(workdir / "empty.png")
    with pytest.raises(InputFileError, match="directory"):
        load_image(workdir)
    with pytest.raises(InputFileError, match="no such file"):
        load_image(workdir / "missing.png")


def test_enough_image_cases_were_tried():
    total = sum(v for k, v in COUNTS.items() if ":" in k)
    if total == 0:
        pytest.skip("run together with the fuzz tests of this file")
    assert total >= 700, dict(COUNTS)
