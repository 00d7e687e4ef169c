"""The native runtime (C kernels + onnxruntime segments) against the onnxruntime backend (the
custom ops' ONNX function bodies in stock onnxruntime, the oracle), on synthetic models covering
every layer pattern the converter decomposes, with run-time min/max and with calibrated
quantizers, at k = Q = 8 and at k, Q in 2..4.

Read as a spec: `bdecomp.load(path).run(x)` computes the same function as
`bdecomp.load(path, backend="onnxruntime").run(x)` up to float rounding, whatever the layer
geometry, batch size or kernel ISA.
"""
from __future__ import annotations

import inspect

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_images, make_model, run_onnx, save_model, weights
from onnx import helper, numpy_helper

import bdecomp
from bdecomp import native
from bdecomp.decomposer.convert import convert as _convert
from bdecomp.decomposer.ops import DOMAIN
from bdecomp.runtime.graph import build_schedule

H = W = 12

# ---------------------------------------------------------------- tolerance (stated once)
#
# Both backends quantize with the same float32 division and round-half-to-even, so the codes of
# the network input are identical. A decomposed layer's integer accumulators are exact in C, while
# onnxruntime convolves with the rebuilt float32 weights: outputs differ by float rounding
# (~1e-7 relative, measured ≤ 4e-7). REL_TOL = 1e-4 of the output's largest magnitude leaves
# 250x headroom for that, and at least MIN_CLOSE_FRACTION of all outputs must meet it.
#
# Beyond the first layer a value can sit on a rounding boundary of the next quantizer (an exact
# tie, or within float rounding of one) and get a code one level apart in the two backends. One
# level at a layer's input moves each of that layer's outputs by at most s·max|w|, with s the
# layer's step and max|w| = max over channels of Σ_j |c_j|. Every output must therefore be within
# REL_TOL plus FLIP_STEPS such steps of the largest-stepping layer.
REL_TOL = 1e-4
ABS_TOL = 1e-6
MIN_CLOSE_FRACTION = 0.99
FLIP_STEPS = 2


def layer_steps(path, x: np.ndarray) -> float:
    """max over decomposed layers of s·max|w| (the output change of one code level), with the
    run-time steps of dynamic quantizers taken from the onnxruntime emulation on the same x."""
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    dynamic = [n.output[1] for n in m.graph.node if n.domain == DOMAIN and n.op_type == "BinQuantizeDynamic"]
    steps = dict(inits)
    if dynamic:
        probe = onnx.ModelProto.FromString(m.SerializeToString())
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in dynamic)
        steps.update(zip(dynamic, run_onnx(probe, x)))
    worst = 0.0
    for n in m.graph.node:
        if n.domain == DOMAIN and n.op_type in ("BinConv", "BinGemm"):
            s = float(np.asarray(steps[n.input[1]]).reshape(-1)[0])
            worst = max(worst, s * float(np.abs(inits[n.input[4]]).sum(axis=1).max()))
    return worst


def assert_same_outputs(got: list[np.ndarray], ref: list[np.ndarray], flip_step: float) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == np.float32
        scale = float(np.abs(r).max())
        assert scale > 0, "degenerate test: the oracle's output is all zero"
        diff = np.abs(g.astype(np.float64) - r)
        close = diff <= REL_TOL * scale + ABS_TOL
        assert close.mean() >= MIN_CLOSE_FRACTION, f"only {close.mean():.4f} of outputs within {REL_TOL:g}"
        bound = REL_TOL * scale + ABS_TOL + FLIP_STEPS * flip_step
        assert diff.max() <= bound, f"max |native - onnxruntime| = {diff.max():.3g} > {bound:.3g}"


# ---------------------------------------------------------------- the patterns


