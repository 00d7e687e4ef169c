"""Per-channel activation steps folded into a layer's weights.

A per-channel quantizer gives channel c the step s_c. The binary inner product needs one step for
the whole input, so the layer is rewritten to consume the codes in *code units*: the weight of
input element d becomes w_d · s_c(d), the quantizer of the folded layer has step 1, and the layer's
output is unchanged, y = Σ_d w_d x_d = Σ_d (w_d s_c(d)) (x_d / s_c(d)). The bases are then fitted
to the folded weights, and the decomposed node's own scale input is 1.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from bdecomp.decomposer.calibrate import QParams
from bdecomp.decomposer.rewrite import Layer


def element_scales(channel_scales, group: int, depth: int) -> np.ndarray:
    """float32 [G, D]: the step of every element d of each group's patch, (c, ky, kx) order."""
    s = np.asarray(channel_scales, np.float32)
    cg = s.size // group
    if cg * group != s.size or depth % cg:
        raise ValueError(f"{s.size} channel steps do not fit {group} groups of depth {depth}")
    return s.reshape(group, cg).repeat(depth // cg, axis=1)


def unit_qparams(qp: QParams) -> QParams:
    """The quantizer the folded layer sees: same zero point and bits, step 1."""
    return QParams(1.0, qp.zero_point, qp.bits)


def layer_quantizer(qp: QParams) -> QParams:
    """The quantizer a (folded) layer applies to its patches in fold_patches' units: step 1 where
    the per-channel steps are in its weights, else `qp` itself."""
    return unit_qparams(qp) if qp.channel_scales else qp


def fold_layer(L: Layer, qp: QParams | None) -> Layer:
    """L with the per-channel steps of `qp` multiplied into its weight (L itself if none)."""
    if qp is None or qp.channel_scales is None:
        return L
    es = element_scales(qp.channel_scales, L.group, L.depth)  # [G, D]
    rows = np.repeat(np.arange(L.group), L.cout // L.group)
    return replace(L, weight=(L.weight * es[rows]).astype(np.float32))


def fold_patches(P: np.ndarray, L: Layer, qp: QParams | None) -> np.ndarray:
    """Patches [P, G, D] in the folded layer's input units (x / s_c)."""
    if qp is None or qp.channel_scales is None:
        return P
    return (P / element_scales(qp.channel_scales, L.group, L.depth)[None]).astype(np.float32)
