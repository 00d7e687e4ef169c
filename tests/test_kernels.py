"""The native kernels (bdecomp.native) against the numpy reference (bdecomp.runtime.reference).

Read as a spec: every ISA this CPU can run must reproduce the reference's integer accumulators
bit for bit, its float outputs to float rounding, and must reject bad arguments with ValueError.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

native = pytest.importorskip("bdecomp.native", reason="native kernels not built")
from bdecomp.runtime import reference as ref  # noqa: E402

ISAS = native.available_isas()
FAMILIES = ["popcount", "lut", "lut64"]  # kernel families (the lookup-table ones need a SIMD ISA)
# BDECOMP_TEST_EXAMPLES=2000 BDECOMP_TEST_RANDOM=1 for a longer, randomized soak run
SETTINGS = settings(
    max_examples=int(os.environ.get("BDECOMP_TEST_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not os.environ.get("BDECOMP_TEST_RANDOM"),
)


# ------------------------------------------------------------------------------------------------
# helpers: an independent numpy packer for the bit layout of bdecomp.h


def pack_codes(codes_pc: np.ndarray, groups: int, bits: int) -> np.ndarray:
    """codes [pixels, C] → uint64 (pixels, groups, bits, wpg): bit i of word w of plane b of group
    g = bit b of the code of channel g·Cg + 64·w + i."""
    p, c = codes_pc.shape
    cg = c // groups
    wpg = (cg + 63) // 64
    padded = np.zeros((p, groups, wpg * 64), np.uint8)
    padded[:, :, :cg] = codes_pc.reshape(p, groups, cg)
    planes = np.stack([(padded >> b) & 1 for b in range(bits)], axis=2)
    packed = np.packbits(planes, axis=-1, bitorder="little")  # (p, g, bits, wpg·8) bytes
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64).reshape(p, groups, bits, wpg)


def pack_nchw(codes: np.ndarray, groups: int, bits: int) -> np.ndarray:
    n, c, h, w = codes.shape
    return pack_codes(codes.transpose(0, 2, 3, 1).reshape(n * h * w, c), groups, bits)


def random_basis(rng, cout, k, depth) -> np.ndarray:
    signs = rng.integers(0, 2, (cout, k, depth)).astype(np.uint8)
    return np.packbits(signs, axis=-1, bitorder="little")


def draw_geometry(draw, kmax: int = 4, dmax: int = 2, size: int = 9) -> dict:
    """kernel, strides, dilations, pads and an input n × h × w the dilated kernel fits."""
    kh, kw = draw(st.integers(1, kmax)), draw(st.integers(1, kmax))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, dmax)), draw(st.integers(1, dmax))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    min_h = max(1, dh * (kh - 1) + 1 - pads[0] - pads[2])
    min_w = max(1, dw * (kw - 1) + 1 - pads[1] - pads[3])
    return dict(kernel=(kh, kw), strides=(sh, sw), dilations=(dh, dw), pads=pads,
                h=draw(st.integers(min_h, max(min_h, size))), w=draw(st.integers(min_w, max(min_w, size))),
                n=draw(st.integers(1, 2)))


@st.composite
def conv_cases(draw):
    """A random but valid binary convolution: shapes, geometry, quantization, data."""
    mode = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if mode == "dense":
        groups = 1
        c = draw(st.sampled_from([1, 3, 17, 63, 64, 65, 100, 128, 129, 150]))
    elif mode == "grouped":
        groups = draw(st.sampled_from([2, 3, 4]))
        c = groups * draw(st.integers(1, 150 // groups))
    else:
        c = draw(st.integers(1, 40))
        groups = c
    cout = groups * draw(st.integers(1, 3 if mode != "dense" else 6))
    g = draw_geometry(draw, kmax=5, dmax=3)
    n, h, w, (kh, kw) = g["n"], g["h"], g["w"], g["kernel"]
    k = draw(st.integers(1, 8))
    sign = draw(st.integers(0, 3)) == 0
    bits = 1 if sign else draw(st.integers(1, 8))
    zero_point = 0 if sign else draw(st.integers(0, 2**bits - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    depth = c // groups * kh * kw
    return dict(
        n=n, c=c, h=h, w=w, groups=groups, cout=cout, kernel=(kh, kw), strides=g["strides"],
        pads=g["pads"], dilations=g["dilations"], k=k, bits=bits, zero_point=zero_point, sign=sign,
        scale=float(np.float32(rng.uniform(0.01, 2.0))),
        codes=rng.integers(0, 2**bits, (n, c, h, w)).astype(np.uint8),
        basis=random_basis(rng, cout, k, depth),
        coeffs=rng.standard_normal((cout, k)).astype(np.float32),
        bias=rng.standard_normal(cout).astype(np.float32),
        depth=depth,
    )


def make_conv(case, **overrides) -> native.PackedConv:
    kw = dict(
        cin=case["c"], groups=case["groups"], kernel=case["kernel"], strides=case["strides"],
        pads=case["pads"], dilations=case["dilations"], bits=case["bits"],
        zero_point=case["zero_point"], scale=case["scale"], sign=case["sign"],
    )
    kw.update(overrides)
    return native.PackedConv(case["basis"], case["coeffs"], case["bias"], **kw)


def reference_acc(case) -> np.ndarray:
    return ref.conv_acc(
        case["codes"], ref.unpack_basis(case["basis"], case["depth"]), groups=case["groups"],
        kernel=case["kernel"], strides=case["strides"], pads=case["pads"],
        dilations=case["dilations"], zero_point=case["zero_point"], sign=case["sign"],
    )


def small_case(**changes):
    rng = np.random.default_rng(7)
    case = dict(n=1, c=8, h=5, w=5, groups=1, cout=4, kernel=(3, 3), strides=(1, 1),
                pads=(1, 1, 1, 1), dilations=(1, 1), k=2, bits=4, zero_point=3, sign=False,
                scale=0.5)
    case.update(changes)
    case["depth"] = case["c"] // case["groups"] * case["kernel"][0] * case["kernel"][1]
    case["codes"] = rng.integers(0, 2 ** case["bits"], (case["n"], case["c"], case["h"], case["w"])).astype(np.uint8)
    case["basis"] = random_basis(rng, case["cout"], case["k"], case["depth"])
    case["coeffs"] = rng.standard_normal((case["cout"], case["k"])).astype(np.float32)
    case["bias"] = rng.standard_normal(case["cout"]).astype(np.float32)
    return case


# ------------------------------------------------------------------------------------------------
# exactness against the reference


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(case=conv_cases())
def test_integer_accumulators_equal_reference_bit_for_bit(isa, case):
    conv = make_conv(case)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    _, acc = conv.run(act, case["n"], case["h"], case["w"], isa=isa, threads=2, return_acc=True)
    np.testing.assert_array_equal(acc, reference_acc(case))


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(case=conv_cases())
def test_float_output_matches_reference(isa, case):
    conv = make_conv(case)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    y = conv.run(act, case["n"], case["h"], case["w"], isa=isa, threads=1)
    A = reference_acc(case)
    expect = ref.conv_output(A, case["coeffs"], case["bias"], case["scale"], case["sign"])
    assert y.shape == expect.shape == conv.output_shape(case["n"], case["h"], case["w"])
    # float rounding of Σ_j c_j A_j is relative to the terms, not to their (cancelling) sum
    s_eff = case["scale"] * (0.5 if case["sign"] else 1.0)
    terms = s_eff * np.einsum("nhwok,ok->nohw", np.abs(A).astype(np.float64), np.abs(case["coeffs"]))
    tol = 1e-5 * np.abs(expect) + 1e-5 * s_eff + 1e-6 * terms
    assert np.all(np.abs(y.astype(np.float64) - expect) <= tol)


@SETTINGS
@given(case=conv_cases())
def test_all_isas_give_bit_identical_float_outputs(case):
    conv = make_conv(case)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    outs = [conv.run(act, case["n"], case["h"], case["w"], isa=isa) for isa in ISAS]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k,cout", [(3, 5), (4, 6), (6, 3), (8, 2)])
@pytest.mark.parametrize("geometry", [dict(kernel=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0)),
                                      dict(kernel=(3, 3), strides=(1, 2), pads=(1, 1, 1, 1)),
                                      dict(kernel=(3, 3), strides=(1, 1), pads=(0, 2, 1, 0))])
def test_long_rows_of_interior_pixels_give_the_reference_integers(isa, bits, k, cout, geometry):
    """Rows wide enough for the kernels' blocks of output pixels (AVX-512 reads each weight word
    once per block of 2-4 pixels, and k <= 4 pairs two output channels per register; odd Cout
    leaves one channel alone), with the remainder and edge pixels one at a time."""
    for sign in ([False, True] if bits == 1 else [False]):
        case = small_case(c=70, h=3, w=23, k=k, cout=cout, bits=bits, sign=sign,
                          zero_point=0 if sign else (2 ** bits - 1) // 2, **geometry)
        conv = make_conv(case)
        act = pack_nchw(case["codes"], 1, bits)
        y, acc = conv.run(act, 1, 3, 23, isa=isa, threads=1, return_acc=True, family="popcount")
        np.testing.assert_array_equal(acc, reference_acc(case))
        y_ref = conv.run(act, 1, 3, 23, isa="scalar", threads=1)
        assert y.tobytes() == y_ref.tobytes()


@pytest.mark.parametrize("isa", ISAS)
def test_relu_clamp_is_applied_to_outputs(isa):
    case = small_case(c=20, cout=6, k=3)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    plain = make_conv(case).run(act, 1, 5, 5, isa=isa)
    relu6 = make_conv(case, act_min=0.0, act_max=6.0).run(act, 1, 5, 5, isa=isa)
    assert plain.min() < 0  # the clamp has something to do
    np.testing.assert_array_equal(relu6, np.clip(plain, 0.0, 6.0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_residual_is_added_before_the_clamp_with_the_same_float_operations(isa, family):
    """y = clamp((s·Σ c_j A_j + bias) + r): bit for bit numpy's float32 add and clamp of the
    unclamped output (what onnxruntime does with the Add and Relu the layer absorbed)."""
    case = small_case(c=70, h=6, w=9, cout=11, k=3, bits=3, zero_point=2)
    act = pack_nchw(case["codes"], 1, 3)
    conv = make_conv(case, act_min=0.0, act_max=2.5)
    if family not in conv.families(isa):
        pytest.skip(f"no {family} kernel on {isa} here")
    raw = conv.run(act, 1, 6, 9, isa=isa, family=family, clamp=False)
    assert raw.min() < 0 < 2.5 < raw.max()  # the clamp has work on both sides
    r = np.random.default_rng(3).standard_normal(raw.shape).astype(np.float32)
    y = conv.run(act, 1, 6, 9, isa=isa, family=family, residual=r)
    np.testing.assert_array_equal(y, np.minimum(np.maximum(raw + r, np.float32(0)), np.float32(2.5)))
    assert conv.run(act, 1, 6, 9, isa=isa, family=family).tobytes() == np.clip(raw, 0, 2.5).tobytes()


def test_a_residual_of_the_wrong_shape_or_type_is_refused():
    case = small_case()
    act = pack_nchw(case["codes"], 1, case["bits"])
    conv = make_conv(case)
    for bad in (np.zeros((1, 4, 5, 4), np.float32), np.zeros((1, 4, 5, 5), np.float64), [[0.0]]):
        with pytest.raises(ValueError, match="residual"):
            conv.run(act, 1, 5, 5, residual=bad)


@pytest.mark.parametrize("isa", ISAS)
def test_per_call_scale_and_zero_point_override_construction_values(isa):
    case = small_case(zero_point=0)
    act = pack_nchw(case["codes"], 1, case["bits"])
    conv = make_conv(case)
    y, acc = conv.run(act, 1, 5, 5, isa=isa, scale=0.25, zero_point=5, return_acc=True)
    case5 = dict(case, zero_point=5)
    np.testing.assert_array_equal(acc, reference_acc(case5))
    expect = make_conv(case5, scale=0.25).run(act, 1, 5, 5, isa=isa)
    np.testing.assert_array_equal(y, expect)


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_is_a_one_by_one_conv_on_one_pixel_images(isa):
    rng = np.random.default_rng(3)
    rows, d, cout, k, bits, zp = 5, 300, 7, 5, 3, 2
    codes = rng.integers(0, 2**bits, (rows, d)).astype(np.uint8)
    basis = random_basis(rng, cout, k, d)
    coeffs = rng.standard_normal((cout, k)).astype(np.float32)
    conv = native.PackedConv(basis, coeffs, None, cin=d, groups=1, kernel=(1, 1), bits=bits,
                             zero_point=zp, scale=1.0)
    _, acc = conv.run(pack_codes(codes, 1, bits), rows, 1, 1, isa=isa, return_acc=True)
    pm = ref.unpack_basis(basis, d).astype(np.int64)
    expect = np.einsum("rd,okd->rok", codes.astype(np.int64) - zp, pm)
    np.testing.assert_array_equal(acc.reshape(rows, cout, k), expect)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_do_not_change_results(isa):
    case = small_case(n=2, c=70, h=9, w=7, cout=8, k=6, bits=5, zero_point=11)
    act = pack_nchw(case["codes"], 1, case["bits"])
    conv = make_conv(case)
    y1, a1 = conv.run(act, 2, 9, 7, isa=isa, threads=1, return_acc=True)
    y3, a3 = conv.run(act, 2, 9, 7, isa=isa, threads=3, return_acc=True)
    np.testing.assert_array_equal(a1, a3)
    np.testing.assert_array_equal(y1, y3)


# ------------------------------------------------------------------------------------------------
# quantize + pack


@st.composite
def activations(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 70))
    n = draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)))
    sign = draw(st.integers(0, 4)) == 0
    bits = 1 if sign else draw(st.integers(1, 8))
    zp = 0 if sign else draw(st.integers(0, 2**bits - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = float(np.float32(rng.uniform(0.01, 1.0)))
    x = (rng.standard_normal((n, c) + spatial) * scale * 2 ** (bits - 1)).astype(np.float32)
    # exact ties (half-even rounding), NaN and ±inf must behave like the reference too
    flat = x.reshape(-1)
    m = min(flat.size, 6)
    flat[rng.choice(flat.size, m, replace=False)] = np.array(
        [0.5, -2.5, np.nan, np.inf, -np.inf, 1.5], np.float32)[:m] * np.float32(scale)
    return dict(x=x, groups=groups, bits=bits, zero_point=zp, sign=sign, scale=scale)


@SETTINGS
@given(a=activations())
def test_quantize_pack_bits_equal_packing_of_reference_codes(a):
    x = a["x"]
    got = native.quantize_pack(x, groups=a["groups"], scale=a["scale"], zero_point=a["zero_point"],
                               bits=a["bits"], sign=a["sign"], threads=2)
    codes = ref.quantize(x, a["scale"], a["zero_point"], a["bits"], a["sign"])
    c = x.shape[1]
    codes_pc = np.moveaxis(codes, 1, -1).reshape(-1, c)  # pixel = (n, *spatial)
    np.testing.assert_array_equal(got, pack_codes(codes_pc, a["groups"], a["bits"]))


@SETTINGS
@given(a=activations())
def test_quantize_pack_channel_last_equals_channel_first_of_the_transpose(a):
    x_last = np.ascontiguousarray(np.moveaxis(a["x"], 1, -1))
    got = native.quantize_pack(x_last, groups=a["groups"], scale=a["scale"],
                               zero_point=a["zero_point"], bits=a["bits"], sign=a["sign"],
                               channel_axis=-1)
    codes = ref.quantize(x_last, a["scale"], a["zero_point"], a["bits"], a["sign"])
    expect = pack_codes(codes.reshape(-1, x_last.shape[-1]), a["groups"], a["bits"])
    np.testing.assert_array_equal(got, expect)


@SETTINGS
@given(a=activations(), per_channel=st.booleans(), last=st.booleans())
def test_every_isa_quantizes_to_the_same_bits(a, per_channel, last):
    """The scalar loops (forced by isa / BDECOMP_ISA=scalar, the only code on non-x86) and the
    AVX2 code give the same planes, channel-first or channel-last, one step or one per channel;
    the reference tests above pin the best ISA's bits."""
    x = a["x"]
    c = x.shape[1]
    cs = None if not per_channel else (np.random.default_rng(c).uniform(0.5, 2.0, c) * a["scale"]).astype(np.float32)
    xin, axis = (np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1) if last else (x, 1)
    got = {isa: native.quantize_pack(xin, groups=a["groups"], scale=a["scale"], zero_point=a["zero_point"],
                                     bits=a["bits"], sign=a["sign"], channel_axis=axis, channel_scales=cs,
                                     threads=2, isa=isa) for isa in ISAS}
    for isa in ISAS[1:]:
        np.testing.assert_array_equal(got[isa], got["scalar"])
    if not a["sign"] and x.ndim == 4:
        codes = {isa: native.quantize_codes(x, scale=a["scale"], zero_point=a["zero_point"], bits=a["bits"],
                                            channel_scales=cs, isa=isa) for isa in ISAS}
        patches = {isa: native.im2col_quantize_pack(x, kernel=(3, 3), pads=(1, 1, 1, 1), scale=a["scale"],
                                                    zero_point=a["zero_point"], bits=a["bits"], channel_scales=cs,
                                                    isa=isa)[0] for isa in ISAS}
        for isa in ISAS[1:]:
            np.testing.assert_array_equal(codes[isa], codes["scalar"])
            np.testing.assert_array_equal(patches[isa], patches["scalar"])


