"""Bad input meets one clear line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bdecomp.cli", *args], capture_output=True, text=True, timeout=120)


def _assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode not in (0, 70), res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), path)
    return path


def test_convert_of_a_missing_file_says_so(tmp_path):
    _assert_one_line_error(_run("convert", str(tmp_path / "nope.onnx")), "no such file")


def test_convert_of_a_text_file_says_it_is_not_onnx(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_text("hello, I am not a model\n" * 20)
    _assert_one_line_error(_run("convert", str(p)), "model.onnx")


def test_convert_of_a_truncated_onnx_file_fails_cleanly(tmp_path, tiny_model):
    data = tiny_model.read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_run("convert", str(p)), "cut.onnx")


def test_convert_of_a_directory_says_it_is_a_directory(tmp_path):
    _assert_one_line_error(_run("convert", str(tmp_path)), "directory")


def test_infer_on_an_unreadable_image_names_the_image(tmp_path, tiny_model):
    img = tmp_path / "broken.jpg"
    img.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _assert_one_line_error(_run("infer", str(tiny_model), str(img)), "broken.jpg")


def test_infer_on_a_missing_image_names_the_image(tmp_path, tiny_model):
    _assert_one_line_error(_run("infer", str(tiny_model), str(tmp_path / "none.png")), "none.png")


def test_unknown_option_is_a_usage_error_with_exit_code_2(tiny_model):
    res = _run("convert", str(tiny_model), "--no-such-flag")
    _assert_one_line_error(res, "no-such-flag")
    assert res.returncode == 2


def test_bases_out_of_range_is_rejected(tmp_path, tiny_model):
    _assert_one_line_error(_run("convert", str(tiny_model), "-o", str(tmp_path / "o.onnx"), "--bases", "9"), "1..8")


def test_convert_refuses_to_overwrite_its_input(tiny_model):
    before = tiny_model.read_bytes()
    _assert_one_line_error(_run("convert", str(tiny_model), "-o", str(tiny_model)), "overwrite")
    assert tiny_model.read_bytes() == before
