"""`bdecomp compare` on tiny synthetic models and the three data layouts (labels.tsv, ImageFolder,
segmentation pairs), plus one end-to-end CLI run writing report.json / report.md."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import helper
from PIL import Image

from conftest import as_float16, make_images, make_model, run_onnx, save_model, weights

import bdecomp
from bdecomp.decomposer.convert import resolve_recipe
from bdecomp.models import preprocess
from bdecomp.runtime.compare import compare, count_weights
from bdecomp.runtime.report_md import headline

FAST = dict(seconds=0.3, progress=False, threads=1)


def _classifier(tmp: Path, n_classes: int = 4) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = {"w1": weights(rng, 16, 3, 3, 3), "b1": np.zeros(16, np.float32), "w2": weights(rng, 16, 16, 3, 3),
             "wf": weights(rng, n_classes, 16), "bf": rng.standard_normal(n_classes).astype(np.float32)}
    orig = save_model(make_model(nodes, inits, [1, 3, 16, 16]), tmp / "cls.onnx")
    calib = make_images(tmp / "calib", 6, (16, 16), seed=5)
    dec = tmp / "cls.bd.onnx"
    bdecomp.convert(orig, dec, bases=4, act_bits=8, calib=calib, progress=False, min_depth=0)
    return orig, dec


def _segmenter(tmp: Path, channels_last: bool = False) -> tuple[Path, Path]:
    """conv1 → Relu → 1×1 head, 3 classes on 16×16 images; channels_last: the same layers between
    Transposes, [1, 16, 16, 3] in and out (as TensorFlow / Keras exports write segmentation models)."""
    rng = np.random.default_rng(2)
    x, y = ("xt", "yt") if channels_last else ("x", "y")
    nodes = [helper.make_node("Conv", [x, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], [y], name="head")]
    if channels_last:
        nodes = ([helper.make_node("Transpose", ["x"], ["xt"], name="to_nchw", perm=[0, 3, 1, 2])] + nodes
                 + [helper.make_node("Transpose", ["yt"], ["y"], name="to_nhwc", perm=[0, 2, 3, 1])])
    inits = {"w1": weights(rng, 8, 3, 3, 3), "b1": np.zeros(8, np.float32), "w2": weights(rng, 3, 8, 1, 1),
             "b2": np.array([0.0, 0.1, -0.1], np.float32)}
    name = "seg_nhwc" if channels_last else "seg"
    orig = save_model(make_model(nodes, inits, [1, 16, 16, 3] if channels_last else [1, 3, 16, 16]), tmp / f"{name}.onnx")
    calib = make_images(tmp / "calib", 6, (16, 16), seed=5)
    dec = tmp / f"{name}.bd.onnx"
    bdecomp.convert(orig, dec, bases=6, act_bits=8, calib=calib, progress=False, min_depth=0)
    return orig, dec


def _original_outputs(model: Path, images: list[Path]) -> list[np.ndarray]:
    import onnx

    recipe, _ = resolve_recipe(model, onnx.load(str(model)), None)
    return [run_onnx(model, preprocess(p, recipe))[0] for p in images]


@pytest.fixture(scope="module")
def cls_models(tmp_path_factory):
    return _classifier(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def cls_images(tmp_path_factory, cls_models):
    """Eight images labelled with the original model's own top-1 (so the original scores 100%)."""
    d = make_images(tmp_path_factory.mktemp("imgs") / "all", 8, (20, 24), seed=9)
    paths = sorted(d.glob("*.png"))
    labels = [int(np.argmax(y)) for y in _original_outputs(cls_models[0], paths)]
    return paths, labels


def _check_model_entry(e: dict, task: str) -> None:
    keys = ("top1", "top5") if task == "classification" else ("pixel_acc", "miou")
    for k in keys + ("latency_ms", "latency_p90_ms", "bytes", "agreement"):
        assert k in e, k
    assert e["latency_ms"] > 0 and e["latency_p90_ms"] >= e["latency_ms"] * 0.999
    assert e["bytes"] > 0


