"""Fitting one layer's bases to calibration data: the data-aware fit and bias correction.

Pure numpy on the patches a PatchSampler gathered; convert.py decides which layers and settings.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from bdecomp.decomposer import calibrate, decompose, fold
from bdecomp.decomposer.rewrite import Layer

DATA_AWARE_MAX_DEPTH = 4608  # Gram matrices beyond this (FC layers) cost more than they return
DATA_AWARE_MAX_FLOPS = 2e11  # D²·Cout·k per sweep: beyond this (e.g. VGG's 4096×4096 fc7, ~3 min) the
# layer keeps its weight-only bases (+ bias correction)


GRID_MAX_FLOPS = 2.5e10  # D²·Cout·Σk of the allocator's grid (one data-aware fit per k): beyond this
# (ResNet-50's layer3/4 3×3 and wide 1×1 layers, its fc: ~3 min each) the grid keeps weight-only bases


def data_aware_fits(L: Layer, k: int) -> bool:
    """Whether the data-aware fit runs for L at k (within the Gram size and flop limits above)."""
    return L.depth <= DATA_AWARE_MAX_DEPTH and L.depth ** 2 * (L.cout // L.group) * k <= DATA_AWARE_MAX_FLOPS


def fit_layer(L: Layer, k: int, qp: calibrate.QParams | None, sampler: calibrate.PatchSampler | None,
              method: str, bias_correction: bool) -> tuple[decompose.Decomposition, Layer, float | None]:
    """Decompose one layer; with calibration patches, fit to its output (method "data") and/or
    correct its bias. Returns (decomposition, layer with the corrected bias, relative output error
    on the calibration patches or None). With a per-channel quantizer the returned layer is the
    folded one (fold.py): its weight and the decomposition are in code units.

    Fitting to the float output from the *decomposed* network's inputs (a second calibration pass)
    was tried: least squares on noisy inputs shrinks the scales and the errors compound (ResNet-20
    at k = Q = 4: 74.0 % → 59.4 % top-1), so the fit uses the float network's inputs."""
    L = fold.fold_layer(L, qp)
    dec = decompose.decompose(L.weight, k)
    if sampler is None or qp is None or sampler.count == 0:
        return dec, L, None
    P = fold.fold_patches(sampler.patches(), L, qp)  # [P, G, D] float32
    Ph = calibrate.quantize_dequantize(P, fold.layer_quantizer(qp))
    cout_g = L.cout // L.group
    codes, coeffs, bias = dec.codes.copy(), dec.coeffs.copy(), L.bias.copy()
    num = den = 0.0
    for g in range(L.group):
        rows = slice(g * cout_g, (g + 1) * cout_g)
        X, Xh, W = P[:, g, :], Ph[:, g, :], L.weight[rows]
        Y = X @ W.T.astype(np.float32)  # float outputs on the calibration patches (sgemm: fast enough)
        gdec = decompose.Decomposition(codes[rows], coeffs[rows], k)
        if method == "data" and data_aware_fits(L, k):
            G = (Xh.T @ Xh).astype(np.float64) / len(X)  # D × D: only built where it is used
            T = (Xh.T @ Y).astype(np.float64) / len(X)
            gdec = decompose.decompose_data_aware(W, k, G, T, init=gdec)
            codes[rows], coeffs[rows] = gdec.codes, gdec.coeffs
        Yh = Xh @ gdec.reconstruct().T.astype(np.float32)
        shift = (Y - Yh).mean(axis=0, dtype=np.float64)
        if bias_correction:
            bias[rows] += shift
            Yh = Yh + shift.astype(np.float32)
        num += float(((Y - Yh).astype(np.float64) ** 2).sum())
        den += float((Y.astype(np.float64) ** 2).sum())
    out_err = float(np.sqrt(num / den)) if den > 0 else 0.0
    return decompose.Decomposition(codes, coeffs, k), replace(L, bias=bias), out_err


