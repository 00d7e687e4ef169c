"""`bdecomp infer`: classes and probabilities for classifiers, colour masks for segmentation."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bdecomp.models.labels import palette


def _save(tmp_path, nodes, inits, out_shape, name, in_shape=("N", 3, 8, 8)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    p = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), p)
    return p


@pytest.fixture
def classifier(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)]
    return _save(tmp_path, nodes, {"w": rng.standard_normal((10, 3)).astype(np.float32),
                                   "b": np.zeros(10, np.float32)}, ["N", 10], "cls.onnx")


@pytest.fixture
def segmenter(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["input", "w"], ["logits"])]
    return _save(tmp_path, nodes, {"w": rng.standard_normal((12, 3, 1, 1)).astype(np.float32)},
                 ["N", 12, 8, 8], "seg.onnx")


def test_a_channels_last_segmenter_writes_the_mask_of_its_channels_first_twin(segmenter, image, tmp_path):
    """[N, 8, 8, 3] in, [N, 8, 8, 12] out (a Keras-style export of the same 1×1 convolution)."""
    w = numpy_helper.to_array(onnx.load(segmenter).graph.initializer[0])
    nodes = [helper.make_node("Transpose", ["input"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w"], ["yt"]),
             helper.make_node("Transpose", ["yt"], ["logits"], perm=[0, 2, 3, 1])]
    nhwc = _save(tmp_path, nodes, {"w": w}, ["N", 8, 8, 12], "seg_nhwc.onnx", in_shape=("N", 8, 8, 3))
    first = json.loads(_infer(segmenter, image, "--json", "--masks", tmp_path / "a"))[0]
    last = json.loads(_infer(nhwc, image, "--json", "--masks", tmp_path / "b"))[0]
    assert np.array_equal(np.asarray(Image.open(first["mask"])), np.asarray(Image.open(last["mask"])))
    assert first["classes"] == last["classes"]


def test_a_classifier_ending_in_a_1x1_map_gets_classes_not_a_mask(image, tmp_path):
    """GlobalAveragePool without Flatten: [N, 10, 1, 1] is one score vector per image."""
    w = np.random.default_rng(3).standard_normal((10, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["p"]), helper.make_node("Conv", ["p", "w"], ["logits"])]
    model = _save(tmp_path, nodes, {"w": w}, ["N", 10, 1, 1], "gap.onnx")
    masks = tmp_path / "masks"
    out = json.loads(_infer(model, image, "--json", "--top-k", "3", "--masks", masks))[0]
    assert "mask" not in out and len(out["top"]) == 3 and not masks.exists()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
    return p


def _infer(*args):
    res = subprocess.run([sys.executable, "-m", "bdecomp.cli", "infer", *map(str, args)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_json_lists_top_k_classes_with_probabilities_in_falling_order(classifier, image):
    out = json.loads(_infer(classifier, image, "--json", "--top-k", "3"))
    top = out[0]["top"]
    assert out[0]["image"] == str(image) and len(top) == 3
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert all(set(t) == {"index", "label", "prob"} for t in top)
    assert top[0]["label"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"][top[0]["index"]]


def test_a_folder_stands_for_every_image_under_it_in_sorted_order(classifier, image, tmp_path):
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.open(image).convert("RGB").save(d / name)
    (d / "notes.txt").write_text("not an image")
    out = json.loads(_infer(classifier, d, image, "--json"))
    assert [r["image"] for r in out] == [str(d / "a.jpg"), str(d / "b.png"), str(d / "sub" / "c.png"), str(image)]


def test_segmentation_writes_a_colour_mask_with_the_camvid_palette(segmenter, image, tmp_path):
    masks = tmp_path / "masks"
    out = json.loads(_infer(segmenter, image, "--json", "--masks", masks, "--overlay"))
    mask = np.asarray(Image.open(out[0]["mask"]))
    assert mask.shape == (8, 8, 3)
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in palette("camvid", 12)}
    assert (masks / "img_overlay.png").exists()
    assert sum(c["fraction"] for c in out[0]["classes"]) == pytest.approx(1.0)
