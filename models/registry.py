"""Pretrained models bdecomp knows, identified only by the sha256 of the file.

Matching by file name would silently apply the wrong preprocessing to a renamed or re-exported
model, so `identify` trusts nothing but the hash. Entries without a hash (files we could not
verify) are informational: `bdecomp models list` shows them with their URL and recipe, and a
user can pass the flags by hand.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bdecomp.errors import InputFileError
from bdecomp.models.preprocess import TORCHVISION, Recipe


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model: its hash, task, label set and the exact preprocessing it needs."""

    name: str
    sha256: str | None
    task: str  # "classification" | "segmentation"
    labels: str  # "imagenet" | "cifar10" | "camvid"
    recipe: Recipe
    source: str
    notes: str = ""
    ignore_index: int | None = None  # ground-truth class excluded from segmentation metrics


SQUEEZENET_RECIPE = Recipe(
    size=(227, 227), resize="direct", interpolation="bicubic", scale=1.0, mean=(123.0, 117.0, 104.0)
)
MOBILENET_RECIPE = Recipe(
    size=(224, 224), resize="short", resize_to=256, scale=1.0, mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)
)
ESPNET_RECIPE = Recipe(
    size=(360, 480),
    resize="direct",
    bgr=True,
    mean=(110.331, 108.409, 105.033),
    std=(72.126 * 255, 72.691 * 255, 69.904 * 255),
)
CIFAR_RESNET_RECIPE = Recipe(
    size=(32, 32), resize="direct", scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
CIFAR_CAFFE_RECIPE = Recipe(size=(32, 32), resize="direct", scale=255.0)
# Caffe BVLC AlexNet: BGR, 0-255, per-channel mean (B, G, R) = 104, 117, 123. Caffe squashed to
# 256x256 before cropping; short side 256 + centre crop is the closest Recipe.
CAFFE_ALEXNET_RECIPE = Recipe(size=(224, 224), resize="short", resize_to=256, bgr=True, mean=(104.0, 117.0, 123.0))

_ZOO = "https://github.com/onnx/models/raw/main/validated/vision/classification"
_ZOO_NOTE = "ONNX model zoo; sha256 not verified here, so this entry is informational only"
_LFS_NOTE = "ONNX model zoo; sha256 from the git-lfs pointer at onnx/models commit {}"

KNOWN: tuple[KnownModel, ...] = (
    # ---- real files shipped in ../shared/models (hashes from its MANIFEST.md)
    KnownModel(
        "squeezenet1.1-imagenet",
        "e83980e8217008160e72754a57d02ca6e9fe69118882d11a62b85793ae342af9",
        "classification", "imagenet", SQUEEZENET_RECIPE,
        "SqueezeNet v1.1 (DeepScale, BSD-2-Clause) from MathWorks weight dumps (4mbilal/RPiDev_VR d715ff01)",
        "RGB 0-255 minus mean 123,117,104; whole image resized to 227x227",
    ),
    KnownModel(
        "mobilenet-v1-0.25-imagenet",
        "d941e35fe605ff50e61c8a8ac4c08e2aeb41f3b3b8e39e5801329a9a26b2d57f",
        "classification", "imagenet", MOBILENET_RECIPE,
        "Keras-applications MobileNet v1 alpha 0.25 (Apache-2.0), novlan1/tensorflowjs-demos 64a7f9e7",
        "x/127.5 - 1; short side 256, centre crop 224",
    ),
    KnownModel(
        "espnet-camvid",
        "dfffaca6ca8c199faffa724abd18b2d9a8cb79b9155c860c73d4699828d6d558",
        "segmentation", "camvid", ESPNET_RECIPE,
        "ESPNet p=2 q=8 (MIT), sacmehta/ESPNet afe71c38 pretrained/decoder/espnet_p_2_q_8_camvid.pth",
        "BGR; ((x - mean) / std) / 255; H, W multiples of 8; class 11 = void",
        ignore_index=11,
    ),
    KnownModel(
        "resnet20-cifar10",
        "78c74136abab39774c4269a051de90cc326e7f06fc7915f20fd6b1c03253c6f0",
        "classification", "cifar10", CIFAR_RESNET_RECIPE,
        "akamaster/pytorch_resnet_cifar10 d5489e89 (BSD-2-Clause)",
        "x/255 then ImageNet mean/std; 32x32",
    ),
    KnownModel(
        "resnet56-cifar10",
        "c42e7a0d40e1f238141eb5e13ab23af50bafc413a5c5235b94737c20bcd1cf3b",
        "classification", "cifar10", CIFAR_RESNET_RECIPE,
        "akamaster/pytorch_resnet_cifar10 d5489e89 (BSD-2-Clause)",
        "x/255 then ImageNet mean/std; 32x32",
    ),
    KnownModel(
        "cifar10-full-caffe",
        "280bfa2d53650f76c9a97ea6881ec7af93b8e20d69555235c95ddc640c595927",
        "classification", "cifar10", CIFAR_CAFFE_RECIPE,
        "Caffe examples/cifar10 cifar10_full (everpeace/caffe 91cb3b5e, BSD-2-Clause)",
        "x/255 only (the graph subtracts the training mean); 32x32",
    ),
    # ---- ONNX model zoo files users may bring (download URLs; most unverified here)
    KnownModel(
        "bvlcalexnet-12", None, "classification", "imagenet", CAFFE_ALEXNET_RECIPE,
        f"{_ZOO}/alexnet/model/bvlcalexnet-12.onnx", _ZOO_NOTE + "; Caffe BGR mean subtraction; output is softmax",
    ),
    KnownModel(
        "bvlcalexnet-8",
        "9a4dc22fd706a19462aaec3b08e027e0ef89daf63d123824f20b59b6de9a727b",
        "classification", "imagenet", CAFFE_ALEXNET_RECIPE,
        f"{_ZOO}/alexnet/model/bvlcalexnet-8.onnx",
        _LFS_NOTE.format("2a67a85e") + "; Caffe BGR mean subtraction; output is softmax",
    ),
    KnownModel(
        "vgg16-12", None, "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/vgg/model/vgg16-12.onnx", _ZOO_NOTE + "; ImageNet mean/std, short 256 crop 224",
    ),
    KnownModel(
        "resnet18-v1-7", None, "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/resnet/model/resnet18-v1-7.onnx", _ZOO_NOTE + "; MXNet Gluon, ImageNet mean/std",
    ),
    KnownModel(
        "resnet18-v2-7",
        "3b4d048057854022232aa20bf68262e31718ab7119a17f920b8a2dc1433f824b",
        "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/resnet/model/resnet18-v2-7.onnx",
        _LFS_NOTE.format("2a67a85e") + "; MXNet Gluon, ImageNet mean/std",
    ),
    KnownModel(
        "resnet50-v1-12", None, "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/resnet/model/resnet50-v1-12.onnx", _ZOO_NOTE + "; MXNet Gluon, ImageNet mean/std",
    ),
    KnownModel(
        "resnet152-v1-7",
        "b0ec92437bf8c9d0739bf9bafdea9638e13f9e3c1e2fb766ad546cc182fd3f6d",
        "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/resnet/model/resnet152-v1-7.onnx",
        _LFS_NOTE.format("4c46cd00") + "; MXNet Gluon, ImageNet mean/std",
    ),
    KnownModel(
        "resnet152-v2-7", None, "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/resnet/model/resnet152-v2-7.onnx", _ZOO_NOTE + "; MXNet Gluon, ImageNet mean/std",
    ),
    KnownModel(
        "squeezenet1.1-7", None, "classification", "imagenet", TORCHVISION,
        f"{_ZOO}/squeezenet/model/squeezenet1.1-7.onnx", _ZOO_NOTE + "; ImageNet mean/std, 224x224",
    ),
)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (models can be hundreds of MB)."""
    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{p}: is a directory, expected a file")
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise InputFileError(f"{p}: no such file") from None
    except OSError as e:
        raise InputFileError(f"{p}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


@lru_cache(maxsize=None)
def _by_hash() -> dict[str, KnownModel]:
    return {m.sha256: m for m in KNOWN if m.sha256}


def by_sha256(digest: str) -> KnownModel | None:
    """The known model with this hex digest, if any."""
    return _by_hash().get(digest.strip().lower())


def identify(path: str | Path) -> KnownModel | None:
    """The known model whose sha256 equals the file's, else None (never matched by name)."""
    return by_sha256(file_sha256(path))


def by_name(name: str) -> KnownModel | None:
    """Registry entry by its exact name (for `bdecomp models show NAME`), not for identification."""
    for m in KNOWN:
        if m.name == name:
            return m
    return None