def output_fits(L: Layer, sampler: calibrate.PatchSampler, ks) -> dict[int, decompose.Decomposition]:
    """Per k in ks, the bases fitted to the layer's output on its *float* calibration patches, for
    the allocator's error grid (`--budget`): the grid then sees what the data-aware fit achieves
    at each k, not the weight-only error, which overstates small k. Measured on 1,000 held-out
    images against weight-only grids: ResNet-56 `--budget 9` 74.4 → 78.3 % top-1, `--budget 16`
    79.7 → 80.2 %; SqueezeNet `--budget 16` 68.8 → 70.5 %, `--budget 24` 70.7 → 71.7 %, `--budget 20`
    70.7 → 70.5 % (agreement 89.8 → 87.2 %). Layers beyond the data-aware limits keep weight-only
    bases, as in fit_layer, and so do layers whose grid alone would cost more than GRID_MAX_FLOPS
    (every layer of SqueezeNet, ResNet-56, MobileNet and ESPNet is within it)."""
    P = sampler.patches()
    cout_g = L.cout // L.group
    if L.depth ** 2 * cout_g * sum(ks) > GRID_MAX_FLOPS:
        return {k: decompose.decompose(L.weight, k) for k in ks}
    grams: list[tuple[np.ndarray, np.ndarray]] | None = None  # per group (Ĝ, W): the same for every k
    out = {}
    for k in ks:
        dec = decompose.decompose(L.weight, k)
        if not len(P) or not data_aware_fits(L, k):
            out[k] = dec
            continue
        if grams is None:
            grams = []
            for g in range(L.group):
                X = P[:, g, :].astype(np.float64)
                grams.append((X.T @ X / len(X), L.weight.reshape(L.cout, -1)[g * cout_g:(g + 1) * cout_g].astype(np.float64)))
        codes, coeffs = dec.codes.copy(), dec.coeffs.copy()
        for g, (G, W) in enumerate(grams):
            rows = slice(g * cout_g, (g + 1) * cout_g)
            gdec = decompose.decompose_data_aware(W, k, G, G @ W.T,
                                                  init=decompose.Decomposition(codes[rows], coeffs[rows], k))
            codes[rows], coeffs[rows] = gdec.codes, gdec.coeffs
        out[k] = decompose.Decomposition(codes, coeffs, k)
    return out


SEQUENTIAL_MIX = 0.5  # weight of the float-input objective in refit_codes (the rest: the decomposed inputs)
SEQUENTIAL_SWEEPS = 2


def refit_codes(plan, float_patches: np.ndarray, seq_patches: np.ndarray,
                mix: float = SEQUENTIAL_MIX, sweeps: int = SEQUENTIAL_SWEEPS) -> decompose.Decomposition:
    """Refit a fitted layer's basis codes, scales fixed, to what it will really see: the patches
    `seq_patches` that the network with every earlier layer decomposed feeds it (same positions
    as `float_patches`, the float network's), against the float network's output there. So a
    layer can take up the error of the layers before it (`convert --sequential`).

    The objective is (1 − mix)·‖Q(X̃) M c − X w‖² + mix·‖Q(X) M c − X w‖²: on ResNet-56
    (`--budget 12 --float-when-faster`, 4,500 held-out CIFAR-10 images) the decomposed inputs
    alone gave 82.62 % top-1 (float 83.13, before 81.09), mixed 82.31 %, and the same two sweeps
    on float inputs only (mix = 1) 81.18 %: the gain is the decomposed inputs'. On SqueezeNet
    `--budget 16` (1,000 ImageNet val) alone 67.7 % (fitted to 128 calibration images' own
    upstream errors), mixed 69.6 % (before 69.5). Refitting the scales too shrinks them (least
    squares on noisy inputs) and the shrinkage compounds layer after layer, so they stay."""
    L, dec, qp = plan.layer, plan.dec, plan.qparams
    unit = fold.layer_quantizer(qp)
    X = fold.fold_patches(float_patches, L, qp)
    Xq = calibrate.quantize_dequantize(X, unit)
    Xs = calibrate.quantize_dequantize(fold.fold_patches(seq_patches, L, qp), unit)
    cout_g = L.cout // L.group
    codes, coeffs = dec.codes.copy(), dec.coeffs.astype(np.float64)
    for g in range(L.group):
        rows = slice(g * cout_g, (g + 1) * cout_g)
        Y = X[:, g, :] @ L.weight[rows].T.astype(np.float32)
        G = T = 0.0
        for w, P in ((1.0 - mix, Xs[:, g, :]), (mix, Xq[:, g, :])):
            G = G + w * (P.T @ P).astype(np.float64) / len(P)
            T = T + w * (P.T @ Y).astype(np.float64) / len(P)
        for _ in range(sweeps):
            codes[rows] = decompose._codes_data_aware(codes[rows], coeffs[rows], dec.k, G, T)
    return decompose.Decomposition(codes, dec.coeffs, dec.k)
