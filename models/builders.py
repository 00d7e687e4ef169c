"""ONNX graphs of the classic benchmark CNNs, with seeded random weights (no torch needed).

    from bdecomp.models.builders import build
    model = build("resnet18", seed=0)             # onnx.ModelProto, opset 13, ir_version 8

`alexnet`, `vgg16`, `resnet18`, `resnet50` and `resnet152` have exactly the layers, shapes, op
patterns of torchvision's models exported to ONNX, named after their modules (BatchNormalization
kept as its own node, Dropout kept, AdaptiveAvgPool as an AveragePool), so their parameter counts
equal torchvision's. `segnet` is SegNet (Badrinarayanan et al., 2017): the VGG-16 encoder with
Conv+BatchNorm+ReLU, MaxPool that also returns the argmax indices, and a mirrored decoder that
upsamples with MaxUnpool at those indices (to the exact pre-pool size, read with Shape, so odd sizes
such as 45 → 22 → 45 round-trip), ending in a 3×3 Conv to 12 CamVid classes.

The weights are random but scale-wise like a trained network's: Kaiming-normal (fan-in, gain √2
before a ReLU, 1 otherwise), small random biases, and every BatchNormalization gets as running
statistics the per-channel mean and variance of its actual input on a small seeded probe batch
(pushed through the network in numpy while it is built), slightly perturbed, with gamma ≈ 1 and
small beta. So each BN really normalises and activations stay O(1) through 150 layers; the last BN
of each residual branch gets a smaller gamma (as trained ResNets have) so the sums grow slowly.
Same name, seed and options give a byte-identical model (the measured statistics are rounded to 4
significant digits, so BLAS rounding differences between machines cannot leak into the file).

Each model carries its preprocessing and task in metadata (`bdecomp.recipe`, `bdecomp.task`,
`bdecomp.labels`, `bdecomp.name`, …), which `bdecomp convert` / `infer` read.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from bdecomp.errors import ConfigError
from bdecomp.models.preprocess import TORCHVISION, Recipe

OPSET = 13
IR_VERSION = 8
META_PREFIX = "bdecomp."

# CamVid (SegNet's 12 outputs: 11 classes + "Unlabelled"), fed like the ImageNet-trained VGG encoder.
CAMVID_RECIPE = Recipe(size=(360, 480), resize="direct", interpolation="bilinear", scale=255.0,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CAMVID_CLASSES = 12
CAMVID_IGNORE = 11

PROBE_SIDE = 64  # the probe batch that sets BN statistics is at most this many pixels per side
PROBE_BATCH = 2


# ------------------------------------------------------------------------------------------------
# the graph builder; a small probe batch flows through it to measure what each BN will see


def _signif(a: np.ndarray, digits: int = 4) -> np.ndarray:
    """Round to `digits` significant digits, so BLAS rounding differences between machines
    cannot change the statistics written into the model."""
    a = np.asarray(a, np.float64)
    mag = np.where(a == 0, 1.0, 10.0 ** np.floor(np.log10(np.abs(np.where(a == 0, 1.0, a)))))
    return np.round(a / mag, digits - 1) * mag


def _windows(x: np.ndarray, k: int, stride: int, pad: int, fill: float) -> np.ndarray:
    """[N, C, H, W] → [N, C, OH, OW, k, k] views of the padded input."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    w = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return w[:, :, ::stride, ::stride]


