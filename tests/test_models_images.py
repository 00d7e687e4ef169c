"""load_image: every PIL mode becomes 8-bit RGB; every bad file becomes a one-line, named error."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from bdecomp.errors import ImageError, InputFileError
from bdecomp.models import images
from bdecomp.models.images import IMAGE_EXTENSIONS, load_image, to_rgb


def rgb_array(path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    return a


def save(tmp_path, img: Image.Image, name: str, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


# ---------------------------------------------------------------- modes


def test_rgb_is_unchanged(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(rgb_array(save(tmp_path, Image.fromarray(a), "x.png")), a)


def test_greyscale_L(tmp_path):
    a = rgb_array(save(tmp_path, Image.new("L", (6, 4), 100), "l.png"))
    assert a.shape == (4, 6, 3) and np.all(a == 100)


def test_bilevel_1(tmp_path):
    img = Image.new("1", (4, 2), 0)
    img.putpixel((0, 0), 1)
    a = rgb_array(save(tmp_path, img, "b.png"))
    assert a[0, 0].tolist() == [255, 255, 255] and a[1, 1].tolist() == [0, 0, 0]


def test_palette_P(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert np.all(rgb_array(save(tmp_path, img, "p.png")) == (10, 20, 30))


def test_palette_with_transparency_composites_on_black(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 200, 200] + [0] * 759)
    img.putpixel((0, 0), 2)
    p = save(tmp_path, img, "pt.png", transparency=1)
    a = rgb_array(p)
    assert a[1, 1].tolist() == [0, 0, 0]  # transparent index → black
    assert a[0, 0].tolist() == [200, 200, 200]  # opaque index keeps its colour


def test_rgba_composites_alpha_on_black(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)])
    a = rgb_array(save(tmp_path, img, "a.png"))
    assert a[0, 0].tolist() == [200, 100, 50]
    assert a[0, 1].tolist() == [0, 0, 0]
    assert a[0, 2].tolist() == [100, 50, 25]


def test_la_composites_alpha_on_black(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putdata([(200, 255), (200, 0)])
    a = rgb_array(save(tmp_path, img, "la.png"))
    assert a[0, 0].tolist() == [200] * 3 and a[0, 1].tolist() == [0] * 3


def test_cmyk(tmp_path):
    a = rgb_array(save(tmp_path, Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "c.jpg"))
    assert np.all(a == 255)


@pytest.mark.parametrize("mode, name", [("I;16", "s.png"), ("I;16B", "s.tif"), ("I", "i.tif")])
def test_16_bit_scaled_down_not_clipped(tmp_path, mode, name):
    img = Image.new(mode, (3, 1))
    img.putdata([0, 40000, 65535])
    a = rgb_array(save(tmp_path, img, name))
    assert a[0, :, 0].tolist() == [0, 40000 >> 8, 255]


def test_mode_I_with_8_bit_range_is_kept():
    img = Image.new("I", (2, 1))
    img.putdata([7, 200])
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [7, 200]


def test_float_F_in_unit_range_is_scaled(tmp_path):
    img = Image.new("F", (2, 1))
    img.putdata([0.0, 0.5])
    a = rgb_array(save(tmp_path, img, "f.tif"))
    assert a[0, :, 0].tolist() == [0, 128]


def test_every_mode_gives_rgb_uint8_with_same_size():
    for mode in ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "HSV", "I", "I;16", "I;16B", "I;16L", "F", "La"]:
        out = to_rgb(Image.new(mode, (5, 3)))
        assert out.mode == "RGB" and out.size == (5, 3), mode


# ---------------------------------------------------------------- bad files


def assert_named(excinfo, path):
    msg = str(excinfo.value)
    assert path.name in msg and "\n" not in msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(InputFileError) as e:
        load_image(p)
    assert_named(e, p)


def test_directory(tmp_path):
    p = tmp_path / "dir.png"
    p.mkdir()
    with pytest.raises(InputFileError) as e:
        load_image(p)
    assert_named(e, p)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    p = save(tmp_path, Image.new("RGB", (2, 2)), "locked.png")
    p.chmod(0)
    try:
        with pytest.raises(InputFileError) as e:
            load_image(p)
        assert_named(e, p)
    finally:
        p.chmod(0o644)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


def test_not_an_image(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("hello, I am not a JPEG\n")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


@pytest.mark.parametrize("fmt, name", [("PNG", "t.png"), ("JPEG", "t.jpg")])
def test_truncated(tmp_path, fmt, name):
    p = save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), name)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


def test_corrupt_png_data(tmp_path):
    p = save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "c.png")
    data = bytearray(p.read_bytes())
    data[100:400] = bytes(300)  # zero the compressed stream (and break its CRC)
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


def _png(width: int, height: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_zero_by_zero_image(tmp_path):
    p = tmp_path / "zero.png"
    p.write_bytes(_png(0, 0))
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


def test_enormous_image_refused_before_decoding(tmp_path, monkeypatch):
    p = save(tmp_path, Image.new("RGB", (20, 20)), "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 399)

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match="too large") as e:
        load_image(p)
    assert_named(e, p)


def test_header_claiming_huge_size_is_refused(tmp_path):
    p = tmp_path / "claims.png"
    p.write_bytes(_png(100_000, 100_000))  # 10 Gpx in the header, no data
    with pytest.raises(ImageError, match="too large") as e:
        load_image(p)
    assert_named(e, p)


@pytest.mark.parametrize("pil_limit", [300, 100], ids=["bomb-warning", "bomb-error"])
def test_pil_decompression_bomb_becomes_image_error(tmp_path, monkeypatch, pil_limit):
    p = save(tmp_path, Image.new("RGB", (20, 20)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert_named(e, p)


def test_image_at_the_limit_is_accepted(tmp_path, monkeypatch):
    p = save(tmp_path, Image.new("RGB", (20, 20)), "ok.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 400)
    assert load_image(p).size == (20, 20)


def test_image_extensions_are_lower_case_with_dot():
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