def test_labels_tsv_layout(tmp_path, cls_models, cls_images):
    paths, labels = cls_images
    d = tmp_path / "tsv"
    (d / "images").mkdir(parents=True)
    for p in paths:
        shutil.copy(p, d / "images" / p.name)
    (d / "labels.tsv").write_text("file\tlabel\n" + "".join(f"{p.name}\t{c}\n" for p, c in zip(paths, labels)))
    rep = compare(*cls_models, d, **FAST)
    assert rep["task"] == "classification" and rep["n_images"] == 8 and rep["threads"] == 1
    assert rep["data"]["layout"] == "labels.tsv"
    assert rep["original"]["top1"] == 1.0 and rep["original"]["top5"] == 1.0
    assert rep["original"]["agreement"] == 1.0
    assert rep["decomposed"]["top1"] == rep["decomposed"]["agreement"]  # labels = original's top-1
    ci = rep["decomposed"]["top1_diff"]
    assert ci["n"] == 8 and ci["diff"] == pytest.approx(rep["decomposed"]["top1"] - rep["original"]["top1"])
    assert ci["low"] <= ci["diff"] <= ci["high"]
    assert "95% CI" in " ".join(headline(rep))
    assert rep["int8"] is None
    for k in ("original", "decomposed"):
        _check_model_entry(rep[k], "classification")
    assert rep["decomposed"]["bytes"] < rep["original"]["bytes"]
    n_w = 16 * 27 + 16 * 144 + 4 * 16
    assert rep["n_weights"] == n_w
    assert rep["original"]["bits_per_weight"] == pytest.approx(8 * rep["original"]["bytes"] / n_w)
    assert rep["decomposed"]["layers"]["layers"] >= 2

    lim = compare(*cls_models, d, limit=3, **FAST)
    assert lim["n_images"] == 3 and lim["data"]["selection"].startswith("evenly")


def test_a_model_with_a_fixed_batch_of_three_is_compared_over_eight_images(tmp_path, cls_models, cls_images):
    """Chunks of three, the last padded: every image scored once; latency is stated per batch of 3."""
    import onnx

    orig, _ = cls_models
    m = onnx.load(str(orig))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 3
    fixed = save_model(m, tmp_path / "b3.onnx")
    calib = make_images(tmp_path / "calib", 4, (16, 16), seed=5)
    dec = tmp_path / "b3.bd.onnx"
    bdecomp.convert(fixed, dec, bases=4, act_bits=8, calib=calib, progress=False, min_depth=0)
    paths, labels = cls_images
    d = tmp_path / "tsv"
    (d / "images").mkdir(parents=True)
    for p in paths:
        shutil.copy(p, d / "images" / p.name)
    (d / "labels.tsv").write_text("".join(f"{p.name}\t{c}\n" for p, c in zip(paths, labels)))
    rep = compare(fixed, dec, d, **FAST)
    assert rep["n_images"] == 8 and rep["original"]["top1"] == 1.0
    assert rep["latency_method"]["batch"] == 3


def test_a_float16_original_is_named_for_what_it_is(tmp_path, cls_images):
    import onnx

    paths, _ = cls_images
    orig = save_model(as_float16(onnx.load(str(_classifier(tmp_path)[0]))), tmp_path / "cls16.onnx")
    dec = tmp_path / "cls16.bd.onnx"
    bdecomp.convert(orig, dec, bases=4, act_bits=8, progress=False, min_depth=0)
    rep = compare(orig, dec, paths[0].parent, **FAST)
    assert any("computes in float16" in n for n in rep["notes"])
    assert not any("computes in" in n for n in compare(*_classifier(tmp_path), paths[0].parent, **FAST)["notes"])


def test_imagefolder_layout_matches_labels_tsv(tmp_path, cls_models, cls_images):
    paths, labels = cls_images
    d = tmp_path / "tree"
    for p, c in zip(paths, labels):
        (d / str(c)).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / str(c) / p.name)
    rep = compare(*cls_models, d, **FAST)
    assert rep["data"]["layout"] == "imagefolder" and rep["n_images"] == 8
    assert rep["original"]["top1"] == 1.0
    assert 0 <= rep["decomposed"]["top1"] <= 1 and rep["decomposed"]["top1"] == rep["decomposed"]["agreement"]


def test_unlabelled_images_report_agreement_only(tmp_path, cls_models, cls_images):
    d = tmp_path / "plain"
    d.mkdir()
    for p in cls_images[0][:3]:
        shutil.copy(p, d / p.name)
    rep = compare(*cls_models, d, **FAST)
    assert rep["original"]["top1"] is None and rep["decomposed"]["agreement"] is not None
    assert any("no labels" in n for n in rep["notes"])


