"""Model builders: torchvision's AlexNet, VGG-16, ResNet-18/50/152 and SegNet as ONNX with random
weights, exactly the layers of the originals (parameter counts equal torchvision's published ones),
runnable in onnxruntime, deterministic per seed, and convertible by bdecomp end to end.

Full-size VGG-16 (553 MB) and ResNet-152 are never built here: their layer shapes come from the
builders' dry run (`parameter_shapes`), which is checked against real builds of the others.
"""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import run_onnx
from onnx import numpy_helper

import bdecomp
from bdecomp.decomposer.convert import resolve_recipe
from bdecomp.decomposer.load import save_model
from bdecomp.errors import ConfigError
from bdecomp.models.builders import (
    BUILDERS,
    CAMVID_RECIPE,
    TORCHVISION_PARAMS,
    build,
    parameter_count,
    parameter_shapes,
)
from bdecomp.models.preprocess import TORCHVISION

CLASSIFIERS = ["alexnet", "vgg16", "resnet18", "resnet50", "resnet152"]
SMALL = {  # name → build options of a fast, structurally identical model
    "alexnet": dict(width=0.125),
    "vgg16": dict(width=0.0625),
    "resnet18": dict(width=0.25),
    "resnet50": dict(width=0.125),
    "resnet152": dict(width=0.0625, size=(64, 64)),
    "segnet": dict(width=0.125, size=(64, 96)),
}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def alexnet() -> onnx.ModelProto:
    return build("alexnet")


@pytest.fixture(scope="module")
def resnet18() -> onnx.ModelProto:
    return build("resnet18")


@pytest.fixture(scope="module")
def small() -> dict[str, onnx.ModelProto]:
    return {name: build(name, **kw) for name, kw in SMALL.items()}


# ---------------------------------------------------------------- structure


def test_builders_cover_the_papers_networks():
    assert set(BUILDERS) == {"alexnet", "vgg16", "resnet18", "resnet50", "resnet152", "segnet"}
    assert BUILDERS["resnet18"](seed=3, width=0.25).graph.name == "resnet18"