def test_quantize_pack_reads_bdecomp_isa_and_refuses_an_unknown_isa(monkeypatch):
    x = np.ones((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="isa"):
        native.quantize_pack(x, groups=1, scale=1.0, zero_point=0, bits=2, isa="neon")
    monkeypatch.setenv("BDECOMP_ISA", "neon")
    with pytest.raises(ValueError, match="BDECOMP_ISA"):
        native.quantize_pack(x, groups=1, scale=1.0, zero_point=0, bits=2)


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0, np.nan]], np.float32)
    codes = ref.quantize(x, 1.0, 4, 4)
    np.testing.assert_array_equal(codes, [[4, 6, 6, 4, 2, 15, 0, 4]])
    got = native.quantize_pack(x, groups=1, scale=1.0, zero_point=4, bits=4, channel_axis=-1)
    np.testing.assert_array_equal(got, pack_codes(codes, 1, 4))


def test_quantized_conv_end_to_end_matches_reference():
    case = small_case(c=33, h=7, w=6, cout=5, k=4, bits=4, zero_point=6, scale=0.125)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 33, 7, 6)).astype(np.float32)
    act = native.quantize_pack(x, groups=1, scale=0.125, zero_point=6, bits=4)
    case["codes"] = ref.quantize(x, 0.125, 6, 4)
    _, acc = make_conv(case).run(act, 1, 7, 6, return_acc=True)
    np.testing.assert_array_equal(acc, reference_acc(case))


