"""Preprocessing recipes: the numbers a network receives, the resize geometry, and CLI overrides."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bdecomp.errors import ConfigError
from bdecomp.models.preprocess import (
    TORCHVISION,
    Recipe,
    _resize_geometry,
    parse_size,
    parse_triple,
    preprocess,
    recipe_with_overrides,
    resize_image,
)
from bdecomp.models.registry import (
    CIFAR_CAFFE_RECIPE,
    CIFAR_RESNET_RECIPE,
    ESPNET_RECIPE,
    MOBILENET_RECIPE,
    SQUEEZENET_RECIPE,
)

RGB = (200, 100, 50)


def constant(size=(40, 30), colour=RGB) -> Image.Image:
    return Image.new("RGB", size, colour)


def expected(colour, recipe: Recipe) -> np.ndarray:
    c = np.array(colour[::-1] if recipe.bgr else colour, dtype=np.float64)
    return ((c / recipe.scale - np.array(recipe.mean)) / np.array(recipe.std)).astype(np.float32)


# ---------------------------------------------------------------- values


def test_output_is_float32_nchw_c_contiguous():
    x = preprocess(constant(), TORCHVISION)
    assert x.shape == (1, 3, 224, 224)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous


@pytest.mark.parametrize(
    "recipe",
    [TORCHVISION, SQUEEZENET_RECIPE, MOBILENET_RECIPE, ESPNET_RECIPE, CIFAR_RESNET_RECIPE, CIFAR_CAFFE_RECIPE],
    ids=["torchvision", "squeezenet", "mobilenet", "espnet", "cifar-resnet", "cifar-caffe"],
)
def test_constant_image_gives_exact_normalised_value_per_channel(recipe):
    x = preprocess(constant(), recipe)
    want = expected(RGB, recipe)
    for c in range(3):
        assert np.all(x[0, c] == want[c])


def test_bgr_swaps_channels():
    rgb = Recipe(size=(8, 8))
    bgr = Recipe(size=(8, 8), bgr=True)
    a, b = preprocess(constant(), rgb), preprocess(constant(), bgr)
    assert np.array_equal(a[0, ::-1], b[0])
    assert b[0, 0, 0, 0] == 50 and b[0, 2, 0, 0] == 200


def test_channels_last_recipe_gives_the_same_values_as_nhwc():
    nchw = preprocess(constant(colour=(10, 20, 30)), Recipe(size=(6, 5), mean=(1, 2, 3)))
    nhwc = preprocess(constant(colour=(10, 20, 30)), Recipe(size=(6, 5), mean=(1, 2, 3), channels_last=True))
    assert nhwc.shape == (1, 6, 5, 3) and nhwc.flags.c_contiguous
    assert np.array_equal(nhwc, nchw.transpose(0, 2, 3, 1))


def test_grayscale_recipe_feeds_one_luminance_channel_with_the_first_mean_and_std():
    r = Recipe(size=(4, 4), grayscale=True, mean=(10, 0, 0), std=(2, 1, 1))
    x = preprocess(constant(colour=(200, 100, 50)), r)
    luminance = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    assert x.shape == (1, 1, 4, 4) and np.all(x == np.float32((luminance - 10) / 2))


def test_old_recipes_without_channels_last_read_as_channels_first():
    assert Recipe.from_json('{"size": [8, 8]}').channels_last is False


def test_mean_is_applied_in_fed_order_after_bgr_swap():
    r = Recipe(size=(4, 4), bgr=True, mean=(1, 2, 3))
    x = preprocess(constant(colour=(10, 20, 30)), r)
    assert x[0, :, 0, 0].tolist() == [30 - 1, 20 - 2, 10 - 3]


def test_squeezenet_recipe_is_rgb_0_255_minus_mean_227_bicubic():
    r = SQUEEZENET_RECIPE
    assert (r.size, r.resize, r.interpolation, r.scale, r.bgr) == ((227, 227), "direct", "bicubic", 1.0, False)
    x = preprocess(constant(colour=(123, 117, 104)), r)
    assert np.all(x == 0)


def test_mobilenet_recipe_maps_0_255_to_minus1_plus1():
    lo = preprocess(constant(colour=(0, 0, 0)), MOBILENET_RECIPE)
    hi = preprocess(constant(colour=(255, 255, 255)), MOBILENET_RECIPE)
    assert np.all(lo == -1) and np.all(hi == 1)


def test_espnet_recipe_matches_manifest_formula():
    x = preprocess(constant(size=(480, 360)), ESPNET_RECIPE)
    bgr = np.array(RGB[::-1], dtype=np.float64)
    want = ((bgr - [110.331, 108.409, 105.033]) / [72.126, 72.691, 69.904]) / 255
    assert x.shape == (1, 3, 360, 480)
    np.testing.assert_allclose(x[0, :, 0, 0], want, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    colour=st.tuples(*[st.integers(0, 255)] * 3),
    scale=st.sampled_from([1.0, 255.0, 127.5]),
    mean=st.tuples(*[st.floats(-300, 300)] * 3),
    std=st.tuples(*[st.floats(0.01, 1e4)] * 3),
    bgr=st.booleans(),
)
def test_any_recipe_gives_exact_formula_on_constant_image(colour, scale, mean, std, bgr):
    r = Recipe(size=(3, 5), scale=scale, mean=mean, std=std, bgr=bgr)
    x = preprocess(constant(size=(7, 4), colour=colour), r)
    assert np.array_equal(x[0, :, 1, 1], expected(colour, r))


# ---------------------------------------------------------------- geometry


def test_short_side_resize_then_centre_crop():
    # 600x200: red | green (400 px) | blue. Short side 256 → 768x256; the centred 224 crop is all green.
    img = Image.new("RGB", (600, 200), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 100, 200))
    img.paste((0, 0, 255), (500, 0, 600, 200))
    out = np.asarray(resize_image(img, TORCHVISION))
    assert out.shape == (224, 224, 3)
    assert np.all(out == (0, 255, 0))


def test_direct_resize_squashes_whole_image():
    img = Image.new("RGB", (600, 200), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, 100, 200))
    out = np.asarray(resize_image(img, Recipe(size=(224, 224))))
    assert out.shape == (224, 224, 3)
    assert tuple(out[100, 0]) == (255, 0, 0)


def test_short_resize_follows_torchvision_sizes():
    # torchvision Resize(256) on 400x300 → 341x256 (long side truncated); CenterCrop(224) offsets
    # round((341-224)/2) = 58 and round((256-224)/2) = 16.
    assert _resize_geometry(400, 300, TORCHVISION) == ((341, 256), (58, 16, 282, 240))
    assert _resize_geometry(300, 400, TORCHVISION) == ((256, 341), (16, 58, 240, 282))


def test_short_resize_of_very_elongated_image_still_fills_crop():
    out = resize_image(constant(size=(2000, 10)), Recipe(size=(32, 64), resize="short", resize_to=32))
    assert out.size == (64, 32)


def test_resize_none_keeps_pixels_when_size_matches():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    x = preprocess(Image.fromarray(a), Recipe(size=(6, 9), resize="none"))
    assert np.array_equal(x[0].transpose(1, 2, 0), a)


def test_resize_none_falls_back_to_direct():
    x = preprocess(constant(size=(50, 20)), Recipe(size=(6, 9), resize="none"))
    assert x.shape == (1, 3, 6, 9)


def test_preprocess_accepts_a_path(tmp_path):
    p = tmp_path / "c.png"
    constant().save(p)
    assert np.array_equal(preprocess(p, TORCHVISION), preprocess(str(p), TORCHVISION))


def test_preprocess_converts_non_rgb_images():
    x = preprocess(Image.new("L", (10, 10), 77), Recipe(size=(4, 4)))
    assert np.all(x == 77)


# ---------------------------------------------------------------- serialisation and validation


@pytest.mark.parametrize("recipe", [TORCHVISION, ESPNET_RECIPE, SQUEEZENET_RECIPE, Recipe(size=(1, 2), resize="none"),
                                    Recipe(size=(3, 4), channels_last=True), Recipe(size=(3, 4), grayscale=True)])
def test_json_round_trip(recipe):
    assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        "{}",
        '{"size": [224]}',
        '{"size": [0, 224]}',
        '{"size": "224"}',
        '{"size": [224, 224], "resize": "zoom"}',
        '{"size": [224, 224], "interpolation": "lanczos9"}',
        '{"size": [224, 224], "std": [1, 0, 1]}',
        '{"size": [224, 224], "mean": [1, 2]}',
        '{"size": [224, 224], "scale": -1}',
        '{"size": [224, 224], "scale": NaN}',
        '{"size": [224, 224], "bgr": "yes"}',
        '{"size": [224, 224], "channels_last": 1}',
        '{"size": [224, 224], "grayscale": "no"}',
        '{"size": [224, 224], "colour": 1}',
        '{"size": [224, 224], "resize_to": 2.5}',
    ],
)
def test_from_json_rejects_garbage(text):
    with pytest.raises(ConfigError):
        Recipe.from_json(text)


def test_recipe_is_frozen_and_normalised():
    r = Recipe(size=[32, 32], mean=[1, 2, 3])
    assert r.size == (32, 32) and r.mean == (1.0, 2.0, 3.0)
    with pytest.raises(Exception):
        r.size = (1, 1)  # type: ignore[misc]


# ---------------------------------------------------------------- CLI overrides


@pytest.mark.parametrize(
    "text, want", [("224", (224, 224)), ("224,320", (224, 320)), ("224x320", (224, 320)), (" 32X64 ", (32, 64)), (48, (48, 48))]
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "a", "0", "-3", "1,2,3", "224x", "1e9"])
def test_parse_size_rejects_bad_values(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_parse_triple():
    assert parse_triple("0.485, 0.456,0.406") == (0.485, 0.456, 0.406)
    assert parse_triple("127.5") == (127.5, 127.5, 127.5)


@pytest.mark.parametrize("text", ["", "1,2", "a,b,c", "1,2,3,4", "nan,1,1", "inf"])
def test_parse_triple_rejects_bad_values(text):
    with pytest.raises(ConfigError):
        parse_triple(text)


def test_overrides_default_to_torchvision():
    assert recipe_with_overrides(None) == TORCHVISION


def test_size_override_means_direct_resize():
    r = recipe_with_overrides(TORCHVISION, size="32")
    assert (r.size, r.resize, r.resize_to) == ((32, 32), "direct", None)


def test_resize_and_crop_overrides_mean_short_side_then_crop():
    r = recipe_with_overrides(SQUEEZENET_RECIPE, resize="256", crop="224")
    assert (r.size, r.resize, r.resize_to) == ((224, 224), "short", 256)
    assert r.mean == SQUEEZENET_RECIPE.mean


def test_value_overrides():
    r = recipe_with_overrides(TORCHVISION, mean="1,2,3", std="4", scale="2", bgr=True)
    assert (r.mean, r.std, r.scale, r.bgr) == ((1, 2, 3), (4, 4, 4), 2.0, True)
    assert r.size == TORCHVISION.size


@pytest.mark.parametrize(
    "kwargs",
    [{"size": "224", "crop": "200"}, {"std": "0"}, {"std": "1,0,1"}, {"scale": "0"}, {"scale": "x"}, {"resize": "-5"}, {"mean": "1,2"}],
)
def test_bad_overrides_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        recipe_with_overrides(TORCHVISION, **kwargs)
