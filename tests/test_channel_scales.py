"""Per-channel activation scales in the native quantize + pack entry points (bdecomp.native).

Read as a spec: with ``channel_scales`` (one float32 scale per channel, shared zero point) the code
of channel c is clamp(rint(x / s[c]) + z, 0, 2^Q − 1) — the same single float32 division as
onnxruntime's Div(x, scale[1, C, 1, 1]) — packed exactly as the per-tensor codes are.
``channel_scales=None`` is the per-tensor behaviour, covered by tests/test_kernels.py.

quantize_pack / im2col_quantize_pack take no ISA: they run AVX2 code where the CPU has it, else
scalar code.  The scalar code is exercised everywhere anyway: by the channel-last path (scalar
only), and by the rows of fewer than 8 pixels and the tails of the rows (the 8-lane AVX2 loop
hands its last n mod 8 elements to the scalar code) drawn below.  The conv kernels do take an ISA
and are checked on channel-scaled activations for every ISA this CPU runs.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

native = pytest.importorskip("bdecomp.native", reason="native kernels not built")
from bdecomp.runtime import reference as ref  # noqa: E402  (conv_acc / unpack_basis, read only)

from test_kernels import (ISAS, SETTINGS, draw_geometry, make_conv, pack_codes, patches,  # noqa: E402
                          reference_acc, small_case)


# ------------------------------------------------------------------------------------------------
# the expected codes, written out here (independent of the C code and of runtime/reference.py)


def per_channel_codes(x, channel_scales, zero_point, bits, channel_axis) -> np.ndarray:
    """uint8 codes of x: clip(rint(x / s[c]) + z, 0, 2^Q − 1), the quotient a float32 division
    (float32 x by the float32 scale of its channel, as onnxruntime's Div), half to even, NaN → z."""
    x = np.asarray(x, np.float32)
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    s = np.asarray(channel_scales, np.float32).reshape(shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = x / s
        assert q.dtype == np.float32
        t = np.rint(q).astype(np.float64)
    t = np.where(np.isnan(t), 0.0, t)
    return np.clip(t + zero_point, 0, 2**bits - 1).astype(np.uint8)




def spread_scales(rng, c) -> np.ndarray:
    """c float32 scales spread over four decades, so channels quantize very differently."""
    return (10.0 ** rng.uniform(-3, 1, c)).astype(np.float32)


def channel_data(rng, shape, scales, bits, channel_axis) -> np.ndarray:
    """Floats covering each channel's code range, plus exact ties, NaN, ±inf and 0."""
    bshape = [1] * len(shape)
    bshape[channel_axis] = -1
    s = scales.reshape(bshape)
    x = (rng.standard_normal(shape) * s * 2 ** (bits - 1)).astype(np.float32)
    flat, sflat = x.reshape(-1), np.broadcast_to(s, shape).reshape(-1)
    m = min(flat.size, 8)
    idx = rng.choice(flat.size, m, replace=False)
    mult = np.array([0.5, -2.5, 1.5, -0.5, 0.0, np.nan, np.inf, -np.inf], np.float32)[:m]
    with np.errstate(invalid="ignore"):
        flat[idx] = mult * sflat[idx]
    return x


# ------------------------------------------------------------------------------------------------
# quantize_pack


@st.composite
def channel_first_cases(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 70))
    n = draw(st.integers(1, 2))
    # rows shorter than 8 (all scalar), with AVX2 tails, longer than a 256-pixel block, and none
    spatial = tuple(draw(st.one_of(st.lists(st.integers(1, 7), min_size=0, max_size=2),
                                   st.sampled_from([[300], [17, 19]]))))
    bits = draw(st.integers(1, 8))
    zp = draw(st.integers(0, 2**bits - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = spread_scales(rng, c)
    x = channel_data(rng, (n, c) + spatial, s, bits, 1)
    return dict(x=x, groups=groups, bits=bits, zero_point=zp, channel_scales=s,
                scale=float(np.float32(rng.uniform(0.01, 1.0))))


@SETTINGS
@given(a=channel_first_cases())
def test_quantize_pack_channel_first_codes_use_each_channels_own_scale(a):
    x = a["x"]
    got = native.quantize_pack(x, groups=a["groups"], scale=a["scale"], zero_point=a["zero_point"],
                               bits=a["bits"], channel_scales=a["channel_scales"], threads=2)
    codes = per_channel_codes(x, a["channel_scales"], a["zero_point"], a["bits"], channel_axis=1)
    codes_pc = np.moveaxis(codes, 1, -1).reshape(-1, x.shape[1])  # pixel = (n, *spatial)
    np.testing.assert_array_equal(got, pack_codes(codes_pc, a["groups"], a["bits"]))


@st.composite
def channel_last_cases(draw):
    """Gemm / MatMul inputs: [rows, C] or [batch, rows, C], scales along the last axis."""
    groups = draw(st.sampled_from([1, 1, 2]))
    c = groups * draw(st.integers(1, 150))
    lead = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)))
    bits = draw(st.integers(1, 8))
    zp = draw(st.integers(0, 2**bits - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = spread_scales(rng, c)
    x = channel_data(rng, lead + (c,), s, bits, -1)
    return dict(x=x, groups=groups, bits=bits, zero_point=zp, channel_scales=s, scale=1.0)


@SETTINGS
@given(a=channel_last_cases())
def test_quantize_pack_channel_last_rows_use_each_columns_own_scale(a):
    x = a["x"]
    got = native.quantize_pack(x, groups=a["groups"], scale=a["scale"], zero_point=a["zero_point"],
                               bits=a["bits"], channel_axis=-1, channel_scales=a["channel_scales"])
    codes = per_channel_codes(x, a["channel_scales"], a["zero_point"], a["bits"], channel_axis=-1)
    np.testing.assert_array_equal(got, pack_codes(codes.reshape(-1, x.shape[-1]), a["groups"], a["bits"]))


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_quantize_pack_divides_by_the_channel_scale_like_onnxruntime_not_by_its_reciprocal(channel_axis):
    # float32 pairs where rint(x / s) and rint(x · (1 / s)) differ: only the division is right
    s = np.array([0.1, 0.3, 0.7, 3.0], np.float32)
    x = np.array([1.55, 0.75000006, 3.1500001, 28.499998], np.float32)
    with np.errstate(all="ignore"):
        assert np.all(np.rint(x / s) != np.rint(x * (np.float32(1) / s)))  # the example bites
    x9 = np.tile(x[:, None], (1, 9))  # 9 pixels: the 8-lane loop and its tail
    xin = x9[None] if channel_axis == 1 else np.ascontiguousarray(x9.T)
    got = native.quantize_pack(xin, groups=1, scale=1.0, zero_point=100, bits=8,
                               channel_axis=channel_axis, channel_scales=s)
    codes = np.tile((np.rint(x / s) + 100).astype(np.uint8), (9, 1))  # [pixel, channel]
    np.testing.assert_array_equal(codes[0], [115, 102, 104, 109])
    np.testing.assert_array_equal(got, pack_codes(codes, 1, 8))


@SETTINGS
@given(a=channel_first_cases(), channel_last=st.booleans())
def test_equal_channel_scales_give_the_per_tensor_result_bit_for_bit(a, channel_last):
    x = np.ascontiguousarray(np.moveaxis(a["x"], 1, -1)) if channel_last else a["x"]
    axis = -1 if channel_last else 1
    kw = dict(groups=a["groups"], zero_point=a["zero_point"], bits=a["bits"], channel_axis=axis)
    same = np.full(x.shape[axis], a["scale"], np.float32)
    np.testing.assert_array_equal(native.quantize_pack(x, scale=a["scale"], channel_scales=same, **kw),
                                  native.quantize_pack(x, scale=a["scale"], **kw))


def test_the_per_tensor_scale_is_unused_when_channel_scales_are_given():
    rng = np.random.default_rng(4)
    s = spread_scales(rng, 6)
    x = channel_data(rng, (2, 6, 5), s, 4, 1)
    runs = [native.quantize_pack(x, groups=1, scale=scale, zero_point=7, bits=4, channel_scales=s)
            for scale in (1.0, 0.001, 1000.0)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def test_sign_mode_ignores_channel_scales():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 10, 4, 3)).astype(np.float32)
    s = spread_scales(rng, 10)
    plain = native.quantize_pack(x, groups=2, scale=1.0, zero_point=0, bits=1, sign=True)
    scaled = native.quantize_pack(x, groups=2, scale=1.0, zero_point=0, bits=1, sign=True, channel_scales=s)
    np.testing.assert_array_equal(scaled, plain)
    p_plain = native.im2col_quantize_pack(x, kernel=(3, 3), pads=(1, 1, 1, 1), scale=1.0, zero_point=0,
                                          bits=1, sign=True)[0]
    p_scaled = native.im2col_quantize_pack(x, kernel=(3, 3), pads=(1, 1, 1, 1), scale=1.0, zero_point=0,
                                           bits=1, sign=True, channel_scales=s)[0]
    np.testing.assert_array_equal(p_scaled, p_plain)


def test_channel_scales_accept_any_real_one_dimensional_array_like():
    rng = np.random.default_rng(6)
    s = spread_scales(rng, 5)
    x = channel_data(rng, (1, 5, 4, 4), s, 6, 1)
    kw = dict(groups=1, scale=1.0, zero_point=20, bits=6)
    expect = native.quantize_pack(x, channel_scales=s, **kw)
    strided = np.zeros(10, np.float64)
    strided[::2] = s
    for variant in (s.tolist(), tuple(s.tolist()), s.astype(np.float64), strided[::2]):
        np.testing.assert_array_equal(native.quantize_pack(x, channel_scales=variant, **kw), expect)
    ints = native.quantize_pack(x, channel_scales=np.arange(1, 6), **kw)
    np.testing.assert_array_equal(ints, native.quantize_pack(x, channel_scales=np.arange(1.0, 6.0), **kw))


def test_plan_cache_never_reuses_the_plan_of_other_channel_scales():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32) * 4
    kw = dict(groups=1, scale=1.0, zero_point=8, bits=4)

    def expect(s):
        codes = per_channel_codes(x, s, 8, 4, channel_axis=1)
        return pack_codes(np.moveaxis(codes, 1, -1).reshape(-1, 4), 1, 4)

    s = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    np.testing.assert_array_equal(native.quantize_pack(x, channel_scales=s, **kw), expect(s))
    s_first = s.copy()
    s[2] = 0.125  # the same array object, changed in place
    np.testing.assert_array_equal(native.quantize_pack(x, channel_scales=s, **kw), expect(s))
    other = np.array([4.0, 2.0, 1.0, 0.5], np.float32)  # a different array, same dtype and shape
    np.testing.assert_array_equal(native.quantize_pack(x, channel_scales=other, **kw), expect(other))
    np.testing.assert_array_equal(native.quantize_pack(x, channel_scales=s_first, **kw), expect(s_first))
    np.testing.assert_array_equal(native.quantize_pack(x, **kw),  # per-tensor again
                                  pack_codes(np.moveaxis(ref.quantize(x, 1.0, 8, 4), 1, -1).reshape(-1, 4), 1, 4))
    s[:] = 0.0  # a cached plan never keeps the caller's array: bad values are still caught
    with pytest.raises(ValueError):
        native.quantize_pack(x, channel_scales=s, **kw)


