"""The accuracy levers beyond the original method: data-aware fit, bias correction, allocation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bdecomp.decomposer import allocate, calibrate, decompose
from bdecomp.errors import ConfigError

from test_convert import convert, images, cnn, layer_settings  # noqa: F401  (fixtures)


def _correlated_problem(seed=0, n=4000, d=72, cout=24):
    """Inputs with a strongly anisotropic covariance (as real activations are) and weights."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.geomspace(3.0, 0.05, d)[None, :]
    X = np.maximum(rng.standard_normal((n, d)) @ mix.T, 0).astype(np.float32)  # post-ReLU
    W = rng.standard_normal((cout, d))
    return X, W


def _output_error(X, Xh, W, dec):
    Y = X @ W.T
    return np.linalg.norm(Xh @ dec.reconstruct().T - Y) / np.linalg.norm(Y)


@pytest.mark.parametrize("k,q", [(2, 4), (3, 3), (4, 4)])
def test_data_aware_fit_beats_weight_only_fit_on_output_error(k, q):
    X, W = _correlated_problem()
    stats = calibrate.TensorStats()
    stats.update(X, np.random.default_rng(0))
    Xh = calibrate.quantize_dequantize(X, calibrate.choose_qparams(stats, q))
    G, T = Xh.T.astype(np.float64) @ Xh / len(X), Xh.T.astype(np.float64) @ (X @ W.T) / len(X)
    weight_only = decompose.decompose(W, k)
    data_aware = decompose.decompose_data_aware(W, k, G, T, init=weight_only)
    assert _output_error(X, Xh, W, data_aware) < 0.9 * _output_error(X, Xh, W, weight_only)


def test_data_aware_fit_never_worsens_its_starting_point():
    X, W = _correlated_problem(seed=3)
    G, T = X.T.astype(np.float64) @ X / len(X), X.T.astype(np.float64) @ (X @ W.T) / len(X)
    for k in (1, 2, 5):
        start = decompose.decompose(W, k)
        assert _output_error(X, X, W, decompose.decompose_data_aware(W, k, G, T, init=start)) <= \
            _output_error(X, X, W, start) + 1e-9


def _costs():
    """Three layers: a cheap sensitive one, a big robust one, a middle one."""
    kq = np.outer(allocate.K_CHOICES, allocate.Q_CHOICES).astype(float)
    return [allocate.LayerCosts("sensitive", 1_000, 10.0 / kq),
            allocate.LayerCosts("robust", 100_000, 0.1 / kq),
            allocate.LayerCosts("middle", 10_000, 1.0 / kq)]


@pytest.mark.parametrize("budget", [4, 9, 16, 30])
def test_allocation_meets_the_budget_in_kernel_cost(budget):
    costs = _costs()
    choice = allocate.allocate(costs, budget)
    assert allocate.mac_weighted_cost(costs, choice) <= budget + 1e-9


def test_kernel_cost_is_the_cheaper_of_lookup_table_sets_and_popcount_lanes():
    cost = allocate.kernel_cost
    assert cost(4, 4) == cost(4, 3) == 16 and cost(2, 4) == 8 and cost(5, 4) == 20  # one table set: 4·k
    assert [cost(2, 8), cost(4, 8), cost(8, 8), cost(5, 6)] == [14, 28, 56, 35]  # two sets: 7·k
    assert cost(4, 2) == pytest.approx(14.4) and cost(8, 2) == pytest.approx(28.8)  # popcount: 0.9·KP·(Q+2)
    for k in allocate.K_CHOICES:
        for q in allocate.Q_CHOICES:
            assert q == allocate.Q_CHOICES[-1] or cost(k, q) <= cost(k, q + 1)
            assert k == allocate.K_CHOICES[-1] or cost(k, q) <= cost(k + 1, q)


def test_kernel_cost_counts_the_bits_few_input_channels_leave_empty_in_popcount_words():
    """16 input channels fill a quarter of each 64-bit word: popcount then loses to the tables."""
    cost = allocate.kernel_cost
    assert allocate.popcount_cost(8, 2, 16) == pytest.approx(4 * allocate.popcount_cost(8, 2, 64))
    assert cost(8, 2, 16) == allocate.lut_cost(8, 2) == 32 > cost(8, 2, 64)
    assert cost(2, 4, 16) == cost(2, 4) == 8


