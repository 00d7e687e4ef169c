"""Pure-numpy reference of the decomposed layers (the oracle for the C kernels).

Written independently of the popcount trick: codes are turned back into integers (q − z), the
input is padded so that padded taps contribute exactly 0, patches are gathered (im2col) and the
accumulators are plain integer dot products with the ±1 bases:

    A_j = Σ_{taps, channels} m_j · (q − z)          affine (padding = code z ⇒ q − z = 0)
    A_j = Σ_{taps, channels} m_j · (2q − 1)         sign mode (padding ⇒ 0)
    y   = clamp(s_eff · Σ_j c_j A_j + bias, act_min, act_max),   s_eff = s (s/2 in sign mode)
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["quantize", "unpack_basis", "conv_acc", "conv_output", "output_size"]


def quantize(x, scale, zero_point, bits, sign=False) -> np.ndarray:
    """uint8 codes of x (same shape): clip(rint(x / s) + z, 0, 2^Q − 1) computed in float32 with
    round-half-to-even; NaN → z.  Sign mode: [x ≥ 0]."""
    x = np.asarray(x, dtype=np.float32)
    if sign:
        return (x >= 0).astype(np.uint8)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        t = np.rint(x / np.float32(scale)).astype(np.float64)
    t = np.where(np.isnan(t), 0.0, t)
    q = np.clip(t + zero_point, 0, 2**bits - 1)
    return q.astype(np.uint8)


def unpack_basis(basis, depth) -> np.ndarray:
    """File-layout basis bits uint8 [cout, k, ceil(D/8)] (LSB first, 1 ⇔ +1) → int8 ±1 [cout, k, D]."""
    basis = np.asarray(basis, dtype=np.uint8)
    bits = np.unpackbits(basis, axis=-1, bitorder="little")[..., :depth]
    return (2 * bits.astype(np.int8) - 1).astype(np.int8)


def output_size(size, kernel, stride, pad_begin, pad_end, dilation) -> int:
    """ONNX Conv output size along one axis."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def conv_acc(
    codes,
    basis_pm,
    *,
    groups,
    kernel,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    zero_point=0,
    sign=False,
) -> np.ndarray:
    """Integer accumulators A [N, OH, OW, cout, k] (int64) of codes [N, C, H, W] against the ±1
    bases basis_pm [cout, k, D], D = C/groups·KH·KW in ONNX weight order (c, ky, kx).
    pads = (top, left, bottom, right)."""
    codes = np.asarray(codes)
    basis_pm = np.asarray(basis_pm)
    n, c, h, w = codes.shape
    cout, k, depth = basis_pm.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    cg, coutg = c // groups, cout // groups
    assert cg * groups == c and coutg * groups == cout and depth == cg * kh * kw

    # values whose padding contributes 0: q − z (affine) or 2q − 1 (sign)
    if sign:
        vals = 2 * codes.astype(np.int64) - 1
    else:
        vals = codes.astype(np.int64) - int(zero_point)
    vals = np.pad(vals, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=0)

    oh = output_size(h, kh, sh, pt, pb, dh)
    ow = output_size(w, kw, sw, pl, pr, dw)
    # im2col: cols[n, oy, ox, c, ky, kx] = vals[n, c, oy·sh + ky·dh, ox·sw + kx·dw]
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=np.int64)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            patch = vals[:, :, y0 : y0 + sh * (oh - 1) + 1 : sh, x0 : x0 + sw * (ow - 1) + 1 : sw]
            cols[:, :, :, :, ky, kx] = patch.transpose(0, 2, 3, 1)

    acc = np.empty((n, oh, ow, cout, k), dtype=np.int64)
    bpm = basis_pm.astype(np.int64)
    for g in range(groups):
        x_g = cols[:, :, :, g * cg : (g + 1) * cg].reshape(n, oh, ow, depth)  # (c, ky, kx) order
        w_g = bpm[g * coutg : (g + 1) * coutg].reshape(coutg * k, depth)
        acc[:, :, :, g * coutg : (g + 1) * coutg, :] = (x_g @ w_g.T).reshape(n, oh, ow, coutg, k)
    return acc


def conv_output(
    acc, coeffs, bias, scale, sign=False, act_min=-math.inf, act_max=math.inf
) -> np.ndarray:
    """float32 [N, cout, OH, OW] = clamp(s_eff · Σ_j c_j A_j + bias, act_min, act_max), computed in
    float64 and rounded once."""
    acc = np.asarray(acc, dtype=np.float64)
    coeffs = np.asarray(coeffs, dtype=np.float64)
    s_eff = float(np.float32(scale)) * (0.5 if sign else 1.0)
    y = np.einsum("nhwok,ok->nohw", acc, coeffs) * s_eff
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None, None]
    y = np.clip(y, act_min, act_max)
    return y.astype(np.float32)
