"""The custom operators of a decomposed file and their ONNX function bodies.

Every decomposed layer becomes nodes of the ``ai.bdecomp`` domain. Each op ships a model-local
function of standard operators, so stock onnxruntime runs the file unchanged (the emulation path and
our correctness oracle), while bdecomp's runtime runs them in C. The bodies are written in the
operators' opset-13 form, which every later opset up to the newest (ReduceMin/Max without axes
included) accepts unchanged; a function imports the model's own opset, because the ONNX checker
rejects a function whose operators (Div: version 14) have newer versions in the model's opset.

Ops (all tensors of one layer; attributes in brackets):

* ``BinQuantize(x, scale, zero_point) -> codes`` [qmax]: q = clip(round(x/scale) + z, 0, qmax),
  uint8 codes; zero_point uint8 scalar (calibrated); scale a float scalar, or one step per input
  channel shaped to broadcast ([C, 1, 1] for NCHW, [C] for a feature axis).
* ``BinQuantizeDynamic(x) -> codes, scale, zero_point`` [qmax]: the original method's run-time
  min/max (range widened to contain 0 so zero padding stays exact; a zero range is guarded).
* ``BinConv(codes, scale, zero_point, basis, coeffs, bias) -> y``
  [weight_shape, depth, strides, pads, dilations, group]: basis uint8 [Cout, k, ceil(D/8)]
  (bit d%8 of byte d/8, 1 ⇔ +1), coeffs float [Cout, k]; y = Conv(s·(q − z), M·c) + bias.
  scale is a float scalar: the quantizer's own, or (after a per-channel quantizer, whose steps
  are folded into M·c) a constant 1; zero_point is always the quantizer's.
* ``BinGemm(codes, scale, zero_point, basis, coeffs, bias) -> y`` [depth]: y = s·(q − z) @ (M·c)ᵀ + bias.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "ai.bdecomp"
VERSION = 1
MIN_OPSET = 13  # the oldest opset whose operator forms the function bodies use

QUANTIZE = "BinQuantize"
QUANTIZE_DYNAMIC = "BinQuantizeDynamic"
CONV = "BinConv"
GEMM = "BinGemm"
LAYER_OPS = (CONV, GEMM)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _ref(attr: str, ref: str, type_: int) -> onnx.AttributeProto:
    """An attribute whose value is the calling node's attribute `ref` (function attribute reference)."""
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = attr, ref, type_
    return a


def _node_with_refs(op: str, inputs, outputs, refs: list[onnx.AttributeProto], **attrs) -> onnx.NodeProto:
    n = helper.make_node(op, inputs, outputs, **attrs)
    n.attribute.extend(refs)
    return n


def _qmax_nodes() -> list[onnx.NodeProto]:
    """qmaxf (float) from the `qmax` attribute."""
    return [
        _node_with_refs("Constant", [], ["qmax_i"], [_ref("value_int", "qmax", onnx.AttributeProto.INT)]),
        helper.make_node("Cast", ["qmax_i"], ["qmaxf"], to=TensorProto.FLOAT),
    ]


