"""`convert --sequential`: each layer's basis codes are refitted, scales fixed, to the inputs the
network with the layers before it decomposed feeds it, against the float network's outputs."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest

from conftest import conv_node, make_images, make_model, output_error, run_onnx, save_model, weights

import bdecomp
from bdecomp.decomposer import calibrate, simplify
from bdecomp.decomposer.fit import fit_layer, refit_codes
from bdecomp.decomposer.rewrite import Layer, Plan


def _layer_and_patches(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((3000, 1, 72)), 0).astype(np.float32)
    W = rng.standard_normal((24, 72)).astype(np.float32)
    L = Layer("l", "Conv", "x", "y", W, np.zeros(24), (24, 8, 3, 3))
    sampler = calibrate.PatchSampler("x", 72, "Gemm", seed=seed)
    sampler.chunks, sampler.count = [X], len(X)
    qp = calibrate.qparams_from_range(0.0, float(X.max()), 4)
    return L, X, sampler, qp


def _objective(plan, X, Xs, mix):
    """(1 − mix)·‖Q(X̃) M c − X w‖² + mix·‖Q(X) M c − X w‖² over the patches (one group)."""
    Mc = plan.dec.reconstruct().astype(np.float64)
    Y = X[:, 0, :].astype(np.float64) @ plan.layer.weight.T.astype(np.float64)
    err = lambda P: float(np.square(calibrate.quantize_dequantize(P, plan.qparams)[:, 0, :] @ Mc.T - Y).sum())
    return (1 - mix) * err(Xs) + mix * err(X)


@pytest.mark.parametrize("mix,factor", [(0.0, 0.95), (0.5, 1.0)])
def test_refitting_to_shifted_inputs_lowers_the_error_on_them_and_keeps_the_scales(mix, factor):
    L, X, sampler, qp = _layer_and_patches()
    dec, L2, _ = fit_layer(L, 3, qp, sampler, "data", False)
    plan = Plan(L2, dec, 4, qp)
    Xs = (X * np.float32(0.85) + np.float32(0.05)).astype(np.float32)  # the decomposed upstream, shrunk
    new = refit_codes(plan, X, Xs, mix=mix)
    np.testing.assert_array_equal(new.coeffs, dec.coeffs)
    assert not np.array_equal(new.codes, dec.codes)
    before, after = _objective(plan, X, Xs, mix), _objective(Plan(L2, new, 4, qp), X, Xs, mix)
    assert after < factor * before


def test_refitting_to_the_float_inputs_themselves_never_raises_the_error():
    L, X, sampler, qp = _layer_and_patches(1)
    dec, L2, _ = fit_layer(L, 2, qp, sampler, "data", False)
    new = refit_codes(Plan(L2, dec, 4, qp), X, X)
    assert _objective(Plan(L2, new, 4, qp), X, X, 0.0) <= _objective(Plan(L2, dec, 4, qp), X, X, 0.0) * (1 + 1e-9)


def test_a_fresh_sampler_samples_the_same_positions():
    rng = np.random.default_rng(2)
    s = calibrate.PatchSampler("x", 4 * 9, "Conv", (3, 3), (1, 1), (1, 1, 1, 1), per_image=20, seed=7)
    xs = [rng.standard_normal((1, 4, 10, 10)).astype(np.float32) for _ in range(3)]
    for x in xs:
        s.update(x)
    twin = s.fresh()
    for x in xs:
        twin.update(2 * x)
    np.testing.assert_array_equal(twin.patches(), 2 * s.patches())


def _deep_cnn(tmp_path):
    """Four 3×3 convs with ReLUs over 16 channels, then global pooling: errors of early layers
    reach the later ones."""
    rng = np.random.default_rng(3)
    nodes, inits, x = [], {}, "x"
    for i, cin in enumerate([3, 16, 16, 16]):
        nodes += [conv_node(x, f"w{i}", f"c{i}", f"b{i}", name=f"conv{i}", pads=[1, 1, 1, 1]),
                  onnx.helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        inits[f"w{i}"], inits[f"b{i}"] = weights(rng, 16, cin, 3, 3), np.full(16, 0.1, np.float32)
        x = f"r{i}"
    nodes.append(onnx.helper.make_node("GlobalAveragePool", [x], ["y"], name="gap"))
    return save_model(make_model(nodes, inits, [1, 3, 16, 16]), tmp_path / "deep.onnx")


def test_sequential_conversion_tracks_the_float_network_closer_on_its_calibration_images(tmp_path, monkeypatch):
    """Closer than the plain conversion, and closer than the same refit fed the float network's
    own inputs (mix = 1: the extra sweeps alone), so the gain comes from the decomposed inputs.
    (Layer by layer: block reconstruction, a refit of its own, has its own test.)"""
    import functools

    from bdecomp.decomposer import convert as convert_module

    src, calib = _deep_cnn(tmp_path), make_images(tmp_path / "calib", 12, (16, 16), seed=6)
    error = lambda path: output_error(path, src, calib)

    opts = dict(bases=2, act_bits=4, calib=calib, progress=False, min_depth=0, block_reconstruction=False)
    bdecomp.convert(src, tmp_path / "plain.onnx", sequential=False, **opts)
    bdecomp.convert(src, tmp_path / "seq.onnx", sequential=True, **opts)
    with monkeypatch.context() as mp:
        mp.setattr(convert_module, "refit_codes", functools.partial(refit_codes, mix=1.0))
        bdecomp.convert(src, tmp_path / "float_fed.onnx", sequential=True, **opts)
    seq, plain, float_fed = (error(tmp_path / f"{n}.onnx") for n in ("seq", "plain", "float_fed"))
    assert seq < 0.9 * plain and seq < 0.9 * float_fed
    assert _options(tmp_path / "seq.onnx")["sequential"] is True


def _two_convs() -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    nodes = [conv_node("x", "w0", "c0", name="conv0", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c0"], ["a"], name="relu0"),
             conv_node("a", "w1", "y", name="conv1", pads=[1, 1, 1, 1])]
    return make_model(nodes, {"w0": weights(rng, 8, 3, 3, 3), "w1": weights(rng, 8, 8, 3, 3)}, [1, 3, 8, 8])


def test_the_upstream_model_computes_only_what_the_tensor_needs_and_the_same_values():
    model = _two_convs()
    cut = simplify.upstream(model, ["a"])
    assert [n.name for n in cut.graph.node] == ["conv0", "relu0"]
    assert [i.name for i in cut.graph.initializer] == ["w0"]
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    full = onnx.ModelProto.FromString(model.SerializeToString())
    full.graph.output.append(onnx.ValueInfoProto(name="a"))
    np.testing.assert_array_equal(run_onnx(cut, x)[0], run_onnx(full, x)[1])


def test_the_upstream_model_keeps_what_a_subgraph_reads_from_the_outer_scope():
    """An If whose branches read `a` from the enclosing graph still needs a's producer."""
    model = _two_convs()
    branch = lambda op: onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["a"], [f"{op}_out"])], op, [],
        [onnx.helper.make_tensor_value_info(f"{op}_out", onnx.TensorProto.FLOAT, None)])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["z"], name="if0",
                                                  then_branch=branch("Sigmoid"), else_branch=branch("Neg")))
    cut = simplify.upstream(model, ["z"])
    assert [n.name for n in cut.graph.node] == ["conv0", "relu0", "if0"]
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a = np.maximum(run_onnx(simplify.upstream(model, ["a"]), x)[0], 0)
    np.testing.assert_allclose(run_onnx(cut, x)[0], 1 / (1 + np.exp(-a)), rtol=1e-6)