@pytest.mark.parametrize("name", list(SMALL))
def test_each_builder_gives_a_checked_opset13_model_with_one_dynamic_batch_input(small, name):
    m = small[name]
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == 8
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 13)]
    (inp,) = m.graph.input
    assert inp.name == "input"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:2]] == [3]
    assert [o.name for o in m.graph.output] == ["logits"]
    names = [n.name for n in m.graph.node]
    assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_parameter_counts_equal_torchvision(name):
    assert parameter_count(parameter_shapes(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", list(SMALL))
def test_the_dry_run_has_exactly_the_initializers_of_a_real_build(small, name):
    assert parameter_shapes(name, **SMALL[name]) == _shapes(small[name])


def test_full_size_alexnet_and_resnet18_graphs_hold_torchvisions_parameter_counts(alexnet, resnet18):
    assert parameter_count(_shapes(alexnet)) == 61_100_840
    assert parameter_count(_shapes(resnet18)) == 11_689_512
    assert _shapes(alexnet)["features.0.weight"] == (64, 3, 11, 11)
    assert _shapes(alexnet)["classifier.1.weight"] == (4096, 9216)
    assert _shapes(resnet18)["fc.weight"] == (1000, 512)


def test_torchvision_layer_patterns():
    shapes = parameter_shapes("vgg16")
    convs = [s for n, s in shapes.items() if n.startswith("features.") and n.endswith(".weight")]
    assert [s[0] for s in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert shapes["classifier.0.weight"] == (4096, 25088)
    r50 = parameter_shapes("resnet50")
    assert r50["layer2.0.conv1.weight"] == (128, 256, 1, 1)  # v1.5: the stride sits on conv2 (3×3)
    assert r50["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert r50["layer2.0.downsample.0.weight"] == (512, 256, 1, 1)
    assert "layer1.0.downsample.0.weight" in r50 and "layer1.1.downsample.0.weight" not in r50
    r152 = parameter_shapes("resnet152")
    assert max(int(n.split(".")[1]) for n in r152 if n.startswith("layer3.")) == 35
    r18 = parameter_shapes("resnet18")
    assert "layer1.0.downsample.0.weight" not in r18 and r18["layer4.1.conv2.weight"] == (512, 512, 3, 3)


def test_resnet_strides_sit_on_the_3x3_conv_and_downsample(small):
    nodes = {n.name: n for n in small["resnet50"].graph.node}

    def strides(name):
        return next(list(a.ints) for a in nodes[name].attribute if a.name == "strides")

    assert strides("layer3.0.conv1") == [1, 1]
    assert strides("layer3.0.conv2") == [2, 2]
    assert strides("layer3.0.downsample.0") == [2, 2]
    ops = Counter(n.op_type for n in small["resnet50"].graph.node)
    assert ops["Add"] == 16 and ops["BatchNormalization"] == ops["Conv"] == 53 and ops["GlobalAveragePool"] == 1


def test_alexnet_and_vgg_keep_dropout_and_the_adaptive_pool(small):
    for name, dropouts in (("alexnet", 2), ("vgg16", 2)):
        ops = Counter(n.op_type for n in small[name].graph.node)
        assert ops["Dropout"] == dropouts and ops["AveragePool"] == 1 and ops["Flatten"] == 1 and ops["Gemm"] == 3


def test_segnet_pools_with_indices_and_unpools_to_the_exact_pre_pool_shape(small):
    g = small["segnet"].graph
    pools = [n for n in g.node if n.op_type == "MaxPool"]
    unpools = [n for n in g.node if n.op_type == "MaxUnpool"]
    assert len(pools) == len(unpools) == 5
    assert all(len(p.output) == 2 for p in pools)
    producer = {o: n for n in g.node for o in n.output}
    pool_indices = {p.output[1] for p in pools}
    for u in unpools:
        assert u.input[1] in pool_indices
        assert producer[u.input[2]].op_type == "Shape"
    ops = Counter(n.op_type for n in g.node)
    assert ops["Conv"] == 26 and ops["BatchNormalization"] == ops["Relu"] == 25


def test_segnet_parameters_are_vgg16_bn_features_plus_the_mirrored_decoder():
    enc = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    dec = [(512, 512)] * 3 + [(512, 512), (512, 512), (512, 256), (256, 256), (256, 256), (256, 128),
                               (128, 128), (128, 64), (64, 64)]
    expect = sum(ci * co * 9 + co + 2 * co for ci, co in enc + dec) + 64 * 12 * 9 + 12
    assert parameter_count(parameter_shapes("segnet")) == expect


# ---------------------------------------------------------------- running them


def test_alexnet_and_resnet18_give_finite_order_one_logits(alexnet, resnet18):
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224)).astype(np.float32)
    for m in (alexnet, resnet18):
        (y,) = run_onnx(m, x)
        assert y.shape == (1, 1000) and np.all(np.isfinite(y))
        assert 0.1 < y.std() < 30, y.std()


@pytest.mark.parametrize("name", ["resnet50", "resnet152"])
def test_deep_batchnorm_networks_keep_activations_order_one(small, name):
    x = np.random.default_rng(6).standard_normal((2, 3) + tuple(SMALL[name].get("size", (224, 224)))).astype(np.float32)
    (y,) = run_onnx(small[name], x)
    assert np.all(np.isfinite(y)) and 0.1 < y.std() < 30, y.std()


@pytest.mark.parametrize("size", [(64, 96), (45, 61)])
def test_segnet_output_is_classes_by_input_size_even_for_odd_sizes(size):
    m = build("segnet", width=0.125, size=size)
    x = np.random.default_rng(7).standard_normal((2, 3) + size).astype(np.float32)
    (y,) = run_onnx(m, x)
    assert y.shape == (2, 12) + size and np.all(np.isfinite(y)) and 0.05 < y.std() < 30
    (y1,) = run_onnx(m, x[1:])
    np.testing.assert_allclose(y1, y[1:], rtol=1e-5, atol=1e-5)  # unpool indices are per sample


def test_full_segnet_declares_12_classes_at_360x480():
    shapes = parameter_shapes("segnet")
    assert shapes["conv1_1_D.weight"] == (12, 64, 3, 3)
    out = build("segnet", width=0.0625).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out] == ["N", 12, 360, 480]


def test_batchnorm_statistics_are_plausible(small):
    m = small["resnet50"]
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    for n in bns:
        assert next(a.f for a in n.attribute if a.name == "epsilon") == pytest.approx(1e-5)
        gamma, beta, mean, var = (inits[i] for i in n.input[1:5])
        assert np.all(var > 0) and np.all(np.isfinite(mean))
        assert np.all(gamma > 0) and np.abs(beta).max() < 0.5
    mid = [inits[n.input[1]] for n in bns if n.name.endswith(("bn1", "bn2"))]
    assert 0.8 < float(np.mean(np.concatenate(mid))) < 1.25


# ---------------------------------------------------------------- determinism and metadata


def test_same_seed_gives_byte_identical_models_and_another_seed_does_not():
    a = build("resnet18", seed=1, width=0.25).SerializeToString(deterministic=True)
    b = build("resnet18", seed=1, width=0.25).SerializeToString(deterministic=True)
    c = build("resnet18", seed=2, width=0.25).SerializeToString(deterministic=True)
    assert a == b and a != c
    s1 = build("segnet", seed=1, width=0.125, size=(64, 96)).SerializeToString(deterministic=True)
    assert s1 == build("segnet", seed=1, width=0.125, size=(64, 96)).SerializeToString(deterministic=True)


def test_batch_may_be_fixed():
    m = build("resnet18", width=0.125, batch=1)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_models_carry_their_recipe_task_and_labels(small, tmp_path):
    recipe, info = resolve_recipe(tmp_path / "unused.onnx", build("resnet18", width=0.125), None)
    assert recipe == TORCHVISION and info == {"task": "classification", "labels": "imagenet", "name": "resnet18"}
    recipe, info = resolve_recipe(tmp_path / "unused.onnx", build("segnet", width=0.0625), None)
    assert recipe == CAMVID_RECIPE and recipe.size == (360, 480) and recipe.resize == "direct"
    assert info["task"] == "segmentation" and info["labels"] == "camvid"
    recipe, _ = resolve_recipe(tmp_path / "unused.onnx", small["segnet"], None)
    assert recipe.size == (64, 96)


@pytest.mark.parametrize("kw", [dict(name="resnet19"), dict(name="alexnet", width=0),
                                dict(name="alexnet", size=(16, 16)), dict(name="alexnet", seed=-1),
                                dict(name="vgg16", size=(200, 200))])
def test_bad_arguments_are_config_errors(kw):
    with pytest.raises(ConfigError):
        build(**kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bdecomp.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_models_build_writes_the_model_and_rejects_unknown_names(tmp_path):
    out = tmp_path / "seg.onnx"
    res = _cli("models", "build", "segnet", "-o", str(out), "--seed", "3", "--width", "0.125", "--size", "64x96")
    assert res.returncode == 0, res.stderr
    assert "parameters" in res.stdout and str(out) in res.stdout
    assert out.read_bytes() == build("segnet", seed=3, width=0.125, size=(64, 96)).SerializeToString(deterministic=True)
    res = _cli("models", "build", "resnet19", "-o", str(tmp_path / "x.onnx"))
    assert res.returncode == 2 and "resnet18" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x.onnx").exists()
    listed = _cli("models", "list").stdout
    assert all(name in listed for name in BUILDERS)


# ---------------------------------------------------------------- end to end through bdecomp


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# Both backends quantize identically, and their decomposed layers differ by float rounding only
# (~1e-7 relative, see test_runtime_synthetic.py). Through ~20 layers a value on a rounding boundary
# of a quantizer may get a code one level apart and carry that step on: at Q = 4 one level is 1/15
# of a layer's input range, so the outputs must agree to 1e-4 of their scale almost everywhere and
# to 2 per cent of it at worst (measured: within 3e-6 everywhere).
REL_TOL, MIN_CLOSE, MAX_REL = 1e-4, 0.99, 0.02


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet18", dict(width=0.25, size=(64, 64)), (2, 3, 64, 64)),
    ("segnet", dict(width=0.125, size=(64, 96)), (2, 3, 64, 96)),
])
def test_converted_builder_models_run_natively_like_the_onnxruntime_oracle(tmp_path, name, kw, shape):
    src = tmp_path / f"{name}.onnx"
    save_model(build(name, **kw), src)
    out = tmp_path / f"{name}.bd.onnx"
    rep = bdecomp.convert(src, out, bases=4, act_bits=4, progress=False, min_depth=0)
    assert len(rep.layers) == sum(1 for n in onnx.load(src).graph.node if n.op_type in ("Conv", "Gemm"))
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    native_y = bdecomp.load(out).run(x)[0]
    oracle_y = bdecomp.load(out, backend="onnxruntime").run(x)[0]
    assert native_y.shape == oracle_y.shape == ((shape[0], 1000) if name == "resnet18" else (shape[0], 12) + shape[2:])
    close = np.abs(native_y.astype(np.float64) - oracle_y) <= REL_TOL * np.abs(oracle_y).max() + 1e-6
    assert close.mean() >= MIN_CLOSE, close.mean()
    assert _max_rel_diff(native_y, oracle_y) <= MAX_REL