# ------------------------------------------------------------------------------------------------
# bad arguments: ValueError, never a crash


def _valid_conv_and_act():
    case = small_case()
    return case, make_conv(case), pack_nchw(case["codes"], 1, case["bits"])


@pytest.mark.parametrize(
    "change",
    [
        dict(bits=0), dict(bits=9), dict(zero_point=16), dict(zero_point=-1), dict(scale=0.0),
        dict(scale=float("nan")), dict(scale=-1.0), dict(groups=3), dict(kernel=(0, 3)),
        dict(strides=(0, 1)), dict(dilations=(1, 0)), dict(pads=(1, 1, 1)), dict(pads=(-1, 0, 0, 0)),
        dict(cin=9), dict(act_min=1.0, act_max=0.0), dict(sign=True, bits=2),
    ],
)
def test_packed_conv_rejects_invalid_parameters(change):
    case = small_case()
    with pytest.raises(ValueError):
        make_conv(case, **change)


def test_packed_conv_rejects_bad_basis_and_coefficients():
    case = small_case()
    with pytest.raises(ValueError):  # wrong dtype
        native.PackedConv(case["basis"].astype(np.int16), case["coeffs"], None, cin=8, groups=1,
                          kernel=(3, 3), bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError):  # non-contiguous
        native.PackedConv(np.asfortranarray(np.repeat(case["basis"], 2, axis=0)),
                          np.repeat(case["coeffs"], 2, 0), None, cin=8, groups=1, kernel=(3, 3),
                          bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError):  # wrong byte count for D
        native.PackedConv(case["basis"][:, :, :-1].copy(), case["coeffs"], None, cin=8, groups=1,
                          kernel=(3, 3), bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError):  # k = 9
        rng = np.random.default_rng(0)
        native.PackedConv(random_basis(rng, 4, 9, 72), np.ones((4, 9), np.float32), None, cin=8,
                          groups=1, kernel=(3, 3), bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError):  # coeffs shape mismatch
        native.PackedConv(case["basis"], case["coeffs"][:, :1].copy(), None, cin=8, groups=1,
                          kernel=(3, 3), bits=4, zero_point=0, scale=1.0)
    with pytest.raises(ValueError):  # bias dtype
        native.PackedConv(case["basis"], case["coeffs"], np.zeros(4), cin=8, groups=1,
                          kernel=(3, 3), bits=4, zero_point=0, scale=1.0)


