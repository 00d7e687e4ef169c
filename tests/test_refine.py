"""Output-aware activation steps (`--range output`): the step multiple chosen for the layers that
read a tensor, not for the tensor alone."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import make_images, make_model, save_model, weights
from onnx import helper

import bdecomp
from bdecomp.decomposer import refine
from bdecomp.decomposer.calibrate import QParams, quantize_dequantize


def skewed_case(seed: int = 0):
    """Channel 0 is rare and large (clipped by an activation-MSE range) but carries the layer's
    big weights; the other channels are dense and small."""
    rng = np.random.default_rng(seed)
    X = np.abs(rng.standard_normal((4096, 1, 8))).astype(np.float32) * 0.3
    spikes = rng.random(4096) < 0.03
    X[spikes, 0, 0] = rng.uniform(2.0, 4.0, spikes.sum())
    W = rng.standard_normal((6, 8)).astype(np.float32) * 0.05
    W[:, 0] = rng.choice([-3.0, 3.0], 6)
    return X, W


def test_the_refined_step_gives_less_output_error_when_the_weights_amplify_clipped_inputs():
    X, W = skewed_case()
    qp = QParams(0.1, 0, 4)  # clips at 1.5: the spikes of channel 0 are cut
    better = refine.refine_for_outputs(qp, [(X, W, 1)])
    assert better.scale > qp.scale  # a longer range, for the amplified spikes
    assert refine.output_error(better, [(X, W, 1)]) < 0.9 * refine.output_error(qp, [(X, W, 1)])


def test_refinement_never_increases_the_output_error_and_keeps_the_zero_point():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((2048, 2, 12)).astype(np.float32)
    W = rng.standard_normal((4, 12)).astype(np.float32)
    for qp in (QParams(0.3, 7, 4), QParams(0.05, 128, 8), QParams(1.0, 2, 2, tuple(np.linspace(0.5, 1.5, 12)))):
        r = refine.refine_for_outputs(qp, [(X, W, 2)])
        assert r.zero_point == qp.zero_point and r.bits == qp.bits
        assert refine.output_error(r, [(X, W, 2)]) <= refine.output_error(qp, [(X, W, 2)])


def test_channel_steps_are_scaled_together():
    qp = QParams(1.0, 0, 4, (0.5, 1.0, 2.0))
    s = refine.scaled(qp, 1.25)
    np.testing.assert_allclose(s.channel_scales, np.float32([0.625, 1.25, 2.5]))
    assert s.scale == np.float32(1.25)


def test_without_readers_the_quantizer_is_left_as_is():
    qp = QParams(0.2, 3, 4)
    assert refine.refine_for_outputs(qp, []) is qp


def test_the_output_error_is_what_the_layer_sees():
    X, W = skewed_case(2)
    qp = QParams(0.2, 0, 3)
    Y = X[:, 0] @ W.T
    Yh = quantize_dequantize(X[:, 0], qp) @ W.T
    expect = float(((Y - Yh).astype(np.float64) ** 2).sum() / (Y.astype(np.float64) ** 2).sum())
    assert refine.output_error(qp, [(X, W, 1)]) == pytest.approx(expect, rel=1e-9)


def options_of(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["bdecomp.options"])


def test_convert_uses_output_aware_steps_by_default_and_records_which_ranges_it_used(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["s"], name="stem"),  # D = 3: stays float
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    src = save_model(make_model(nodes, {"w0": weights(rng, 16, 3, 1, 1), "w": weights(rng, 8, 16, 3, 3)},
                                ["N", 3, 8, 8]), tmp_path / "m.onnx")
    calib = make_images(tmp_path / "calib", 2, (8, 8))
    bdecomp.convert(src, tmp_path / "a.onnx", bases=2, act_bits=4, calib=calib, progress=False)
    assert options_of(tmp_path / "a.onnx")["range_method"] == "output"
    # no calibration patches without the data-aware fit or bias correction: plain MSE ranges
    bdecomp.convert(src, tmp_path / "b.onnx", bases=2, act_bits=4, calib=calib, method="weight",
                    bias_correction=False, progress=False)
    assert options_of(tmp_path / "b.onnx")["range_method"] == "mse"
