"""Finding images and their labels in a user's folder, for calibration and evaluation.

Only paths and labels are held in memory; pixels are loaded one image at a time (`iter_batches`).
Layouts understood (see `detect`):

* labels.tsv  — DIR/labels.tsv with lines `file<TAB>class index`; file relative to DIR or DIR/images.
* imagefolder — one sub-folder per class, named by ImageNet synset id (n01440764), integer class
                index, or CIFAR-10 class name.
* segmentation — DIR/test + DIR/testannot, or DIR with a sibling DIR+"annot" (camvid/val +
                camvid/valannot); label PNG pixel value = class index.
* images      — anything else: unlabelled images, recursively.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from bdecomp.errors import ConfigError, ImageError, InputFileError
from bdecomp.models.images import IMAGE_EXTENSIONS, open_image
from bdecomp.models.labels import CIFAR10_CLASSES, imagenet_synsets
from bdecomp.models.preprocess import Recipe, preprocess

T = TypeVar("T")
LABELS_FILE = "labels.tsv"
_SYNSET = re.compile(r"^n\d{8}$")
_INTEGER = re.compile(r"^\d+$")


@dataclass
class LabelledImage:
    """One sample: image path, class index (None when unlabelled) and, for segmentation, the mask."""

    path: Path
    label: int | None
    label_path: Path | None = None


def _existing_dir(directory: str | Path) -> Path:
    d = Path(directory)
    if not d.exists():
        raise InputFileError(f"{d}: no such directory")
    if not d.is_dir():
        raise InputFileError(f"{d}: not a directory")
    return d


def list_images(directory: str | Path) -> list[Path]:
    """All image files under `directory` (recursive), sorted by relative path.

    Matched by IMAGE_EXTENSIONS, case-insensitively; hidden files and folders (including macOS
    "._x.jpg" companions) are skipped. InputFileError if the folder is missing or has no images.
    """
    d = _existing_dir(directory)
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            p = Path(root) / name
            if p.is_file():
                found.append((p.relative_to(d).as_posix(), p))
    if not found:
        raise InputFileError(f"{d}: no images in this directory (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def spread(items: Sequence[T], limit: int | None) -> list[T]:
    """`limit` items evenly spaced over `items` (all of them if limit is None or ≥ len).

    Deterministic: element i of the result is items[floor((i + ½)·n / limit)]. Sorted data sets are
    usually sorted by class, so the first N would cover only a few classes.
    """
    n = len(items)
    if limit is None or limit >= n:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ConfigError(f"number of images must be a positive integer, got {limit!r}")
    return [items[((2 * i + 1) * n) // (2 * limit)] for i in range(int(limit))]


# ---------------------------------------------------------------- layout detection


def _folder_class(name: str) -> int | None:
    """Class index a folder name stands for (synset id, integer, CIFAR-10 name), else None.

    A synset id that is not an ImageNet-1k class raises ConfigError (it is clearly meant as one).
    """
    if _SYNSET.match(name):
        try:
            return _synset_index()[name]
        except KeyError:
            raise ConfigError(f"folder {name!r}: not an ImageNet-1k synset id") from None
    if _INTEGER.match(name):
        return int(name)
    lowered = name.lower()
    if lowered in CIFAR10_CLASSES:
        return CIFAR10_CLASSES.index(lowered)
    return None


_SYNSET_INDEX: dict[str, int] | None = None


def _synset_index() -> dict[str, int]:
    global _SYNSET_INDEX
    if _SYNSET_INDEX is None:
        _SYNSET_INDEX = {s: i for i, s in enumerate(imagenet_synsets())}
    return _SYNSET_INDEX


def _looks_like_class(name: str) -> bool:
    return bool(_SYNSET.match(name) or _INTEGER.match(name) or name.lower() in CIFAR10_CLASSES)


def segmentation_dirs(directory: str | Path) -> tuple[Path, Path] | None:
    """(image dir, label dir) if `directory` is a segmentation layout, else None.

    DIR/test + DIR/testannot (the reporting split) is preferred; otherwise DIR paired with its
    sibling DIR+"annot" (camvid/val → camvid/valannot).
    """
    d = Path(directory)
    if (d / "test").is_dir() and (d / "testannot").is_dir():
        return d / "test", d / "testannot"
    resolved = d.resolve()
    sibling = resolved.parent / (resolved.name + "annot")
    if resolved.name and sibling.is_dir():
        return d, sibling
    return None


def detect(directory: str | Path) -> str:
    """"labels.tsv" | "imagefolder" | "segmentation" | "images" (see the module docstring).

    Sub-folders make an ImageFolder only if every one is named like a class; a mix of class-like
    and other folder names is a ConfigError rather than a silent guess.
    """
    d = _existing_dir(directory)
    if (d / LABELS_FILE).is_file():
        return "labels.tsv"
    if segmentation_dirs(d) is not None:
        return "segmentation"
    subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    classy = [s for s in subdirs if _looks_like_class(s)]
    if subdirs and len(classy) == len(subdirs):
        return "imagefolder"
    if classy:
        other = next(s for s in subdirs if not _looks_like_class(s))
        raise ConfigError(
            f"{d}: unknown layout: folders {classy[0]!r} look like classes but {other!r} does not "
            "(class folders must be synset ids like n01440764, integer indices or CIFAR-10 names)"
        )
    return "images"


# ---------------------------------------------------------------- classification


def _read_labels_tsv(d: Path) -> list[LabelledImage]:
    tsv = d / LABELS_FILE
    try:
        text = tsv.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{tsv}: not UTF-8 text") from None
    except OSError as e:
        raise InputFileError(f"{tsv}: cannot read ({e.strerror or e})") from None
    out: list[LabelledImage] = []
    first_data_line = True
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(parts) < 2 or not parts[0].strip():
            raise ConfigError(f"{tsv}:{lineno}: expected 'file<TAB>class index', got {line.strip()!r}")
        name, field = parts[0].strip(), parts[1].strip()
        try:
            label = int(field)
        except ValueError:
            if first_data_line:  # a header such as "file<TAB>label"
                first_data_line = False
                continue
            raise ConfigError(f"{tsv}:{lineno}: class index {field!r} is not an integer") from None
        first_data_line = False
        if label < 0:
            raise ConfigError(f"{tsv}:{lineno}: class index {label} is negative")
        path = d / name
        if not path.is_file():
            alt = d / "images" / name
            if not alt.is_file():
                raise InputFileError(f"{tsv}:{lineno}: {name} not found in {d} or {d / 'images'}")
            path = alt
        out.append(LabelledImage(path, label))
    if not out:
        raise InputFileError(f"{tsv}: lists no images")
    return out


def _read_imagefolder(d: Path) -> list[LabelledImage]:
    out: list[LabelledImage] = []
    for sub in sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        label = _folder_class(sub.name)
        if label is None:
            raise ConfigError(f"{sub}: folder name is not a class (synset id, integer or CIFAR-10 name)")
        try:
            images = list_images(sub)
        except InputFileError:
            continue  # an empty class folder is not an error; an empty data set is (below)
        out.extend(LabelledImage(p, label) for p in images)
    if not out:
        raise InputFileError(f"{d}: no images in its class folders")
    return out


def classification_set(directory: str | Path) -> list[LabelledImage]:
    """Labelled images of a classification folder (labels.tsv or ImageFolder), in a stable order.

    A plain folder of images is accepted with label=None (enough for comparing two models);
    a segmentation folder is a ConfigError.
    """
    d = _existing_dir(directory)
    layout = detect(d)
    if layout == "labels.tsv":
        return _read_labels_tsv(d)
    if layout == "imagefolder":
        return _read_imagefolder(d)
    if layout == "segmentation":
        raise ConfigError(f"{d}: this is a segmentation data set (images + annotations), not classification")
    return [LabelledImage(p, None) for p in list_images(d)]


# ---------------------------------------------------------------- segmentation


def segmentation_set(image_dir: str | Path, label_dir: str | Path | None = None) -> list[LabelledImage]:
    """Images paired with label images of the same name (any extension) in `label_dir`.

    With label_dir None, `image_dir` must be a segmentation layout (see segmentation_dirs).
    Every image needs a label: a missing one is a ConfigError naming it.
    """
    if label_dir is None:
        dirs = segmentation_dirs(_existing_dir(image_dir))
        if dirs is None:
            raise ConfigError(f"{image_dir}: no label folder (expected test/ + testannot/ or a sibling {Path(image_dir).name}annot/)")
        image_dir, label_dir = dirs
    img_d, lab_d = _existing_dir(image_dir), _existing_dir(label_dir)
    by_rel: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in list_images(lab_d):
        by_rel[p.relative_to(lab_d).with_suffix("").as_posix()] = p
        by_stem.setdefault(p.stem, []).append(p)
    out: list[LabelledImage] = []
    for p in list_images(img_d):
        lab = by_rel.get(p.relative_to(img_d).with_suffix("").as_posix())
        if lab is None and len(by_stem.get(p.stem, [])) == 1:
            lab = by_stem[p.stem][0]
        if lab is None:
            raise ConfigError(f"{p}: no label image named {p.stem}.* in {lab_d}")
        out.append(LabelledImage(p, None, lab))
    return out


def load_label_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Class-index mask [H, W] (uint8, or int64 for 16/32-bit labels), nearest-resized to `size`.

    Palette PNGs keep their raw indices. An RGB label image is accepted only if it is grey
    (R = G = B); colour-coded masks must be converted to indices first.
    """
    p = Path(path)
    img = open_image(p)
    mode = img.mode
    if mode in ("L", "P", "1"):
        a = np.asarray(img if mode != "1" else img.convert("L"), dtype=np.uint8)
        if mode == "1":
            a = (a > 0).astype(np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0:
            raise ImageError(f"{p}: label image has negative values")
    elif mode in ("RGB", "RGBA", "LA"):
        c = np.asarray(img)
        c = c[..., :3] if mode != "LA" else c[..., :1]
        if not (c == c[..., :1]).all():
            raise ImageError(f"{p}: label image is colour-coded ({mode}); expected one class index per pixel")
        a = np.ascontiguousarray(c[..., 0], dtype=np.uint8)
    else:
        raise ImageError(f"{p}: unsupported label image mode {mode}")
    h, w = int(size[0]), int(size[1])
    if a.shape != (h, w):
        rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
        a = a[rows[:, None], cols[None, :]]
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------- streaming


def iter_batches(
    items: Iterable[LabelledImage | str | Path], recipe: Recipe, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, list[LabelledImage]]]:
    """Yield (float32 [B,3,H,W], the B samples) loading one image at a time, so memory stays
    bounded by one batch whatever the data set size."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    batch: list[np.ndarray] = []
    meta: list[LabelledImage] = []
    for it in items:
        sample = it if isinstance(it, LabelledImage) else LabelledImage(Path(it), None)
        batch.append(preprocess(sample.path, recipe))
        meta.append(sample)
        if len(batch) == batch_size:
            yield np.concatenate(batch, axis=0), meta
            batch, meta = [], []
    if batch:
        yield np.concatenate(batch, axis=0), meta
