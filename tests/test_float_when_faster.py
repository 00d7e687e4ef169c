"""`convert --float-when-faster`: convolutions estimated faster in onnxruntime fp32 than decomposed
stay float (decomposer/speed.py), the others are decomposed as usual.

The model: an image stem (float under --min-depth), a 16-channel 3×3 layer on 64×64 pixels (its
per-pixel fixed work makes it ~2x slower decomposed, like ResNet-56's first stage), a stride-4
transition, and a 128-channel 3×3 layer on 16×16 (~1.3x faster decomposed at k = Q = 4).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import conv_node, make_images, make_model, save_model, weights
from onnx import helper

import bdecomp
from bdecomp.decomposer import speed

HW = 64
SW = speed.BUILTIN.switch_ms


def shapes_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [conv_node("x", "w0", "c0", name="stem"), helper.make_node("Relu", ["c0"], ["r0"]),
             conv_node("r0", "w1", "c1", name="narrow", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             conv_node("r1", "w2", "c2", name="down", pads=[1, 1, 1, 1], strides=[4, 4]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             conv_node("r2", "w3", "y", name="wide", pads=[1, 1, 1, 1])]
    inits = {"w0": weights(rng, 16, 3, 1, 1), "w1": weights(rng, 16, 16, 3, 3), "w2": weights(rng, 128, 16, 3, 3),
             "w3": weights(rng, 128, 128, 3, 3)}
    return make_model(nodes, inits, ["N", 3, HW, HW])


@pytest.fixture
def model(tmp_path):
    return save_model(shapes_model(), tmp_path / "model.onnx")


def convert(src, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("bases", 4)
    kw.setdefault("act_bits", 4)
    return bdecomp.convert(src, out, **kw)


def decomposed(path) -> set[str]:
    return {n.name for n in onnx.load(path).graph.node if n.op_type == "BinConv"}


def reasons(report) -> dict[str, str]:
    return {f["name"]: f["reason"] for f in report.float_layers}


def test_the_model_estimates_a_small_channel_layer_on_a_large_image_faster_in_float():
    # ResNet-56's first stage: 16 channels, 3×3, 32×32 (measured 0.075 ms at (4, 4) vs 0.048 ms)
    assert speed.BUILTIN.float_ms(16, 16, 1, 9, 1024) < speed.BUILTIN.decomposed_ms(16, 16, 1, 9, 1024, 1024, 4, 4)
    # 128 channels on 28×28 (measured 1.36 ms at (4, 4) vs 1.98 ms)
    assert speed.BUILTIN.float_ms(128, 128, 1, 9, 784) > speed.BUILTIN.decomposed_ms(128, 128, 1, 9, 784, 784, 4, 4)


def test_the_decomposed_estimate_grows_with_k_and_with_a_second_table_set():
    t = [speed.BUILTIN.decomposed_ms(64, 64, 1, 9, 256, 256, k, q) for k, q in [(2, 4), (4, 4), (4, 8)]]
    assert t[0] < t[1] < t[2]


def test_a_narrow_layer_on_a_large_image_stays_float_and_a_wide_one_is_decomposed(model, tmp_path):
    report = convert(model, tmp_path / "out.onnx", float_when_faster=True)
    assert "wide" in decomposed(tmp_path / "out.onnx")
    assert "narrow" not in decomposed(tmp_path / "out.onnx")
    assert reasons(report)["narrow"].startswith("faster in float")


def test_without_the_option_both_are_decomposed(model, tmp_path):
    convert(model, tmp_path / "out.onnx")
    assert {"narrow", "wide"} <= decomposed(tmp_path / "out.onnx")


def test_without_the_option_the_report_names_the_layers_it_would_keep_float(model, tmp_path):
    report = convert(model, tmp_path / "out.onnx")
    with_option = convert(model, tmp_path / "fw.onnx", float_when_faster=True)
    kept_float = [f["name"] for f in with_option.float_layers if f["reason"].startswith("faster in float")]
    assert "narrow" in kept_float and "wide" not in kept_float
    assert report.faster_in_float["layers"] == kept_float and report.faster_in_float["est_ms"] > 0
    assert "--float-when-faster" in report.table().splitlines()[-1]
    assert json.loads(report.to_json())["faster_in_float"]["layers"] == kept_float


def test_with_the_option_or_nothing_faster_in_float_the_report_has_no_such_note(model, tmp_path):
    assert convert(model, tmp_path / "a.onnx", float_when_faster=True).faster_in_float == {}
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"narrow": {"skip": True}, "down": {"skip": True}}}))
    report = convert(model, tmp_path / "b.onnx", layer_config=cfg)
    assert report.faster_in_float == {} and "--float-when-faster" not in report.table()


@pytest.mark.parametrize("rows,stays_float", [(3136, True), (1, False)])
def test_a_matmul_over_many_rows_is_weighed_like_a_one_by_one_conv_and_a_single_row_is_not(rows, stays_float, tmp_path):
    # ConvNeXt-T's first-stage MLP (3136 rows, 96 → 384): fp32 was faster at k=Q=4; a one-row
    # MatMul at batch 1 is memory-bound, where the binary weights win
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mlp")], {"w": weights(rng, 96, 384)},
                   ["N", rows, 96])
    report = convert(save_model(m, tmp_path / "m.onnx"), tmp_path / "out.onnx", float_when_faster=True)
    assert ("mlp" in reasons(report)) == stays_float
    assert (not report.layers) == stays_float


def test_a_layer_config_giving_k_decomposes_a_layer_estimated_faster_in_float(model, tmp_path):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"narrow": {"k": 2}}}))
    convert(model, tmp_path / "out.onnx", float_when_faster=True, layer_config=cfg)
    assert "narrow" in decomposed(tmp_path / "out.onnx")


def test_the_file_with_float_layers_matches_onnxruntime_on_the_native_runtime(model, tmp_path):
    convert(model, tmp_path / "out.onnx", float_when_faster=True)
    x = np.random.default_rng(1).random((1, 3, HW, HW), dtype=np.float32)
    native = bdecomp.load(tmp_path / "out.onnx").run(x)[0]
    oracle = bdecomp.load(tmp_path / "out.onnx", backend="onnxruntime").run(x)[0]
    np.testing.assert_allclose(native, oracle, rtol=1e-4, atol=1e-4 * float(np.abs(oracle).max()))


def test_with_a_budget_a_layer_slower_even_at_the_cheapest_setting_is_left_out_of_the_allocation(model, tmp_path):
    calib = make_images(tmp_path / "calib", 3, (HW, HW))
    report = convert(model, tmp_path / "out.onnx", calib=calib, budget=12, float_when_faster=True)
    assert "narrow" in reasons(report) and "k=2, Q=2" in reasons(report)["narrow"]
    assert "wide" in decomposed(tmp_path / "out.onnx")
    assert "narrow" not in report.allocation["sensitivity"]


def test_the_command_line_flag_keeps_the_narrow_layer_float(model, tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "bdecomp.cli", "convert", str(model), "-o", str(tmp_path / "out.onnx"),
                          "--bases", "4", "--act-bits", "4", "--float-when-faster", "--quiet",
                          "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    floats = {f["name"]: f["reason"] for f in json.loads((tmp_path / "r.json").read_text())["float_layers"]}
    assert floats["narrow"].startswith("faster in float") and "wide" not in floats


def test_with_a_budget_a_layer_slower_at_the_setting_it_was_allocated_stays_float(model, tmp_path):
    calib = make_images(tmp_path / "calib", 3, (HW, HW))
    report = convert(model, tmp_path / "out.onnx", calib=calib, budget=56, float_when_faster=True)
    # "wide" is allocated (8, 8) (the only allocated layer, and the budget allows it), where it is
    # estimated at 2.2x its float time
    assert "wide" in report.allocation["sensitivity"]
    assert reasons(report)["wide"].startswith("faster in float") and "k=8, Q=8" in reasons(report)["wide"]
    assert not decomposed(tmp_path / "out.onnx")


def test_a_lone_layer_saving_less_than_a_segment_switch_stays_decomposed():
    order = ["a", "b", "c"]
    assert speed.float_runs(order, {"b": SW / 2}, set(), SW) == set()


def test_consecutive_layers_go_float_together_when_their_savings_add_up_to_more_than_a_switch():
    order = ["a", "b", "c", "d"]
    gains = {"a": SW / 3, "b": SW / 3, "c": SW / 2}
    assert speed.float_runs(order, gains, set(), SW) == {"a", "b", "c"}


def test_a_layer_next_to_one_already_float_goes_float_for_any_saving():
    order = ["stem", "a", "b"]
    assert speed.float_runs(order, {"a": 1e-6}, {"stem"}, SW) == {"a"}
    assert speed.float_runs(order, {"b": 1e-6}, {"stem"}, SW) == set()


# switches priced on the data graph (speed.switch_worthy, rewrite.native_neighbours): a chain
# a → b → c of layers, `None` where a side reaches an onnxruntime op
CHAIN = {"a": (frozenset(), frozenset({"b"})), "b": (frozenset({"a"}), frozenset({"c"})),
         "c": (frozenset({"b"}), frozenset())}
SILU = {n: (None, None) for n in "abc"}  # every layer's Sigmoid and Mul run in onnxruntime


def test_a_layer_among_decomposed_neighbours_pays_no_switch():
    keep, _ = speed.switch_worthy({"b": 1e-6}, CHAIN, {"a", "b", "c"}, SW)
    assert keep == {"a", "b", "c"}


def test_a_layer_whose_sides_both_reach_onnxruntime_must_save_a_whole_switch():
    keep, saved = speed.switch_worthy({"a": SW * 0.9, "b": SW * 1.1, "c": SW * 0.5}, SILU, {"a", "b", "c"}, SW)
    assert keep == {"b"} and saved == {"a": SW, "c": SW}


def test_a_layer_gone_float_makes_its_neighbours_pay_for_their_switches():
    # a feeds b, whose output goes to onnxruntime; b is faster in float. Once b is float, a's
    # output side is half a switch: a stays decomposed only if it saves more than that
    graph = {"a": (frozenset(), frozenset({"b"})), "b": (frozenset({"a"}), None)}
    keep, saved = speed.switch_worthy({"a": SW * 0.4, "b": -SW * 0.1}, graph, {"a", "b"}, SW)
    assert keep == set() and saved["a"] == SW / 2
    keep, _ = speed.switch_worthy({"a": SW * 0.6, "b": -SW * 0.1}, graph, {"a", "b"}, SW)
    assert keep == {"a"}


def test_the_graph_shows_which_sides_run_natively(tmp_path):
    from bdecomp.decomposer import rewrite

    m = shapes_model()
    layers, _ = rewrite.find_layers(m)
    nb = rewrite.native_neighbours(m, layers)
    assert nb["narrow"] == (frozenset({"stem"}), frozenset({"down"}))  # through the Relus
    assert nb["stem"] == (frozenset(), frozenset({"narrow"}))  # the graph's input
    assert nb["wide"] == (frozenset({"down"}), frozenset())  # the graph's output


def test_a_block_output_read_by_the_next_block_s_residual_add_stays_native():
    # a → Relu → r; r feeds conv b and the Add after b, which the runtime runs inside b's output write
    from bdecomp.decomposer import rewrite

    rng = np.random.default_rng(0)
    nodes = [conv_node("x", "wa", "ca", name="a", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["ca"], ["r"]),
             conv_node("r", "wb", "cb", name="b", pads=[1, 1, 1, 1]), helper.make_node("Add", ["cb", "r"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    m = make_model(nodes, {"wa": weights(rng, 16, 16, 3, 3), "wb": weights(rng, 16, 16, 3, 3)}, ["N", 16, 8, 8])
    layers, _ = rewrite.find_layers(m)
    nb = rewrite.native_neighbours(m, layers)
    assert nb["a"] == (frozenset(), frozenset({"b"}))
    assert nb["b"] == (frozenset({"a"}), frozenset())