def test_run_rejects_mismatched_activations_and_outputs():
    _, conv, act = _valid_conv_and_act()
    with pytest.raises(ValueError):  # wrong image size for this act
        conv.run(act, 1, 5, 6)
    with pytest.raises(ValueError):  # wrong dtype
        conv.run(act.astype(np.int64), 1, 5, 5)
    with pytest.raises(ValueError):  # non-contiguous
        conv.run(np.repeat(act, 2, axis=0)[::2], 1, 5, 5)
    with pytest.raises(ValueError):  # output buffer of the wrong shape
        conv.run(act, 1, 5, 5, out=np.empty((1, 4, 5, 4), np.float32))
    with pytest.raises(ValueError):  # zero point out of range for Q = 4
        conv.run(act, 1, 5, 5, zero_point=16)
    with pytest.raises(ValueError):
        conv.run(act, 1, 5, 5, isa="sse9")
    with pytest.raises(ValueError):
        conv.run(act, 1, 5, 5, threads=0)


def test_run_rejects_an_image_smaller_than_the_kernel():
    case = small_case(pads=(0, 0, 0, 0), h=2, w=2)
    conv = make_conv(case)
    with pytest.raises(ValueError):
        conv.run(pack_nchw(case["codes"], 1, 4), 1, 2, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(groups=1, scale=1.0, zero_point=0, bits=0),
        dict(groups=1, scale=1.0, zero_point=0, bits=9),
        dict(groups=1, scale=1.0, zero_point=256, bits=8),
        dict(groups=5, scale=1.0, zero_point=0, bits=4),
        dict(groups=1, scale=float("inf"), zero_point=0, bits=4),
        dict(groups=1, scale=1.0, zero_point=0, bits=4, channel_axis=2),
        dict(groups=1, scale=1.0, zero_point=0, bits=2, sign=True),
    ],
)
def test_quantize_pack_rejects_invalid_parameters(kwargs):
    x = np.zeros((1, 8, 3, 3), np.float32)
    with pytest.raises(ValueError):
        native.quantize_pack(x, **kwargs)


def test_quantize_pack_rejects_non_numeric_or_empty_input():
    with pytest.raises(ValueError):
        native.quantize_pack(np.zeros((1, 8), np.complex64), groups=1, scale=1.0, zero_point=0, bits=4)
    with pytest.raises(ValueError):
        native.quantize_pack(np.zeros((1, 0, 3), np.float32), groups=1, scale=1.0, zero_point=0, bits=4)
    with pytest.raises(ValueError):
        native.quantize_pack([[1.0, 2.0]], groups=1, scale=1.0, zero_point=0, bits=4)


def test_c_layer_rejects_inconsistent_parameters_with_einval():
    """The C entry points validate too (for callers other than the Python wrapper)."""
    ffi, lib = native.ffi, native.lib
    p = ffi.new("bd_conv_params *")
    assert lib.bd_act_words(p) == 0  # all zero: invalid
    assert lib.bd_conv(p, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                       0, 1) == lib.BD_EINVAL
    assert lib.bd_conv(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                       ffi.NULL, 0, 1) == lib.BD_EINVAL
    p.n = p.h = p.w = p.c = p.groups = p.cout = p.kh = p.kw = 1
    p.stride_h = p.stride_w = p.dil_h = p.dil_w = p.oh = p.ow = 1
    p.bits, p.k, p.scale, p.act_min, p.act_max = 1, 1, 1.0, -math.inf, math.inf
    assert lib.bd_act_words(p) == 1
    p.oh = 2  # does not match the formula
    assert lib.bd_act_words(p) == 0
    assert lib.bd_quantize_pack(ffi.NULL, 1, 1, 1, 1, 1.0, ffi.NULL, 0, 1, 0, ffi.NULL, 0, 1) == lib.BD_EINVAL
    assert lib.bd_popcount_peak(99, 0.01) == 0.0


# ------------------------------------------------------------------------------------------------
# ISA selection and the peak measurement


def test_scalar_is_always_available_and_default_is_the_best():
    assert ISAS[0] == "scalar"
    assert set(ISAS) <= set(native.ISAS)


