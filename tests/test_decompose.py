"""Weight decomposition w ≈ M c (DESIGN §2): k binary ±1 bases and k scales per output channel.

Read as a spec: the fit gets better with every extra basis, k = 8 is close to the float weights,
the alternating refinement never loses against its greedy start, degenerate rows stay finite, and
the packed basis bits are laid out as the file format says.
"""
from __future__ import annotations

import numpy as np
import pytest

from bdecomp.decomposer.decompose import MAX_BASES, Decomposition, decompose, relative_error


def gaussian_layer(seed: int = 0, cout: int = 64, depth: int = 1152) -> np.ndarray:
    """A 64×1152 layer (a 3×3 conv over 128 channels) of standard normal weights."""
    return np.random.default_rng(seed).standard_normal((cout, depth))


def total_relative_error(w: np.ndarray, d: Decomposition) -> float:
    w = w.reshape(w.shape[0], -1)
    return float(np.linalg.norm(w - d.reconstruct()) / np.linalg.norm(w))


def greedy_reconstruction(w: np.ndarray, k: int) -> np.ndarray:
    """DESIGN §2 greedy start, written independently: r = w; m_j = sign(r) with sign(0) = +1,
    c_j = mean|r|, r −= c_j m_j. Returns the reconstruction Σ c_j m_j per row."""
    r = w.astype(np.float64).copy()
    for _ in range(k):
        m = np.where(r >= 0, 1.0, -1.0)
        c = np.abs(r).mean(axis=1, keepdims=True)
        r -= c * m
    return w - r


# ---------------------------------------------------------------- accuracy