def test_an_activation_bound_layer_gets_eight_bits_within_a_budget_of_sixteen():
    """Two table sets make Q = 5…8 cheaper than k·Q at small k: a layer whose error depends on Q
    alone is given Q = 8 at k·Q = 16's kernel cost rather than (4, 4)."""
    err = np.tile(1.0 / np.asarray(allocate.Q_CHOICES, float) ** 4, (len(allocate.K_CHOICES), 1))
    (k, q), = allocate.allocate([allocate.LayerCosts("activation-bound", 1_000, err)], 16)
    assert q == 8 and allocate.kernel_cost(k, q) <= 16


def test_allocation_error_does_not_grow_with_the_budget():
    costs = _costs()

    def total(b):
        return sum(L.err[allocate.K_CHOICES.index(k), allocate.Q_CHOICES.index(q)]
                   for L, (k, q) in zip(costs, allocate.allocate(costs, b)))
    errs = [total(b) for b in (4, 6, 9, 16, 25, 64)]
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:]))


def test_allocation_gives_the_cheap_sensitive_layer_more_bits_than_the_big_robust_one():
    choice = allocate.allocate(_costs(), 6)
    assert choice[0][0] * choice[0][1] > choice[1][0] * choice[1][1]


def test_sensitivity_is_the_output_error_per_unit_of_layer_error():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((1, 10)) for _ in range(4)]
    noisy = [r + 0.1 * rng.standard_normal(r.shape) for r in ref]
    c = allocate.centered
    out_err = sum(np.square(c(r) - c(n)).sum() for r, n in zip(ref, noisy)) / sum(np.square(c(r)).sum() for r in ref)
    assert allocate.sensitivity(ref, noisy, layer_error=0.2) == pytest.approx(out_err / 0.04)
    assert allocate.sensitivity(ref, ref, layer_error=0.2) == 0.0


def test_sensitivity_ignores_a_shift_common_to_all_classes():
    """Softmax and argmax do not see it; most of a classifier's logit energy is such an offset."""
    rng = np.random.default_rng(1)
    ref = [rng.standard_normal((2, 10)) + 20.0 for _ in range(3)]
    shifted = [r + rng.standard_normal((2, 1)) for r in ref]  # one shift per image, all classes
    assert allocate.sensitivity(ref, shifted, layer_error=0.2) == pytest.approx(0.0, abs=1e-12)
    dense = [rng.standard_normal((1, 5, 4, 4)) for _ in range(2)]  # per pixel for dense outputs
    assert allocate.sensitivity(dense, [d + rng.standard_normal((1, 1, 4, 4)) for d in dense],
                                layer_error=0.2) == pytest.approx(0.0, abs=1e-12)
    noisy = [r + rng.standard_normal(r.shape) for r in ref]  # errors that move classes apart count
    assert allocate.sensitivity(ref, noisy, layer_error=0.2) > 1.0


def test_convert_with_a_budget_records_each_layers_measured_sensitivity(cnn, images, tmp_path):
    report = convert(cnn, tmp_path / "s.onnx", calib=images, budget=9)
    sens = report.allocation["sensitivity"]
    assert set(sens) == {r.name for r in report.layers}
    assert all(np.isfinite(v) and v >= 0 for v in sens.values()) and any(v > 0 for v in sens.values())


def test_agreement_counts_pixels_for_dense_outputs():
    a = np.zeros((1, 3, 2, 2)); a[0, 1] = 1
    b = a.copy(); b[0, 2, 0, 0] = 5
    assert allocate.agreement([a], [b]) == pytest.approx(0.75)


def test_convert_with_a_budget_writes_per_layer_settings_within_it(cnn, images, tmp_path):
    report = convert(cnn, tmp_path / "b.onnx", calib=images, budget=9, report_path=tmp_path / "r.json")
    assert report.mac_weighted_kq <= 9 + 1e-9
    assert json.loads((tmp_path / "r.json").read_text())["allocation"]["budget"] == 9
    assert f"kernel cost {report.allocation['mac_weighted_cost']:.1f}" in report.table()  # what the budget bounds
    settings = layer_settings(tmp_path / "b.onnx")
    assert {r.name: (r.k, r.q) for r in report.layers} == settings


def test_the_lowest_budget_gives_every_layer_two_bases_never_one(cnn, images, tmp_path):
    """k = 1 is cheapest (lookup tables: 4 units at Q <= 4, against 8 for k = 2), but the allocator
    never picks it; at k = 2 every Q <= 4 costs 8, so the lowest error among them wins: Q = 4."""
    report = convert(cnn, tmp_path / "b.onnx", calib=images, budget=1)
    assert {(r.k, r.q) for r in report.layers} == {(2, 4)}


