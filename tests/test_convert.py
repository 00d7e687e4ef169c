"""`bdecomp.convert` on small synthetic models (DESIGN §3, §4).

Read as a spec: the decomposed file is valid ONNX whose ai.bdecomp nodes carry their own function
bodies, holds bits and scales instead of float weights, is written atomically next to an input that
is never touched, is byte-identical for identical inputs, folds BatchNorm, and honours per-layer
configuration files (including a conversion report fed back in).
"""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
from conftest import as_float16, conv_node, file_sha256, make_images, make_model, run_onnx, save_model, weights
from onnx import helper, numpy_helper

import bdecomp
from bdecomp.decomposer import simplify
from bdecomp.decomposer.ops import DOMAIN
from bdecomp.errors import ConfigError, ModelError

H = W = 8


def small_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """conv1 → Relu → conv2 → Relu → GlobalAveragePool → Flatten → fc (Gemm, transB)."""
    rng = np.random.default_rng(seed)
    nodes = [conv_node("x", "w1", "c1", "b1", name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             conv_node("r1", "w2", "c2", "b2", name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = {"w1": weights(rng, 16, 3, 3, 3), "b1": 0.1 * rng.standard_normal(16).astype(np.float32),
             "w2": weights(rng, 32, 16, 3, 3), "b2": 0.1 * rng.standard_normal(32).astype(np.float32),
             "wf": weights(rng, 10, 32), "bf": 0.1 * rng.standard_normal(10).astype(np.float32)}
    return make_model(nodes, inits, ["N", 3, H, W], opset=opset)


def big_layer_model() -> onnx.ModelProto:
    """A 1×1 stem and one 3×3 conv over 128 channels: 147k weights, ~590 kB as float32."""
    rng = np.random.default_rng(1)
    nodes = [conv_node("x", "w1", "c1", name="stem"), helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             conv_node("r1", "w2", "y", "b2", name="big", pads=[1, 1, 1, 1])]
    inits = {"w1": weights(rng, 128, 3, 1, 1), "w2": weights(rng, 128, 128, 3, 3),
             "b2": np.zeros(128, np.float32)}
    return make_model(nodes, inits, ["N", 3, H, W])


def batchnorm_model(after: str) -> onnx.ModelProto:
    """Conv → BatchNormalization → Relu, or Flatten → Gemm(transB) → BatchNormalization → Relu."""
    rng = np.random.default_rng(2)
    c = 12
    bn = {"gamma": rng.uniform(0.5, 2.0, c), "beta": rng.normal(0, 0.3, c),
          "mean": rng.normal(0, 0.3, c), "var": rng.uniform(0.2, 3.0, c)}
    bn = {k: v.astype(np.float32) for k, v in bn.items()}
    if after == "Conv":
        layer = [conv_node("x", "w", "z", "b", name="conv", pads=[1, 1, 1, 1])]
        inits = {"w": weights(rng, c, 3, 3, 3), "b": 0.1 * rng.standard_normal(c).astype(np.float32)}
    else:
        layer = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
                 helper.make_node("Gemm", ["f", "w", "b"], ["z"], name="fc", transB=1)]
        inits = {"w": weights(rng, c, 3 * H * W), "b": 0.1 * rng.standard_normal(c).astype(np.float32)}
    nodes = layer + [helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["n"],
                                      name="bn", epsilon=1e-3),
                     helper.make_node("Relu", ["n"], ["y"], name="relu")]
    return make_model(nodes, {**inits, **bn}, ["N", 3, H, W])


@pytest.fixture
def cnn(tmp_path):
    return save_model(small_cnn(), tmp_path / "model.onnx")


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "calib", 3, (H, W))


def convert(src, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("min_depth", 0)  # these tiny models have narrow layers; they are what is tested
    return bdecomp.convert(src, out, **kw)


def x_batch(seed: int = 0, n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, H, W)).astype(np.float32)


def calibration_batch(model_path, folder) -> np.ndarray:
    """The images of `folder` as the model's recipe feeds them (inputs in the calibrated range)."""
    from bdecomp.decomposer.convert import resolve_recipe
    from bdecomp.models import datasets

    recipe, _ = resolve_recipe(model_path, onnx.load(model_path), None)
    return np.concatenate([x for x, _ in datasets.iter_batches(datasets.list_images(folder), recipe, batch_size=1)])