# ------------------------------------------------------------------------------------------------
# im2col_quantize_pack


@st.composite
def patch_cases(draw):
    c = draw(st.sampled_from([1, 3, 5, 16, 17, 70]))
    g = draw_geometry(draw)
    n, h, w = g["n"], g["h"], g["w"]
    bits = draw(st.integers(1, 8))
    zp = draw(st.integers(0, 2**bits - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = spread_scales(rng, c)
    x = channel_data(rng, (n, c, h, w), s, bits, 1)
    return dict(x=x, kernel=g["kernel"], strides=g["strides"], dilations=g["dilations"], pads=g["pads"],
                bits=bits, zero_point=zp, channel_scales=s, scale=float(np.float32(rng.uniform(0.01, 1.0))))


def _im2col_pack(a, **extra):
    return native.im2col_quantize_pack(
        a["x"], kernel=a["kernel"], strides=a["strides"], pads=a["pads"], dilations=a["dilations"],
        scale=a["scale"], zero_point=a["zero_point"], bits=a["bits"], channel_scales=a["channel_scales"],
        **extra)


@SETTINGS
@given(a=patch_cases())
def test_im2col_quantize_pack_with_channel_scales_equals_packing_of_per_channel_patch_codes(a):
    act, n, oh, ow = _im2col_pack(a, threads=2)
    codes = per_channel_codes(a["x"], a["channel_scales"], a["zero_point"], a["bits"], channel_axis=1)
    expect = pack_codes(patches(codes, np.uint8(a["zero_point"]), a["kernel"], a["strides"],
                                a["dilations"], a["pads"]), 1, a["bits"])
    assert (n * oh * ow,) == expect.shape[:1]
    np.testing.assert_array_equal(act, expect)


@SETTINGS
@given(a=patch_cases())
def test_im2col_quantize_pack_equals_quantize_pack_of_the_im2col_with_scales_repeated_per_tap(a):
    act = _im2col_pack(a)[0]
    cols = patches(a["x"], np.float32(0.0), a["kernel"], a["strides"], a["dilations"], a["pads"])
    taps = a["kernel"][0] * a["kernel"][1]
    expect = native.quantize_pack(cols, groups=1, scale=a["scale"], zero_point=a["zero_point"], bits=a["bits"],
                                  channel_axis=-1, channel_scales=np.repeat(a["channel_scales"], taps))
    np.testing.assert_array_equal(act, expect)


def test_im2col_padding_code_is_the_zero_point_whatever_the_channel_scales():
    # an all-NaN image codes to z everywhere too, so pad with a value that does not: x = +inf → 2^Q − 1
    x = np.full((1, 3, 2, 2), np.inf, np.float32)
    s = np.array([1e-3, 1.0, 1e3], np.float32)
    act, n, oh, ow = native.im2col_quantize_pack(x, kernel=(3, 3), pads=(1, 1, 1, 1), scale=1.0,
                                                 zero_point=5, bits=4, channel_scales=s)
    inside = np.zeros((1, 3, 4, 4), bool)
    inside[:, :, 1:3, 1:3] = True
    is_in = patches(inside, False, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0))  # the taps inside the image
    codes = np.where(is_in, 15, 5).astype(np.uint8)
    np.testing.assert_array_equal(act, pack_codes(codes, 1, 4))


# ------------------------------------------------------------------------------------------------
# the conv kernels of every ISA on channel-scaled activations


@pytest.mark.parametrize("isa", ISAS)
def test_grouped_conv_accumulators_on_channel_scaled_activations_equal_the_reference(isa):
    case = small_case(c=12, h=7, w=6, groups=3, cout=6, k=3, bits=5, zero_point=9)
    rng = np.random.default_rng(12)
    s = spread_scales(rng, 12)
    x = channel_data(rng, (1, 12, 7, 6), s, 5, 1)
    case["codes"] = per_channel_codes(x, s, 9, 5, channel_axis=1)
    act = native.quantize_pack(x, groups=3, scale=1.0, zero_point=9, bits=5, channel_scales=s)
    _, acc = make_conv(case).run(act, 1, 7, 6, isa=isa, return_acc=True)
    np.testing.assert_array_equal(acc, reference_acc(case))


@pytest.mark.parametrize("isa", ISAS)
def test_patch_conv_accumulators_on_channel_scaled_patches_equal_the_reference(isa):
    case = small_case(c=3, h=9, w=8, cout=6, k=3, bits=4, zero_point=5, strides=(2, 1), pads=(1, 0, 2, 1))
    rng = np.random.default_rng(13)
    s = np.array([0.05, 0.5, 5.0], np.float32)
    x = channel_data(rng, (1, 3, 9, 8), s, 4, 1)
    case["codes"] = per_channel_codes(x, s, 5, 4, channel_axis=1)
    act, n, oh, ow = native.im2col_quantize_pack(x, kernel=case["kernel"], strides=case["strides"],
                                                 pads=case["pads"], scale=1.0, zero_point=5, bits=4,
                                                 channel_scales=s)
    patch = native.PackedConv(case["basis"], case["coeffs"], case["bias"], cin=case["depth"], groups=1,
                              kernel=(1, 1), bits=4, zero_point=5, scale=1.0)
    _, acc = patch.run(act, n, oh, ow, isa=isa, return_acc=True)
    np.testing.assert_array_equal(acc.reshape(reference_acc(case).shape), reference_acc(case))


# ------------------------------------------------------------------------------------------------
# threads


def test_channel_scaled_packing_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("BDECOMP_MIN_PARALLEL_WORK", "0")  # really run the parallel code
    rng = np.random.default_rng(14)
    s = spread_scales(rng, 70)
    x = channel_data(rng, (2, 70, 9, 7), s, 5, 1)
    x_last = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    runs = []
    for t in (1, 2, 3):
        kw = dict(scale=1.0, zero_point=2, bits=5, threads=t, channel_scales=s)
        runs.append((native.quantize_pack(x, groups=2, **kw),
                     native.quantize_pack(x_last, groups=2, channel_axis=-1, **kw),
                     native.im2col_quantize_pack(x, kernel=(3, 3), strides=(2, 1), pads=(0, 1, 2, 1), **kw)[0]))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------
# bad channel scales: ValueError from Python, BD_EINVAL from C


BAD_SCALES = [
    pytest.param(np.ones(4, np.float32), id="too-short"),
    pytest.param(np.ones(6, np.float32), id="too-long"),
    pytest.param(np.ones((1, 5), np.float32), id="not-1d"),
    pytest.param(np.float32(1.0), id="scalar"),
    pytest.param(np.array([1, 1, 0, 1, 1], np.float32), id="zero"),
    pytest.param(np.array([1, 1, np.nan, 1, 1], np.float32), id="nan"),
    pytest.param(np.array([1, -1, 1, 1, 1], np.float32), id="negative"),
    pytest.param(np.array([1, 1, 1, np.inf, 1], np.float32), id="inf"),
    pytest.param(np.array([1, 1, 1, 1, 1e-50]), id="zero-in-float32"),
    pytest.param(np.array([1, 1, 1, 1, 1e39]), id="inf-in-float32"),
    pytest.param(["1", "1", "1", "1", "1"], id="strings"),
    pytest.param(np.ones(5, bool), id="booleans"),
    pytest.param(np.ones(5, np.complex64), id="complex"),
]


@pytest.mark.parametrize("bad", BAD_SCALES)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_quantize_pack_rejects_bad_channel_scales(bad, channel_axis):
    x = np.ones((2, 5, 3) if channel_axis == 1 else (2, 3, 5), np.float32)
    with pytest.raises(ValueError, match="channel_scales"):
        native.quantize_pack(x, groups=1, scale=1.0, zero_point=0, bits=4, channel_axis=channel_axis,
                             channel_scales=bad)


@pytest.mark.parametrize("bad", BAD_SCALES)
def test_im2col_quantize_pack_rejects_bad_channel_scales(bad):
    with pytest.raises(ValueError, match="channel_scales"):
        native.im2col_quantize_pack(np.ones((1, 5, 4, 4), np.float32), kernel=(3, 3), scale=1.0,
                                    zero_point=0, bits=4, channel_scales=bad)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_c_entry_points_reject_bad_channel_scales_with_einval(value):
    """The C layer checks the scales too, for callers other than the Python wrapper."""
    ffi, lib = native.ffi, native.lib
    x = np.ones((1, 4, 3, 3), np.float32)
    act = np.zeros(1024, np.uint64)
    good = np.ones(4, np.float32)
    bad = good.copy()
    bad[3] = value
    xp, ap = ffi.from_buffer("float[]", x), ffi.from_buffer("uint64_t[]", act)
    for cs, status in ((ffi.NULL, lib.BD_OK), (good, lib.BD_OK), (bad, lib.BD_EINVAL)):
        csp = cs if cs is ffi.NULL else ffi.from_buffer("float[]", cs)
        for inner in (9, 1):  # channel-first and channel-last
            assert lib.bd_quantize_pack(xp, 1, 4, inner, 1, 1.0, csp, 0, 4, 0, ap, 0, 1) == status
        p = ffi.new("bd_conv_params *")
        p.n, p.h, p.w, p.c, p.groups, p.cout, p.kh, p.kw = 1, 3, 3, 4, 1, 1, 3, 3
        p.stride_h = p.stride_w = p.dil_h = p.dil_w = 1
        p.pad_top = p.pad_left = p.pad_bottom = p.pad_right = 1
        p.oh, p.ow, p.bits, p.k, p.scale = 3, 3, 4, 1, 1.0
        p.act_min, p.act_max = float("-inf"), float("inf")
        assert lib.bd_im2col_quantize_pack(xp, p, csp, ap, 0, 1) == status
        # sign mode reads no scale: the bad ones are ignored
        assert lib.bd_quantize_pack(xp, 1, 4, 9, 1, 1.0, csp, 0, 1, 1, ap, 0, 1) == lib.BD_OK