def _codes_nodes() -> list[onnx.NodeProto]:
    """codes = uint8(clip(round(x / scale) + z, 0, qmax)) in float arithmetic.

    Written without QuantizeLinear/DequantizeLinear on purpose: onnxruntime's QDQ graph
    optimisations rewrite Q→Clip→DQ chains and change the numbers (seen with onnxruntime 1.32)."""
    return [
        _const("zero_f", np.array(0, np.float32)),
        helper.make_node("Cast", ["zero_point"], ["zf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["xs"]),
        helper.make_node("Round", ["xs"], ["xr"]),
        helper.make_node("Add", ["xr", "zf"], ["xz"]),
        helper.make_node("Clip", ["xz", "zero_f", "qmaxf"], ["qf"]),
        helper.make_node("Cast", ["qf"], ["codes"], to=TensorProto.UINT8),
    ]


def _quantize(opset: int) -> onnx.FunctionProto:
    nodes = _qmax_nodes() + _codes_nodes()
    return helper.make_function(DOMAIN, QUANTIZE, ["x", "scale", "zero_point"], ["codes"], nodes,
                                [helper.make_opsetid("", opset)], ["qmax"])


def _quantize_dynamic(opset: int) -> onnx.FunctionProto:
    nodes = _qmax_nodes() + [
        _const("zero_lo", np.array(0, np.float32)),
        _const("tiny", np.array(1e-8, np.float32)),
        helper.make_node("ReduceMin", ["x"], ["mn"], keepdims=0),
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
        helper.make_node("Min", ["mn", "zero_lo"], ["lo"]),
        helper.make_node("Max", ["mx", "zero_lo"], ["hi"]),
        helper.make_node("Sub", ["hi", "lo"], ["rng"]),
        helper.make_node("Max", ["rng", "tiny"], ["rng_g"]),
        helper.make_node("Div", ["rng_g", "qmaxf"], ["scale"]),
        helper.make_node("Neg", ["lo"], ["neg_lo"]),
        helper.make_node("Div", ["neg_lo", "scale"], ["z_raw"]),
        helper.make_node("Round", ["z_raw"], ["zr"]),
        helper.make_node("Clip", ["zr", "zero_lo", "qmaxf"], ["zc"]),
        helper.make_node("Cast", ["zc"], ["zero_point"], to=TensorProto.UINT8),
    ] + _codes_nodes()
    return helper.make_function(DOMAIN, QUANTIZE_DYNAMIC, ["x"], ["codes", "scale", "zero_point"], nodes,
                                [helper.make_opsetid("", opset)], ["qmax"])


def _weights_nodes() -> list[onnx.NodeProto]:
    """Rebuild W = M·c ([Cout, 1, D]) from the packed basis bits: unpack with BitShift only."""
    return [
        _const("ax3", np.array([3], np.int64)),
        _const("ax1", np.array([1], np.int64)),
        _const("ax2", np.array([2], np.int64)),
        _const("zero_i", np.array([0], np.int64)),
        _const("shl", np.array([7, 6, 5, 4, 3, 2, 1, 0], np.uint8)),
        _const("shr", np.array([7], np.uint8)),
        _const("flat3", np.array([0, 0, -1], np.int64)),
        _const("two", np.array(2, np.float32)),
        _const("one", np.array(1, np.float32)),
        _node_with_refs("Constant", [], ["depth_i"], [_ref("value_int", "depth", onnx.AttributeProto.INT)]),
        helper.make_node("Unsqueeze", ["depth_i", "zero_i"], ["depth_v"]),
        helper.make_node("Unsqueeze", ["basis", "ax3"], ["b4"]),
        helper.make_node("BitShift", ["b4", "shl"], ["b_hi"], direction="LEFT"),
        helper.make_node("BitShift", ["b_hi", "shr"], ["bit"], direction="RIGHT"),
        helper.make_node("Cast", ["bit"], ["bitf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["bitf", "flat3"], ["bits_all"]),
        helper.make_node("Slice", ["bits_all", "zero_i", "depth_v", "ax2"], ["m01"]),
        helper.make_node("Mul", ["m01", "two"], ["m2"]),
        helper.make_node("Sub", ["m2", "one"], ["m_pm"]),
        helper.make_node("Unsqueeze", ["coeffs", "ax1"], ["c3"]),
        helper.make_node("MatMul", ["c3", "m_pm"], ["w3"]),
    ]


def _conv(opset: int) -> onnx.FunctionProto:
    I, INTS = onnx.AttributeProto.INT, onnx.AttributeProto.INTS
    nodes = _weights_nodes() + [
        _node_with_refs("Constant", [], ["wshape"], [_ref("value_ints", "weight_shape", INTS)]),
        helper.make_node("Reshape", ["w3", "wshape"], ["W"]),
        helper.make_node("Cast", ["codes"], ["codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["zero_point"], ["zp_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["codes_f", "zp_f"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["xf"]),
        _node_with_refs("Conv", ["xf", "W", "bias"], ["y"], [
            _ref("strides", "strides", INTS), _ref("pads", "pads", INTS),
            _ref("dilations", "dilations", INTS), _ref("group", "group", I)]),
    ]
    return helper.make_function(DOMAIN, CONV, ["codes", "scale", "zero_point", "basis", "coeffs", "bias"], ["y"],
                                nodes, [helper.make_opsetid("", opset)],
                                ["weight_shape", "depth", "strides", "pads", "dilations", "group"])


def _gemm(opset: int) -> onnx.FunctionProto:
    nodes = _weights_nodes() + [
        _const("flat2", np.array([0, -1], np.int64)),
        helper.make_node("Reshape", ["w3", "flat2"], ["W"]),
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("Cast", ["codes"], ["codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["zero_point"], ["zp_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["codes_f", "zp_f"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["xf"]),
        helper.make_node("MatMul", ["xf", "Wt"], ["xw"]),
        helper.make_node("Add", ["xw", "bias"], ["y"]),
    ]
    return helper.make_function(DOMAIN, GEMM, ["codes", "scale", "zero_point", "basis", "coeffs", "bias"], ["y"],
                                nodes, [helper.make_opsetid("", opset)], ["depth"])


def functions(opset: int) -> list[onnx.FunctionProto]:
    """The model-local function definitions every decomposed file carries, importing the model's
    default-domain opset (MIN_OPSET or later)."""
    if opset < MIN_OPSET:
        raise ValueError(f"function bodies need opset {MIN_OPSET} or later, got {opset}")
    return [_quantize(opset), _quantize_dynamic(opset), _conv(opset), _gemm(opset)]
