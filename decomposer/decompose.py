"""Weight decomposition w ≈ M c, M ∈ {−1,+1}^{D×k}, c ∈ R^k, for all output channels at once.

DESIGN §2: greedy start, then alternate (c by least squares, each row's code by exhaustive search
over the 2^k values b·c). M is held as one integer *code* per weight (bit j ⇔ m_j = +1), so the
least-squares normal equations come from per-row code histograms (no D×k matrix is ever built):
VGG-16's 102 M-weight FC layer needs ~100 MB instead of ~1 GB.

With a calibration Gram matrix (data-aware fit) the same loop minimises ‖Xᵀ(w − M c)‖ instead:
c by weighted least squares, codes by coordinate descent over rows (see `decompose_data_aware`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BASES = 8
BLOCK_ELEMENTS = 1 << 22  # rows are independent: big layers are fitted a block of rows at a time,
# so VGG-16's 4096×25088 fc6 never has more than ~32 MB of float64 temporaries per array


@dataclass
class Decomposition:
    """codes: uint8 [Cout, D] (bit j of a code ⇔ basis j is +1 there); coeffs: float32 [Cout, k]."""

    codes: np.ndarray
    coeffs: np.ndarray
    k: int

    def basis_pm(self) -> np.ndarray:
        """int8 ±1 [Cout, k, D]."""
        j = np.arange(self.k, dtype=np.uint8)
        return ((self.codes[:, None, :] >> j[None, :, None]) & 1).astype(np.int8) * 2 - 1

    def packed_basis(self) -> np.ndarray:
        """uint8 [Cout, k, ceil(D/8)], the file layout: bit d%8 (LSB first) of byte d/8, 1 ⇔ +1."""
        j = np.arange(self.k, dtype=np.uint8)
        rows, depth = self.codes.shape
        out = np.empty((rows, self.k, (depth + 7) // 8), np.uint8)
        for r in _row_blocks(rows, depth * self.k):
            bits = (self.codes[r, None, :] >> j[None, :, None]) & 1
            out[r] = np.packbits(bits, axis=2, bitorder="little")
        return out

    def packed_bytes(self) -> int:
        return self.codes.shape[0] * self.k * ((self.codes.shape[1] + 7) // 8)

    def reconstruct(self) -> np.ndarray:
        """M c as float64 [Cout, D] (from the stored float32 scales)."""
        vals = self.coeffs.astype(np.float64) @ code_table(self.k).T  # [Cout, 2^k]
        return np.take_along_axis(vals, self.codes.astype(np.intp), axis=1)


def _row_blocks(rows: int, per_row: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(1, per_row))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def code_table(k: int) -> np.ndarray:
    """B [2^k, k] with B[code, j] = +1 if bit j of code is set, else −1."""
    codes = np.arange(1 << k)[:, None]
    return (((codes >> np.arange(k)[None, :]) & 1) * 2 - 1).astype(np.float64)


def _greedy(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """r = w; m_j = sign(r) (sign(0) = +1), c_j = mean|r|, r −= c_j m_j."""
    r = w.astype(np.float64).copy()
    codes = np.zeros(w.shape, np.uint8)
    coeffs = np.zeros((w.shape[0], k))
    for j in range(k):
        plus = r >= 0
        codes |= (plus.astype(np.uint8) << j)
        c = np.abs(r).mean(axis=1)
        coeffs[:, j] = c
        r -= c[:, None] * np.where(plus, 1.0, -1.0)
    return codes, coeffs


def _code_stats(codes: np.ndarray, w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and code: how many weights carry it, and their sum; both float64 [Cout, 2^k]."""
    n_codes = 1 << k
    rows = codes.shape[0]
    idx = (np.arange(rows, dtype=np.int64)[:, None] * n_codes + codes).ravel()
    counts = np.bincount(idx, minlength=rows * n_codes).reshape(rows, n_codes).astype(np.float64)
    sums = np.bincount(idx, weights=w.ravel(), minlength=rows * n_codes).reshape(rows, n_codes)
    return counts, sums


def _solve_coeffs(counts: np.ndarray, sums: np.ndarray, k: int) -> np.ndarray:
    """c = (MᵀM)⁺ Mᵀ w per row: MᵀM = Σ_codes count·b bᵀ, Mᵀw = Σ_codes sum·b."""
    B = code_table(k)
    G = np.einsum("rc,ckl->rkl", counts, np.einsum("ck,cl->ckl", B, B))
    return np.einsum("rkl,rl->rk", np.linalg.pinv(G, hermitian=True), sums @ B)