def test_default_threads_are_the_cpus_this_process_may_run_on(monkeypatch):
    """taskset / docker --cpuset-cpus: more threads than usable CPUs would make every layer wait."""
    monkeypatch.delenv("BDECOMP_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert native.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert native.default_threads() == 3
    monkeypatch.setenv("BDECOMP_THREADS", "2")
    assert native.default_threads() == 2


def test_bdecomp_isa_env_forces_the_kernel(monkeypatch):
    for isa in ISAS:
        monkeypatch.setenv("BDECOMP_ISA", isa)
        assert native.default_isa() == isa
    monkeypatch.delenv("BDECOMP_ISA")
    assert native.default_isa() == ISAS[-1]


def test_bdecomp_isa_env_rejects_unknown_or_unsupported_isas(monkeypatch):
    monkeypatch.setenv("BDECOMP_ISA", "neon")
    with pytest.raises(ValueError):
        native.default_isa()
    missing = [i for i in native.ISAS if i not in ISAS]
    if missing:
        monkeypatch.setenv("BDECOMP_ISA", missing[0])
        with pytest.raises(RuntimeError):
            native.default_isa()


def test_forced_isa_is_used_by_run(monkeypatch):
    case, conv, act = _valid_conv_and_act()
    monkeypatch.setenv("BDECOMP_ISA", "scalar")
    np.testing.assert_array_equal(conv.run(act, 1, 5, 5), conv.run(act, 1, 5, 5, isa=ISAS[-1]))
    missing = [i for i in native.ISAS if i not in ISAS]
    if missing:  # run() consults the variable: forcing an ISA this CPU lacks fails loudly
        monkeypatch.setenv("BDECOMP_ISA", missing[0])
        with pytest.raises(RuntimeError):
            conv.run(act, 1, 5, 5)


@pytest.mark.parametrize("isa", ISAS)
def test_popcount_peak_is_positive_and_finite(isa):
    peak = native.popcount_peak(isa, seconds=0.02)
    assert math.isfinite(peak) and peak > 0


# ------------------------------------------------------------------------------------------------
# the lookup-table kernel family (affine, Q ≤ 8): same integers and floats as the popcount family

LUT_ISAS = [i for i in ISAS if i != "scalar"]


def lut_runs(conv) -> list[tuple[str, str]]:
    """(isa, family) of every lookup-table kernel this CPU can run for `conv`: the 16-entry tables
    on every SIMD ISA, the 64-entry ones (vpermb) on AVX-512 VBMI."""
    return [(isa, fam) for isa in LUT_ISAS for fam in conv.families(isa) if fam != "popcount"]


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@SETTINGS
@given(case=conv_cases())
def test_lut_kernel_matches_reference_bit_for_bit(case):
    conv = make_conv(case)
    if case["sign"]:
        assert conv.wlut is None
        return
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, case["n"], case["h"], case["w"], isa=isa, family=fam, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        y_ref = conv.run(act, case["n"], case["h"], case["w"], isa="scalar")
        np.testing.assert_array_equal(y, y_ref)


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 21])
@pytest.mark.parametrize("bits,k,cout,groups,zp", [(3, 2, 13, 1, 2), (6, 5, 40, 1, 0), (4, 3, 18, 2, 7)])
@pytest.mark.parametrize("threads", [1, 2])
def test_lut_gemm_runs_its_rows_as_the_pixels_of_one_row_bit_for_bit(rows, bits, k, cout, groups, zp, threads):
    """A gemm's rows (1×1 images) run 8 to a block, as the pixels of one row, and store [rows][Cout]
    pixel-major: the reference's integers, the scalar path's floats with residual and clamp, for row
    counts around the block size, one and two table sets, output channels off the 8-wide stores."""
    rng = np.random.default_rng(rows * 10 + k)
    d = 70
    codes = rng.integers(0, 2**bits, (rows, d * groups)).astype(np.uint8)
    basis = random_basis(rng, cout, k, d)
    coeffs = rng.standard_normal((cout, k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    conv = native.PackedConv(basis, coeffs, bias, cin=d * groups, groups=groups, kernel=(1, 1), bits=bits,
                             zero_point=zp, scale=0.5, act_min=-3.0, act_max=3.0)
    act = pack_codes(codes, groups, bits)
    res = rng.standard_normal((rows, cout, 1, 1)).astype(np.float32)
    pm = ref.unpack_basis(basis, d).astype(np.int64).reshape(groups, cout // groups, k, d)
    x = codes.astype(np.int64).reshape(rows, groups, d) - zp
    expect = np.einsum("rgd,gokd->rgok", x, pm).reshape(rows, cout, k)
    want = conv.run(act, rows, 1, 1, isa="scalar", residual=res)
    assert (want == -3.0).any() and (want == 3.0).any()  # the clamp has work on both sides
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, rows, 1, 1, isa=isa, family=fam, threads=threads, residual=res, return_acc=True)
        np.testing.assert_array_equal(acc.reshape(rows, cout, k), expect)
        assert y.tobytes() == want.tobytes()


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@pytest.mark.parametrize("bits,k,c,cout", [(4, 4, 600, 5), (4, 3, 520, 130), (1, 8, 260, 40), (2, 2, 64, 300),
                                           (8, 4, 600, 5), (6, 8, 130, 40), (5, 3, 600, 130), (6, 4, 600, 5),
                                           (7, 2, 600, 5)])
def test_lut_kernel_long_depth_and_many_lanes(bits, k, c, cout):
    """Depth past the 16-bit counter spill (> 1024 steps at Q = 4, > 256 at Q = 6, where one byte
    counter takes one lookup) and several 128-lane passes, codes at the maximum (worst case for the
    byte counters: one table set up to Q = 6 (quads) or 5 (6-channel groups), two above)."""
    case = small_case(c=c, cout=cout, k=k, bits=bits, zero_point=1, h=4, w=5)
    case["codes"][:] = 2**bits - 1
    case["codes"][0, :, 0, 0] = np.random.default_rng(1).integers(0, 2**bits, c)
    conv = make_conv(case)
    act = pack_nchw(case["codes"], 1, bits)
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, 1, 4, 5, isa=isa, family=fam, threads=2, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        np.testing.assert_array_equal(y, conv.run(act, 1, 4, 5, isa="scalar"))


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@pytest.mark.parametrize("bits", [4, 8])
def test_lut_kernel_runs_a_batch_as_its_images_one_by_one(bits):
    """The tables are built one image at a time, into one buffer the threads share: every image of
    a batch (two threads, padding with z != 0) gets the integers of the reference and the bytes of
    its own run."""
    case = small_case(n=3, c=40, cout=9, k=3, bits=bits, zero_point=5, h=6, w=7)
    conv = make_conv(case)
    act = pack_nchw(case["codes"], 1, bits)
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, 3, 6, 7, isa=isa, family=fam, threads=2, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        for i in range(3):
            one = conv.run(pack_nchw(case["codes"][i:i + 1], 1, bits), 1, 6, 7, isa=isa, family=fam, threads=2)
            assert y[i:i + 1].tobytes() == one.tobytes()


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@pytest.mark.parametrize("w, strides, pads, dil", [(1, (2, 2), (2, 2, 2, 2), (1, 1)), (2, 1, (2, 3, 2, 3), (1, 1)),
                                                   (9, (1, 3), (1, 3, 1, 3), (1, 2)), (6, (1, 1), (1, 4, 1, 0), (2, 2))])
def test_lut_kernel_edge_pixels_sharing_a_pass_stay_exact(w, strides, pads, dil):
    """Pixels of one pass run the hull of their valid column taps through the tables' padding
    columns (codes z ≠ 0 there): even pixels whose valid taps do not overlap, or lie entirely in
    the padding, give the reference's integers."""
    strides = strides if isinstance(strides, tuple) else (strides, strides)
    case = small_case(c=20, cout=9, k=3, bits=4, zero_point=5, h=3, w=w, strides=strides, pads=pads,
                      dilations=dil)
    conv = make_conv(case)
    act = pack_nchw(case["codes"], 1, 4)
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, 1, 3, w, isa=isa, family=fam, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        np.testing.assert_array_equal(y, conv.run(act, 1, 3, w, isa="scalar"))


def test_kernel_family_env_and_argument(monkeypatch):
    case, conv, act = _valid_conv_and_act()
    with pytest.raises(ValueError):
        conv.run(act, 1, 5, 5, family="gemm")
    if LUT_ISAS:
        monkeypatch.setenv("BDECOMP_KERNEL", "lut")
        assert conv.family(LUT_ISAS[-1]) == "lut"
        monkeypatch.setenv("BDECOMP_KERNEL", "popcount")
        assert conv.family(LUT_ISAS[-1]) == "popcount"
        monkeypatch.setenv("BDECOMP_KERNEL", "lut64")  # AVX-512 VBMI only, else popcount
        assert conv.family(LUT_ISAS[-1]) == ("lut64" if "lut64" in conv.families(LUT_ISAS[-1]) else "popcount")
    assert conv.family("scalar") == "popcount"  # no LUT kernel in the scalar reference


# ------------------------------------------------------------------------------------------------
# im2col fused with quantize + pack (the packed-patch path of few-channel convolutions)


@st.composite
def patch_cases(draw):
    c = draw(st.sampled_from([1, 3, 5, 16, 17, 70]))
    g = draw_geometry(draw)
    n, h, w = g["n"], g["h"], g["w"]
    sign = draw(st.integers(0, 4)) == 0
    bits = 1 if sign else draw(st.integers(1, 8))
    zp = 0 if sign else draw(st.integers(0, 2**bits - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = float(np.float32(rng.uniform(0.01, 1.0)))
    x = (rng.standard_normal((n, c, h, w)) * scale * 2 ** (bits - 1)).astype(np.float32)
    flat = x.reshape(-1)
    m = min(flat.size, 4)
    flat[rng.choice(flat.size, m, replace=False)] = np.array([0.5, -2.5, np.nan, 1.5], np.float32)[:m] * np.float32(scale)
    return dict(x=x, kernel=g["kernel"], strides=g["strides"], dilations=g["dilations"], pads=g["pads"],
                bits=bits, zero_point=zp, sign=sign, scale=scale)


def patches(a: np.ndarray, pad_value, kernel, strides, dilations, pads) -> np.ndarray:
    """im2col of a [N, C, H, W] (codes or floats): [N·OH·OW, C·KH·KW] in (c, ky, kx) order, taps
    in the padding set to pad_value."""
    (kh, kw), (sh, sw), (dh, dw), (pt, pl, pb, pr) = kernel, strides, dilations, pads
    n, c, h, w = a.shape
    padded = np.full((n, c, h + pt + pb, w + pl + pr), pad_value, a.dtype)
    padded[:, :, pt:pt + h, pl:pl + w] = a
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    out = np.empty((n, oh, ow, c, kh, kw), a.dtype)
    for ky in range(kh):
        for kx in range(kw):
            win = padded[:, :, ky * dh: ky * dh + sh * (oh - 1) + 1: sh, kx * dw: kx * dw + sw * (ow - 1) + 1: sw]
            out[:, :, :, :, ky, kx] = win.transpose(0, 2, 3, 1)
    return out.reshape(n * oh * ow, c * kh * kw)


def reference_patch_codes(a) -> np.ndarray:
    """[pixels, C·KH·KW] codes of every patch in (c, ky, kx) order, padding = the code of 0.0."""
    codes = ref.quantize(a["x"], a["scale"], a["zero_point"], a["bits"], a["sign"])
    pad_code = ref.quantize(np.zeros((1, 1), np.float32), a["scale"], a["zero_point"], a["bits"], a["sign"])[0, 0]
    return patches(codes, pad_code, a["kernel"], a["strides"], a["dilations"], a["pads"])


@SETTINGS
@given(a=patch_cases())
def test_im2col_quantize_pack_equals_packing_of_reference_patch_codes(a):
    act, n, oh, ow = native.im2col_quantize_pack(
        a["x"], kernel=a["kernel"], strides=a["strides"], pads=a["pads"], dilations=a["dilations"],
        scale=a["scale"], zero_point=a["zero_point"], bits=a["bits"], sign=a["sign"], threads=2)
    expect = pack_codes(reference_patch_codes(a), 1, a["bits"])
    assert (n * oh * ow,) == expect.shape[:1]
    np.testing.assert_array_equal(act, expect)


@pytest.mark.parametrize("isa", ISAS)
def test_patch_conv_on_fused_im2col_packing_equals_the_reference_conv(isa):
    case = small_case(c=3, h=9, w=8, cout=6, k=3, bits=4, zero_point=5, scale=0.25, strides=(2, 1),
                      pads=(1, 0, 2, 1))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 9, 8)).astype(np.float32)
    case["codes"] = ref.quantize(x, 0.25, 5, 4)
    act, n, oh, ow = native.im2col_quantize_pack(x, kernel=case["kernel"], strides=case["strides"],
                                                 pads=case["pads"], scale=0.25, zero_point=5, bits=4)
    patch = native.PackedConv(case["basis"], case["coeffs"], case["bias"], cin=case["depth"], groups=1,
                              kernel=(1, 1), bits=4, zero_point=5, scale=0.25)
    _, acc = patch.run(act, n, oh, ow, isa=isa, return_acc=True)
    np.testing.assert_array_equal(acc.reshape(reference_acc(case).shape), reference_acc(case))


@pytest.mark.parametrize("kwargs", [dict(kernel=(0, 3)), dict(kernel=(3, 3), pads=(1, 1, 1)),
                                    dict(kernel=(9, 9)), dict(kernel=(3, 3), bits=9),
                                    dict(kernel=(3, 3), scale=0.0), dict(kernel=(3, 3), zero_point=16),
                                    dict(kernel=(3, 3), strides=(0, 1))])
def test_im2col_quantize_pack_rejects_invalid_parameters(kwargs):
    args = dict(scale=0.5, zero_point=0, bits=4)
    args.update(kwargs)
    with pytest.raises(ValueError):
        native.im2col_quantize_pack(np.zeros((1, 3, 5, 5), np.float32), **args)
    with pytest.raises(ValueError):
        native.im2col_quantize_pack(np.zeros((3, 5, 5), np.float32), kernel=(1, 1), scale=1.0, zero_point=0, bits=4)


# ------------------------------------------------------------------------------------------------
# threads: small layers run on one thread unless BDECOMP_MIN_PARALLEL_WORK says otherwise


def test_min_parallel_work_override_makes_small_layers_multithreaded(monkeypatch):
    case, conv, act = _valid_conv_and_act()
    monkeypatch.delenv("BDECOMP_MIN_PARALLEL_WORK", raising=False)
    assert conv.threads_used(1, 5, 5, threads=4) == 1
    monkeypatch.setenv("BDECOMP_MIN_PARALLEL_WORK", "0")
    assert conv.threads_used(1, 5, 5, threads=4) == 4
    monkeypatch.setenv("BDECOMP_MIN_PARALLEL_WORK", "junk")  # ignored: the default threshold
    assert conv.threads_used(1, 5, 5, threads=4) == 1


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("family", FAMILIES)
def test_results_do_not_depend_on_the_thread_count_of_a_real_parallel_run(monkeypatch, isa, family):
    monkeypatch.setenv("BDECOMP_MIN_PARALLEL_WORK", "0")
    bits = 5 if family == "popcount" else 3
    case = small_case(n=2, c=70, h=9, w=7, cout=40, k=3, bits=bits, zero_point=2, strides=(2, 1),
                      pads=(0, 1, 2, 1))
    conv = make_conv(case)
    if family not in conv.families(isa):
        pytest.skip(f"no {family} kernel on {isa} here")
    assert conv.threads_used(2, 9, 7, threads=3) == 3
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 70, 9, 7)).astype(np.float32)
    runs = []
    for t in (1, 2, 3):
        act = native.quantize_pack(x, groups=1, scale=0.5, zero_point=2, bits=bits, threads=t)
        patches = native.im2col_quantize_pack(x, kernel=(3, 3), strides=(2, 1), pads=(0, 1, 2, 1),
                                              scale=0.5, zero_point=2, bits=bits, threads=t)[0]
        y, acc = conv.run(act, 2, 9, 7, isa=isa, threads=t, family=family, return_acc=True)
        runs.append((act, patches, y, acc))
    case["codes"] = ref.quantize(x, 0.5, 2, bits)
    np.testing.assert_array_equal(runs[0][3], reference_acc(case))
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert a.tobytes() == b.tobytes()


