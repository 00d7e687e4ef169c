"""Per-channel activation steps: chosen per channel on calibration data, folded into the layer."""
from __future__ import annotations

import numpy as np
import pytest

from bdecomp.decomposer import calibrate, fold
from bdecomp.decomposer.calibrate import ChannelStats, QParams, TensorStats
from bdecomp.decomposer.rewrite import Layer


def channel_spread_activations(seed: int = 0) -> np.ndarray:
    """Post-ReLU NCHW activations whose channels differ in range by up to 100x."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((6, 8, 10, 10)), 0).astype(np.float32)
    return x * np.logspace(-2, 0, 8, dtype=np.float32)[None, :, None, None]


def stats_of(x: np.ndarray, axis: int = 1) -> tuple[TensorStats, ChannelStats]:
    rng = np.random.default_rng(0)
    ts, cs = TensorStats(), ChannelStats(axis)
    for img in x:
        ts.update(img[None], rng)
        cs.update(img[None], rng)
    return ts, cs


def quant_mse(x: np.ndarray, qp: QParams) -> float:
    scales = None if qp.channel_scales is None else np.array(qp.channel_scales, np.float32)[None, :, None, None]
    return float(((calibrate.quantize_dequantize(x, qp, scales) - x) ** 2).mean())


@pytest.mark.parametrize("method", ["mse", "minmax"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_channel_steps_quantize_with_less_error_than_one_step_per_tensor(method, bits):
    x = channel_spread_activations()
    ts, cs = stats_of(x)
    per_tensor = calibrate.choose_qparams(ts, bits, method)
    per_channel = calibrate.choose_channel_scales(cs, per_tensor, method)
    assert len(per_channel.channel_scales) == 8
    assert quant_mse(x, per_channel) < quant_mse(x, per_tensor)


def test_channel_steps_share_the_zero_point_of_the_tensor_quantizer():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 3, 9, 9)) * np.array([0.5, 1.0, 2.0])[None, :, None, None]).astype(np.float32)
    ts, cs = stats_of(x)
    base = calibrate.choose_qparams(ts, 4)
    assert base.zero_point > 0  # signed input
    q = calibrate.choose_channel_scales(cs, base)
    assert q.zero_point == base.zero_point and q.bits == base.bits
    assert all(np.isfinite(s) and s > 0 for s in q.channel_scales)
    assert q.channel_scales[0] < q.channel_scales[2]  # the narrow channel gets the finer step


def test_a_channel_with_a_denormal_range_keeps_the_tensor_step_without_warnings():
    x = channel_spread_activations()
    x[:, 5] = np.float32(1e-42)  # its steps would underflow float32 to 0 (seen in ESPNet)
    ts, cs = stats_of(x)
    base = calibrate.choose_qparams(ts, 4)
    with np.errstate(divide="raise", invalid="raise"):  # the RuntimeWarning users saw
        q = calibrate.choose_channel_scales(cs, base)
    assert q.channel_scales[5] == np.float32(base.scale)


def test_an_always_zero_channel_keeps_the_tensor_step():
    x = channel_spread_activations()
    x[:, 3] = 0
    ts, cs = stats_of(x)
    base = calibrate.choose_qparams(ts, 4)
    assert calibrate.choose_channel_scales(cs, base).channel_scales[3] == pytest.approx(base.scale)


def test_channel_stats_keep_channels_of_feature_rows_on_the_last_axis():
    rng = np.random.default_rng(2)
    rows = (rng.random((50, 5)) * np.arange(1, 6)).astype(np.float32)
    cs = ChannelStats(-1)
    cs.update(rows, rng)
    np.testing.assert_allclose(cs.hi, rows.max(axis=0))
    assert cs.sample().shape[0] == 5


def conv_layer(rng, cin=6, cout=4, group=2, kh=3) -> Layer:
    w = rng.standard_normal((cout, cin // group * kh * kh)).astype(np.float32)
    return Layer("conv", "Conv", "x", "y", w, np.zeros(cout), (cout, cin // group, kh, kh), group=group)


def test_folded_layer_on_folded_patches_gives_the_original_output():
    rng = np.random.default_rng(3)
    L = conv_layer(rng)
    qp = QParams(1.0, 0, 4, tuple(float(v) for v in rng.uniform(0.1, 3.0, 6).astype(np.float32)))
    P = rng.standard_normal((40, 2, L.depth)).astype(np.float32)  # [patches, groups, D]
    Lf, Pf = fold.fold_layer(L, qp), fold.fold_patches(P, L, qp)
    for g in range(2):
        rows = slice(2 * g, 2 * g + 2)
        np.testing.assert_allclose(Pf[:, g] @ Lf.weight[rows].T, P[:, g] @ L.weight[rows].T, rtol=1e-4, atol=1e-4)


def test_element_scales_follow_the_channel_tap_order_of_the_weights():
    es = fold.element_scales([1.0, 2.0, 3.0, 4.0], group=2, depth=2 * 9)
    assert es.shape == (2, 18)
    assert list(es[0, 8:10]) == [1.0, 2.0] and list(es[1, 8:10]) == [3.0, 4.0]


def test_a_per_tensor_quantizer_leaves_the_layer_unfolded():
    L = conv_layer(np.random.default_rng(4))
    assert fold.fold_layer(L, QParams(0.5, 0, 4)) is L
