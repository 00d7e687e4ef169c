"""Models whose output no label scores (a detector head [N, 84, 8400], a depth map [N, 1, H, W]):
`compare` measures how close the raw tensors stay, `infer` shows and saves them, and `convert`
neither reads classes into them nor promises a drop of class decisions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from conftest import make_images, make_model, save_model, weights

import bdecomp
from bdecomp.decomposer.convert import resolve_recipe
from bdecomp.decomposer.feed import output_task
from bdecomp.errors import ConfigError
from bdecomp.models import preprocess
from bdecomp.runtime import metrics
from bdecomp.runtime.compare import compare
from bdecomp.runtime.report_md import markdown, terminal_text

FAST = dict(seconds=0.3, progress=False, threads=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bdecomp.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> tuple[Path, Path, Path]:
    """conv → Relu → conv → Reshape to [1, 8, 256]: a detector-style head (8 values per anchor),
    decomposed at k = Q = 4; and six images to run it on."""
    tmp = tmp_path_factory.mktemp("head")
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c2", "shape"], ["y"], name="flatten_anchors")]
    inits = {"w1": weights(rng, 16, 3, 3, 3), "b1": np.zeros(16, np.float32), "w2": weights(rng, 8, 16, 3, 3),
             "b2": rng.standard_normal(8).astype(np.float32), "shape": np.array([1, 8, 256], np.int64)}
    orig = save_model(make_model(nodes, inits, [1, 3, 16, 16]), tmp / "head.onnx")
    images = make_images(tmp / "images", 6, (16, 16), seed=4)
    dec = tmp / "head.bd.onnx"
    bdecomp.convert(orig, dec, bases=4, act_bits=4, calib=images, progress=False, min_depth=0)
    return orig, dec, images


@pytest.mark.parametrize("shape,channels_last,task", [
    ([1, 1000], False, "classification"), ([None, 10], False, "classification"),
    ([1, 4, 1, 1], False, "classification"), ([1, 1, 1, 4], True, "classification"),
    ([1, 12, 64, 64], False, "segmentation"), ([1, 64, 64, 12], True, "segmentation"),
    ([1, 84, 8400], False, "outputs"), ([1, 1, 64, 64], False, "outputs"), ([1, 64, 64, 1], True, "outputs"),
    ([1, 1], False, "outputs"), ([1, 2, 3, 4, 5], False, "outputs"), ([], False, "classification")])
def test_the_output_shape_says_what_a_model_predicts(shape, channels_last, task):
    assert output_task(shape, channels_last) == task


def test_fidelity_is_the_sqnr_over_the_set_and_each_images_relative_error():
    acc = metrics.FidelityAccumulator(["a"])
    y = np.array([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    acc.update([y], [y + np.array([[0.0, 0.5], [0.0, 0.2]])])  # errors 0.5 and 0.2
    r = acc.result()["a"]
    assert r["sqnr_db"] == pytest.approx(10 * math.log10(26 / 0.29))
    assert r["rel_err_median"] == pytest.approx((0.1 + 0.2) / 2)
    assert r["rel_err_p90"] == pytest.approx(0.2)
    assert r["max_abs_err"] == pytest.approx(0.5)


def test_identical_outputs_have_infinite_sqnr_and_no_error():
    acc = metrics.FidelityAccumulator(["a", "b"])
    y = np.ones((2, 3, 4))
    acc.update([y, np.zeros((2, 5))], [y.copy(), np.zeros((2, 5))])
    r = acc.result()
    assert r["a"]["sqnr_db"] == math.inf and r["a"]["rel_err_median"] == 0 and r["a"]["max_abs_err"] == 0
    assert r["b"]["sqnr_db"] == math.inf and r["b"]["rel_err_p90"] == 0


def test_compare_scores_a_detector_head_by_its_raw_outputs(head, tmp_path):
    orig, dec, images = head
    rep = compare(orig, dec, images, **FAST)
    assert rep["task"] == "outputs" and rep["n_images"] == 6 and not rep["data"]["labelled"]
    assert "top1" not in rep["decomposed"] and rep["original"].get("sqnr_db") is None
    # the same numbers from the two models run here, image by image
    import onnx

    recipe, _ = resolve_recipe(dec, onnx.load(str(dec)), None)
    acc = metrics.FidelityAccumulator(["y"])
    native = bdecomp.load(dec, threads=1)
    for p in sorted(images.glob("*.png")):
        x = preprocess(p, recipe)
        acc.update(bdecomp.load(orig, backend="onnxruntime").run(x), native.run(x))
    want = acc.result()["y"]
    got = rep["decomposed"]["outputs"]["y"]
    assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], rel=1e-6)
    assert got["rel_err_median"] == pytest.approx(want["rel_err_median"], rel=1e-6)
    assert rep["decomposed"]["sqnr_db"] == got["sqnr_db"] and 3 < got["sqnr_db"] < 60
    assert any("neither class scores nor a class map" in n for n in rep["notes"])
    text = terminal_text(rep)
    assert "output SQNR" in text and f"{got['sqnr_db']:.1f} dB" in text and "top-1" not in text
    assert "output SQNR" in markdown(rep, {})


def test_raw_outputs_are_compared_on_a_labelled_or_segmentation_folder_too(head, tmp_path):
    orig, dec, images = head
    seg = tmp_path / "seg"
    make_images(seg / "test", 2, (16, 16), seed=1)
    make_images(seg / "testannot", 2, (16, 16), seed=2)
    rep = compare(orig, dec, seg, **FAST)
    assert rep["task"] == "outputs" and rep["n_images"] == 2 and rep["data"]["layout"] == "segmentation"


def test_the_task_option_compares_a_classifier_as_raw_outputs(head, tmp_path):
    """An embedding model's [N, 16] looks like a classifier; --task outputs compares it as tensors."""
    _, _, images = head
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    orig = save_model(make_model(nodes, {"w": weights(rng, 16, 3, 3, 3)}, [1, 3, 16, 16]), tmp_path / "emb.onnx")
    dec = tmp_path / "emb.bd.onnx"
    bdecomp.convert(orig, dec, bases=4, act_bits=8, calib=images, progress=False, min_depth=0)
    assert compare(orig, dec, images, **FAST)["task"] == "classification"
    rep = compare(orig, dec, images, task="outputs", **FAST)
    assert rep["task"] == "outputs" and any(n.startswith("--task outputs:") for n in rep["notes"])
    assert rep["decomposed"]["outputs"]["y"]["sqnr_db"] > 10
    with pytest.raises(ConfigError, match="--task"):
        compare(orig, dec, images, task="detection", **FAST)


