"""Finding the decomposable layers and rewriting the graph with the ai.bdecomp ops.

A layer is a Conv (2-D, any kernel/stride/pad/dilation/group), a Gemm (transA = 0) or a MatMul
whose weight is a constant initializer. Everything else stays float and is listed with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bdecomp.decomposer import load, ops
from bdecomp.decomposer.calibrate import QParams
from bdecomp.decomposer.decompose import Decomposition
from bdecomp.decomposer.feed import declared_dims
from bdecomp.decomposer.simplify import prune_initializers
from bdecomp.runtime.graph import clip_bounds, residual_input


@dataclass
class Layer:
    """One decomposable layer, with its weight as float32 [Cout, D] (Gemm alpha folded in); fits
    convert to float64 a block at a time."""

    name: str
    op: str  # "Conv" | "Gemm" | "MatMul"
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray
    weight_shape: tuple[int, ...]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    out_pixels: int | None = None  # output positions per image (None: unknown)
    weight_names: tuple[str, ...] = field(default_factory=tuple)
    # ONNX element type of the layer's input and output (that of its weight): the decomposed ops
    # compute in float32, so float16 / double layers get a Cast on each side
    elem_type: int = onnx.TensorProto.FLOAT

    @property
    def cout(self) -> int:
        return self.weight.shape[0]

    @property
    def depth(self) -> int:
        return self.weight.shape[1]

    @property
    def macs(self) -> int:
        return self.cout * self.depth * (self.out_pixels or 1)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shape(vi: dict[str, onnx.ValueInfoProto], name: str) -> list[int | None] | None:
    return declared_dims(vi[name]) if name in vi else None


def _same_pads(in_hw, kernel, strides, dilations, upper: bool) -> tuple[int, int, int, int]:
    pads_begin, pads_end = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        pads_begin.append(small if upper else big)
        pads_end.append(big if upper else small)
    return (pads_begin[0], pads_begin[1], pads_end[0], pads_end[1])


def _conv_layer(node, inits, vi) -> Layer | str:
    a = _attrs(node)
    W = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if W.ndim != 4:
        return f"{W.ndim - 2}-D convolution (only 2-D is decomposed)"
    group = int(a.get("group", 1))
    strides = tuple(a.get("strides", [1, 1]))
    dilations = tuple(a.get("dilations", [1, 1]))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    in_shape = _shape(vi, node.input[0])
    if auto_pad in ("NOTSET", ""):
        pads = tuple(a.get("pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif in_shape and len(in_shape) == 4 and None not in in_shape[2:]:
        pads = _same_pads(in_shape[2:], W.shape[2:], strides, dilations, auto_pad == "SAME_UPPER")
    else:
        return f"auto_pad={auto_pad} with unknown input size"
    if any(p < 0 for p in pads) or any(s < 1 for s in strides) or any(d < 1 for d in dilations):
        return "negative pads or non-positive strides/dilations"
    bias = (numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros(W.shape[0]))
    out_shape = _shape(vi, node.output[0])
    out_pixels = (out_shape[2] * out_shape[3]) if out_shape and len(out_shape) == 4 and None not in out_shape[2:] else None
    return Layer(node.name, "Conv", node.input[0], node.output[0], W.reshape(W.shape[0], -1), bias,
                 tuple(W.shape), strides, pads, dilations, group, out_pixels, tuple(node.input[1:]))


def _gemm_layer(node, inits, vi) -> Layer | str:
    a = _attrs(node)
    if a.get("transA", 0):
        return "Gemm with transA=1"
    B = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if B.ndim != 2:
        return "Gemm weight is not 2-D"
    W = np.ascontiguousarray(B if a.get("transB", 0) else B.T)
    if a.get("alpha", 1.0) != 1.0:
        W = W * np.float32(a.get("alpha", 1.0))
    cout = W.shape[0]
    bias = np.zeros(cout)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return "Gemm bias is not constant"
        C = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) * float(a.get("beta", 1.0))
        if C.size == 1:
            bias = np.full(cout, float(C.reshape(-1)[0]))
        elif C.shape in ((cout,), (1, cout)):
            bias = C.reshape(cout)
        else:
            return f"Gemm bias of shape {list(C.shape)} is not per output"
    return Layer(node.name, "Gemm", node.input[0], node.output[0], W, bias, tuple(W.shape),
                 out_pixels=1, weight_names=tuple(node.input[1:]))


def _matmul_layer(node, inits, vi) -> Layer | str:
    B = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if B.ndim != 2:
        return "MatMul weight is not 2-D"
    shape = _shape(vi, node.input[0])
    if shape is not None and len(shape) < 2:
        return "MatMul input is 1-D"
    rows = int(np.prod(shape[1:-1])) if shape and None not in shape[1:-1] else 1
    W = np.ascontiguousarray(B.T)
    return Layer(node.name, "MatMul", node.input[0], node.output[0], W, np.zeros(W.shape[0]), tuple(W.shape),
                 out_pixels=rows, weight_names=(node.input[1],))


QUANTIZED_WEIGHT = "weight comes from a DequantizeLinear (an int8 QDQ model)"
QUANTIZED_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger")  # QOperator int8 layers


def find_layers(model: onnx.ModelProto, measured: dict[str, list[int]] | None = None
                ) -> tuple[list[Layer], list[tuple[str, str, str]]]:
    """Decomposable layers in graph order, and (name, op, reason) for Conv/Gemm/MatMul left float.
    `measured`: tensor sizes shape inference could not give (calibrate.measure_shapes)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    vi = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    vi.update({t: helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, dims)
               for t, dims in (measured or {}).items()})
    producer = {o: n.op_type for n in g.node for o in n.output}
    layers, floats = [], []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            floats.append((node.name, node.op_type, QUANTIZED_WEIGHT if len(node.input) > 1 and
                           producer.get(node.input[1]) == "DequantizeLinear" else "weight is not a constant initializer"))
            continue
        t = inits[node.input[1]]
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            floats.append((node.name, node.op_type, "weight is not floating point"))
            continue
        build = {"Conv": _conv_layer, "Gemm": _gemm_layer, "MatMul": _matmul_layer}[node.op_type]
        res = build(node, inits, vi)
        if isinstance(res, str):
            floats.append((node.name, node.op_type, res))
            continue
        res.elem_type = t.data_type
        if not np.all(np.isfinite(res.weight)) or not np.all(np.isfinite(res.bias)):
            floats.append((node.name, node.op_type, "weights contain NaN or Inf"))
        else:
            layers.append(res)
    return layers, floats