@st.composite
def wide_lut_cases(draw):
    """Layers wide enough for the vectorised LUT epilogue (≥ 8 output channels per group, every
    k, tails of 1..7 channels, border pixels, with and without bias and clamp)."""
    groups = draw(st.sampled_from([1, 1, 2]))
    c = groups * draw(st.integers(1, 40))
    cout = groups * draw(st.integers(8, 45))
    kh = kw = draw(st.sampled_from([1, 3]))
    sh = draw(st.integers(1, 2))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(3, 7)), draw(st.integers(3, 7))
    bits, k = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    depth = c // groups * kh * kw
    case = dict(n=1, c=c, h=h, w=w, groups=groups, cout=cout, kernel=(kh, kw), strides=(sh, sh), pads=pads,
                dilations=(1, 1), k=k, bits=bits, zero_point=draw(st.integers(0, 2**bits - 1)), sign=False,
                scale=float(np.float32(rng.uniform(0.01, 2.0))),
                codes=rng.integers(0, 2**bits, (1, c, h, w)).astype(np.uint8),
                basis=random_basis(rng, cout, k, depth), coeffs=rng.standard_normal((cout, k)).astype(np.float32),
                bias=rng.standard_normal(cout).astype(np.float32) if draw(st.booleans()) else None, depth=depth)
    clamp = draw(st.sampled_from([(-math.inf, math.inf), (0.0, math.inf), (0.0, 6.0)]))
    return case, clamp