def _nearest_codes(w_sorted: np.ndarray, order: np.ndarray, coeffs: np.ndarray, k: int) -> np.ndarray:
    """For every weight, the code b minimising (w_d − b·c)².

    With each row's weights sorted once (w_sorted, order = argsort), the nearest of the 2^k sorted
    values b·c changes only at the midpoints between them: 2^k − 1 bisections per row, then the
    codes are run-length filled and scattered back to the original positions.
    """
    vals = coeffs @ code_table(k).T  # [Cout, 2^k]
    vorder = np.argsort(vals, axis=1, kind="stable")
    svals = np.take_along_axis(vals, vorder, axis=1)
    mids = 0.5 * (svals[:, 1:] + svals[:, :-1])
    rows, depth = w_sorted.shape
    bounds = np.empty((rows, mids.shape[1] + 2), np.int64)
    bounds[:, 0], bounds[:, -1] = 0, depth
    for r in range(rows):
        bounds[r, 1:-1] = np.searchsorted(w_sorted[r], mids[r])
    runs = np.diff(bounds, axis=1)
    filled = np.repeat(vorder.astype(np.uint8).ravel(), runs.ravel()).reshape(rows, depth)
    codes = np.empty((rows, depth), np.uint8)
    np.put_along_axis(codes, order, filled, axis=1)
    return codes


def relative_error(w: np.ndarray, d: Decomposition) -> np.ndarray:
    """‖w − M c‖ / ‖w‖ per output channel (0 for all-zero rows)."""
    w = w.reshape(w.shape[0], -1)
    diff, norm = np.empty(w.shape[0]), np.empty(w.shape[0])
    vals = d.coeffs.astype(np.float64) @ code_table(d.k).T
    for r in _row_blocks(*w.shape):
        wr = w[r].astype(np.float64)
        diff[r] = np.linalg.norm(wr - np.take_along_axis(vals[r], d.codes[r].astype(np.intp), axis=1), axis=1)
        norm[r] = np.linalg.norm(wr, axis=1)
    return np.where(norm > 0, diff / np.where(norm > 0, norm, 1), 0.0)


