"""The allocator's sensitivity probes (decomposer/probe.py): a network with one layer replaced,
run only downstream of that layer from the float network's values, gives what running the whole
probe network gives, and computes each float node once over a set of probes."""
from __future__ import annotations

import numpy as np
import onnx

from conftest import conv_node, make_model, weights

from bdecomp.decomposer import calibrate, decompose, probe
from bdecomp.decomposer.rewrite import Plan, find_layers, rewrite
from bdecomp.decomposer.simplify import boundary


def _net() -> onnx.ModelProto:
    """stem conv → residual block (conv a, conv b, Add of the stem) → a fire module (squeeze, two
    expands, Concat) → 1×1 head → pooling: skip tensors and parallel branches at the boundaries."""
    rng = np.random.default_rng(5)
    H = onnx.helper.make_node
    nodes = [conv_node("x", "w0", "c0", name="stem", pads=[1, 1, 1, 1]), H("Relu", ["c0"], ["s"], name="r0"),
             conv_node("s", "wa", "ca", name="conv_a", pads=[1, 1, 1, 1]), H("Relu", ["ca"], ["ra"], name="ra"),
             conv_node("ra", "wb", "cb", name="conv_b", pads=[1, 1, 1, 1]), H("Add", ["cb", "s"], ["sum"], name="add"),
             H("Relu", ["sum"], ["b"], name="rb"),
             conv_node("b", "wq", "cq", name="squeeze"), H("Relu", ["cq"], ["q"], name="rq"),
             conv_node("q", "we1", "e1", name="expand1"), conv_node("q", "we3", "e3", name="expand3", pads=[1, 1, 1, 1]),
             H("Concat", ["e1", "e3"], ["cat"], name="cat", axis=1), H("Relu", ["cat"], ["f"], name="rf"),
             conv_node("f", "wh", "h", name="head"), H("GlobalAveragePool", ["h"], ["g"], name="gap"),
             H("Flatten", ["g"], ["y"], name="flat")]
    inits = {"w0": weights(rng, 8, 3, 3, 3), "wa": weights(rng, 8, 8, 3, 3), "wb": weights(rng, 8, 8, 3, 3),
             "wq": weights(rng, 4, 8, 1, 1), "we1": weights(rng, 8, 4, 1, 1), "we3": weights(rng, 8, 4, 3, 3),
             "wh": weights(rng, 10, 16, 1, 1)}
    return make_model(nodes, inits, [1, 3, 12, 12])


def _probe_model(model, layer):
    qp = calibrate.qparams_from_range(0.0, 4.0, 4)
    return rewrite(model, [Plan(layer, decompose.decompose(layer.weight, 2), 4, qp)])


def _images(n=3):
    rng = np.random.default_rng(6)
    return [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(n)]


def test_downstream_runs_give_the_whole_probe_networks_outputs():
    model, xs = _net(), _images()
    layers, _ = find_layers(model)
    runs = probe.ProbeRuns(model, xs, threads=1)
    assert not runs.whole
    for L in layers:
        pm = _probe_model(model, L)
        got, want = runs.outputs(pm), calibrate.first_outputs(pm, xs, 1)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_each_float_node_runs_once_over_the_probes():
    model, xs = _net(), _images(2)
    layers, _ = find_layers(model)
    runs = probe.ProbeRuns(model, xs, threads=1)
    for L in layers:
        runs.outputs(_probe_model(model, L))
    # the float values probes read lie upstream of the head: at most every node once
    assert 0 < runs.float_nodes_run <= len(model.graph.node)


def test_the_boundary_of_a_block_layer_holds_the_skip_tensor():
    model = _net()
    nodes = list(model.graph.node)
    conv_b = next(n for n in nodes if n.name == "conv_b")
    consts = {t.name for t in model.graph.initializer}
    assert boundary(probe.downstream(nodes, [conv_b]), consts) == ["ra", "s"]
    expand3 = next(n for n in nodes if n.name == "expand3")
    assert boundary(probe.downstream(nodes, [expand3]), consts) == ["e1", "q"]


def test_a_fixed_batch_model_runs_whole_probe_networks():
    model = _net()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    xs = [np.repeat(x, 2, axis=0) for x in _images(1)]
    layers, _ = find_layers(model)
    runs = probe.ProbeRuns(model, xs, threads=1)
    assert runs.whole
    pm = _probe_model(model, layers[1])
    np.testing.assert_array_equal(runs.outputs(pm)[0], calibrate.first_outputs(pm, xs, 1)[0])