def test_the_upstream_model_of_a_graph_input_is_the_model_itself():
    model = _two_convs()
    assert simplify.upstream(model, ["x"]) is model


def test_calibration_batches_kept_in_memory_equal_those_read_again(tmp_path):
    from bdecomp.decomposer.convert import _kept_batches
    from bdecomp.models.preprocess import Recipe

    images = sorted(make_images(tmp_path / "calib", 5, (16, 16), seed=8).glob("*.png"))
    recipe = Recipe(size=(16, 16))
    (kept, in_memory), (read, streamed) = _kept_batches(images, recipe, 2), _kept_batches(images, recipe, 2, max_bytes=0)
    assert in_memory and not streamed
    for _ in range(2):  # each call gives them all again
        a, b = list(kept()), list(read())
        assert [x.shape[0] for x in a] == [2, 2, 1]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def _fire_module(tmp_path):
    """squeeze 3×3 → (expand 1×1, expand 3×3) → Concat → 3×3 → pooling: the expand layers read
    the same tensor."""
    rng = np.random.default_rng(9)
    nodes = [conv_node("x", "w0", "s", name="squeeze", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["s"], ["sr"], name="relu_s"),
             conv_node("sr", "w1", "e1", name="expand1"),
             conv_node("sr", "w2", "e3", name="expand3", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Concat", ["e1", "e3"], ["cat"], name="cat", axis=1),
             onnx.helper.make_node("Relu", ["cat"], ["cr"], name="relu_c"),
             conv_node("cr", "w3", "c", name="last", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("GlobalAveragePool", ["c"], ["y"], name="gap")]
    inits = {"w0": weights(rng, 16, 3, 3, 3), "w1": weights(rng, 16, 16, 1, 1),
             "w2": weights(rng, 16, 16, 3, 3), "w3": weights(rng, 16, 32, 3, 3)}
    return save_model(make_model(nodes, inits, [1, 3, 16, 16]), tmp_path / "fire.onnx")


def test_layers_reading_independent_inputs_share_a_pass_and_a_chain_does_not(tmp_path):
    from bdecomp.decomposer.convert import _shared_passes
    from bdecomp.decomposer.rewrite import find_layers

    for src, runs in ((_fire_module(tmp_path), [[0], [1, 2], [3]]), (_deep_cnn(tmp_path), [[0], [1], [2], [3]])):
        model = onnx.load(str(src))
        layers, _ = find_layers(model)
        assert _shared_passes(model, layers) == runs


def test_shared_passes_give_the_same_file_as_one_pass_per_layer(tmp_path, monkeypatch):
    from bdecomp.decomposer import convert as convert_module

    src, calib = _fire_module(tmp_path), make_images(tmp_path / "calib", 6, (16, 16), seed=10)
    opts = dict(bases=2, act_bits=4, calib=calib, progress=False, min_depth=0, sequential=True)
    bdecomp.convert(src, tmp_path / "shared.onnx", **opts)
    with monkeypatch.context() as mp:
        mp.setattr(convert_module, "_shared_passes", lambda model, layers: [[i] for i in range(len(layers))])
        bdecomp.convert(src, tmp_path / "each.onnx", **opts)
    assert (tmp_path / "shared.onnx").read_bytes() == (tmp_path / "each.onnx").read_bytes()


def _residual_net() -> onnx.ModelProto:
    """conv0 → relu (r0) → conv1 → relu → conv2 → Add(r0) → relu → conv3 → pooling."""
    rng = np.random.default_rng(11)
    nodes = [conv_node("x", "w0", "c0", name="conv0", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             conv_node("r0", "w1", "c1", name="conv1", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             conv_node("r1", "w2", "c2", name="conv2", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Add", ["c2", "r0"], ["s"], name="add"),
             onnx.helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             conv_node("r2", "w3", "c3", name="conv3", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("GlobalAveragePool", ["c3"], ["y"], name="gap")]
    inits = {"w0": weights(rng, 8, 3, 3, 3), **{f"w{i}": weights(rng, 8, 8, 3, 3) for i in (1, 2, 3)}}
    return make_model(nodes, inits, [1, 3, 12, 12])


def _passes(max_bytes=1 << 30):
    rng = np.random.default_rng(12)
    batches = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(4)]
    return calibrate.FrontierPasses(lambda: iter(batches), True, "x", "float32", None, None, max_bytes=max_bytes)


def _samplers():
    return [calibrate.PatchSampler(t, 72, "Conv", (3, 3), (1, 1), (1, 1, 1, 1), per_image=20, seed=i)
            for i, t in enumerate(["r0", "r1", "r2"])]


@pytest.mark.parametrize("max_bytes", [1 << 30, 0])
def test_passes_from_the_kept_frontier_sample_what_passes_from_the_images_sample(max_bytes):
    """Layer inputs in graph order; with max_bytes = 0 nothing is kept and each pass runs from the
    images, which is the reference here."""
    model, passes, reference = _residual_net(), _passes(max_bytes), _passes()
    ours, theirs = _samplers(), _samplers()
    for a, b in zip(ours, theirs):
        passes.sample(model, [a])
        calibrate.collect_stats(simplify.upstream(model, [b.tensor]), [], reference.batches(), samplers=[b])
        np.testing.assert_allclose(a.patches(), b.patches(), rtol=1e-6, atol=1e-6)
    assert passes.kept == {} if max_bytes == 0 else passes.kept


def test_the_frontier_keeps_what_a_later_node_reads_and_drops_what_none_does():
    """After the pass for conv2's input (r1), the skip connection's r0 (read by the Add) and r1 are
    kept; after the pass for conv3's input, only r2 is: nothing later reads r0 or r1."""
    model, passes = _residual_net(), _passes()
    r0, r1, r2 = _samplers()
    passes.sample(model, [r1])
    assert set(passes.kept) == {"r0", "r1"}
    passes.sample(model, [r2])
    assert set(passes.kept) == {"r2"}


def _options(path) -> dict:
    return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["bdecomp.options"])


@pytest.mark.parametrize("max_bytes,applied", [(1 << 30, True), (0, False)])
def test_by_default_the_refit_runs_when_the_calibration_images_fit_in_memory(max_bytes, applied, tmp_path, monkeypatch):
    import functools

    from bdecomp.decomposer import convert as convert_module

    src, calib = _deep_cnn(tmp_path), make_images(tmp_path / "calib", 4, (16, 16), seed=13)
    monkeypatch.setattr(convert_module, "_kept_batches",
                        functools.partial(convert_module._kept_batches, max_bytes=max_bytes))
    bdecomp.convert(src, tmp_path / "d.onnx", bases=2, act_bits=4, calib=calib, progress=False, min_depth=0)
    assert _options(tmp_path / "d.onnx")["sequential"] is applied


@pytest.mark.parametrize("opts", [dict(sequential=False), dict(method="weight"), dict(calib=False)])
def test_no_refit_when_turned_off_or_without_the_data_aware_fit(opts, tmp_path):
    src = _deep_cnn(tmp_path)
    calib = None if opts.pop("calib", True) is False else make_images(tmp_path / "calib", 4, (16, 16), seed=13)
    bdecomp.convert(src, tmp_path / "d.onnx", bases=2, act_bits=4, calib=calib, progress=False, min_depth=0, **opts)
    assert _options(tmp_path / "d.onnx")["sequential"] is False


@pytest.mark.parametrize("opts", [dict(), dict(method="weight")])
def test_sequential_without_calibration_or_the_data_aware_fit_is_refused(opts, tmp_path):
    from bdecomp.errors import ConfigError

    src = _deep_cnn(tmp_path)
    calib = make_images(tmp_path / "calib", 2, (16, 16)) if opts else None
    with pytest.raises(ConfigError, match="--sequential"):
        bdecomp.convert(src, tmp_path / "o.onnx", calib=calib, sequential=True, progress=False, **opts)


class _Grab:
    """A sampler that keeps the whole tensor it is fed."""

    def __init__(self, tensor: str):
        self.tensor, self.values = tensor, []

    def update(self, x: np.ndarray) -> None:
        self.values.append(x.copy())


def test_after_forgetting_a_changed_layers_output_a_pass_gives_what_a_pass_from_the_images_gives(tmp_path):
    """The frontier kept values computed with conv1's old weights (r1 feeds conv2); once conv1
    changes, `forget` drops them and the next pass recomputes them, instead of reading stale ones."""
    model = onnx.load(str(_deep_cnn(tmp_path)))
    xs = [np.random.default_rng(20 + i).standard_normal((1, 3, 16, 16)).astype(np.float32) for i in range(3)]

    def passes():
        return calibrate.FrontierPasses(lambda: iter(xs), True, "x", "float32", None, None)

    changed = onnx.ModelProto.FromString(model.SerializeToString())
    w1 = next(t for t in changed.graph.initializer if t.name == "w1")
    w1.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(w1), "w1"))
    p = passes()
    for t in ("r0", "r1"):
        p.sample(model, [_Grab(t)])
    stale, fresh, reference = _Grab("r2"), _Grab("r2"), _Grab("r2")
    p_stale = copy.deepcopy(p)
    p_stale.sample(changed, [stale])
    p.forget(changed, "c1")
    p.sample(changed, [fresh])
    passes().sample(changed, [reference])
    for a, b in zip(fresh.values, reference.values, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(stale.values[0], reference.values[0])
