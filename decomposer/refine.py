"""Output-aware activation steps (`convert --range output`, the default).

A calibrated range that minimises the activations' own squared quantization error can clip or
round coarsely exactly the inputs a layer's weights amplify; what matters is the error of the
layers that read the tensor. So the MSE steps are scaled by the factor, from a short list, that
minimises those layers' output error on their calibration patches (float weights: the bases are
fitted afterwards, to whatever quantizer is chosen here).
"""
from __future__ import annotations

import numpy as np

from bdecomp.decomposer.calibrate import QParams, quantize_dequantize
from bdecomp.decomposer.fold import element_scales

STEP_MULTIPLIERS = (0.7, 0.8, 0.9, 1.0, 1.12, 1.25, 1.4)


def scaled(qp: QParams, m: float) -> QParams:
    """`qp` with every step (the tensor's and the channels') multiplied by m, in float32."""
    cs = None if qp.channel_scales is None else tuple(float(np.float32(v * m)) for v in qp.channel_scales)
    return QParams(float(np.float32(qp.scale * m)), qp.zero_point, qp.bits, cs)


Use = tuple[np.ndarray, np.ndarray, int]  # a reading layer: (patches [P, G, D], weight [Cout, D], groups)


def _float_outputs(uses: list[Use]) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]]:
    """Per reading layer and group: (X, Wᵀ, X Wᵀ, ‖X Wᵀ‖²) — what does not depend on the quantizer."""
    out = []
    for P, W, group in uses:
        cout_g = W.shape[0] // group
        per_group = []
        for g in range(group):
            X = P[:, g, :]
            Wg = W[g * cout_g:(g + 1) * cout_g].T.astype(np.float32)
            Y = X @ Wg
            per_group.append((X, Wg, Y, float((Y.astype(np.float64) ** 2).sum())))
        out.append(per_group)
    return out


def _output_error(qp: QParams, uses: list[Use], floats) -> float:
    total = 0.0
    for (_, W, group), per_group in zip(uses, floats):
        es = None if qp.channel_scales is None else element_scales(qp.channel_scales, group, W.shape[1])
        num = den = 0.0
        for g, (X, Wg, Y, energy) in enumerate(per_group):
            Yh = quantize_dequantize(X, qp, None if es is None else es[g]) @ Wg
            num += float(((Y - Yh).astype(np.float64) ** 2).sum())
            den += energy
        total += num / den if den > 0 else 0.0
    return total


def output_error(qp: QParams, uses: list[Use]) -> float:
    """Σ over the reading layers of ‖X Wᵀ − Q(X) Wᵀ‖² / ‖X Wᵀ‖² on their patches: each layer counts
    alike whatever its output scale."""
    return _output_error(qp, uses, _float_outputs(uses))


def refine_for_outputs(qp: QParams, uses: list[Use]) -> QParams:
    """The multiple of `qp`'s steps in STEP_MULTIPLIERS with the least output_error (`qp` itself,
    factor 1, on ties or without uses). The float outputs are computed once for all multiples."""
    if not uses:
        return qp
    floats = _float_outputs(uses)
    errs = [_output_error(scaled(qp, m), uses, floats) for m in STEP_MULTIPLIERS]
    one = STEP_MULTIPLIERS.index(1.0)
    best = int(np.argmin(errs))
    return qp if errs[best] >= errs[one] else scaled(qp, STEP_MULTIPLIERS[best])