class _Builder:
    """Collects nodes and initializers straight into a ModelProto (no copies of the weights).

    `dry=True` records parameter shapes only. With `probe`, a small random batch is pushed through
    every layer in numpy as it is added, and each BatchNormalization gets the per-channel mean and
    variance of its actual input on that batch (slightly perturbed) as running statistics, like a
    trained network: so BN really normalises and activations stay O(1) at any depth.
    """

    def __init__(self, seed: int, dry: bool = False, probe: np.ndarray | None = None):
        self.rng = np.random.default_rng(seed)
        self.dry = dry
        self.model = onnx.ModelProto()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.channels: dict[str, int] = {}
        self.probe: dict[str, np.ndarray] = {}
        self._first_probe = probe
        self._names: set[str] = set()

    # ---------------------------------------------------------------- primitives
    def _node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        if name in self._names:
            raise AssertionError(f"duplicate node name {name}")  # a bug in a builder
        self._names.add(name)
        self.model.graph.node.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def _param(self, name: str, array_or_shape) -> str:
        if name in self.shapes:
            raise AssertionError(f"duplicate initializer {name}")
        if self.dry:
            self.shapes[name] = tuple(array_or_shape)
            return name
        a = np.ascontiguousarray(array_or_shape, dtype="<f4")
        self.shapes[name] = a.shape
        t = self.model.graph.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(a.shape)
        t.raw_data = a.tobytes()
        return name

    def _normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        a = self.rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        return a

    def _p(self, x: str) -> np.ndarray | None:
        return self.probe.get(x)

    def _set(self, out: str, value: np.ndarray | None) -> None:
        if value is not None:
            self.probe[out] = np.ascontiguousarray(value, dtype=np.float32)

    def input(self, name: str, channels: int) -> str:
        self.channels[name] = channels
        if self._first_probe is not None:
            self.probe[name] = self._first_probe
        return name

    # ---------------------------------------------------------------- layers
    def conv(self, name: str, x: str, cout: int, k: int, stride: int = 1, pad: int = 0, bias: bool = True,
             gain: float = math.sqrt(2.0), out: str | None = None) -> str:
        """Kaiming-normal (fan-in) weights; gain √2 before a ReLU, 1 before BN-only / the output."""
        cin = self.channels[x]
        shape = (cout, cin, k, k)
        out = out or name
        inputs = [x, f"{name}.weight"]
        if self.dry:
            self._param(f"{name}.weight", shape)
            if bias:
                inputs.append(self._param(f"{name}.bias", (cout,)))
        else:
            w = self._normal(shape, gain / math.sqrt(cin * k * k))
            self._param(f"{name}.weight", w)
            b = None
            if bias:
                b = self._normal((cout,), 0.01)
                inputs.append(self._param(f"{name}.bias", b))
            p = self._p(x)
            if p is not None:
                win = _windows(p, k, stride, pad, 0.0)  # [N, C, OH, OW, k, k]
                y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
                self._set(out, y if b is None else y + b[None, :, None, None])
        self._node("Conv", inputs, [out], name, kernel_shape=[k, k], strides=[stride, stride],
                   pads=[pad] * 4, dilations=[1, 1], group=1)
        self.channels[out] = cout
        return out

    def bn(self, name: str, x: str, gamma: float = 1.0, out: str | None = None) -> str:
        c = self.channels[x]
        out = out or name
        names = [f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"]
        if self.dry:
            for n in names:
                self._param(n, (c,))
        else:
            p = self._p(x)
            if p is None:
                mean, var = np.zeros(c), np.ones(c)
            else:
                mean, var = p.mean(axis=(0, 2, 3), dtype=np.float64), p.var(axis=(0, 2, 3), dtype=np.float64)
                var = np.maximum(var, 1e-4 * max(float(var.mean()), 1e-12))
            sd = np.sqrt(var)
            g = gamma * np.exp(0.1 * self.rng.standard_normal(c))
            beta = 0.05 * self.rng.standard_normal(c)
            rmean = _signif(mean + 0.05 * sd * self.rng.standard_normal(c))
            rvar = _signif(var * np.exp(0.1 * self.rng.standard_normal(c)))
            for n, v in zip(names, (g, beta, rmean, rvar)):
                self._param(n, v)
            if p is not None:
                f = (g / np.sqrt(rvar + 1e-5)).astype(np.float32)[None, :, None, None]
                self._set(out, (p - rmean.astype(np.float32)[None, :, None, None]) * f
                          + beta.astype(np.float32)[None, :, None, None])
        self._node("BatchNormalization", [x] + names, [out], name, epsilon=1e-5, momentum=0.9)
        self.channels[out] = c
        return out

    def relu(self, name: str, x: str, out: str | None = None) -> str:
        out = out or name
        self._node("Relu", [x], [out], name)
        self.channels[out] = self.channels[x]
        p = self._p(x)
        self._set(out, None if p is None else np.maximum(p, 0))
        return out

    def maxpool(self, name: str, x: str, k: int, stride: int, pad: int = 0, indices: bool = False) -> tuple[str, str]:
        out = name
        outs = [out, f"{name}.indices"] if indices else [out]
        self._node("MaxPool", [x], outs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        self.channels[out] = self.channels[x]
        p = self._p(x)
        if p is not None:
            win = _windows(p, k, stride, pad, -np.inf)
            n, c, oh, ow = win.shape[:4]
            flat = win.reshape(n, c, oh, ow, k * k)
            self._set(out, flat.max(axis=-1))
            if indices:  # positions in the (unpadded) input plane, as MaxUnpool takes them
                arg = flat.argmax(axis=-1)
                ky, kx = arg // k, arg % k
                rows = np.arange(oh)[:, None] * stride + ky - pad
                cols = np.arange(ow)[None, :] * stride + kx - pad
                self.probe[outs[1]] = rows * p.shape[3] + cols
        return out, (outs[1] if indices else "")

    def maxunpool(self, name: str, x: str, indices: str, like: str) -> str:
        """MaxUnpool 2×2/2 of x at `indices`, to exactly the shape of tensor `like` (via Shape)."""
        shape = f"{name}.output_shape"
        self._node("Shape", [like], [shape], f"{name}.shape")
        out = name
        self._node("MaxUnpool", [x, indices, shape], [out], name, kernel_shape=[2, 2], strides=[2, 2])
        self.channels[out] = self.channels[x]
        p, idx, ref = self._p(x), self.probe.get(indices), self._p(like)
        if p is not None and idx is not None and ref is not None:
            n, c, h, w = ref.shape
            y = np.zeros((n, c, h * w), np.float32)
            np.put_along_axis(y, idx.reshape(n, c, -1), p.reshape(n, c, -1), axis=2)
            self._set(out, y.reshape(n, c, h, w))
        return out

    def add(self, name: str, a: str, b: str) -> str:
        self._node("Add", [a, b], [name], name)
        self.channels[name] = self.channels[a]
        pa, pb = self._p(a), self._p(b)
        self._set(name, None if pa is None or pb is None else pa + pb)
        return name

    def avgpool(self, name: str, x: str, k: int) -> str:
        self._node("AveragePool", [x], [name], name, kernel_shape=[k, k], strides=[k, k], pads=[0] * 4,
                   ceil_mode=0, count_include_pad=0)
        self.channels[name] = self.channels[x]
        return name

    def global_avgpool(self, name: str, x: str) -> str:
        self._node("GlobalAveragePool", [x], [name], name)
        self.channels[name] = self.channels[x]
        return name

    def flatten(self, name: str, x: str, positions: int = 1) -> str:
        self._node("Flatten", [x], [name], name, axis=1)
        self.channels[name] = self.channels[x] * positions
        return name

    def dropout(self, name: str, x: str) -> str:
        self._node("Dropout", [x], [name], name)  # opset 13, no training_mode: identity at inference
        self.channels[name] = self.channels[x]
        return name

    def gemm(self, name: str, x: str, cout: int, gain: float = math.sqrt(2.0), out: str | None = None) -> str:
        cin = self.channels[x]
        out = out or name
        if self.dry:
            self._param(f"{name}.weight", (cout, cin))
            self._param(f"{name}.bias", (cout,))
        else:
            self._param(f"{name}.weight", self._normal((cout, cin), gain / math.sqrt(cin)))
            self._param(f"{name}.bias", self._normal((cout,), 0.01))
        self._node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name, alpha=1.0, beta=1.0, transB=1)
        self.channels[out] = cout
        return out


# ------------------------------------------------------------------------------------------------
# the networks (torchvision names: features.N, classifier.N, layerL.B.convK, …)


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _check_size(size: tuple[int, int], min_side: int, what: str) -> None:
    if min(size) < min_side:
        raise ConfigError(f"{what} needs an input of at least {min_side}×{min_side}, got {size[0]}×{size[1]}")


def _adaptive_avgpool(b: _Builder, name: str, x: str, hw: tuple[int, int], target: int) -> str:
    """AdaptiveAvgPool2d(target) as torch exports it: an AveragePool of kernel = stride = in / out."""
    if hw[0] != hw[1] or hw[0] % target:
        raise ConfigError(f"AdaptiveAvgPool2d({target}) of a {hw[0]}×{hw[1]} map is not a plain AveragePool; "
                          f"use an input size whose feature map is a multiple of {target}")
    return b.avgpool(name, x, hw[0] // target)


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _alexnet(b: _Builder, x: str, size: tuple[int, int], width: float, classes: int) -> str:
    _check_size(size, 63, "alexnet")
    c = lambda n: _ch(n, width)  # noqa: E731
    h = size
    x = b.relu("features.1", b.conv("features.0", x, c(64), 11, 4, 2))
    h = tuple(_conv_out(v, 11, 4, 2) for v in h)
    x, _ = b.maxpool("features.2", x, 3, 2)
    h = tuple(_conv_out(v, 3, 2, 0) for v in h)
    x = b.relu("features.4", b.conv("features.3", x, c(192), 5, 1, 2))
    x, _ = b.maxpool("features.5", x, 3, 2)
    h = tuple(_conv_out(v, 3, 2, 0) for v in h)
    x = b.relu("features.7", b.conv("features.6", x, c(384), 3, 1, 1))
    x = b.relu("features.9", b.conv("features.8", x, c(256), 3, 1, 1))
    x = b.relu("features.11", b.conv("features.10", x, c(256), 3, 1, 1))
    x, _ = b.maxpool("features.12", x, 3, 2)
    h = tuple(_conv_out(v, 3, 2, 0) for v in h)
    x = _adaptive_avgpool(b, "avgpool", x, h, 6)
    x = b.flatten("flatten", x, 36)
    x = b.dropout("classifier.0", x)
    x = b.relu("classifier.2", b.gemm("classifier.1", x, c(4096)))
    x = b.dropout("classifier.3", x)
    x = b.relu("classifier.5", b.gemm("classifier.4", x, c(4096)))
    return b.gemm("classifier.6", x, classes, gain=1.0, out="logits")


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(b: _Builder, x: str, size: tuple[int, int], width: float, classes: int) -> str:
    _check_size(size, 32, "vgg16")
    h = size
    i = 0
    for v in VGG16_CFG:
        if v == "M":
            x, _ = b.maxpool(f"features.{i}", x, 2, 2)
            h = (h[0] // 2, h[1] // 2)
            i += 1
        else:
            x = b.relu(f"features.{i + 1}", b.conv(f"features.{i}", x, _ch(v, width), 3, 1, 1))
            i += 2
    x = _adaptive_avgpool(b, "avgpool", x, h, 7)
    x = b.flatten("flatten", x, 49)
    x = b.dropout("classifier.2", b.relu("classifier.1", b.gemm("classifier.0", x, _ch(4096, width))))
    x = b.dropout("classifier.5", b.relu("classifier.4", b.gemm("classifier.3", x, _ch(4096, width))))
    return b.gemm("classifier.6", x, classes, gain=1.0, out="logits")


RESNET_CFG = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _resnet(kind: str, blocks: tuple[int, ...]):
    expansion = 1 if kind == "basic" else 4
    # the last BN of each residual branch starts smaller (trained ResNets have small final gammas),
    # so that the sum of many blocks grows like √blocks instead of exploding
    last_gamma = min(0.5, 1.5 / math.sqrt(sum(blocks)))

    def net(b: _Builder, x: str, size: tuple[int, int], width: float, classes: int) -> str:
        _check_size(size, 32, "resnet")
        x = b.relu("relu", b.bn("bn1", b.conv("conv1", x, _ch(64, width), 7, 2, 3, bias=False)))
        x, _ = b.maxpool("maxpool", x, 3, 2, 1)
        inplanes = _ch(64, width)
        for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            planes = _ch(planes, width)
            for bi in range(n):
                stride = 2 if (bi == 0 and li > 1) else 1
                p = f"layer{li}.{bi}"
                identity = x
                if kind == "basic":
                    y = b.conv(f"{p}.conv1", x, planes, 3, stride, 1, bias=False)
                    y = b.relu(f"{p}.relu1", b.bn(f"{p}.bn1", y))
                    y = b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", y, planes, 3, 1, 1, bias=False, gain=1.0),
                             gamma=last_gamma)
                else:  # torchvision v1.5: the stride sits on the 3×3 conv
                    y = b.relu(f"{p}.relu1", b.bn(f"{p}.bn1", b.conv(f"{p}.conv1", x, planes, 1, bias=False)))
                    y = b.conv(f"{p}.conv2", y, planes, 3, stride, 1, bias=False)
                    y = b.relu(f"{p}.relu2", b.bn(f"{p}.bn2", y))
                    y = b.bn(f"{p}.bn3", b.conv(f"{p}.conv3", y, planes * expansion, 1, bias=False, gain=1.0),
                             gamma=last_gamma)
                if stride != 1 or inplanes != planes * expansion:
                    identity = b.bn(f"{p}.downsample.1",
                                    b.conv(f"{p}.downsample.0", x, planes * expansion, 1, stride, bias=False, gain=1.0))
                x = b.relu(f"{p}.relu", b.add(f"{p}.add", y, identity))
                inplanes = planes * expansion
        x = b.flatten("flatten", b.global_avgpool("avgpool", x))
        return b.gemm("fc", x, classes, gain=1.0, out="logits")

    return net


# SegNet: VGG-16 encoder blocks (convs per block, channels) and the mirrored decoder.
SEGNET_ENCODER = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _segnet(b: _Builder, x: str, size: tuple[int, int], width: float, classes: int) -> str:
    _check_size(size, 32, "segnet")
    enc = [(n, _ch(c, width)) for n, c in SEGNET_ENCODER]
    saved: list[tuple[str, str]] = []  # (pre-pool tensor, indices) per block
    for bi, (n, c) in enumerate(enc, start=1):
        for ci in range(1, n + 1):
            name = f"conv{bi}_{ci}"
            x = b.relu(f"{name}.relu", b.bn(f"{name}.bn", b.conv(name, x, c, 3, 1, 1)))
        pre = x
        x, idx = b.maxpool(f"pool{bi}", x, 2, 2, indices=True)
        saved.append((pre, idx))
    # decoder block i mirrors encoder block i: its last conv maps to the previous block's width
    for bi in range(len(enc), 0, -1):
        pre, idx = saved[bi - 1]
        x = b.maxunpool(f"unpool{bi}", x, idx, pre)
        n, c = enc[bi - 1]
        for ci in range(n, 0, -1):
            name = f"conv{bi}_{ci}_D"
            if bi == 1 and ci == 1:
                return b.conv(name, x, classes, 3, 1, 1, gain=1.0, out="logits")
            cout = c if ci > 1 else enc[bi - 2][1]
            x = b.relu(f"{name}.relu", b.bn(f"{name}.bn", b.conv(name, x, cout, 3, 1, 1)))
    raise AssertionError("unreachable")


_NET: dict[str, tuple[Callable, str, str, Recipe, int]] = {
    "alexnet": (_alexnet, "classification", "imagenet", TORCHVISION, 1000),
    "vgg16": (_vgg16, "classification", "imagenet", TORCHVISION, 1000),
    "resnet18": (_resnet(*RESNET_CFG["resnet18"]), "classification", "imagenet", TORCHVISION, 1000),
    "resnet50": (_resnet(*RESNET_CFG["resnet50"]), "classification", "imagenet", TORCHVISION, 1000),
    "resnet152": (_resnet(*RESNET_CFG["resnet152"]), "classification", "imagenet", TORCHVISION, 1000),
    "segnet": (_segnet, "segmentation", "camvid", CAMVID_RECIPE, CAMVID_CLASSES),
}

# torchvision's published parameter counts (sum of `parameters()`, BN gamma + beta, no running stats)
TORCHVISION_PARAMS = {"alexnet": 61_100_840, "vgg16": 138_357_544, "resnet18": 11_689_512,
                      "resnet50": 25_557_032, "resnet152": 60_192_808}

_WITH_BN = ("resnet18", "resnet50", "resnet152", "segnet")  # these get a probe batch for BN statistics

RECIPES: dict[str, Recipe] = {k: v[3] for k, v in _NET.items()}
TASKS: dict[str, str] = {k: v[1] for k, v in _NET.items()}
LABELS: dict[str, str] = {k: v[2] for k, v in _NET.items()}
DESCRIPTIONS = {
    "alexnet": "torchvision AlexNet (features + 3 FC), random weights",
    "vgg16": "torchvision VGG-16 (config D, no BN), random weights; ~553 MB",
    "resnet18": "torchvision ResNet-18 (BasicBlock [2,2,2,2]), random weights",
    "resnet50": "torchvision ResNet-50 v1.5 (Bottleneck [3,4,6,3]), random weights",
    "resnet152": "torchvision ResNet-152 v1.5 (Bottleneck [3,8,36,3]), random weights",
    "segnet": "SegNet (VGG-16-BN encoder, MaxUnpool decoder), 12 CamVid classes, random weights",
}


def _parse(name: str, width: float, size) -> tuple[str, tuple[int, int]]:
    if name not in _NET:
        raise ConfigError(f"unknown model builder {name!r}; choose from {', '.join(_NET)}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0 < width <= 4) \
            or not math.isfinite(width):
        raise ConfigError(f"width must be a number in (0, 4], got {width!r}")
    if size is None:
        size = RECIPES[name].size
    elif isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in size)):
        raise ConfigError(f"size must be (height, width) in pixels, got {size!r}")
    return name, (int(size[0]), int(size[1]))


def parameter_shapes(name: str, width: float = 1.0, size=None) -> dict[str, tuple[int, ...]]:
    """Initializer name → shape of `build(name, width=width, size=size)`, without making weights."""
    name, size = _parse(name, width, size)
    net, _, _, _, classes = _NET[name]
    b = _Builder(0, dry=True)
    net(b, b.input("input", 3), size, width, classes)
    return dict(b.shapes)


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Trainable parameters as torchvision counts them: every initializer but BN running statistics."""
    return sum(int(np.prod(s)) for n, s in shapes.items()
               if not n.endswith((".running_mean", ".running_var")))


def build(name: str, seed: int = 0, batch: int | str = "N", *, width: float = 1.0,
          size: int | tuple[int, int] | None = None) -> onnx.ModelProto:
    """The ONNX model `name` (see BUILDERS) with weights drawn from `seed`.

    batch: a fixed batch size or a name for a dynamic one. width scales every channel count (and
    the hidden FC width) for small test models; size (H, W) overrides the input size (default the
    recipe's: 224×224, SegNet 360×480). Input "input" [batch, 3, H, W], output "logits".
    """
    name, size = _parse(name, width, size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch, bool) or not (isinstance(batch, str) and batch or isinstance(batch, int) and batch >= 1):
        raise ConfigError(f"batch must be a positive integer or a dimension name, got {batch!r}")
    net, task, labels, recipe, classes = _NET[name]
    probe = None
    if name in _WITH_BN:
        prng = np.random.default_rng([int(seed), 0x9B0BE])
        probe = prng.standard_normal((PROBE_BATCH, 3, min(size[0], PROBE_SIDE), min(size[1], PROBE_SIDE)),
                                     dtype=np.float32)
    b = _Builder(int(seed), probe=probe)
    out = net(b, b.input("input", 3), size, width, classes)
    assert out == "logits"
    out_shape = [batch, classes] if task == "classification" else [batch, classes, size[0], size[1]]
    model = b.model
    g = model.graph
    g.name = name
    g.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size[0], size[1]]))
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape))
    model.ir_version = IR_VERSION
    model.opset_import.append(helper.make_opsetid("", OPSET))
    model.producer_name = "bdecomp.models.builders"
    model.producer_version = "1"
    model.doc_string = DESCRIPTIONS[name]
    if size != recipe.size:
        recipe = Recipe(size=size, resize="direct" if recipe.resize == "direct" else recipe.resize,
                        resize_to=(None if recipe.resize == "direct" else max(size) * 8 // 7),
                        interpolation=recipe.interpolation, scale=recipe.scale, mean=recipe.mean, std=recipe.std,
                        bgr=recipe.bgr)
    meta = {"name": name, "task": task, "labels": labels, "recipe": recipe.to_json(),
            "builder": json.dumps({"name": name, "seed": int(seed), "width": width, "size": list(size)},
                                  sort_keys=True)}
    if task == "segmentation":
        meta["ignore_index"] = str(CAMVID_IGNORE)
    for k, v in meta.items():
        model.metadata_props.add(key=META_PREFIX + k, value=v)
    return model


def _bind(name: str) -> Callable[..., onnx.ModelProto]:
    def builder(seed: int = 0, batch: int | str = "N", **kw) -> onnx.ModelProto:
        return build(name, seed, batch, **kw)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = DESCRIPTIONS[name]
    return builder


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {k: _bind(k) for k in _NET}