@SETTINGS
@given(wc=wide_lut_cases(), bits=st.integers(1, 8), sign=st.booleans())
def test_popcount_kernels_wide_layers_match_reference_and_scalar_bit_for_bit(wc, bits, sign):
    """The vectorised epilogue of the SIMD popcount drivers (every ISA), affine and sign mode."""
    case, (lo, hi) = wc
    bits = 1 if sign else bits
    rng = np.random.default_rng(bits)
    case.update(bits=bits, sign=sign, zero_point=0 if sign else int(rng.integers(0, 2**bits)),
                codes=rng.integers(0, 2**bits, case["codes"].shape).astype(np.uint8))
    conv = make_conv(case, act_min=lo, act_max=hi)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    y_ref = conv.run(act, 1, case["h"], case["w"], isa="scalar")
    for isa in ISAS:
        y, acc = conv.run(act, 1, case["h"], case["w"], isa=isa, family="popcount", return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        assert y.tobytes() == y_ref.tobytes()
        assert conv.run(act, 1, case["h"], case["w"], isa=isa, family="popcount").tobytes() == y_ref.tobytes()


@pytest.mark.skipif(not LUT_ISAS, reason="no SIMD ISA for the LUT kernels on this CPU")
@SETTINGS
@given(wc=wide_lut_cases())
def test_lut_kernel_wide_layers_match_reference_and_scalar_bit_for_bit(wc):
    case, (lo, hi) = wc
    conv = make_conv(case, act_min=lo, act_max=hi)
    act = pack_nchw(case["codes"], case["groups"], case["bits"])
    y_ref = conv.run(act, 1, case["h"], case["w"], isa="scalar")
    for isa, fam in lut_runs(conv):
        y, acc = conv.run(act, 1, case["h"], case["w"], isa=isa, family=fam, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        assert y.tobytes() == y_ref.tobytes()
        assert conv.run(act, 1, case["h"], case["w"], isa=isa, family=fam).tobytes() == y_ref.tobytes()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k,cout,groups", [(1, 20, 1), (2, 13, 1), (4, 16, 2), (8, 11, 1), (3, 16, 1), (5, 16, 1),
                                            (6, 21, 1), (7, 9, 2), (4, 130, 1), (6, 50, 1)])
@pytest.mark.parametrize("w", [8, 9, 19])
def test_epilogue_over_blocks_of_pixels_matches_the_scalar_path_bit_for_bit(family, k, cout, groups, w):
    """The SIMD drivers write outputs a block of 8 pixels of a row at a time (one contiguous store
    per channel; rows of 8, 8 + 1 and 8 + 8 + 3 pixels; channel tails; two groups; every k) or
    pixel by pixel (Cout·k > 256): integers, residual, bias and clamp as the scalar kernel."""
    case = small_case(c=24 * groups, h=4, w=w, groups=groups, cout=cout * groups, k=k, bits=4, zero_point=5)
    conv = make_conv(case, act_min=0.0, act_max=3.0)
    act = pack_nchw(case["codes"], groups, 4)
    r = np.random.default_rng(w).standard_normal((1, cout * groups, 4, w)).astype(np.float32)
    y_ref = conv.run(act, 1, 4, w, isa="scalar", residual=r)
    for isa in (i for i in LUT_ISAS if family in conv.families(i)):
        y, acc = conv.run(act, 1, 4, w, isa=isa, family=family, residual=r, return_acc=True)
        np.testing.assert_array_equal(acc, reference_acc(case))
        assert y.tobytes() == y_ref.tobytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bound_call_gives_what_run_gives_with_residual_and_without_clamp(family):
    """PackedConv.bind resolves run()'s options once (the runtime's per-layer call): the same
    bytes as run() for plain, residual and unclamped calls."""
    case = small_case(c=40, h=6, w=11, cout=12, k=4, bits=4, zero_point=2)
    conv = make_conv(case, act_min=0.0, act_max=2.0)
    if family not in conv.families():
        pytest.skip(f"no {family} kernel here")
    act = pack_nchw(case["codes"], 1, 4)
    r = np.random.default_rng(5).standard_normal((1, 12, 6, 11)).astype(np.float32)
    f = conv.bind(1, 6, 11, family=family, scale=0.25, zero_point=3, threads=1)
    kw = dict(family=family, scale=0.25, zero_point=3, threads=1)
    assert f(act).tobytes() == conv.run(act, 1, 6, 11, **kw).tobytes()
    assert f(act, r).tobytes() == conv.run(act, 1, 6, 11, residual=r, **kw).tobytes()
    assert f(act, None, False).tobytes() == conv.run(act, 1, 6, 11, clamp=False, **kw).tobytes()


def test_a_bound_call_refuses_activations_of_another_shape_or_type():
    case, conv, act = _valid_conv_and_act()
    f = conv.bind(1, 5, 5)
    for bad in (act[:-1], act.astype(np.int64), act.tolist(), np.asfortranarray(act.reshape(act.shape[0], -1))):
        with pytest.raises(ValueError):
            f(bad)


def test_a_bound_quantize_pack_gives_what_quantize_pack_gives_and_checks_its_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 70, 5, 9)).astype(np.float32)
    options = dict(groups=2, scale=0.1, zero_point=7, bits=4, channel_scales=rng.uniform(0.05, 0.2, 70))
    f = native.bind_quantize_pack(x, **options)
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    assert f(x2).tobytes() == native.quantize_pack(x2, **options).tobytes()
    for bad in (x2[:1], x2.astype(np.float64), x2.transpose(0, 1, 3, 2)):
        with pytest.raises(ValueError):
            f(bad)


