"""The depthwise kernel (groups = C = Cout, straight from codes) against the reference and the
bit-plane kernels: the same integers and the same float outputs, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bdecomp import native
from bdecomp.runtime import reference as ref

from test_kernels import ISAS, SETTINGS, draw_geometry, make_conv, pack_nchw, random_basis, reference_acc


@st.composite
def depthwise_cases(draw):
    c = draw(st.integers(1, 24))
    g = draw_geometry(draw, kmax=5, size=14)
    n, h, w, (kh, kw) = g["n"], g["h"], g["w"], g["kernel"]
    k, bits = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    depth = kh * kw
    return dict(n=n, c=c, h=h, w=w, groups=c, cout=c, kernel=g["kernel"], strides=g["strides"], pads=g["pads"],
                dilations=g["dilations"], k=k, bits=bits, zero_point=int(rng.integers(0, 2**bits)), sign=False,
                scale=float(np.float32(rng.uniform(0.01, 2.0))),
                codes=rng.integers(0, 2**bits, (n, c, h, w)).astype(np.uint8),
                basis=random_basis(rng, c, k, depth), coeffs=rng.standard_normal((c, k)).astype(np.float32),
                bias=rng.standard_normal(c).astype(np.float32), depth=depth,
                act_min=float(rng.choice([-np.inf, 0.0])))


def depthwise(case) -> native.DepthwiseConv:
    return native.DepthwiseConv(case["basis"], case["coeffs"], case["bias"], cin=case["c"], groups=case["c"],
                                kernel=case["kernel"], strides=case["strides"], pads=case["pads"],
                                dilations=case["dilations"], bits=case["bits"], zero_point=case["zero_point"],
                                scale=case["scale"], act_min=case["act_min"])


@SETTINGS
@given(case=depthwise_cases())
def test_depthwise_accumulators_equal_the_reference_bit_for_bit(case):
    _, acc = depthwise(case).run_codes(case["codes"], threads=2, return_acc=True)
    np.testing.assert_array_equal(acc, reference_acc(case))


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(case=depthwise_cases())
def test_depthwise_float_outputs_equal_the_bit_plane_kernels_bit_for_bit(isa, case):
    y = depthwise(case).run_codes(case["codes"], threads=1)
    packed = make_conv(case, act_min=case["act_min"])
    expect = packed.run(pack_nchw(case["codes"], case["c"], case["bits"]), case["n"], case["h"], case["w"],
                        isa=isa, threads=1)
    np.testing.assert_array_equal(y, expect)


def test_depthwise_residual_is_added_before_the_clamp_like_the_other_kernels():
    rng = np.random.default_rng(4)
    case = dict(n=1, c=6, h=7, w=8, groups=6, cout=6, kernel=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
                dilations=(1, 1), k=3, bits=4, zero_point=5, sign=False, scale=0.25,
                codes=rng.integers(0, 16, (1, 6, 7, 8)).astype(np.uint8), basis=random_basis(rng, 6, 3, 9),
                coeffs=rng.standard_normal((6, 3)).astype(np.float32), bias=rng.standard_normal(6).astype(np.float32),
                depth=9, act_min=0.0)
    r = rng.standard_normal((1, 6, 7, 8)).astype(np.float32)
    y = depthwise(case).run_codes(case["codes"], residual=r)
    raw = depthwise(case).run_codes(case["codes"], clamp=False)
    np.testing.assert_array_equal(y, np.maximum(raw + r, np.float32(0)))
    packed = make_conv(case, act_min=0.0).run(pack_nchw(case["codes"], 6, 4), 1, 7, 8, isa="scalar", residual=r)
    assert y.tobytes() == packed.tobytes()


@pytest.mark.parametrize("channel_scales", [None, "per-channel"])
def test_quantize_codes_are_the_reference_codes(channel_scales):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 7, 9)) * 3).astype(np.float32)
    x[0, 0, 0, :3] = [np.nan, 0.25, -0.25]
    cs = rng.uniform(0.05, 1.0, 5).astype(np.float32) if channel_scales else None
    codes = native.quantize_codes(x, scale=0.3, zero_point=7, bits=4, channel_scales=cs, threads=2)
    s = np.float32(0.3) if cs is None else cs.reshape(1, 5, 1, 1)
    np.testing.assert_array_equal(codes, ref.quantize(x, s, 7, 4))


def test_depthwise_conv_refuses_a_layer_that_is_not_depthwise():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="groups = cin = cout"):
        native.DepthwiseConv(random_basis(rng, 4, 2, 2 * 9), rng.standard_normal((4, 2)).astype(np.float32), None,
                             cin=4, groups=2, kernel=(3, 3), bits=4, zero_point=0, scale=1.0)


def test_depthwise_run_rejects_codes_of_the_wrong_shape_or_type():
    rng = np.random.default_rng(3)
    conv = native.DepthwiseConv(random_basis(rng, 3, 2, 9), rng.standard_normal((3, 2)).astype(np.float32), None,
                                cin=3, groups=3, kernel=(3, 3), pads=(1, 1, 1, 1), bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError, match="codes must be"):
        conv.run_codes(np.zeros((1, 4, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="codes must be"):
        conv.run_codes(np.zeros((1, 3, 5, 5), np.float32))