def custom_nodes(model: onnx.ModelProto, op_type: str | None = None) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and (op_type is None or n.op_type == op_type)]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def layer_settings(path) -> dict[str, tuple[int, int]]:
    """{layer name: (k, Q)} read back from a decomposed file: k from the basis, Q from its quantizer."""
    m = onnx.load(path)
    qbits = {o: int(next(a.i for a in n.attribute if a.name == "qmax")).bit_length()
             for n in custom_nodes(m) if n.op_type.startswith("BinQuantize") for o in n.output[:1]}
    return {n.name: (initializer(m, n.input[3]).shape[1], qbits[n.input[0]])
            for n in m.graph.node if n.op_type in ("BinConv", "BinGemm")}


# ---------------------------------------------------------------- the file


def test_output_passes_the_onnx_checker(cnn, tmp_path):
    convert(cnn, tmp_path / "out.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


def test_every_conv_and_gemm_becomes_an_ai_bdecomp_node_with_a_function_body(cnn, tmp_path):
    convert(cnn, tmp_path / "out.onnx")
    m = onnx.load(tmp_path / "out.onnx")
    assert not [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert {n.name for n in custom_nodes(m, "BinConv")} == {"conv1", "conv2"}
    assert {n.name for n in custom_nodes(m, "BinGemm")} == {"fc"}
    bodies = {f.name for f in m.functions if f.domain == DOMAIN}
    assert {n.op_type for n in custom_nodes(m)} <= bodies
    assert all(len(f.node) > 0 for f in m.functions)
    assert any(o.domain == DOMAIN for o in m.opset_import)


@pytest.mark.parametrize("opset", [17, 18, 21])
@pytest.mark.parametrize("with_calib", [False, True])
def test_a_model_of_a_newer_opset_converts_to_a_checked_file_both_backends_run_alike(opset, with_calib, tmp_path, images):
    # exporters write opset 17+ (torch.onnx's default is 18); the function bodies once imported
    # opset 13, which the checker refuses beside a model's newer Div, and conversion failed
    src = save_model(small_cnn(opset=opset), tmp_path / "model.onnx")
    convert(src, tmp_path / "out.onnx", bases=4, act_bits=4, calib=images if with_calib else None)
    m = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert [(o.domain, o.version) for o in m.opset_import if o.domain == ""] == [("", opset)]
    x = x_batch()
    native = bdecomp.load(tmp_path / "out.onnx").run(x)[0]
    emulated = bdecomp.load(tmp_path / "out.onnx", backend="onnxruntime").run(x)[0]
    np.testing.assert_allclose(native, emulated, rtol=1e-4, atol=1e-4 * np.abs(emulated).max())


def test_stock_onnxruntime_runs_the_file_and_eight_bases_track_the_float_model(cnn, tmp_path):
    convert(cnn, tmp_path / "out.onnx", bases=8, act_bits=8)
    x = x_batch()
    ref, got = run_onnx(cnn, x)[0], run_onnx(tmp_path / "out.onnx", x)[0]
    # k = 8 weight error ~3 %, Q = 8 activations ~0.4 % of range per layer: a few % at the output
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_decomposed_weights_have_no_float_copy_left(tmp_path):
    src = save_model(big_layer_model(), tmp_path / "big.onnx")
    convert(src, tmp_path / "out.onnx", bases=2)
    m = onnx.load(tmp_path / "out.onnx")
    floats = [t for t in m.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                                 onnx.TensorProto.FLOAT16)]
    # the largest float tensors left are the per-output scales and biases ([Cout, k] and [Cout])
    assert max(int(np.prod(t.dims)) for t in floats) <= 128 * 2


def test_file_with_a_big_layer_shrinks_to_a_fraction_of_the_original(tmp_path):
    src = save_model(big_layer_model(), tmp_path / "big.onnx")
    report = convert(src, tmp_path / "out.onnx", bases=2)
    size = (tmp_path / "out.onnx").stat().st_size
    # 2 bits per weight instead of 32 (6.25 %) plus scales, biases and the function bodies
    assert size < 0.10 * src.stat().st_size
    assert report.bytes_after == size


def test_input_model_is_never_modified(cnn, tmp_path, images):
    before, mtime = file_sha256(cnn), cnn.stat().st_mtime_ns
    convert(cnn, None, calib=images)  # default output name beside the input
    assert (tmp_path / "model.bd.onnx").is_file()
    assert file_sha256(cnn) == before and cnn.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_an_int8_quantized_model_is_refused_in_one_line_and_nothing_is_written(fmt, cnn, tmp_path):
    # onnxruntime's quantize_static output: weights behind DequantizeLinear (QDQ) or inside
    # QLinearConv (QOperator); decomposing their integers again is not what the user wants
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x_batch(i, 1)} for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    q = tmp_path / "q.onnx"
    quantize_static(str(cnn), str(q), Reader(), quant_format=getattr(QuantFormat, fmt))
    with pytest.raises(ModelError, match="int8-quantized"):
        convert(q, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_refuses_to_write_over_its_input(cnn):
    before = file_sha256(cnn)
    with pytest.raises(ConfigError):
        convert(cnn, cnn)
    assert file_sha256(cnn) == before


def test_conversion_leaves_no_temporary_files_behind(cnn, tmp_path):
    convert(cnn, tmp_path / "out.onnx", report_path=tmp_path / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx", "report.json"]


def test_output_file_gets_the_permissions_a_plain_write_would_give(cnn, tmp_path):
    # the atomic write goes through mkstemp, whose file is private (0600) until told otherwise
    mask = os.umask(0o022)
    os.umask(mask)
    convert(cnn, tmp_path / "out.onnx", report_path=tmp_path / "report.json")
    assert stat.S_IMODE((tmp_path / "out.onnx").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o666 & ~mask


def test_an_existing_output_keeps_its_permissions_when_replaced(cnn, tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    out.chmod(0o640)
    convert(cnn, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_size_of_a_model_with_external_data_counts_its_data_file(tmp_path):
    # torch.onnx's dynamo exporter writes the weights to FILE.onnx.data beside FILE.onnx
    src = tmp_path / "model.onnx"
    onnx.save_model(small_cnn(), src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    on_disk = src.stat().st_size + (tmp_path / "model.onnx.data").stat().st_size
    assert (tmp_path / "model.onnx.data").stat().st_size > src.stat().st_size
    report = convert(src, tmp_path / "out.onnx")
    assert report.bytes_before == on_disk
    assert report.bytes_after == (tmp_path / "out.onnx").stat().st_size


def test_interrupted_write_keeps_the_previous_output_and_leaves_no_temporary_file(cnn, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("bdecomp.decomposer.load.os.replace", crash)
    with pytest.raises(OSError):
        convert(cnn, out)
    monkeypatch.undo()
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


@pytest.mark.parametrize("with_calib", [False, True], ids=["dynamic", "calibrated"])
def test_same_model_and_options_give_a_byte_identical_file(cnn, tmp_path, images, with_calib):
    calib = images if with_calib else None
    r1 = convert(cnn, tmp_path / "a.onnx", bases=3, act_bits=4, calib=calib)
    r2 = convert(cnn, tmp_path / "b.onnx", bases=3, act_bits=4, calib=calib)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert r1.calibration_images == (3 if with_calib else 0)
    assert all((r.scale is not None) == with_calib for r in r1.layers + r2.layers)


def test_calibration_stores_the_quantizer_parameters_in_the_file(cnn, tmp_path, images):
    convert(cnn, tmp_path / "out.onnx", calib=images)
    m = onnx.load(tmp_path / "out.onnx")
    assert custom_nodes(m, "BinQuantize") and not custom_nodes(m, "BinQuantizeDynamic")
    for q in custom_nodes(m, "BinQuantize"):
        assert initializer(m, q.input[1]).dtype == np.float32 and np.all(initializer(m, q.input[1]) > 0)
        assert initializer(m, q.input[2]).dtype == np.uint8


@pytest.mark.parametrize("act_scales, q, shape", [("channel", 8, (3, 1, 1)), ("tensor", 4, (1,)),
                                                  ("auto", 8, (1,)), ("auto", 4, (3, 1, 1))])
def test_act_scales_choose_one_step_per_input_channel_or_one_per_tensor(cnn, tmp_path, images, act_scales, q, shape):
    convert(cnn, tmp_path / "out.onnx", calib=images, act_scales=act_scales, act_bits=q)
    m = onnx.load(tmp_path / "out.onnx")
    first = next(q for q in custom_nodes(m, "BinQuantize") if q.input[0] == m.graph.input[0].name)
    assert initializer(m, first.input[1]).shape == shape  # the image has 3 channels


# ---------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("after", ["Conv", "Gemm"])
def test_folding_batchnorm_keeps_the_float_outputs(after):
    model = batchnorm_model(after)
    folded, n = simplify.fold_batchnorm(model)
    assert n == 1
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    x = x_batch(1)
    ref, got = run_onnx(model, x)[0], run_onnx(folded, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("after", ["Conv", "Gemm"])
def test_batchnorm_after_a_layer_is_folded_into_the_decomposed_layer(after, tmp_path):
    model = batchnorm_model(after)
    src = save_model(model, tmp_path / "bn.onnx")
    report = convert(src, tmp_path / "out.onnx", bases=8, act_bits=8)
    m = onnx.load(tmp_path / "out.onnx")
    assert report.folded_batchnorms == 1
    assert "BatchNormalization" not in {n.op_type for n in m.graph.node}
    # the quantizer is a new node, so "fewer" counts the float nodes: BN is gone, the layer replaced
    assert len([n for n in m.graph.node if n.domain != DOMAIN]) < len(model.graph.node) - 1
    x = x_batch(2)
    ref, got = run_onnx(model, x)[0], run_onnx(tmp_path / "out.onnx", x)[0]
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------- layer configuration


CONFIGS = {
    "json": json.dumps({"defaults": {"k": 5, "q": 6},
                        "layers": {"conv1": {"k": 2, "q": 4}, "conv2": {"bases": 3}, "fc": {"skip": True}}}),
    "toml": 'defaults = { k = 5, q = 6 }\n'
            '[layers.conv1]\nk = 2\nq = 4\n'
            '[layers.conv2]\nbases = 3\n'
            '[layers.fc]\nskip = true\n',
}


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_layer_config_overrides_k_q_and_skip_per_layer(fmt, cnn, tmp_path):
    cfg = tmp_path / f"layers.{fmt}"
    cfg.write_text(CONFIGS[fmt])
    report = convert(cnn, tmp_path / "out.onnx", bases=8, act_bits=8, layer_config=cfg)
    assert layer_settings(tmp_path / "out.onnx") == {"conv1": (2, 4), "conv2": (3, 6)}
    assert {(r.name, r.k, r.q) for r in report.layers} == {("conv1", 2, 4), ("conv2", 3, 6)}
    m = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in m.graph.node if n.name == "fc"] == ["Gemm"]
    assert [f["name"] for f in report.float_layers] == ["fc"]


def test_layer_config_may_name_a_layer_by_its_output_tensor(cnn, tmp_path):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": [{"name": "c2", "k": 1, "q": 2}]}))
    convert(cnn, tmp_path / "out.onnx", bases=4, act_bits=4, layer_config=cfg)
    assert layer_settings(tmp_path / "out.onnx") == {"conv1": (4, 4), "conv2": (1, 2), "fc": (4, 4)}


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_unknown_layer_name_in_a_layer_config_raises_config_error(fmt, cnn, tmp_path):
    cfg = tmp_path / f"layers.{fmt}"
    cfg.write_text(json.dumps({"layers": {"conv_1": {"k": 2}}}) if fmt == "json" else '[layers.conv_1]\nk = 2\n')
    with pytest.raises(ConfigError, match="conv_1"):
        convert(cnn, tmp_path / "out.onnx", layer_config=cfg)
    assert not (tmp_path / "out.onnx").exists()


def test_report_fed_back_as_layer_config_gives_the_same_file(cnn, tmp_path, images):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"conv1": {"k": 2, "q": 4}, "fc": {"k": 3, "q": 5}}}))
    convert(cnn, tmp_path / "a.onnx", calib=images, layer_config=cfg, report_path=tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["layers"]
    convert(cnn, tmp_path / "b.onnx", calib=images, layer_config=tmp_path / "report.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_report_fed_back_as_layer_config_keeps_a_skipped_layer_float(cnn, tmp_path):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"fc": {"skip": True}}}))
    convert(cnn, tmp_path / "a.onnx", layer_config=cfg, report_path=tmp_path / "report.json")
    convert(cnn, tmp_path / "b.onnx", layer_config=tmp_path / "report.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_layers_with_fewer_than_min_depth_weights_per_output_stay_float_by_default(tmp_path):
    src = save_model(small_cnn(), tmp_path / "model.onnx")  # conv1 D = 27, conv2 D = 144, fc D = 32
    report = bdecomp.convert(src, tmp_path / "out.onnx", bases=4, act_bits=4, progress=False)
    assert layer_settings(tmp_path / "out.onnx") == {"conv2": (4, 4)}
    reasons = {f["name"]: f["reason"] for f in report.float_layers}
    assert set(reasons) == {"conv1", "fc"} and "D = 27 < --min-depth 64" in reasons["conv1"]
    m = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in m.graph.node if n.name in ("conv1", "fc")] == ["Conv", "Gemm"]


def test_min_depth_zero_decomposes_every_layer(cnn, tmp_path):
    convert(cnn, tmp_path / "out.onnx", bases=4, act_bits=4, min_depth=0)
    assert set(layer_settings(tmp_path / "out.onnx")) == {"conv1", "conv2", "fc"}


def test_a_layer_config_giving_k_decomposes_a_narrow_layer_anyway(cnn, tmp_path):
    cfg = tmp_path / "layers.json"
    cfg.write_text(json.dumps({"layers": {"conv1": {"k": 2}}}))
    convert(cnn, tmp_path / "out.onnx", bases=4, act_bits=4, layer_config=cfg, min_depth=64)
    assert layer_settings(tmp_path / "out.onnx") == {"conv1": (2, 4), "conv2": (4, 4)}


@pytest.mark.parametrize("bad", [-1, 2.5, "64"])
def test_min_depth_must_be_a_non_negative_integer(cnn, tmp_path, bad):
    with pytest.raises(ConfigError, match="min-depth"):
        convert(cnn, tmp_path / "out.onnx", min_depth=bad)


def test_a_first_layer_on_the_image_stays_float_whatever_its_kernel_size(tmp_path):
    """7×7 over 3 channels is D = 147 ≥ 64, but 3 of every 64 bits per tap (or a patch-packing
    pass) made it slower than float."""
    rng = np.random.default_rng(4)
    nodes = [conv_node("x", "w1", "c1", name="conv1", pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             conv_node("r1", "w2", "y", name="conv2", pads=[1, 1, 1, 1])]
    src = save_model(make_model(nodes, {"w1": weights(rng, 16, 3, 7, 7), "w2": weights(rng, 16, 16, 3, 3)},
                                ["N", 3, H, W]), tmp_path / "m.onnx")
    report = bdecomp.convert(src, tmp_path / "out.onnx", bases=2, act_bits=4, progress=False)
    assert layer_settings(tmp_path / "out.onnx") == {"conv2": (2, 4)}
    assert [(f["name"], f["reason"]) for f in report.float_layers] == [
        ("conv1", "3 input channels (float is faster)")]
    bdecomp.convert(src, tmp_path / "all.onnx", bases=2, act_bits=4, progress=False, min_depth=0)
    assert set(layer_settings(tmp_path / "all.onnx")) == {"conv1", "conv2"}


# ---------------------------------------------------------------- how exporters write models


def _with_node_weights(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """`model` with conv2's weight given by a Constant node, or read through an Identity (torch.onnx
    writes a shared weight so)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    w2 = next(t for t in m.graph.initializer if t.name == "w2")
    if how == "Constant":
        node = helper.make_node("Constant", [], ["w2c"], name="w2const", value=w2)
        m.graph.initializer.remove(w2)
    else:
        node = helper.make_node("Identity", ["w2"], ["w2c"], name="w2id")
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    conv2.input[1] = "w2c"
    m.graph.node.insert(0, node)
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("how", ["Constant", "Identity"])
def test_a_weight_given_by_a_graph_node_is_decomposed_like_an_initializer(how, tmp_path):
    src = save_model(_with_node_weights(small_cnn(), how), tmp_path / "m.onnx")
    ref = save_model(small_cnn(), tmp_path / "ref.onnx")
    convert(src, tmp_path / "out.onnx", bases=4, act_bits=8)
    convert(ref, tmp_path / "ref_out.onnx", bases=4, act_bits=8)
    assert layer_settings(tmp_path / "out.onnx") == layer_settings(tmp_path / "ref_out.onnx")
    x = x_batch()
    np.testing.assert_array_equal(run_onnx(tmp_path / "out.onnx", x)[0], run_onnx(tmp_path / "ref_out.onnx", x)[0])


@pytest.mark.parametrize("backend", ["onnxruntime", "native"])
def test_a_float16_model_is_decomposed_and_keeps_its_float16_input_and_output(backend, tmp_path, images):
    """The decomposed ops compute in float32 between two Casts; images are fed as float32 and cast
    to the model's input type."""
    src = save_model(as_float16(small_cnn()), tmp_path / "m16.onnx")
    convert(src, tmp_path / "out.onnx", bases=8, act_bits=8, calib=images)
    assert set(layer_settings(tmp_path / "out.onnx")) == {"conv1", "conv2", "fc"}
    x = calibration_batch(tmp_path / "out.onnx", images)
    want = run_onnx(small_cnn(), x)[0]
    y = bdecomp.load(tmp_path / "out.onnx", backend=backend).run(x)[0]
    assert y.dtype == np.float16 and y.shape == want.shape
    assert np.linalg.norm(y.astype(np.float32) - want) / np.linalg.norm(want) < 0.1


def test_a_model_with_an_integer_input_is_refused_when_loaded(tmp_path):
    m = small_cnn()
    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    m.graph.node.insert(0, helper.make_node("Cast", ["x"], ["xf"], name="cast", to=onnx.TensorProto.FLOAT))
    next(n for n in m.graph.node if n.name == "conv1").input[0] = "xf"
    src = save_model(m, tmp_path / "u8.onnx")
    with pytest.raises(ModelError, match="of type UINT8; bdecomp feeds float images"):
        bdecomp.load(src, backend="onnxruntime")


def test_a_channels_last_model_is_calibrated_and_fed_channels_last_images(tmp_path, images):
    """A model declaring an [N, H, W, 3] input (a TensorFlow / Keras export) gets [N, H, W, 3] images
    without a flag, in calibration and at run time."""
    m = small_cnn()
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", H, W, 3]))
    m.graph.node.insert(0, helper.make_node("Transpose", ["image"], ["x"], name="to_nchw", perm=[0, 3, 1, 2]))
    src = save_model(m, tmp_path / "nhwc.onnx")
    report = convert(src, tmp_path / "out.onnx", bases=8, act_bits=8, calib=images)
    assert report.calibration_images == 3
    x = calibration_batch(tmp_path / "out.onnx", images)
    assert x.shape == (3, H, W, 3)
    want = run_onnx(small_cnn(), x.transpose(0, 3, 1, 2))[0]
    y = bdecomp.load(tmp_path / "out.onnx").run(x)[0]
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_one_channel_model_is_fed_grayscale_images(layout, tmp_path, images):
    rng = np.random.default_rng(5)
    nodes = [conv_node("x", "w1", "c1", name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             conv_node("r1", "w2", "y", name="conv2", pads=[1, 1, 1, 1])]
    m = make_model(nodes, {"w1": weights(rng, 16, 1, 3, 3), "w2": weights(rng, 16, 16, 3, 3)}, ["N", 1, H, W])
    if layout == "NHWC":
        m.graph.input[0].CopyFrom(helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", H, W, 1]))
        m.graph.node.insert(0, helper.make_node("Transpose", ["image"], ["x"], name="to_nchw", perm=[0, 3, 1, 2]))
    src = save_model(m, tmp_path / "gray.onnx")
    convert(src, tmp_path / "out.onnx", bases=8, act_bits=8, calib=images)
    x = calibration_batch(tmp_path / "out.onnx", images)
    assert x.shape == ((3, 1, H, W) if layout == "NCHW" else (3, H, W, 1))
    want = run_onnx(src, x)[0]
    y = bdecomp.load(tmp_path / "out.onnx").run(x)[0]
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.1


@pytest.mark.parametrize("backend", ["onnxruntime", "native"])
def test_a_model_with_a_fixed_batch_of_two_is_calibrated_and_run_on_any_number_of_images(backend, tmp_path, images):
    """Images go in chunks of the declared batch, the last one padded; padding never shows in the
    outputs or the statistics (3 images: the same file as when the batch is free)."""
    fixed = small_cnn()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    src = save_model(fixed, tmp_path / "b2.onnx")
    free = save_model(small_cnn(), tmp_path / "free.onnx")
    convert(src, tmp_path / "b2.bd.onnx", bases=4, act_bits=4, calib=images)
    convert(free, tmp_path / "free.bd.onnx", bases=4, act_bits=4, calib=images)
    layers = lambda p: [t for t in onnx.load(p).graph.initializer]  # noqa: E731
    assert [numpy_helper.to_array(t).tobytes() for t in layers(tmp_path / "b2.bd.onnx")] == \
        [numpy_helper.to_array(t).tobytes() for t in layers(tmp_path / "free.bd.onnx")]
    x = calibration_batch(tmp_path / "b2.bd.onnx", images)
    y = bdecomp.load(tmp_path / "b2.bd.onnx", backend=backend).run(x)[0]
    want = bdecomp.load(tmp_path / "free.bd.onnx", backend=backend).run(x)[0]
    assert y.shape == (3, 10)
    np.testing.assert_array_equal(y, want)


def _sliced_by_computed_bounds(tmp_path, dims=(1, 8, 16, 16), **conv_attrs):
    """x [1, 8, 16, 16] → Slice of its first C/2 channels, the bound computed as Shape → Gather →
    Div (torch.onnx's `chunk`) → 3×3 conv 4 → 16: onnx's shape inference leaves the conv's
    output size unknown."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "one"], ["c"], name="gather", axis=0),
             helper.make_node("Div", ["c", "two"], ["h"], name="half"),
             helper.make_node("Unsqueeze", ["h", "ax0"], ["hu"], name="unsq"),
             helper.make_node("Slice", ["x", "zero", "hu", "ax"], ["xs"], name="chunk"),
             conv_node("xs", "w", "y", name="conv", **(conv_attrs or {"pads": [1, 1, 1, 1]}))]
    inits = {"one": np.array(1, np.int64), "two": np.array(2, np.int64), "ax": np.array([1], np.int64),
             "ax0": np.array([0], np.int64),
             "zero": np.array([0], np.int64), "w": weights(np.random.default_rng(0), 16, 4, 3, 3)}
    return save_model(make_model(nodes, inits, list(dims)), tmp_path / "chunk.onnx")


def test_layer_sizes_shape_inference_cannot_give_are_measured_for_the_report(tmp_path):
    from bdecomp.decomposer import calibrate, rewrite

    path = _sliced_by_computed_bounds(tmp_path)
    m = simplify.infer_shapes(onnx.load(str(path)))
    assert rewrite.find_layers(m)[0][0].out_pixels is None  # the premise: inference gives up
    x = np.zeros((1, 8, 16, 16), np.float32)
    assert calibrate.measure_shapes(m, x) == {"xs": [1, 4, 16, 16], "y": [1, 16, 16, 16]}
    rep = bdecomp.convert(path, tmp_path / "o.onnx", bases=2, act_bits=2, progress=False, min_depth=0)
    assert rep.layers[0].macs == 16 * 36 * 16 * 16
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert not any(v.name in ("xs", "y") and v.type.tensor_type.shape.dim[2].HasField("dim_value")
                   for v in list(out.graph.value_info) + list(out.graph.output))  # measured sizes stay out


def test_no_model_is_run_to_measure_shapes_when_inference_knows_them_all(cnn, monkeypatch):
    from bdecomp.decomposer import calibrate

    sessions = []
    monkeypatch.setattr(calibrate, "_session", lambda *a, **k: sessions.append(a))
    m = simplify.infer_shapes(onnx.load(str(cnn)))
    assert calibrate.measure_shapes(m, np.zeros((1, 3, H, W), np.float32)) == {} and not sessions


@pytest.mark.parametrize("dims,decomposed", [((1, 8, 16, 16), True), ((1, 8, "H", "W"), False)])
def test_same_padding_behind_an_unknown_size_is_resolved_only_for_a_fixed_input_size(dims, decomposed, tmp_path):
    """A measured size holds for the size measured: with a dynamic input, SAME padding of stride 2
    would change with the image's parity, so that conv stays float as before."""
    path = _sliced_by_computed_bounds(tmp_path, dims, auto_pad="SAME_UPPER", strides=[2, 2])
    rep = bdecomp.convert(path, tmp_path / "o.onnx", bases=8, act_bits=8, progress=False, min_depth=0)
    assert bool(rep.layers) is decomposed
    if decomposed:
        x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)  # pads 0 / 1
        want, got = run_onnx(path, x)[0], bdecomp.load(tmp_path / "o.onnx").run(x)[0]
        assert got.shape == want.shape == (1, 16, 8, 8)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    else:
        assert "auto_pad" in rep.float_layers[0]["reason"]