def native_neighbours(model: onnx.ModelProto, layers: list[Layer]
                      ) -> dict[str, tuple[frozenset[str] | None, frozenset[str] | None]]:
    """Per layer: (the layers its input comes from, the layers its output goes to), through what
    the native runtime runs without onnxruntime: a residual Add and a Relu / Clip that are a layer
    output's only consumer (the Add's other operand is read by that layer), and a Concat of layer
    outputs. None on a side that reaches another op: decomposed, the layer then switches between
    the two runtimes there. The graph's input and outputs need no switch (an empty set). Mirrors
    runtime/graph.build_schedule's fusions (with its tests of which Add and Relu / Clip it fuses)
    on the float model, so that convert can price the switches before it decides."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
        for y in n.output:
            producer[y] = n
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    by_name = {L.name: L for L in layers}

    residual_of: dict[str, str] = {}  # a residual Add fused into a layer → that layer

    def fused_out(L: Layer) -> str:
        def only(t: str) -> onnx.NodeProto | None:
            cons = consumers.get(t, [])
            ok = len(cons) == 1 and t not in outputs and cons[0].domain in ("", "ai.onnx")
            return cons[0] if ok else None
        t = L.output
        if (c := only(t)) is not None and residual_input(c, t, inits) is not None:
            residual_of[c.name] = L.name
            t = c.output[0]
        if (c := only(t)) is not None and clip_bounds(c, inits) is not None and c.input[0] == t:
            t = c.output[0]
        return t

    out_of = {L.name: fused_out(L) for L in layers}
    layer_of = {t: name for name, t in out_of.items()}

    def sources(t: str) -> frozenset[str] | None:
        if t in layer_of:
            return frozenset([layer_of[t]])
        n = producer.get(t)
        if n is None:
            return frozenset()  # the graph's input (or a constant)
        if n.op_type == "Concat" and all(x in layer_of for x in n.input):
            return frozenset(layer_of[x] for x in n.input)
        return None

    def sinks(t: str) -> frozenset[str] | None:
        found: set[str] = set()
        for n in consumers.get(t, []):
            if n.name in by_name and by_name[n.name].input == t:
                found.add(n.name)
            elif n.name in residual_of:  # read by the layer whose output write adds it
                found.add(residual_of[n.name])
            elif n.op_type == "Concat" and all(x in layer_of for x in n.input):
                if (more := sinks(n.output[0])) is None:
                    return None
                found |= more
            else:
                return None
        return frozenset(found)

    return {L.name: (sources(L.input), sinks(out_of[L.name])) for L in layers}


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name: layer configs and reports refer to layers by name."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)


@dataclass
class Plan:
    """What to write for one layer."""

    layer: Layer
    dec: Decomposition
    q: int
    qparams: QParams | None  # None: run-time min/max (no calibration data)


def _t(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def rewrite(model: onnx.ModelProto, plans: list[Plan]) -> onnx.ModelProto:
    """Replace each planned layer by a (shared) quantizer + BinConv/BinGemm node, keeping the
    original output names so the rest of the graph is untouched."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    g = out.graph
    by_name = {p.layer.name: p for p in plans}
    quantizers: dict[tuple, tuple[str, str, str]] = {}
    as_float: dict[str, str] = {}  # a float16 / double tensor -> its float32 Cast
    new_nodes, new_inits = [], []
    taken = {n.name for n in g.node} | {t.name for t in g.initializer} | {i.name for i in g.input}
    taken |= {o for n in g.node for o in n.output}

    def unique(name: str) -> str:
        out, i = name, 1
        while out in taken:
            out, i = f"{name}_{i}", i + 1
        taken.add(out)
        return out

    for node in g.node:
        p = by_name.get(node.name)
        if p is None:
            new_nodes.append(node)
            continue
        L = p.layer
        qp = p.qparams
        x_in, y_out = L.input, L.output
        if L.elem_type != onnx.TensorProto.FLOAT:
            if x_in not in as_float:
                as_float[x_in] = unique(f"{x_in}/float")
                new_nodes.append(helper.make_node("Cast", [x_in], [as_float[x_in]], name=as_float[x_in],
                                                  to=onnx.TensorProto.FLOAT))
            x_in, y_out = as_float[x_in], unique(f"{L.output}/float")
        per_channel = qp is not None and qp.channel_scales is not None
        key = (L.input, p.q, L.group if L.op == "Conv" else 1, L.op == "Conv",
               None if qp is None else (qp.scale, qp.zero_point, qp.channel_scales))
        if key not in quantizers:
            qname = unique(f"{L.input}/q{p.q}" + (f"g{key[2]}" if key[2] != 1 else ""))
            codes, scale, zp = unique(f"{qname}.codes"), unique(f"{qname}.scale"), unique(f"{qname}.zero_point")
            layer_scale = scale
            qmax = (1 << p.q) - 1
            if qp is None:
                new_nodes.append(helper.make_node(ops.QUANTIZE_DYNAMIC, [x_in], [codes, scale, zp], name=qname,
                                                  domain=ops.DOMAIN, qmax=qmax))
            else:
                if per_channel:  # [C,1,1] broadcasts over NCHW, [C] over the feature axis
                    s = np.array(qp.channel_scales, np.float32)
                    new_inits.append(_t(s.reshape(-1, 1, 1) if L.op == "Conv" else s, scale))
                    layer_scale = unique(f"{qname}.unit_scale")  # the layers' weights carry the steps
                    new_inits.append(_t(np.array(1.0, np.float32), layer_scale))
                else:
                    new_inits.append(_t(np.array(qp.scale, np.float32), scale))
                new_inits.append(_t(np.array(qp.zero_point, np.uint8), zp))
                new_nodes.append(helper.make_node(ops.QUANTIZE, [x_in, scale, zp], [codes], name=qname,
                                                  domain=ops.DOMAIN, qmax=qmax))
            quantizers[key] = (codes, layer_scale, zp)
        codes, scale, zp = quantizers[key]
        basis, coeffs, bias = unique(f"{L.name}.basis"), unique(f"{L.name}.coeffs"), unique(f"{L.name}.bd_bias")
        new_inits += [_t(p.dec.packed_basis(), basis), _t(p.dec.coeffs.astype(np.float32), coeffs),
                      _t(L.bias.astype(np.float32), bias)]
        inputs = [codes, scale, zp, basis, coeffs, bias]
        if L.op == "Conv":
            new_nodes.append(helper.make_node(
                ops.CONV, inputs, [y_out], name=L.name, domain=ops.DOMAIN,
                weight_shape=list(L.weight_shape), depth=L.depth, strides=list(L.strides),
                pads=list(L.pads), dilations=list(L.dilations), group=L.group))
        else:
            new_nodes.append(helper.make_node(ops.GEMM, inputs, [y_out], name=L.name, domain=ops.DOMAIN,
                                              depth=L.depth))
        if y_out != L.output:
            new_nodes.append(helper.make_node("Cast", [y_out], [L.output], name=unique(f"{L.name}/cast"),
                                              to=L.elem_type))
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    del g.value_info[:]
    if plans:
        out.functions.extend(ops.functions(load.default_opset(out)))
        if not any(o.domain == ops.DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.VERSION))
    prune_initializers(out)
    return out
