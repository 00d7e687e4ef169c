"""Data-set folders: image listing, even subsets, the three labelled layouts and label masks."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdecomp.errors import ConfigError, ImageError, InputFileError
from bdecomp.models.datasets import (
    LabelledImage,
    classification_set,
    detect,
    iter_batches,
    list_images,
    load_label_mask,
    segmentation_set,
    spread,
)
from bdecomp.models.preprocess import Recipe


def _shared() -> Path | None:
    env = os.environ.get("BDECOMP_SHARED")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    return p if p.is_dir() else None


SHARED = _shared()


def img(path: Path, colour=(10, 20, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------- list_images


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    img(tmp_path / "b" / "2.png")
    img(tmp_path / "a.JPG")
    img(tmp_path / "b" / "1.Jpeg")
    (tmp_path / "notes.txt").write_text("x")
    img(tmp_path / ".hidden" / "x.png")
    img(tmp_path / "._a.jpg")
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.JPG", "b/1.Jpeg", "b/2.png"]


def test_list_images_missing_dir(tmp_path):
    with pytest.raises(InputFileError, match="nope"):
        list_images(tmp_path / "nope")


def test_list_images_of_a_file(tmp_path):
    f = img(tmp_path / "a.png")
    with pytest.raises(InputFileError):
        list_images(f)


def test_list_images_empty_dir(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(InputFileError, match="no images"):
        list_images(tmp_path)


# ---------------------------------------------------------------- spread


def test_spread_is_evenly_spaced():
    assert spread(list(range(10)), 3) == [1, 5, 8]
    assert spread(list(range(100)), 4) == [12, 37, 62, 87]


def test_spread_covers_every_class_of_a_class_sorted_list():
    items = [(c, i) for c in range(10) for i in range(7)]  # sorted by class
    assert sorted({c for c, _ in spread(items, 10)}) == list(range(10))


def test_spread_is_deterministic_and_distinct():
    items = list(range(1000))
    a, b = spread(items, 37), spread(items, 37)
    assert a == b and len(set(a)) == 37 and a == sorted(a)


@pytest.mark.parametrize("limit", [None, 5, 50])
def test_spread_without_effective_limit_returns_everything(limit):
    assert spread(list("abcde"), limit) == list("abcde")


@pytest.mark.parametrize("limit", [0, -1])
def test_spread_rejects_non_positive_limit(limit):
    with pytest.raises(ConfigError):
        spread(list(range(10)), limit)


# ---------------------------------------------------------------- labels.tsv layout


def test_labels_tsv_with_images_subfolder(tmp_path):
    img(tmp_path / "images" / "a.png")
    img(tmp_path / "images" / "b.png")
    (tmp_path / "labels.tsv").write_text("a.png\t3\nb.png\t0\n")
    assert detect(tmp_path) == "labels.tsv"
    got = classification_set(tmp_path)
    assert [(p.path.name, p.label) for p in got] == [("a.png", 3), ("b.png", 0)]
    assert got[0].path == tmp_path / "images" / "a.png"


def test_labels_tsv_relative_to_dir_with_header_and_comments(tmp_path):
    img(tmp_path / "sub" / "a.png")
    (tmp_path / "labels.tsv").write_text("file\tlabel\n# comment\n\nsub/a.png\t7\n")
    got = classification_set(tmp_path)
    assert [(p.path, p.label) for p in got] == [(tmp_path / "sub" / "a.png", 7)]


@pytest.mark.parametrize("line", ["a.png\t1\nb.png\tseven\n", "a.png\t-1\n", "a.png\n"])
def test_labels_tsv_bad_lines(tmp_path, line):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    (tmp_path / "labels.tsv").write_text(line)
    with pytest.raises(ConfigError, match="labels.tsv"):
        classification_set(tmp_path)


def test_labels_tsv_missing_image(tmp_path):
    (tmp_path / "labels.tsv").write_text("gone.png\t1\n")
    with pytest.raises(InputFileError, match="gone.png"):
        classification_set(tmp_path)


# ---------------------------------------------------------------- ImageFolder layout


def test_imagefolder_by_synset(tmp_path):
    img(tmp_path / "n01443537" / "x.jpg")  # goldfish = 1
    img(tmp_path / "n01440764" / "y.jpg")  # tench = 0
    img(tmp_path / "n01440764" / "z.jpg")
    assert detect(tmp_path) == "imagefolder"
    got = [(p.path.name, p.label) for p in classification_set(tmp_path)]
    assert got == [("y.jpg", 0), ("z.jpg", 0), ("x.jpg", 1)]


def test_imagefolder_by_integer_index(tmp_path):
    img(tmp_path / "0" / "a.png")
    img(tmp_path / "12" / "b.png")
    assert {(p.path.name, p.label) for p in classification_set(tmp_path)} == {("a.png", 0), ("b.png", 12)}


def test_imagefolder_by_cifar_name(tmp_path):
    img(tmp_path / "truck" / "a.png")
    img(tmp_path / "airplane" / "b.png")
    assert {(p.path.name, p.label) for p in classification_set(tmp_path)} == {("a.png", 9), ("b.png", 0)}


def test_imagefolder_unknown_synset(tmp_path):
    img(tmp_path / "n99999999" / "a.png")
    with pytest.raises(ConfigError, match="n99999999"):
        classification_set(tmp_path)


def test_mixed_class_and_other_folders_is_an_error(tmp_path):
    img(tmp_path / "n01440764" / "a.png")
    img(tmp_path / "holiday" / "b.png")
    with pytest.raises(ConfigError, match="holiday"):
        classification_set(tmp_path)


def test_plain_folder_is_unlabelled(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "photos" / "b.png")
    assert detect(tmp_path) == "images"
    assert [(p.path.name, p.label) for p in classification_set(tmp_path)] == [("a.png", None), ("b.png", None)]


def test_detect_missing_dir(tmp_path):
    with pytest.raises(InputFileError):
        detect(tmp_path / "nope")


# ---------------------------------------------------------------- segmentation layout


def mask(path: Path, values: np.ndarray, palette: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = Image.fromarray(values.astype(np.uint8), "L")
    if palette:
        m = m.convert("P")
        m.putpalette([255 - i for i in range(256)] * 3)  # colours unrelated to the indices
    m.save(path)
    return path


def test_segmentation_test_and_testannot(tmp_path):
    img(tmp_path / "test" / "a.png")
    img(tmp_path / "test" / "b.jpg")
    mask(tmp_path / "testannot" / "a.png", np.zeros((6, 8)))
    mask(tmp_path / "testannot" / "b.png", np.ones((6, 8)))
    assert detect(tmp_path) == "segmentation"
    got = segmentation_set(tmp_path)
    assert [(p.path.name, p.label_path.name) for p in got] == [("a.png", "a.png"), ("b.jpg", "b.png")]


def test_segmentation_sibling_annot_folder(tmp_path):
    img(tmp_path / "val" / "a.png")
    mask(tmp_path / "valannot" / "a.png", np.zeros((6, 8)))
    assert detect(tmp_path / "val") == "segmentation"
    assert segmentation_set(tmp_path / "val")[0].label_path == tmp_path / "valannot" / "a.png"
    assert segmentation_set(tmp_path / "val", tmp_path / "valannot") == segmentation_set(tmp_path / "val")


def test_segmentation_missing_label(tmp_path):
    img(tmp_path / "test" / "a.png")
    img(tmp_path / "test" / "lonely.png")
    mask(tmp_path / "testannot" / "a.png", np.zeros((6, 8)))
    with pytest.raises(ConfigError, match="lonely"):
        segmentation_set(tmp_path)


def test_segmentation_folder_is_not_a_classification_set(tmp_path):
    img(tmp_path / "test" / "a.png")
    mask(tmp_path / "testannot" / "a.png", np.zeros((6, 8)))
    with pytest.raises(ConfigError):
        classification_set(tmp_path)


# ---------------------------------------------------------------- label masks


def test_palette_mask_keeps_raw_indices(tmp_path):
    v = np.arange(48).reshape(6, 8) % 12
    m = load_label_mask(mask(tmp_path / "m.png", v), (6, 8))
    assert m.shape == (6, 8) and np.array_equal(m, v)


def test_mask_resize_is_nearest(tmp_path):
    v = np.array([[0, 5], [11, 3]])
    m = load_label_mask(mask(tmp_path / "m.png", v, palette=False), (4, 6))
    assert m.shape == (4, 6)
    assert set(np.unique(m)) == {0, 3, 5, 11}
    assert m[0, 0] == 0 and m[0, 5] == 5 and m[3, 0] == 11 and m[3, 5] == 3


def test_colour_coded_mask_is_refused(tmp_path):
    p = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (128, 64, 128)).save(p)
    with pytest.raises(ImageError, match="rgb.png"):
        load_label_mask(p, (4, 4))


def test_16_bit_mask(tmp_path):
    p = tmp_path / "m16.png"
    m = Image.new("I;16", (3, 1))
    m.putdata([0, 300, 1000])
    m.save(p)
    assert load_label_mask(p, (1, 3)).tolist() == [[0, 300, 1000]]


# ---------------------------------------------------------------- streaming


def test_iter_batches_streams_in_batches(tmp_path):
    paths = [img(tmp_path / f"{i}.png", colour=(i, i, i)) for i in range(5)]
    batches = list(iter_batches([LabelledImage(p, i) for i, p in enumerate(paths)], Recipe(size=(4, 4)), 2))
    assert [b.shape for b, _ in batches] == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    assert [s.label for _, meta in batches for s in meta] == [0, 1, 2, 3, 4]
    assert batches[2][0][0, 0, 0, 0] == 4


# ---------------------------------------------------------------- the real shared data


@pytest.mark.skipif(SHARED is None, reason="shared data not present")
def test_real_layouts_are_detected():
    data = SHARED / "data"
    assert detect(data / "imagenet-val") == "labels.tsv"
    assert detect(data / "camvid") == "segmentation"
    assert detect(data / "camvid" / "val") == "segmentation"
    test = segmentation_set(data / "camvid")
    assert len(test) == len(list_images(data / "camvid" / "test"))
    assert all(s.path.name == s.label_path.name for s in test)