def test_a_budget_prices_each_layer_for_its_own_input_channels(cnn, images, tmp_path):
    """conv2 reads 16 channels and fc 32: popcount would fill 16 and 32 of every 64 bits, so their
    (8, 2) and (4, 2) cost what the tables do (32, 16), not popcount's 28.8 and 14.4 of full words."""
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"conv2": {"k": 8, "q": 2}, "fc": {"k": 4, "q": 2}}}))
    report = convert(cnn, tmp_path / "b.onnx", calib=images, budget=30, layer_config=cfg)
    cin = {"conv1": 3, "conv2": 16, "fc": 32}  # input channels of small_cnn's layers
    macs = sum(r.macs for r in report.layers)
    assert report.allocation["mac_weighted_cost"] == pytest.approx(
        sum(r.macs * allocate.kernel_cost(r.k, r.q, cin[r.name]) for r in report.layers) / macs)
    assert report.allocation["mac_weighted_cost"] != pytest.approx(
        sum(r.macs * allocate.kernel_cost(r.k, r.q) for r in report.layers) / macs)


def test_a_layer_config_may_still_give_one_basis_under_a_budget(cnn, images, tmp_path):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"conv2": {"k": 1, "q": 4}}}))
    report = convert(cnn, tmp_path / "b.onnx", calib=images, budget=1, layer_config=cfg)
    assert {r.name: (r.k, r.q) for r in report.layers}["conv2"] == (1, 4)


def test_target_drop_records_the_budgets_it_tried(cnn, images, tmp_path):
    report = convert(cnn, tmp_path / "t.onnx", calib=images, target_drop=50)
    assert report.allocation["tried"] and all(0 <= t["agreement"] <= 1 for t in report.allocation["tried"])


def test_budget_without_calibration_is_refused(cnn, tmp_path):
    with pytest.raises(ConfigError, match="calib"):
        convert(cnn, tmp_path / "x.onnx", budget=9)


def _gemm_layer_with_patches(X, W):
    from bdecomp.decomposer.rewrite import Layer

    layer = Layer("fc", "Gemm", "x", "y", W, np.zeros(W.shape[0]), W.shape)
    sampler = calibrate.PatchSampler("x", W.shape[1], "Gemm", per_image=len(X), max_patches=len(X))
    sampler.update(X)
    stats = calibrate.TensorStats()
    stats.update(X, np.random.default_rng(0))
    return layer, sampler, stats


def test_the_allocators_error_grid_sees_the_data_aware_fit():
    """With --method data the grid's bases for each k are fitted to the layer's float output (what
    the final fit achieves), not the weight-only ones: lower errors, most at small k."""
    from bdecomp.decomposer.fit import output_fits

    X, W = _correlated_problem(seed=7, n=2000)
    layer, sampler, stats = _gemm_layer_with_patches(X, W)

    def grid(decomps):
        return allocate.layer_errors(W, 1, sampler, lambda q: calibrate.choose_qparams(stats, q), decomps)

    data = grid(output_fits(layer, sampler, allocate.K_CHOICES))
    weight = grid({k: decompose.decompose(W, k) for k in allocate.K_CHOICES})
    assert np.all(data <= weight * (1 + 1e-9))
    assert np.all(data[:4, -1] < 0.9 * weight[:4, -1])  # k = 1…4 at Q = 8


def test_the_error_grid_is_the_same_by_the_gram_route_and_the_direct_one(monkeypatch):
    """layer_errors takes the cheaper route (Gram statistics, or the outputs themselves for wide
    layers with few patches); both compute the same bias-corrected output errors."""
    X, W = _correlated_problem(seed=3, n=2000)
    layer, sampler, stats = _gemm_layer_with_patches(X, W)
    decomps = {k: decompose.decompose(W, k) for k in allocate.K_CHOICES}

    def grid():
        return allocate.layer_errors(W, 1, sampler, lambda q: calibrate.choose_qparams(stats, q), decomps)

    gram = grid()
    monkeypatch.setattr(allocate, "GRAM_MAX_DEPTH", 0)  # forces the direct route
    direct = grid()
    np.testing.assert_allclose(gram, direct, rtol=1e-3, atol=1e-6)  # relative errors: 1e-6 of the output energy
    assert not np.array_equal(gram, direct)  # two computations, not one