def test_segmentation_pairs_with_ignore_index(tmp_path):
    orig, dec = _segmenter(tmp_path)
    d = tmp_path / "camvidish"
    imgs = make_images(d / "test", 3, (16, 16), seed=3)
    (d / "testannot").mkdir()
    paths = sorted(imgs.glob("*.png"))
    labelled = 0
    for p, y in zip(paths, _original_outputs(orig, paths)):
        mask = np.argmax(y[0], axis=0).astype(np.uint8)
        mask[:4] = 2  # ignored rows (and wherever the original predicts class 2)
        labelled += int((mask != 2).sum())
        Image.fromarray(mask, "L").save(d / "testannot" / p.name)
    rep = compare(orig, dec, d, ignore_index=2, **FAST)
    assert rep["task"] == "segmentation" and rep["data"]["layout"] == "segmentation"
    assert rep["ignore_index"] == 2 and rep["n_images"] == 3
    o = rep["original"]
    assert o["pixel_acc"] == 1.0 and o["n_pixels"] == labelled
    assert o["per_class_iou"][2] is None
    for k in ("original", "decomposed"):
        _check_model_entry(rep[k], "segmentation")
    assert 0 <= rep["decomposed"]["miou"] <= 1 and 0 < rep["agreement"] <= 1
    ci = rep["decomposed"]["miou_diff"]
    assert ci["n"] == 3 and ci["diff"] == pytest.approx(rep["decomposed"]["miou"] - o["miou"])
    assert ci["low"] <= ci["high"] and "95% CI" in " ".join(headline(rep))

    # the same pairs given as an image folder + --labels folder
    rep2 = compare(orig, dec, d / "test", labels=d / "testannot", ignore_index=2, **FAST)
    assert rep2["original"]["pixel_acc"] == 1.0 and rep2["decomposed"]["miou"] == rep["decomposed"]["miou"]


@pytest.mark.parametrize("extra_id,note", [(None, None), (9, "can never be right")])
def test_labels_outside_the_models_classes_are_pointed_out(tmp_path, extra_id, note):
    orig, dec = _segmenter(tmp_path)
    d = tmp_path / "camvidish"
    imgs = make_images(d / "test", 3, (16, 16), seed=3)
    (d / "testannot").mkdir()
    paths = sorted(imgs.glob("*.png"))
    outs = _original_outputs(orig, paths)
    n_cls = outs[0].shape[1]
    for i, (p, y) in enumerate(zip(paths, outs)):
        mask = np.argmax(y[0], axis=0).astype(np.uint8)
        mask[0, :n_cls] = np.arange(n_cls)  # every class of the model appears
        if extra_id is not None and i == 0:
            mask[1, 0] = extra_id  # an id the model cannot predict
        Image.fromarray(mask, "L").save(d / "testannot" / p.name)
    rep = compare(orig, dec, d, **FAST)
    found = [n for n in rep["notes"] if "class" in n]
    assert (found == []) if note is None else (len(found) == 1 and note in found[0])


def test_a_channels_last_segmenter_is_scored_on_its_last_axis(tmp_path):
    """Labels are the channels-first twin's own argmax: the channels-last model, same layers, must
    score 100 % pixel accuracy too (argmax over axis 1 of [N, H, W, C] would be over H)."""
    (tmp_path / "nchw").mkdir()
    twin, _ = _segmenter(tmp_path / "nchw")
    orig, dec = _segmenter(tmp_path, channels_last=True)
    d = tmp_path / "camvidish"
    imgs = make_images(d / "test", 3, (16, 16), seed=3)
    (d / "testannot").mkdir()
    paths = sorted(imgs.glob("*.png"))
    for p, y in zip(paths, _original_outputs(twin, paths)):
        Image.fromarray(np.argmax(y[0], axis=0).astype(np.uint8), "L").save(d / "testannot" / p.name)
    rep = compare(orig, dec, d, **FAST)
    assert rep["task"] == "segmentation" and rep["original"]["pixel_acc"] == 1.0
    assert rep["decomposed"]["pixel_acc"] > 0.9 and rep["agreement"] > 0.9


@pytest.mark.parametrize("shape,channels_last,dense", [
    ([1, 4, 1, 1], False, False), ([1, 1, 1, 4], True, False),  # global pooling without Flatten
    ([1, 3, 16, 16], False, True), ([1, 16, 16, 3], True, True), ([None, 12, None, None], False, True),
    ([1, 10], False, False)])
def test_an_output_is_a_class_map_when_it_has_a_spatial_size_beyond_1x1(shape, channels_last, dense):
    from bdecomp.decomposer.feed import dense_output
    assert dense_output(shape, channels_last) is dense


def test_wrong_layout_for_the_task_is_a_clear_error(tmp_path, cls_models, cls_images):
    from bdecomp.errors import ConfigError

    d = tmp_path / "s"
    make_images(d / "test", 1, (16, 16))
    make_images(d / "testannot", 1, (16, 16))
    with pytest.raises(ConfigError, match="segmentation"):
        compare(*cls_models, d, **FAST)
    with pytest.raises(ConfigError, match="--calib"):
        compare(*cls_models, d, int8=True, **FAST)
    with pytest.raises(ConfigError, match="decomposed"):
        compare(cls_models[1], cls_models[1], d, **FAST)


def test_count_weights(cls_models):
    import onnx

    assert count_weights(onnx.load(str(cls_models[0]))) == 16 * 27 + 16 * 144 + 4 * 16