def total_relative_error(w: np.ndarray, d: Decomposition) -> float:
    """‖W − M C‖_F / ‖W‖_F over the whole layer."""
    w = w.reshape(w.shape[0], -1)
    norms = np.linalg.norm(w.astype(np.float64), axis=1) if w.size <= BLOCK_ELEMENTS else np.concatenate(
        [np.linalg.norm(w[r].astype(np.float64), axis=1) for r in _row_blocks(*w.shape)])
    num = float(((relative_error(w, d) * norms) ** 2).sum())
    den = float((norms ** 2).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def decompose(w: np.ndarray, k: int, max_iter: int = 30, tol: float = 1e-6) -> Decomposition:
    """Decompose every row of w ([Cout, ...], flattened to [Cout, D]) into k bases and scales.

    Alternation stops when the total squared error falls by less than `tol` (relative), or after
    `max_iter` rounds. Each half-step cannot increase the error, so the result is never worse than
    the greedy start.
    """
    if not 1 <= k <= MAX_BASES:
        raise ValueError(f"k must be in 1..{MAX_BASES}, got {k}")
    w = w.reshape(w.shape[0], -1)
    blocks = _row_blocks(*w.shape)
    if len(blocks) > 1:
        parts = [decompose(w[r], k, max_iter, tol) for r in blocks]
        return Decomposition(np.concatenate([p.codes for p in parts]), np.concatenate([p.coeffs for p in parts]), k)
    w2 = np.ascontiguousarray(w, dtype=np.float64)
    order = np.argsort(w2, axis=1, kind="stable")
    w_sorted = np.take_along_axis(w2, order, axis=1)
    codes, coeffs = _greedy(w2, k)
    B = code_table(k)
    w_sq = float((w2 ** 2).sum())
    prev_err = np.inf
    for it in range(max_iter + 1):
        counts, sums = _code_stats(codes, w2, k)
        coeffs = _solve_coeffs(counts, sums, k)
        vals = coeffs @ B.T
        err = w_sq - 2.0 * float((vals * sums).sum()) + float((counts * vals ** 2).sum())
        if it == max_iter or (np.isfinite(prev_err) and prev_err - err <= tol * prev_err):
            break
        prev_err = err
        codes = _nearest_codes(w_sorted, order, coeffs, k)
    return Decomposition(codes=codes, coeffs=coeffs.astype(np.float32), k=k)


def _coeffs_data_aware(codes: np.ndarray, k: int, G: np.ndarray, T: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Per row r: c = (M_rᵀ Ĝ M_r)⁺ M_rᵀ t_r (weighted least squares on calibration inputs).
    Ĝ M for a chunk of rows is one GEMM (Ĝ times the chunk's D × rows·k basis matrix), not one
    small product per row: same flops, BLAS speed, bounded memory. That GEMM runs in float32: Ĝ
    is a float32 product of the patches to begin with, the ±1 bases are exact, and the scales
    come out within float32 rounding (≤ 1e-7 relative) of a float64 GEMM in 1/2–1/3 of the
    time (the conversion's largest step at k = 8); M_rᵀ(Ĝ M_r) and the solve stay in float64."""
    B = code_table(k).astype(np.float32)
    rows, depth = codes.shape
    G32 = G.astype(np.float32)
    out = np.empty((rows, k))
    for r0 in range(0, rows, chunk):
        Mt = B[codes[r0:r0 + chunk].T.astype(np.intp)]  # [D, r, k]
        r = Mt.shape[1]
        GM = (G32 @ Mt.reshape(depth, r * k)).reshape(depth, r, k).transpose(1, 0, 2).astype(np.float64)
        A = np.matmul(Mt.transpose(1, 2, 0).astype(np.float64), GM)  # M_rᵀ Ĝ M_r, [r, k, k]
        b = np.einsum("dsk,ds->sk", Mt, T[:, r0:r0 + r])
        ridge = 1e-9 * np.trace(A, axis1=1, axis2=2)[:, None, None] * np.eye(k)
        out[r0:r0 + r] = np.einsum("rkl,rl->rk", np.linalg.pinv(A + ridge, hermitian=True), b)
    return out


def _codes_data_aware(codes: np.ndarray, coeffs: np.ndarray, k: int, G: np.ndarray, T: np.ndarray,
                      block: int = 64) -> np.ndarray:
    """One sweep of exact coordinate descent over the D rows of M, all output channels at once.

    With v = M c, the objective vᵀĜv − 2vᵀt is a 1-D parabola in v_d, so the best of the 2^k
    values b·c for row d is the one nearest to its minimiser (t_d − Σ_{e≠d} Ĝ_de v_e) / Ĝ_dd.
    Ĝv is kept up to date inside a block of `block` rows after every change (native.codes_sweep:
    the rows are dependent steps, too small for numpy calls) and for the other rows once per block
    (one GEMM), so a sweep costs D² · Cout flops at BLAS speed instead of D memory-bound rank-1
    updates of a D × Cout matrix; the sweep visits the rows in the same order."""
    from bdecomp import native

    G, T = np.ascontiguousarray(G, np.float64), np.ascontiguousarray(T, np.float64)
    B = code_table(k)
    vals = np.ascontiguousarray(coeffs @ B.T)  # [rows, 2^k]
    vorder = np.argsort(vals, axis=1, kind="stable").astype(np.int64)
    svals = np.take_along_axis(vals, vorder, axis=1)
    mids = np.ascontiguousarray(0.5 * (svals[:, 1:] + svals[:, :-1]))
    codes = np.ascontiguousarray(codes, np.uint8).copy()
    depth = codes.shape[1]
    V = np.take_along_axis(vals, codes.astype(np.intp), axis=1).T.copy()  # [D, rows]
    U = G @ V  # Ĝ v
    for b0 in range(0, depth, block):
        b1 = min(depth, b0 + block)
        V_start = V[b0:b1].copy()
        native.codes_sweep(G, T, U, V, codes, vals, mids, vorder, b0, b1)
        change = V[b0:b1] - V_start
        if np.any(change):
            U[:b0] += G[:b0, b0:b1] @ change
            U[b1:] += G[b1:, b0:b1] @ change
    return codes


def decompose_data_aware(w: np.ndarray, k: int, G: np.ndarray, T: np.ndarray, rounds: int = 4,
                         init: Decomposition | None = None) -> Decomposition:
    """Fit M and c to the layer's *output* on calibration inputs: minimise ‖X̂ᵀ M c − Xᵀ w‖², where
    X are the float input patches and X̂ the same patches after the layer's own quantizer, so the
    weight and activation errors are reconciled (DESIGN §2, issue 6).

    G = X̂X̂ᵀ [D, D] and T = X̂ Xᵀ wᵀ [D, Cout] are all the data needed. Starts from the weight-only
    decomposition and alternates c (weighted least squares) and M (coordinate descent) sweeps;
    each step cannot increase the objective."""
    w2 = np.ascontiguousarray(w.reshape(w.shape[0], -1), dtype=np.float64)
    dec = init if init is not None else decompose(w2, k)
    codes, coeffs = dec.codes, dec.coeffs.astype(np.float64)
    coeffs = _coeffs_data_aware(codes, k, G, T)
    for _ in range(rounds):
        codes = _codes_data_aware(codes, coeffs, k, G, T)
        coeffs = _coeffs_data_aware(codes, k, G, T)
    return Decomposition(codes=codes, coeffs=coeffs.astype(np.float32), k=k)