def test_the_error_grid_measures_only_the_useful_activation_bits():
    """Q values no k prices below every larger Q are not measured (inf); the others are exactly
    what the full grid gives."""
    X, W = _correlated_problem(seed=4, n=1000)
    layer, sampler, stats = _gemm_layer_with_patches(X, W)
    decomps = {k: decompose.decompose(W, k) for k in allocate.K_CHOICES}
    asked = []

    def grid(qs):
        return allocate.layer_errors(W, 1, sampler, lambda q: asked.append(q) or calibrate.choose_qparams(stats, q),
                                     decomps, qs)

    full = grid(allocate.Q_CHOICES)
    asked.clear()
    qs = allocate.useful_qs(allocate.cost_grid(64))
    part = grid(qs)
    assert qs == (2, 4, 5, 8) and sorted(set(asked)) == [2, 4, 5, 8]
    for j, q in enumerate(allocate.Q_CHOICES):
        if q in qs:
            np.testing.assert_array_equal(part[:, j], full[:, j])
        else:
            assert np.all(np.isinf(part[:, j]))


def test_useful_activation_bits_follow_the_cost_model():
    """64+ input channels: Q = 3 costs what 4 does and Q = 6, 7 what 8 does (lookup tables), Q = 2
    is cheaper with popcount at some k; Q = 5 (one table set) costs less than 6…8 on any number of
    channels, so 16 channels, which leave popcount's words three-quarters empty, keep 4, 5 and 8."""
    assert allocate.useful_qs(allocate.cost_grid(64)) == (2, 4, 5, 8)
    assert allocate.useful_qs(allocate.cost_grid(16)) == (4, 5, 8)
    flat = np.ones((len(allocate.K_CHOICES), len(allocate.Q_CHOICES)))
    assert allocate.useful_qs(flat) == (8,)
    assert allocate.useful_qs(np.cumsum(flat, axis=1)) == allocate.Q_CHOICES


def test_a_layer_that_does_not_reach_the_output_never_gets_one_basis():
    """Sensitivity 0 (its error never reaches the output): the grid's ruled-out k = 1 stays out
    (inf · 0 would be NaN, which argmin takes first) and the layer gets the cheapest allowed setting."""
    kq = np.outer(allocate.K_CHOICES, allocate.Q_CHOICES).astype(float)
    err = allocate.weighted(allocate.allocatable(1.0 / kq), 0.0)
    assert np.all(np.isinf(err[0])) and not np.isnan(err).any()
    (k, q), = allocate.allocate([allocate.LayerCosts("dead end", 1_000, err)], 64)
    assert k >= allocate.MIN_ALLOCATED_K


def test_a_layer_whose_error_grid_would_cost_too_much_gets_weight_only_bases(monkeypatch):
    """Big layers (ResNet-50's 3×3 layer4, its fc) would spend minutes each on one data-aware fit
    per k; past GRID_MAX_FLOPS the grid takes the weight-only bases instead."""
    from bdecomp.decomposer import fit

    X, W = _correlated_problem(seed=7, n=2000)
    layer, sampler, _ = _gemm_layer_with_patches(X, W)
    ks = allocate.K_CHOICES
    monkeypatch.setattr(fit, "GRID_MAX_FLOPS", W.shape[1] ** 2 * W.shape[0] * sum(ks) - 1)
    over = fit.output_fits(layer, sampler, ks)
    assert all(np.array_equal(over[k].codes, decompose.decompose(W, k).codes) for k in ks)
    monkeypatch.setattr(fit, "GRID_MAX_FLOPS", W.shape[1] ** 2 * W.shape[0] * sum(ks))
    within = fit.output_fits(layer, sampler, ks)
    assert not all(np.array_equal(within[k].codes, over[k].codes) for k in ks)


def test_bias_correction_lowers_the_output_error_and_moves_the_bias():
    from bdecomp.decomposer.fit import fit_layer

    X, W = _correlated_problem(seed=5, n=2000)
    layer, sampler, stats = _gemm_layer_with_patches(X, W)
    qp = calibrate.choose_qparams(stats, 2)
    _, plain, err_plain = fit_layer(layer, 2, qp, sampler, "weight", bias_correction=False)
    _, corrected, err_corr = fit_layer(layer, 2, qp, sampler, "weight", bias_correction=True)
    assert err_corr < err_plain
    assert np.any(corrected.bias != 0) and np.all(plain.bias == 0)


def test_data_aware_method_lowers_the_output_error_of_fit_layer():
    from bdecomp.decomposer.fit import fit_layer

    X, W = _correlated_problem(seed=6, n=2000)
    layer, sampler, stats = _gemm_layer_with_patches(X, W)
    qp = calibrate.choose_qparams(stats, 4)
    _, _, err_weight = fit_layer(layer, 3, qp, sampler, "weight", bias_correction=True)
    _, _, err_data = fit_layer(layer, 3, qp, sampler, "data", bias_correction=True)
    assert err_data < 0.9 * err_weight