def test_cli_end_to_end_with_int8_and_per_layer(tmp_path, cls_models, cls_images):
    from click.testing import CliRunner

    from bdecomp.cli import main

    paths, labels = cls_images
    d = tmp_path / "tsv"
    d.mkdir()
    for p in paths:
        shutil.copy(p, d / p.name)
    (d / "labels.tsv").write_text("".join(f"{p.name}\t{c}\n" for p, c in zip(paths, labels)))
    calib = make_images(tmp_path / "calib", 4, (16, 16), seed=11)
    out = tmp_path / "report"
    extra = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["compare", str(cls_models[0]), str(cls_models[1]), "--data", str(d),
                                    "--threads", "1", "--int8", "--calib", str(calib), "--per-layer",
                                    "-o", str(out), "--json", str(extra), "--seconds", "0.3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "decomposed" in res.output and "int8" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert json.loads(extra.read_text()) == rep
    for k in ("task", "n_images", "threads", "original", "decomposed", "int8", "agreement"):
        assert k in rep
    for k in ("original", "decomposed", "int8"):
        _check_model_entry(rep[k], "classification")
    assert (out / "cls.int8.onnx").is_file()
    assert rep["int8"]["bytes"] == (out / "cls.int8.onnx").stat().st_size
    pl = rep["per_layer"]
    assert pl["popcount_peak_gbitops_per_thread"] > 0
    names = [r["name"] for r in pl["layers"]]
    assert "conv2" in names
    for r in pl["layers"]:
        assert r["native_ms"] > 0 and r["ort_ms"] > 0 and r["bit_ops"] > 0
        assert r["sqnr_db"] is not None and (r["sqnr_db"] == "inf" or r["sqnr_db"] > 10)
        assert r["kernel"].split("+")[0] in ("lut", "lut64", "popcount", "depthwise")  # what the runtime settled on
    md = (out / "report.md").read_text()
    assert "## Side by side" in md and "## Per layer" in md and "conv2" in md
    for f in rep["plots"]:
        assert (out / f).is_file()


def test_reports_are_written_without_matplotlib(tmp_path, cls_models, cls_images, monkeypatch):
    import sys

    from bdecomp.runtime.report_md import write_report

    d = tmp_path / "plain"
    d.mkdir()
    for p in cls_images[0][:2]:
        shutil.copy(p, d / p.name)
    rep = compare(*cls_models, d, **FAST)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    written = write_report(rep, tmp_path / "out")
    assert {p.name for p in written} == {"report.json", "report.md"}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["plots"] == [] and any("matplotlib" in n for n in saved["notes"])


def test_per_layer_report_of_a_layer_with_a_fused_residual_add(tmp_path, cls_images):
    """The layer's own error is measured with the original network's residual operand too."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1)]
    inits = {"w1": weights(rng, 16, 3, 3, 3), "b1": np.zeros(16, np.float32), "w2": weights(rng, 16, 16, 3, 3),
             "wf": weights(rng, 4, 16), "bf": rng.standard_normal(4).astype(np.float32)}
    orig = save_model(make_model(nodes, inits, [1, 3, 16, 16]), tmp_path / "res.onnx")
    calib = make_images(tmp_path / "calib", 4, (16, 16), seed=5)
    dec = tmp_path / "res.bd.onnx"
    bdecomp.convert(orig, dec, bases=4, act_bits=8, calib=calib, progress=False)
    d = tmp_path / "imgs"
    d.mkdir()
    for p in cls_images[0]:
        shutil.copy(p, d / p.name)
    rep = compare(orig, dec, d, per_layer=True, calib=calib, **FAST)
    row = next(r for r in rep["per_layer"]["layers"] if r["name"] == "conv2")
    assert row["fused"] == ["add", "relu2"]
    assert row["sqnr_db"] == "inf" or row["sqnr_db"] > 10


def test_per_layer_kernel_is_the_way_settled_for_the_timed_input_shape():
    """A layer settles per input shape: the batch `compare` measures accuracy on can run another
    family than the one image it is timed on, and the report names the one it timed."""
    from types import SimpleNamespace

    from bdecomp.runtime.compare import _settled_kernel
    step = SimpleNamespace(plans={(8, 16, 5, 5): ([(None, "popcount", False)],),
                                  (1, 16, 5, 5): ([(None, "lut", False)],),
                                  (2, 16, 5, 5): ([(None, "lut", False), (None, "popcount", False)],)})
    assert _settled_kernel(step, (1, 16, 5, 5)) == "lut"
    assert _settled_kernel(step, (8, 16, 5, 5)) == "popcount"
    assert _settled_kernel(step, (2, 16, 5, 5)) is None  # not settled yet
    assert _settled_kernel(step, (4, 16, 5, 5)) is None  # never ran on it