def _stem(rng, c: int):
    """1×1 conv 3 → c and Relu: turns the 3-channel image input into c channels ("a0")."""
    return ([conv_node("x", "w0", "s0", "b0", name="stem"), helper.make_node("Relu", ["s0"], ["a0"], name="stem_relu")],
            {"w0": weights(rng, c, 3, 1, 1), "b0": 0.1 * rng.standard_normal(c).astype(np.float32)})


def _bias(rng, c):
    return 0.1 * rng.standard_normal(c).astype(np.float32)


def pattern(name: str):
    """(nodes, initializers) of a model with input x [N, 3, 12, 12] and output y."""
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "first_layer_5x5":  # 3 input channels: the im2col patch path
        return [conv_node("x", "w1", "y", "b1", name="conv", pads=[2, 2, 2, 2])], \
               {"w1": weights(rng, 8, 3, 5, 5), "b1": _bias(rng, 8)}
    if name == "matmul_3d":  # constant 2-D weight on a [N, 36, 12] input
        return [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
                helper.make_node("MatMul", ["r", "wm"], ["y"], name="matmul")], \
               {"shape": np.array([0, 36, W], np.int64), "wm": weights(rng, 20, W).T.copy()}
    stem, inits = _stem(rng, 64 if name in ("plain", "strided_asym_pads", "dilated", "depthwise") else 16)
    conv3 = dict(pads=[1, 1, 1, 1])
    tail = {
        "plain": ([conv_node("a0", "w1", "y", "b1", name="conv", **conv3)],
                  {"w1": weights(rng, 16, 64, 3, 3), "b1": _bias(rng, 16)}),
        "strided_asym_pads": ([conv_node("a0", "w1", "y", "b1", name="conv", strides=[2, 2], pads=[0, 1, 2, 0])],
                              {"w1": weights(rng, 16, 64, 3, 3), "b1": _bias(rng, 16)}),
        "dilated": ([conv_node("a0", "w1", "y", name="conv", dilations=[2, 2], pads=[2, 2, 2, 2])],
                    {"w1": weights(rng, 16, 64, 3, 3)}),
        "grouped": ([conv_node("a0", "w1", "y", "b1", name="conv", group=4, **conv3)],
                    {"w1": weights(rng, 32, 4, 3, 3), "b1": _bias(rng, 32)}),
        "depthwise": ([conv_node("a0", "w1", "y", "b1", name="conv", group=64, **conv3)],
                      {"w1": weights(rng, 64, 1, 3, 3), "b1": _bias(rng, 64)}),
        "gemm_transB_alpha_beta": ([helper.make_node("Flatten", ["a0"], ["f"], name="flatten"),
                                    helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc",
                                                     transB=1, alpha=0.5, beta=2.0)],
                                   {"wg": weights(rng, 10, 16 * H * W), "bg": _bias(rng, 10)}),
        "gemm_plain": ([helper.make_node("Flatten", ["a0"], ["f"], name="flatten"),
                        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc")],
                       {"wg": weights(rng, 10, 16 * H * W).T.copy(), "bg": _bias(rng, 10)}),
        "residual_add": ([conv_node("a0", "w1", "c1", name="conv1", **conv3),
                          helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                          conv_node("r1", "w2", "c2", name="conv2", **conv3),
                          helper.make_node("Add", ["c2", "a0"], ["y"], name="add")],
                         {"w1": weights(rng, 16, 16, 3, 3), "w2": weights(rng, 16, 16, 3, 3)}),
        # the residual first, a Relu after the Add: both fused into conv2
        "residual_add_relu": ([conv_node("a0", "w1", "c1", name="conv1", **conv3),
                               helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                               conv_node("r1", "w2", "c2", "b2", name="conv2", **conv3),
                               helper.make_node("Add", ["a0", "c2"], ["s"], name="add"),
                               helper.make_node("Relu", ["s"], ["y"], name="relu2")],
                              {"w1": weights(rng, 16, 16, 3, 3), "w2": weights(rng, 16, 16, 3, 3),
                               "b2": _bias(rng, 16)}),
        # a [N, C, 1, 1] operand: onnxruntime broadcasts it, so the runtime adds it after the kernel
        "residual_broadcast": ([conv_node("a0", "w1", "c1", name="conv", **conv3),
                                helper.make_node("GlobalAveragePool", ["a0"], ["g"], name="gap"),
                                helper.make_node("Add", ["c1", "g"], ["s"], name="add"),
                                helper.make_node("Relu", ["s"], ["y"], name="relu")],
                               {"w1": weights(rng, 16, 16, 3, 3)}),
        # both operands are decomposed layers (a ResNet downsample block): one of them takes the Add
        "residual_two_layers": ([conv_node("a0", "w1", "c1", name="conv_main", strides=[2, 2], **conv3),
                                 conv_node("a0", "w2", "c2", name="conv_down", strides=[2, 2]),
                                 helper.make_node("Add", ["c1", "c2"], ["s"], name="add"),
                                 helper.make_node("Relu", ["s"], ["y"], name="relu")],
                                {"w1": weights(rng, 32, 16, 3, 3), "w2": weights(rng, 32, 16, 1, 1)}),
        # ResNet-CIFAR's parameter-free shortcut (option A): the block input subsampled and
        # zero-padded in channels by onnxruntime, added in conv2
        "residual_shortcut_pad": ([conv_node("a0", "w1", "c1", name="conv1", strides=[2, 2], **conv3),
                                   helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                                   conv_node("r1", "w2", "c2", name="conv2", **conv3),
                                   helper.make_node("Slice", ["a0", "st", "en", "ax", "sp"], ["sl"], name="subsample"),
                                   helper.make_node("Pad", ["sl", "pp"], ["sc"], name="pad"),
                                   helper.make_node("Add", ["c2", "sc"], ["s"], name="add"),
                                   helper.make_node("Relu", ["s"], ["y"], name="relu2")],
                                  {"w1": weights(rng, 32, 16, 3, 3), "w2": weights(rng, 32, 32, 3, 3),
                                   "st": np.array([0, 0], np.int64), "en": np.array([H, W], np.int64),
                                   "ax": np.array([2, 3], np.int64), "sp": np.array([2, 2], np.int64),
                                   "pp": np.array([0, 8, 0, 0, 0, 8, 0, 0], np.int64)}),
        "concat": ([conv_node("a0", "w1", "c1", name="conv1x1"),
                    conv_node("a0", "w2", "c2", name="conv3x3", **conv3),
                    helper.make_node("Concat", ["c1", "c2"], ["cc"], name="concat", axis=1),
                    conv_node("cc", "w3", "y", name="merge")],
                   {"w1": weights(rng, 8, 16, 1, 1), "w2": weights(rng, 8, 16, 3, 3), "w3": weights(rng, 4, 16, 1, 1)}),
        "relu_after_conv": ([conv_node("a0", "w1", "c1", "b1", name="conv", **conv3),
                             helper.make_node("Relu", ["c1"], ["y"], name="relu")],
                            {"w1": weights(rng, 16, 16, 3, 3), "b1": _bias(rng, 16)}),
        # weights ×3 so that the pre-activation exceeds 6 and the upper clamp is exercised
        "clip06_after_conv": ([conv_node("a0", "w1", "c1", "b1", name="conv", **conv3),
                               helper.make_node("Clip", ["c1", "lo", "hi"], ["y"], name="clip")],
                              {"w1": 3 * weights(rng, 16, 16, 3, 3), "b1": _bias(rng, 16),
                               "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}),
    }[name]
    return stem + tail[0], {**inits, **tail[1]}


PATTERNS = ["plain", "strided_asym_pads", "dilated", "grouped", "depthwise", "first_layer_5x5",
            "gemm_transB_alpha_beta", "gemm_plain", "matmul_3d", "residual_add", "residual_add_relu",
            "residual_broadcast", "residual_two_layers", "residual_shortcut_pad", "concat",
            "relu_after_conv", "clip06_after_conv"]


# How the bases and ranges are *fitted* does not change what the runtime must compute from the file,
# so the big matrix of cases skips the costly searches (data-aware fit, MSE range grid, bias
# correction) where this version of convert() has them; test_default_conversion_... keeps them.
FAST_FIT = {k: v for k, v in {"method": "weight", "range_method": "minmax", "bias_correction": False}.items()
            if k in inspect.signature(_convert).parameters}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(pattern, k, q, calibrated, fast=True) → path of the decomposed file (converted once)."""
    root = tmp_path_factory.mktemp("runtime_synthetic")
    calib = make_images(root / "calib", 3, (H, W))
    cache: dict[tuple, object] = {}

    def get(name: str, k: int, q: int, calibrated: bool, fast: bool = True):
        key = (name, k, q, calibrated, fast)
        if key not in cache:
            src = root / f"{name}.onnx"
            if not src.exists():
                save_model(make_model(*pattern(name), ["N", 3, H, W]), src)
            out = root / f"{name}-k{k}q{q}-{'cal' if calibrated else 'dyn'}{'-fast' if fast else ''}.bd.onnx"
            bdecomp.convert(src, out, bases=k, act_bits=q, calib=calib if calibrated else None, progress=False, min_depth=0,
                            **(FAST_FIT if fast and calibrated else {}))
            cache[key] = out
        return cache[key]

    return get


def batch(name: str, n: int = 2) -> np.ndarray:
    return np.random.default_rng(len(name)).standard_normal((n, 3, H, W)).astype(np.float32)


# ---------------------------------------------------------------- native == oracle


# k = Q = 8 with both quantizer kinds; the low settings split between them to keep the run short
SETTINGS = [(8, 8, False), (8, 8, True), (2, 4, False), (3, 2, True)]


@pytest.mark.parametrize("k, q, calibrated", SETTINGS,
                         ids=[f"k{k}q{q}-{'calibrated' if c else 'dynamic'}" for k, q, c in SETTINGS])
@pytest.mark.parametrize("name", PATTERNS)
def test_native_backend_matches_the_onnxruntime_oracle(converted, name, k, q, calibrated):
    path = converted(name, k, q, calibrated)
    x = batch(name)  # batch size 2 throughout
    model = bdecomp.load(path, backend="native")
    assert model.layer_names(), "nothing runs natively: the test would compare onnxruntime with itself"
    got = model.run(x)
    ref = bdecomp.load(path, backend="onnxruntime").run(x)
    assert_same_outputs(got, ref, layer_steps(path, x))


@pytest.mark.parametrize("name", ["plain", "first_layer_5x5", "gemm_transB_alpha_beta"])
def test_native_backend_matches_the_oracle_with_default_conversion_options(converted, name):
    path = converted(name, 3, 4, True, fast=False)
    x = batch(name)
    got = bdecomp.load(path, backend="native").run(x)
    ref = bdecomp.load(path, backend="onnxruntime").run(x)
    assert_same_outputs(got, ref, layer_steps(path, x))


@pytest.mark.parametrize("name", ["first_layer_5x5", "grouped", "gemm_plain", "concat"])
def test_one_step_per_tensor_files_still_match_the_oracle(tmp_path, name):
    src = save_model(make_model(*pattern(name), ["N", 3, H, W]), tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}.bd.onnx"
    bdecomp.convert(src, out, bases=3, act_bits=4, calib=make_images(tmp_path / "calib", 3, (H, W)),
                    act_scales="tensor", progress=False, min_depth=0, **FAST_FIT)
    x = batch(name)
    assert_same_outputs(bdecomp.load(out, backend="native").run(x), bdecomp.load(out, backend="onnxruntime").run(x),
                        layer_steps(out, x))


@pytest.mark.parametrize("name, act, bounds", [("relu_after_conv", "relu", (0.0, np.inf)),
                                               ("clip06_after_conv", "clip", (0.0, 6.0))])
def test_relu_and_clip_after_a_layer_are_fused_into_the_native_layer(converted, name, act, bounds):
    path = converted(name, 3, 2, True)
    steps = build_schedule(onnx.load(path))
    layer = next(s.spec for s in steps if s.kind == "layer" and s.spec.name == "conv")
    assert layer.fused == [act] and (layer.act_min, layer.act_max) == bounds
    assert layer.output == "y"
    assert not any(n.name == act for s in steps if s.kind == "ort" for n in s.nodes)
    y = bdecomp.load(path).run(batch(name))[0]
    assert y.min() == 0.0 and (y == 0).any()
    if act == "clip":
        assert y.max() == 6.0, "the upper clamp was not reached: the test does not exercise it"


@pytest.mark.parametrize("name", ["plain", "grouped", "depthwise", "first_layer_5x5", "gemm_transB_alpha_beta",
                                  "matmul_3d", "clip06_after_conv"])
@pytest.mark.parametrize("k, q", [(8, 8), (3, 2)], ids=["k8q8", "k3q2"])
def test_forcing_the_scalar_isa_gives_bit_identical_results(converted, monkeypatch, name, k, q):
    if native.available_isas() == ["scalar"]:
        pytest.skip("only the scalar kernels run on this CPU: nothing to compare against")
    path = converted(name, k, q, True)
    x = batch(name)
    monkeypatch.delenv("BDECOMP_ISA", raising=False)
    default = bdecomp.load(path).run(x)
    monkeypatch.setenv("BDECOMP_ISA", "scalar")
    assert native.default_isa() == "scalar"
    scalar = bdecomp.load(path).run(x)
    for a, b in zip(default, scalar):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", ["plain", "first_layer_5x5", "gemm_transB_alpha_beta", "matmul_3d", "concat"])
def test_with_calibration_each_image_of_a_batch_gives_what_it_gives_alone(converted, name):
    path = converted(name, 3, 4, True)
    model = bdecomp.load(path)
    x = batch(name, 2)
    both = model.run(x)[0]  # static quantizers: every image is computed independently, exactly
    for i in range(2):
        alone = model.run(x[i:i + 1])[0]
        assert both[i:i + 1].tobytes() == alone.tobytes()


@pytest.mark.parametrize("name", ["plain", "grouped", "first_layer_5x5", "gemm_transB_alpha_beta"])
@pytest.mark.parametrize("k, q", [(8, 8), (3, 2)], ids=["k8q8", "k3q2"])
def test_a_really_multithreaded_run_gives_bit_identical_results(converted, monkeypatch, name, k, q):
    """BDECOMP_MIN_PARALLEL_WORK=0 makes even these tiny layers use every thread they are given
    (the kernels' multi-threaded code paths, normally hidden below the work threshold)."""
    path = converted(name, k, q, True)
    x = batch(name)
    monkeypatch.setenv("BDECOMP_MIN_PARALLEL_WORK", "0")
    one = bdecomp.load(path, threads=1).run(x)
    model = bdecomp.load(path, threads=3)
    for step in model._steps:
        if step.kind == "layer":
            n, h, w = (2, H, W) if step.spec.op != "BinGemm" else (2, 1, 1)
            assert step.kernel.threads_used(n, h, w, threads=3) == 3
    three = model.run(x)
    for a, b in zip(one, three):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", ["plain", "first_layer_5x5", "gemm_plain"])
def test_the_first_run_of_a_shape_times_the_ways_to_run_each_layer_and_keeps_one(converted, monkeypatch, name):
    """Kernel families and the patch path are timed on the first input of each shape; the
    survivor gives the same bytes as every forced family."""
    monkeypatch.delenv("BDECOMP_KERNEL", raising=False)
    path = converted(name, 3, 4, True)
    x = batch(name)
    model = bdecomp.load(path)
    layers = [s for s in model._steps if s.kind == "layer"]
    first = model.run(x)
    for s in layers:
        (choices, *_), = s.plans.values()
        assert len(choices) == 1
    for a, b in zip(first, model.run(x)):
        assert a.tobytes() == b.tobytes()
    for family in ("popcount", "lut"):
        monkeypatch.setenv("BDECOMP_KERNEL", family)
        forced = bdecomp.load(path).run(x)
        for a, b in zip(first, forced):
            assert a.tobytes() == b.tobytes()


def test_a_first_layer_with_few_channels_can_run_on_packed_patches(converted):
    """first_layer_5x5 has 3 input channels: the patch path (D = 75 bits in 2 words instead of
    25 taps of 1 word) is one of the candidates."""
    path = converted("first_layer_5x5", 3, 4, True)
    model = bdecomp.load(path)
    x = batch("first_layer_5x5")
    first = next(s for s in model._steps if s.kind == "layer")
    choices = model._layer_plan(first, x)[0]
    assert any(patch for _, _, patch in choices)


def test_a_direct_way_nearly_as_fast_as_packed_patches_is_kept_when_it_can_chain():
    """Measured alone, a direct convolution within CHAIN_CREDIT of the patch way still wins when
    it can join a chain (which the one-layer timing does not see); clearly slower, it loses."""
    from bdecomp.runtime.model import CHAIN_CREDIT, fastest_way

    ways = [(None, "lut", False), (None, "lut", True)]
    close = [1.0, 0.5 * (1.0 + CHAIN_CREDIT)]  # patches faster, by less than the credit
    assert fastest_way(close, ways, chainable=True) == 0
    assert fastest_way(close, ways, chainable=False) == 1
    assert fastest_way([1.0, 0.9 * CHAIN_CREDIT], ways, chainable=True) == 1


@pytest.mark.parametrize("name, fused", [("residual_add", ["add"]), ("residual_add_relu", ["add", "relu2"]),
                                         ("residual_broadcast", ["add", "relu"]),
                                         ("residual_two_layers", ["add", "relu"])])
def test_a_residual_add_and_the_activation_after_it_run_inside_the_layer(converted, name, fused):
    """No onnxruntime segment is left for them (ResNet-56 had 27 such segments)."""
    model = bdecomp.load(converted(name, 3, 4, True))
    layers = [s for s in model._steps if s.kind == "layer"]
    assert set(fused) <= {n for s in layers for n in s.spec.fused}
    assert not any(n.name in fused for s in model._steps if s.kind == "ort" for n in s.nodes)


# layers that never run in a chain: the depthwise kernel, and a residual onnxruntime must broadcast;
# besides, a layer whose first run settled on packed patches (the scalar ISA picks them for 16-channel
# 3×3 layers) does not, nor does any layer reading the same quantizer
UNCHAINED = {"depthwise": "conv", "residual_broadcast": "conv"}


@pytest.mark.parametrize("isa", sorted({"scalar", native.default_isa()}))
@pytest.mark.parametrize("name", PATTERNS)
def test_later_runs_of_a_shape_run_its_native_steps_as_chains_with_the_same_bytes(converted, monkeypatch, name,
                                                                                    isa):
    """The first run of a shape calls the steps one by one and compiles the runs of native steps
    into chains (runtime/chains.py); later runs go through them, bit for bit the same."""
    monkeypatch.setenv("BDECOMP_ISA", isa)
    model = bdecomp.load(converted(name, 3, 4, True))
    x = batch(name)
    first = model.run(x)
    chained = model.run(x)
    (built,) = model._chains.values()
    steps = model._steps
    in_chains = {steps[i].spec.name for r in built.values() for i in range(r.start, r.end) if steps[i].kind == "layer"}
    layers = [s for s in steps if s.kind == "layer"]
    alone = {s.spec.name for s in layers if UNCHAINED.get(name) == s.spec.name or next(iter(s.plans.values()))[0][0][2]}
    shut_out = {s.spec.quant for s in layers if s.spec.name in alone}  # quantizers read outside a chain
    assert {s.spec.name for s in layers} - in_chains == alone | {s.spec.name for s in layers if s.spec.quant in shut_out}
    assert built or isa == "scalar" or name in UNCHAINED
    model.chains = False
    one_by_one = model.run(x)
    for a, b, c in zip(first, chained, one_by_one):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_a_shortcut_segment_runs_before_the_quantizers_of_its_block_so_both_convolutions_chain(converted):
    """The scheduler first put the shortcut (Slice, Pad) after conv2's quantizer, the last native
    step it could run before; a quantizer read across a segment keeps it and its layer out of the
    chains. The segment moves up to where it splits only a float tensor."""
    model = bdecomp.load(converted("residual_shortcut_pad", 3, 4, True))
    kinds = [(s.kind, s.spec.name if s.spec else [n.name for n in s.nodes]) for s in model._steps]
    pos = {name if isinstance(name, str) else name[0]: i for i, (_, name) in enumerate(kinds)}
    quants = [i for i, (kind, _) in enumerate(kinds) if kind == "quant"]
    assert pos["stem"] < pos["subsample"] < min(q for q in quants if q > pos["stem"]) < pos["conv1"] < pos["conv2"]
    x = batch("residual_shortcut_pad")
    model.run(x)
    model.run(x)
    (built,) = model._chains.values()
    chained = {model._steps[i].spec.name for r in built.values() for i in range(r.start, r.end)
               if model._steps[i].kind == "layer"}
    assert {"conv1", "conv2"} <= chained


@pytest.mark.parametrize("name", ["residual_broadcast", "gemm_plain"])
def test_onnxruntime_segments_declare_the_rank_of_their_boundary_tensors(converted, name):
    """Segment inputs and outputs carry their rank (dimensions left free): onnxruntime's NCHWc
    rewrite of convolutions needs it (SqueezeNet's float layers ran 15–20 % slower without)."""
    model = bdecomp.load(converted(name, 3, 4, True))
    model.run(batch(name))
    segments = [s.session for s in model._steps if s.kind == "ort" and s.session is not None]
    assert segments
    for sess in segments:
        for v in sess.get_inputs() + sess.get_outputs():
            assert v.shape is not None and len(v.shape) >= 1, (v.name, v.shape)


def test_a_batch1_concat_of_native_layers_runs_inside_their_chain(converted):
    """A channel Concat of two decomposed layers is not an onnxruntime segment: for batch 1 the
    layers write their parts of one buffer inside the chain, and the result has the bytes of the
    one-by-one run (which concatenates with numpy)."""
    model = bdecomp.load(converted("concat", 3, 4, True))
    x = batch("concat", n=1)
    first = model.run(x)
    chained = model.run(x)
    steps = model._steps
    assert not any(n.op_type == "Concat" for s in steps if s.kind == "ort" for n in s.nodes)
    (built,) = model._chains.values()
    (i_concat,) = [i for i, s in enumerate(steps) if s.kind == "concat"]
    assert any(r.start <= i_concat < r.end for r in built.values())
    model.chains = False
    one_by_one = model.run(x)
    assert first[0].tobytes() == chained[0].tobytes() == one_by_one[0].tobytes()


@pytest.mark.parametrize("name", ["plain", "residual_two_layers"])
def test_outputs_of_a_chained_run_are_not_overwritten_by_the_next_run(converted, name):
    model = bdecomp.load(converted(name, 3, 4, True))
    x = batch(name)
    model.run(x)
    y = model.run(x)[0]
    kept = y.copy()
    model.run(-x)
    assert y.tobytes() == kept.tobytes()
