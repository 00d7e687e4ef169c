"""Activation quantizer parameters (DESIGN §2): q = clip(round(x/s) + z, 0, 2^Q − 1), x̂ = s (q − z).

Read as a spec: 0 is always exactly representable (zero padding stays exact), a zero range never
divides by zero, the MSE-chosen range is never worse than the plain min/max range on the values it
was chosen from, and non-negative (post-ReLU) inputs use z = 0.
"""
from __future__ import annotations

import numpy as np
import pytest

from bdecomp.decomposer.calibrate import (SAMPLES_PER_BATCH, QParams, TensorStats, choose_qparams,
                                          qparams_from_range)

BITS = [1, 2, 3, 4, 6, 8]


def dequantize(x: np.ndarray, q: QParams) -> np.ndarray:
    """x̂ for x, computed as the quantizer does (float32 division, round half to even)."""
    codes = np.clip(np.rint(np.asarray(x, np.float32) / np.float32(q.scale)) + q.zero_point, 0, (1 << q.bits) - 1)
    return (codes - q.zero_point) * q.scale


def quant_mse(x: np.ndarray, q: QParams) -> float:
    return float(np.mean((x.astype(np.float64) - dequantize(x, q)) ** 2))


def stats_of(*batches: np.ndarray, seed: int = 0) -> TensorStats:
    st, rng = TensorStats(), np.random.default_rng(seed)
    for b in batches:
        st.update(np.asarray(b, np.float32), rng)
    return st


RANGES = [(-1.3, 2.7), (0.5, 2.0), (-3.0, -1.0), (-1e-3, 40.0), (-5.0, 5.0), (0.0, 1.0), (-7.25, 0.0)]


# ---------------------------------------------------------------- qparams_from_range


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lo, hi", RANGES)
def test_zero_is_exactly_representable(lo, hi, bits):
    q = qparams_from_range(lo, hi, bits)
    assert isinstance(q.zero_point, int) and 0 <= q.zero_point <= (1 << bits) - 1
    assert dequantize(np.zeros(3), q).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lo, hi", RANGES)
def test_range_is_widened_to_contain_zero_and_covered_to_half_a_step(lo, hi, bits):
    q = qparams_from_range(lo, hi, bits)
    qmax = (1 << bits) - 1
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    slack = 0.5 * q.scale * (1 + 1e-6)  # z is rounded: the ends may fall half a step short
    assert -q.zero_point * q.scale <= lo0 + slack
    assert (qmax - q.zero_point) * q.scale >= hi0 - slack


@pytest.mark.parametrize("bits", BITS)
def test_zero_range_gets_a_finite_positive_step(bits):
    q = qparams_from_range(0.0, 0.0, bits)
    assert np.isfinite(q.scale) and q.scale > 0
    assert dequantize(np.zeros(4), q).tolist() == [0.0] * 4


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_all_zero_calibration_input_gets_a_finite_step_and_stays_exact(method, bits):
    q = choose_qparams(stats_of(np.zeros((2, 8, 5, 5))), bits, method)
    assert np.isfinite(q.scale) and q.scale > 0
    assert dequantize(np.zeros(4), q).tolist() == [0.0] * 4


def test_a_tensor_never_seen_gets_a_finite_step():
    q = choose_qparams(TensorStats(), 8, "mse")
    assert np.isfinite(q.scale) and q.scale > 0


# ---------------------------------------------------------------- choose_qparams


def long_tailed(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    return {"student-t2": lambda: rng.standard_t(2, n),
            "laplace": lambda: rng.laplace(size=n),
            "relu-t3": lambda: np.maximum(rng.standard_t(3, n), 0.0),
            "lognormal": lambda: rng.lognormal(0.0, 1.2, n) - 0.5}[kind]().astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["student-t2", "laplace", "relu-t3", "lognormal"])
def test_mse_range_never_has_larger_error_than_min_max_on_a_long_tailed_sample(kind, bits):
    rng = np.random.default_rng(bits)
    # three batches, each small enough to be kept whole, so the statistics hold exactly these values
    batches = [long_tailed(kind, rng, 2000) for _ in range(3)]
    assert sum(b.size for b in batches) <= 3 * SAMPLES_PER_BATCH
    st = stats_of(*batches)
    x = np.concatenate(batches)
    assert quant_mse(x, choose_qparams(st, bits, "mse")) <= quant_mse(x, choose_qparams(st, bits, "minmax"))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["laplace", "relu-t3"])
def test_mse_range_clips_a_long_tail_at_low_bit_widths(kind, bits):
    # exponential-ish tails: a few rare extremes should not set the step of all other values
    x = long_tailed(kind, np.random.default_rng(0), 6000)
    st = stats_of(x)
    mse, minmax = choose_qparams(st, bits, "mse"), choose_qparams(st, bits, "minmax")
    assert mse.scale < minmax.scale
    assert quant_mse(x, mse) < 0.8 * quant_mse(x, minmax)


def test_min_max_method_uses_the_observed_range():
    st = stats_of(np.array([-1.0, 0.25, 3.0]), np.array([2.0, -0.5]))
    assert choose_qparams(st, 8, "minmax") == qparams_from_range(-1.0, 3.0, 8)


def test_unknown_range_method_raises_value_error():
    with pytest.raises(ValueError):
        choose_qparams(stats_of(np.arange(5.0) - 2), 8, "percentile99")


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", BITS)
def test_non_negative_inputs_get_zero_point_zero(method, bits):
    rng = np.random.default_rng(bits)
    post_relu = np.maximum(rng.standard_normal((4, 16, 8, 8)), 0.0)  # many exact zeros
    assert choose_qparams(stats_of(post_relu), bits, method).zero_point == 0
    assert qparams_from_range(0.0, 3.5, bits).zero_point == 0
    assert qparams_from_range(0.2, 3.5, bits).zero_point == 0


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_signed_inputs_get_a_positive_zero_point(method):
    x = np.random.default_rng(0).standard_normal(5000)
    q = choose_qparams(stats_of(x), 8, method)
    assert 0 < q.zero_point < 255