def test_relative_error_falls_strictly_with_every_extra_basis():
    w = gaussian_layer()
    errors = [total_relative_error(w, decompose(w, k)) for k in range(1, MAX_BASES + 1)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


def test_one_basis_reaches_the_optimum_for_gaussian_weights():
    # the best single ±1 basis is sign(w) with c = mean|w|: error sqrt(1 − 2/π) ≈ 0.603 for N(0, 1)
    w = gaussian_layer()
    assert total_relative_error(w, decompose(w, 1)) == pytest.approx(np.sqrt(1 - 2 / np.pi), abs=0.01)


def test_eight_bases_reproduce_gaussian_weights_within_five_percent():
    w = gaussian_layer()
    d = decompose(w, 8)
    assert total_relative_error(w, d) <= 0.05
    assert relative_error(w, d).max() <= 0.05  # every output channel, not just on average


@pytest.mark.parametrize("k", range(1, MAX_BASES + 1))
@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform", "skewed"])
def test_alternating_refinement_is_never_worse_than_the_greedy_start(k, dist):
    rng = np.random.default_rng(k)
    shape = (16, 75)  # a 5×5 conv over 3 channels: small depth, where ties and poor fits are common
    w = {"normal": lambda: rng.standard_normal(shape),
         "laplace": lambda: rng.laplace(size=shape),
         "uniform": lambda: rng.uniform(-1, 1, shape),
         "skewed": lambda: rng.exponential(size=shape) - 0.2}[dist]()
    refined = np.linalg.norm(w - decompose(w, k).reconstruct(), axis=1)
    greedy = np.linalg.norm(w - greedy_reconstruction(w, k), axis=1)
    # per output channel; the slack covers only storing the scales as float32
    assert np.all(refined <= greedy * (1 + 1e-6) + 1e-9), (refined - greedy).max()


# ---------------------------------------------------------------- degenerate rows


@pytest.mark.parametrize("k", [1, 3, 8])
def test_all_zero_rows_decompose_to_zero_without_nan(k):
    w = np.random.default_rng(0).standard_normal((6, 40))
    w[[1, 4]] = 0.0
    d = decompose(w, k)
    assert np.all(np.isfinite(d.coeffs))
    assert np.all(d.reconstruct()[[1, 4]] == 0.0)
    err = relative_error(w, d)
    assert np.all(np.isfinite(err)) and err[1] == 0.0 and err[4] == 0.0


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_constant_rows_are_reproduced_without_nan(k):
    w = np.array([[0.75] * 30, [-2.0] * 30, [1e-3] * 30])
    d = decompose(w, k)
    assert np.all(np.isfinite(d.coeffs))
    np.testing.assert_allclose(d.reconstruct(), w, rtol=1e-6)


def test_invalid_number_of_bases_raises_value_error():
    w = gaussian_layer(cout=4, depth=16)
    for k in (0, -1, MAX_BASES + 1):
        with pytest.raises(ValueError):
            decompose(w, k)


def test_weights_of_any_rank_are_flattened_per_output_channel():
    w4 = np.random.default_rng(3).standard_normal((8, 3, 3, 3))  # a conv weight [Cout, Cin, KH, KW]
    d4, d2 = decompose(w4, 3), decompose(w4.reshape(8, 27), 3)
    assert d4.codes.shape == (8, 27)
    assert np.array_equal(d4.codes, d2.codes) and np.array_equal(d4.coeffs, d2.coeffs)


# ---------------------------------------------------------------- file layout of the bases


@pytest.mark.parametrize("depth", [1, 8, 13, 64, 77])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_packed_basis_bit_d_mod_8_of_byte_d_div_8_is_one_exactly_where_the_basis_is_plus_one(k, depth):
    w = np.random.default_rng(depth).standard_normal((5, depth))
    d = decompose(w, k)
    packed, pm = d.packed_basis(), d.basis_pm()
    assert packed.dtype == np.uint8 and packed.shape == (5, k, (depth + 7) // 8)
    assert pm.shape == (5, k, depth) and set(np.unique(pm)) <= {-1, 1}
    for dd in range(depth):
        bit = (packed[:, :, dd // 8] >> (dd % 8)) & 1  # LSB first
        assert np.array_equal(bit == 1, pm[:, :, dd] == 1), f"position {dd}"


@pytest.mark.parametrize("k", [1, 4, 8])
def test_plus_one_bits_times_the_scales_rebuild_the_reconstruction(k):
    """The bases as stored (1 ⇔ +1) with the stored float32 scales give exactly M c."""
    w = np.random.default_rng(k).standard_normal((7, 50))
    d = decompose(w, k)
    bits = np.unpackbits(d.packed_basis(), axis=2, bitorder="little")[:, :, :50]
    m = 2.0 * bits - 1.0
    rebuilt = np.einsum("ok,okd->od", d.coeffs.astype(np.float64), m)
    np.testing.assert_allclose(rebuilt, d.reconstruct(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_coordinate_descent_visits_rows_exactly_like_the_row_by_row_sweep(block):
    from bdecomp.decomposer.decompose import _codes_data_aware, _coeffs_data_aware

    rng = np.random.default_rng(5)
    X = np.maximum(rng.standard_normal((600, 90)), 0)
    W = rng.standard_normal((12, 90))
    G, T = X.T @ X / len(X), X.T @ (X @ W.T) / len(X)
    start = decompose(W, 3)
    coeffs = _coeffs_data_aware(start.codes, 3, G, T)
    row_by_row = _codes_data_aware(start.codes, coeffs, 3, G, T, block=1)
    np.testing.assert_array_equal(_codes_data_aware(start.codes, coeffs, 3, G, T, block=block), row_by_row)
    assert not np.array_equal(row_by_row, start.codes)  # the sweep did move codes


def _numpy_sweep(codes, coeffs, k, G, T, block=64):
    """The coordinate sweep in numpy as it was before the native one (rows in Python, the other
    rows' Ĝv once per block): the reference the native sweep must match code for code."""
    from bdecomp.decomposer.decompose import code_table

    vals = coeffs @ code_table(k).T
    vorder = np.argsort(vals, axis=1, kind="stable")
    svals = np.take_along_axis(vals, vorder, axis=1)
    mids = 0.5 * (svals[:, 1:] + svals[:, :-1])
    codes, depth = codes.copy(), codes.shape[1]
    V = np.take_along_axis(vals, codes.astype(np.intp), axis=1).T.copy()
    U = G @ V
    for b0 in range(0, depth, block):
        b1 = min(depth, b0 + block)
        V_start = V[b0:b1].copy()
        _numpy_block(G, T, U, V, codes, vals, mids, vorder, b0, b1)
        change = V[b0:b1] - V_start
        if np.any(change):
            U[:b0] += G[:b0, b0:b1] @ change
            U[b1:] += G[b1:, b0:b1] @ change
    return codes


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_native_coordinate_sweep_equals_the_numpy_sweep_code_for_code(k):
    """Including rows whose Ĝ_dd is 0 (a dead input channel, skipped) and tied code values."""
    from bdecomp.decomposer.decompose import _codes_data_aware, _coeffs_data_aware

    rng = np.random.default_rng(10 + k)
    X = np.maximum(rng.standard_normal((500, 140)), 0) * rng.uniform(0.1, 4, 140)
    X[:, 7] = 0.0
    W = rng.standard_normal((33, 140))
    G, T = X.T @ X / len(X), X.T @ (X @ W.T) / len(X)
    start = decompose(W, k)
    coeffs = _coeffs_data_aware(start.codes, k, G, T)
    coeffs[0] = coeffs[0, 0]  # equal scales: several codes share a value
    ref = _numpy_sweep(start.codes, coeffs, k, G, T)
    np.testing.assert_array_equal(_codes_data_aware(start.codes, coeffs, k, G, T), ref)
    assert not np.array_equal(ref, start.codes)


def _numpy_block(G, T, U, V, codes, vals, mids, vorder, b0, b1):
    """The inner loop of _numpy_sweep, for one block, in place."""
    rows = np.arange(codes.shape[0])
    for d in range(b0, b1):
        gdd = G[d, d]
        if gdd <= 0:
            continue
        target = (T[d] - U[d] + gdd * V[d]) / gdd
        new_codes = vorder[rows, (mids < target[:, None]).sum(axis=1)]
        new_v = vals[rows, new_codes]
        delta = new_v - V[d]
        if np.any(delta):
            U[b0:b1] += G[b0:b1, d, None] * delta[None, :]
            V[d] = new_v
            codes[:, d] = new_codes


@pytest.mark.parametrize("on_midpoints", [False, True])
def test_native_sweep_block_updates_values_and_codes_bit_for_bit_like_numpy(on_midpoints):
    """U, V and codes after a block; with targets exactly on a midpoint between two code values
    (ties go to the lower value, as `#{mids < target}` says)."""
    from bdecomp import native
    from bdecomp.decomposer.decompose import code_table

    rng = np.random.default_rng(21)
    depth, rows, k = 40, 9, 3
    X = rng.standard_normal((200, depth))
    G = np.eye(depth) if on_midpoints else X.T @ X / 200
    vals = rng.standard_normal((rows, k)) @ code_table(k).T
    vorder = np.argsort(vals, axis=1, kind="stable").astype(np.int64)
    svals = np.take_along_axis(vals, vorder, axis=1)
    mids = np.ascontiguousarray(0.5 * (svals[:, 1:] + svals[:, :-1]))
    codes = rng.integers(0, 2 ** k, (rows, depth)).astype(np.uint8)
    V = np.take_along_axis(vals, codes.astype(np.intp), axis=1).T.copy()
    if on_midpoints:  # Ĝ = I: target = T[d] exactly
        T = mids[np.arange(rows), rng.integers(0, 2 ** k - 1, (depth, rows))].copy()
    else:
        T = rng.standard_normal((depth, rows))
    U = G @ V
    a, b = (U.copy(), V.copy(), codes.copy()), (U.copy(), V.copy(), codes.copy())
    for b0, b1 in ((0, 16), (16, 40)):
        native.codes_sweep(G, T, *a, vals, mids, vorder, b0, b1)
        _numpy_block(G, T, *b, vals, mids, vorder, b0, b1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], codes)


def test_native_sweep_refuses_an_order_that_points_outside_the_code_values():
    from bdecomp import native

    depth, rows, n = 4, 2, 4
    z = lambda *s: np.zeros(s)
    bad = np.full((rows, n), n, np.int64)
    with pytest.raises(ValueError, match="bd_codes_sweep"):
        native.codes_sweep(np.eye(depth), z(depth, rows), z(depth, rows), z(depth, rows),
                           np.zeros((rows, depth), np.uint8), z(rows, n), z(rows, n - 1), bad, 0, depth)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_data_aware_scales_are_the_float64_least_squares_solution_within_float32_rounding(k):
    """The scales' Ĝ·M product runs in float32 for speed; each row's scales must still be its
    weighted least-squares solution (M_rᵀ Ĝ M_r) c = M_rᵀ t_r, solved here row by row in float64."""
    from bdecomp.decomposer.decompose import _coeffs_data_aware, code_table

    rng = np.random.default_rng(k)
    X = (np.maximum(rng.standard_normal((2000, 300)), 0) * rng.uniform(0.1, 10, 300)).astype(np.float32)
    W = rng.standard_normal((40, 300))
    G = (X.T @ X).astype(np.float64) / len(X)
    T = G @ W.T
    codes = decompose(W, k).codes
    got = _coeffs_data_aware(codes, k, G, T, chunk=16)  # several chunks, the last one partial
    B = code_table(k)
    for r in range(len(W)):
        M = B[codes[r].astype(np.intp)]
        want = np.linalg.solve(M.T @ G @ M, M.T @ T[:, r])
        np.testing.assert_allclose(got[r], want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
