"""The real pretrained models in ../shared keep their accuracy after conversion.

Calibration and measurement never share images: SqueezeNet calibrates on imagenet-calib and is
measured on imagenet-val; ResNet-20 calibrates on every 10th CIFAR-10 test image and is measured
on 500 others.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import bdecomp
from bdecomp.models import datasets, registry

SHARED = Path(os.environ.get("BDECOMP_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
pytestmark = pytest.mark.slow


def _need(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def _top1(model, items, recipe) -> np.ndarray:
    return np.array([int(model.run(x)[0].reshape(-1).argmax())
                     for x, _ in datasets.iter_batches(items, recipe, batch_size=1)])


@pytest.fixture(scope="module")
def squeezenet_k8q8(tmp_path_factory):
    src = _need("models", "squeezenet1.1-imagenet.onnx")
    calib = _need("data", "imagenet-calib", "images")
    out = tmp_path_factory.mktemp("sq") / "squeezenet.bd.onnx"
    bdecomp.convert(src, out, bases=8, act_bits=8, calib=calib, calib_limit=128, progress=False)
    return src, out


def test_squeezenet_k8_q8_keeps_top1_within_1p5_points_and_agrees_on_90_percent(squeezenet_k8q8):
    src, out = squeezenet_k8q8
    items = datasets.classification_set(_need("data", "imagenet-val"))[:200]
    recipe = registry.identify(src).recipe
    labels = np.array([it.label for it in items])
    original = _top1(bdecomp.load(src), items, recipe)
    decomposed = _top1(bdecomp.load(out), items, recipe)
    drop = 100 * ((original == labels).mean() - (decomposed == labels).mean())
    agreement = (original == decomposed).mean()
    assert drop <= 1.5, f"top-1 drop {drop:.1f} points"
    assert agreement >= 0.90, f"top-1 agreement {agreement:.1%}"


def test_squeezenet_decomposed_file_is_under_30_percent_of_the_original(squeezenet_k8q8):
    src, out = squeezenet_k8q8
    assert out.stat().st_size < 0.30 * src.stat().st_size


def test_squeezenet_native_and_onnxruntime_backends_agree(squeezenet_k8q8):
    src, out = squeezenet_k8q8
    items = datasets.classification_set(_need("data", "imagenet-val"))[200:230]
    recipe = registry.identify(src).recipe
    assert (_top1(bdecomp.load(out), items, recipe) == _top1(bdecomp.load(out, backend="onnxruntime"), items, recipe)).mean() >= 0.95


def test_resnet20_k8_q8_keeps_top1_within_5_points(tmp_path):
    src = _need("models", "resnet20-cifar10.onnx")
    data = _need("data", "cifar10-test")
    items = datasets.classification_set(data)
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    for it in items[::10]:
        (calib_dir / it.path.name).symlink_to(it.path)
    measure = datasets.spread([it for i, it in enumerate(items) if i % 10], 500)
    out = tmp_path / "resnet20.bd.onnx"
    bdecomp.convert(src, out, bases=8, act_bits=8, calib=calib_dir, calib_limit=256, progress=False)
    recipe = registry.identify(src).recipe
    labels = np.array([it.label for it in measure])
    original = _top1(bdecomp.load(src), measure, recipe)
    decomposed = _top1(bdecomp.load(out), measure, recipe)
    drop = 100 * ((original == labels).mean() - (decomposed == labels).mean())
    assert drop <= 5.0, f"top-1 drop {drop:.1f} points"
    assert (original == decomposed).mean() >= 0.85