def test_infer_shows_each_outputs_shape_and_saves_the_tensors(head, tmp_path):
    orig, dec, images = head
    img = sorted(images.glob("*.png"))[0]
    res = _cli("infer", str(dec), str(img), "--json", "--save-outputs", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    (r,) = json.loads(res.stdout)
    assert r["outputs"][0]["name"] == "y" and r["outputs"][0]["shape"] == [1, 8, 256] and "top" not in r
    saved = np.load(tmp_path / "out" / (img.stem + ".npz"))
    import onnx

    recipe, _ = resolve_recipe(dec, onnx.load(str(dec)), None)
    np.testing.assert_array_equal(saved["y"], bdecomp.load(dec).run(preprocess(img, recipe))[0])
    assert r["outputs"][0]["max"] == pytest.approx(float(saved["y"].max()))
    text = _cli("infer", str(dec), str(img))
    assert text.returncode == 0 and "y [1, 8, 256] min" in text.stdout


def test_target_drop_is_refused_for_outputs_without_classes(head, tmp_path):
    orig, _, images = head
    with pytest.raises(ConfigError, match="--budget"):
        bdecomp.convert(orig, tmp_path / "o.onnx", calib=images, target_drop=1.0, progress=False, min_depth=0)
    assert not (tmp_path / "o.onnx").exists()


def test_sensitivity_counts_a_common_offset_only_when_outputs_are_not_classes():
    from bdecomp.decomposer.allocate import sensitivity

    ref = [np.array([[1.0, 2.0, 3.0]])]
    shifted = [ref[0] + 1.0]
    assert sensitivity(ref, shifted, 0.1) == 0.0
    assert sensitivity(ref, shifted, 0.1, centre=False) == pytest.approx((3 / 14) / 0.01)