def _chain_layers(rng):
    """Three 3×3 layers 24 → 24 → 24 → 24 (the third grouped; per-channel steps for the second,
    which tests add a residual to) as (convs, quantizer options)."""
    convs = []
    for i in range(3):
        groups = 3 if i == 2 else 1
        basis = random_basis(rng, 24, 3, 24 // groups * 9)
        convs.append(native.PackedConv(basis, rng.uniform(0.1, 1.0, (24, 3)).astype(np.float32),
                                       rng.standard_normal(24).astype(np.float32), cin=24, groups=groups,
                                       kernel=(3, 3), pads=(1, 1, 1, 1), bits=4, zero_point=0, scale=0.2,
                                       act_min=0.0))
    qopts = [dict(scale=0.2, zero_point=0, bits=4, groups=c.groups) for c in convs]
    qopts[1]["channel_scales"] = rng.uniform(0.1, 0.3, 24)
    return convs, qopts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("isa", ISAS)
def test_a_chain_gives_the_bytes_of_its_steps_called_one_by_one(isa, family):
    rng = np.random.default_rng(11)
    convs, qopts = _chain_layers(rng)
    if family not in convs[0].families(isa):
        pytest.skip(f"no {family} kernel on {isa} here")
    x = np.abs(rng.standard_normal((2, 24, 7, 9))).astype(np.float32)
    kw = dict(isa=isa, family=family, threads=1)
    y, ys = x, []
    for i, (conv, q) in enumerate(zip(convs, qopts)):
        y = conv.run(native.quantize_pack(y, **q), 2, 7, 9, residual=x if i == 1 else None, **kw)
        ys.append(y)
    chain = native.Chain()
    src = xin = chain.external(x.shape)
    refs = []
    for i, (conv, q) in enumerate(zip(convs, qopts)):
        act, _ = chain.quantize_pack(src, x.shape, **q)
        src, shape = chain.conv(conv, act, 2, 7, 9, residual=xin if i == 1 else None, **kw)
        refs.append(src)
    chain.keep(refs[0])
    for _ in range(2):  # the second run reuses the first run's arena
        arena = chain.run([x])
        assert chain.view(arena, refs[0], shape).tobytes() == ys[0].tobytes()
        assert chain.view(arena, refs[2], shape).tobytes() == ys[2].tobytes()
        chain.release(arena)


def test_a_chain_reuses_the_bytes_of_buffers_nobody_reads_any_more():
    rng = np.random.default_rng(12)
    convs, qopts = _chain_layers(rng)
    chain = native.Chain()
    src = chain.external((1, 24, 8, 8))
    for conv, q in zip(convs, qopts):
        act, _ = chain.quantize_pack(src, (1, 24, 8, 8), **q)
        src, _ = chain.conv(conv, act, 1, 8, 8)
    chain.run([np.ones((1, 24, 8, 8), np.float32)])
    out_bytes = 4 * 24 * 8 * 8
    assert chain.arena_bytes < 3 * out_bytes  # 3 outputs + 3 packed inputs, at most 2 alive at once


def test_a_chain_concat_is_its_parts_written_in_place_one_after_the_other():
    """Two layers read the same input; concat() makes their outputs consecutive parts of one
    buffer (batch 1: the channel concatenation) that a third layer reads, with no copy step."""
    rng = np.random.default_rng(15)
    convs, qopts = _chain_layers(rng)
    x = np.abs(rng.standard_normal((1, 24, 6, 6))).astype(np.float32)
    merge = native.PackedConv(random_basis(rng, 24, 3, 48), rng.uniform(0.1, 1.0, (24, 3)).astype(np.float32),
                              rng.standard_normal(24).astype(np.float32), cin=48, groups=1, kernel=(1, 1), bits=4,
                              zero_point=0, scale=0.2)
    chain = native.Chain()
    act, _ = chain.quantize_pack(chain.external(x.shape), x.shape, **qopts[0])
    a, shape = chain.conv(convs[0], act, 1, 6, 6)
    b, _ = chain.conv(convs[1], act, 1, 6, 6)
    both = chain.concat([a, b])
    act2, _ = chain.quantize_pack(both, (1, 48, 6, 6), scale=0.2, zero_point=0, bits=4, groups=1)
    y, yshape = chain.conv(merge, act2, 1, 6, 6)
    chain.keep(both)
    chain.keep(y)
    n_steps = len(chain)
    arena = chain.run([x])
    packed = native.quantize_pack(x, **qopts[0])
    cat = np.concatenate([convs[0].run(packed, 1, 6, 6), convs[1].run(packed, 1, 6, 6)], axis=1)
    assert n_steps == 5
    assert chain.view(arena, both, (1, 48, 6, 6)).tobytes() == cat.tobytes()
    assert chain.view(arena, a, shape).tobytes() == cat[:, :24].tobytes()
    expected = merge.run(native.quantize_pack(cat, scale=0.2, zero_point=0, bits=4, groups=1), 1, 6, 6)
    assert chain.view(arena, y, yshape).tobytes() == expected.tobytes()
    with pytest.raises(ValueError):
        chain.concat([a, y])  # a is already part of `both`
    with pytest.raises(ValueError):
        chain.concat([act2, y])  # packed activations are not conv outputs


def _one_layer_chain(seed: int) -> tuple[native.Chain, np.ndarray]:
    """A chain of quantize + pack and one 3×3 layer on a 1×24×5×5 input, and such an input."""
    convs, qopts = _chain_layers(np.random.default_rng(seed))
    chain = native.Chain()
    act, _ = chain.quantize_pack(chain.external((1, 24, 5, 5)), (1, 24, 5, 5), **qopts[0])
    chain.conv(convs[0], act, 1, 5, 5)
    return chain, np.ones((1, 24, 5, 5), np.float32)


def test_a_chain_refuses_external_arrays_of_another_shape_or_type():
    chain, x = _one_layer_chain(13)
    for bad in ([], [x[:, :23]], [x.astype(np.float64)], [x.transpose(0, 1, 3, 2)]):
        with pytest.raises(ValueError):
            chain.run(bad)


def test_c_chain_refuses_buffer_references_outside_its_arena_or_externals():
    """bd_run_steps checks every arena extent a step reads or writes: a step that would write past
    the arena fails with BD_EINVAL and names its index, instead of corrupting memory."""
    chain, x = _one_layer_chain(14)
    chain.run([x])
    steps, n = chain._steps, len(chain)
    arena = np.empty(chain.arena_bytes, np.uint8)
    ptr = native.ffi.new("void *[]", [native.ffi.from_buffer("float[]", x)])
    failed = native.ffi.new("int64_t *")
    lib = native.lib
    for field, value, bad_step in (("dst", chain.arena_bytes - 8, 1), ("src", -2, 0), ("residual", 1 << 40, 1)):
        saved = getattr(steps[bad_step], field)
        setattr(steps[bad_step], field, value)
        rc = lib.bd_run_steps(steps, n, native.ffi.from_buffer("uint8_t[]", arena), chain.arena_bytes, ptr, 1, failed)
        assert (rc, failed[0]) == (lib.BD_EINVAL, bad_step)
        setattr(steps[bad_step], field, saved)
    rc = lib.bd_run_steps(steps, n, native.ffi.from_buffer("uint8_t[]", arena), chain.arena_bytes, ptr, 1, failed)
    assert (rc, failed[0]) == (lib.BD_OK, -1)
