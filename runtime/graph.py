"""Reading a decomposed graph for the native runtime: validation of the ai.bdecomp nodes,
activation fusion, and the schedule of onnxruntime segments and native steps.

Everything here is checked before any array reaches C, so a malformed file fails with one
DecomposedModelError line instead of a crash.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bdecomp.decomposer import ops
from bdecomp.errors import DecomposedModelError

MAX_DIM = 1 << 24  # no sane CNN layer has a dimension beyond this


@dataclass
class QuantSpec:
    name: str
    input: str
    outputs: list[str]  # codes[, scale, zero_point]
    params: list[str]  # the scale and zero_point tensors layers must take from this quantizer
    bits: int
    dynamic: bool
    scale: float | None = None  # 1.0 for a per-channel quantizer (its layers carry the steps)
    zero_point: int | None = None
    channel_scales: np.ndarray | None = None  # float32 [C]: one step per input channel
    channel_ndim: int = 0  # 3: steps shaped [C, 1, 1] (NCHW, BinConv); 1: [C] (feature axis, BinGemm)


@dataclass
class LayerSpec:
    name: str
    op: str  # BinConv | BinGemm
    quant: str  # name of the quantizer node feeding it
    output: str
    basis: np.ndarray
    coeffs: np.ndarray
    bias: np.ndarray
    depth: int
    weight_shape: tuple[int, ...]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    act_min: float = -np.inf
    act_max: float = np.inf
    fused: list[str] = field(default_factory=list)  # names of fused Add / activation nodes
    residual: str | None = None  # a tensor added to the output before the clamp (fused residual Add)
    scale: float | None = None  # the layer's own constant step; None: its quantizer's

    @property
    def k(self) -> int:
        return self.basis.shape[1]


def _err(node: onnx.NodeProto, msg: str) -> DecomposedModelError:
    return DecomposedModelError(f"malformed decomposed node {node.name or node.op_type!r}: {msg}")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(inits: dict, name: str, node, dtype, what: str) -> np.ndarray:
    if name not in inits:
        raise _err(node, f"{what} ({name!r}) is not a constant initializer")
    try:
        a = numpy_helper.to_array(inits[name])
    except Exception:
        raise _err(node, f"{what} cannot be read") from None
    if a.dtype != dtype:
        raise _err(node, f"{what} must be {np.dtype(dtype).name}, got {a.dtype.name}")
    return a


def _ints(a: dict, key: str, n: int, lo: int, node, default=None) -> tuple[int, ...]:
    v = a.get(key, default)
    if v is None or not isinstance(v, (list, tuple)) or len(v) != n or not all(isinstance(i, int) for i in v):
        raise _err(node, f"attribute {key} must be {n} integers")
    if any(i < lo or i > MAX_DIM for i in v):
        raise _err(node, f"attribute {key} out of range: {list(v)}")
    return tuple(v)


def parse_quantizer(node: onnx.NodeProto, inits: dict) -> QuantSpec:
    a = _attrs(node)
    qmax = a.get("qmax")
    if not isinstance(qmax, int) or qmax not in [(1 << b) - 1 for b in range(1, 9)]:
        raise _err(node, f"qmax must be 2^Q - 1 with Q in 1..8, got {qmax!r}")
    bits = int(qmax).bit_length()
    if node.op_type == ops.QUANTIZE_DYNAMIC:
        if len(node.input) != 1 or len(node.output) != 3:
            raise _err(node, "BinQuantizeDynamic takes 1 input and gives 3 outputs")
        return QuantSpec(node.name, node.input[0], list(node.output), list(node.output[1:]), bits, True)
    if len(node.input) != 3 or len(node.output) != 1:
        raise _err(node, "BinQuantize takes 3 inputs and gives 1 output")
    s = _const(inits, node.input[1], node, np.float32, "scale")
    z = _const(inits, node.input[2], node, np.uint8, "zero_point")
    if z.size != 1:
        raise _err(node, "zero_point must be a scalar")
    zp = int(z.reshape(-1)[0])
    if zp > qmax:
        raise _err(node, f"zero_point {zp} exceeds qmax {qmax}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)) or s.size == 0:
        raise _err(node, "scale must be finite and > 0")
    spec = QuantSpec(node.name, node.input[0], list(node.output), list(node.input[1:]), bits, False, 1.0, zp)
    if s.size == 1:  # also [1], [1, 1, 1]: broadcasting makes them one step
        spec.scale = float(s.reshape(-1)[0])
    elif s.ndim == 1 or (s.ndim == 3 and s.shape[1:] == (1, 1)):
        if s.shape[0] > MAX_DIM:
            raise _err(node, "too many channel steps")
        spec.channel_scales, spec.channel_ndim = np.ascontiguousarray(s.reshape(-1)), s.ndim
    else:
        raise _err(node, f"scale must be a scalar, [C] or [C, 1, 1], got shape {list(s.shape)}")
    return spec


def parse_layer(node: onnx.NodeProto, inits: dict, quant_of: dict[str, QuantSpec]) -> LayerSpec:
    a = _attrs(node)
    if len(node.input) != 6 or len(node.output) != 1:
        raise _err(node, f"{node.op_type} takes 6 inputs and gives 1 output")
    q = quant_of.get(node.input[0])
    if q is None:
        raise _err(node, "its codes input does not come from a BinQuantize node")
    if q.outputs[0] != node.input[0]:
        raise _err(node, "its codes input is not a quantizer's codes output")
    if node.input[2] != q.params[1]:
        raise _err(node, "its zero_point is not that of the quantizer of its codes")
    own_scale = None
    if node.input[1] != q.params[0]:  # its own constant step (weights carrying per-channel steps)
        s = _const(inits, node.input[1], node, np.float32, "scale")
        if s.size != 1 or not (np.isfinite(s.reshape(-1)[0]) and s.reshape(-1)[0] > 0):
            raise _err(node, "its own scale must be a finite float32 scalar > 0")
        own_scale = float(s.reshape(-1)[0])
    elif q.channel_scales is not None:
        raise _err(node, "a per-channel quantizer's steps cannot be a layer's scale")
    if q.channel_scales is not None and q.channel_ndim != (3 if node.op_type == ops.CONV else 1):
        raise _err(node, "its quantizer's per-channel steps are not shaped for this op "
                         "([C, 1, 1] for BinConv, [C] for BinGemm)")
    basis = _const(inits, node.input[3], node, np.uint8, "basis")
    coeffs = _const(inits, node.input[4], node, np.float32, "coeffs")
    bias = _const(inits, node.input[5], node, np.float32, "bias")
    depth = a.get("depth")
    if not isinstance(depth, int) or not 1 <= depth <= MAX_DIM:
        raise _err(node, f"depth must be a positive integer, got {depth!r}")
    if basis.ndim != 3 or not 1 <= basis.shape[1] <= 8:
        raise _err(node, f"basis must be [Cout, k<=8, ceil(D/8)], got shape {list(basis.shape)}")
    cout, k = basis.shape[0], basis.shape[1]
    if basis.shape[2] != (depth + 7) // 8:
        raise _err(node, f"basis has {basis.shape[2]} bytes per basis, expected ceil({depth}/8)")
    if coeffs.shape != (cout, k) or not np.all(np.isfinite(coeffs)):
        raise _err(node, f"coeffs must be finite float32 [{cout}, {k}], got {list(coeffs.shape)}")
    if bias.shape != (cout,) or not np.all(np.isfinite(bias)):
        raise _err(node, f"bias must be finite float32 [{cout}]")
    if not (1 <= cout <= MAX_DIM):
        raise _err(node, "no output channels")
    spec = LayerSpec(node.name, node.op_type, q.name, node.output[0], np.ascontiguousarray(basis),
                     np.ascontiguousarray(coeffs), np.ascontiguousarray(bias), depth, (cout, depth),
                     scale=own_scale)
    if node.op_type == ops.CONV:
        ws = _ints(a, "weight_shape", 4, 1, node)
        group = a.get("group", 1)
        if not isinstance(group, int) or group < 1 or cout % group:
            raise _err(node, f"group {group!r} must be positive and divide Cout {cout}")
        if ws[0] != cout or ws[1] * ws[2] * ws[3] != depth:
            raise _err(node, f"weight_shape {list(ws)} does not match basis [{cout}, {k}, D={depth}]")
        spec.weight_shape, spec.group = ws, group
        spec.strides = _ints(a, "strides", 2, 1, node, [1, 1])
        spec.pads = _ints(a, "pads", 4, 0, node, [0, 0, 0, 0])
        spec.dilations = _ints(a, "dilations", 2, 1, node, [1, 1])
    return spec


@dataclass
class ConcatSpec:
    """A channel Concat of native layers' outputs: inside a chain, batch 1, the layers write their
    parts of one buffer and the concatenation is free (a SqueezeNet fire module whose two expand
    layers are both decomposed then needs no onnxruntime segment)."""

    name: str
    inputs: list[str]
    output: str


@dataclass
class Step:
    kind: str  # "ort" | "quant" | "layer" | "concat"
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    spec: QuantSpec | LayerSpec | ConcatSpec | None = None


def clip_bounds(node: onnx.NodeProto, inits: dict) -> tuple[float, float] | None:
    """Constant bounds of a Relu / Clip node, or None if not fusable."""
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    a = _attrs(node)
    lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
    for idx in (1, 2):
        if len(node.input) > idx and node.input[idx]:
            if node.input[idx] not in inits:
                return None
            v = numpy_helper.to_array(inits[node.input[idx]])
            if v.size != 1:
                return None
            if idx == 1:
                lo = float(v.reshape(-1)[0])
            else:
                hi = float(v.reshape(-1)[0])
    return float(lo), float(hi)


def residual_input(node: onnx.NodeProto, output: str, inits: dict) -> str | None:
    """The other operand of an Add of `output` and a computed tensor (not a constant), or None."""
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = node.input
    other = b if a == output else a if b == output else None
    return other if other and other != output and other not in inits else None


def build_schedule(model: onnx.ModelProto) -> list[Step]:
    """Validate the custom nodes; fuse into a layer the residual Add that is its output's only
    consumer (a computed tensor added before the clamp) and then a Relu/Clip that is the only
    consumer; group the standard nodes into as few onnxruntime segments as the dependencies
    allow."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    quant_of: dict[str, QuantSpec] = {}
    specs: dict[int, QuantSpec | LayerSpec] = {}
    for i, n in enumerate(nodes):
        if n.domain == ops.DOMAIN and n.op_type in (ops.QUANTIZE, ops.QUANTIZE_DYNAMIC):
            q = parse_quantizer(n, inits)
            specs[i] = q
            quant_of[q.outputs[0]] = q
    for i, n in enumerate(nodes):
        if n.domain == ops.DOMAIN and n.op_type in ops.LAYER_OPS:
            specs[i] = parse_layer(n, inits, quant_of)
        elif n.domain == ops.DOMAIN and i not in specs:
            raise _err(n, f"unknown operator {ops.DOMAIN}.{n.op_type}")
    graph_outputs = {o.name for o in g.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    removed: set[int] = set()

    def only_consumer(name: str) -> int | None:
        """The node that alone reads `name` (not fused into another layer already), or None."""
        cons = consumers.get(name, [])
        return cons[0] if len(cons) == 1 and name not in graph_outputs and cons[0] not in removed else None

    for i, spec in specs.items():
        if not isinstance(spec, LayerSpec):
            continue
        c = only_consumer(spec.output)
        other = residual_input(nodes[c], spec.output, inits) if c is not None else None
        if other is not None:
            spec.residual, spec.output = other, nodes[c].output[0]
            spec.fused.append(nodes[c].name)
            removed.add(c)
            c = only_consumer(spec.output)
        if c is None:
            continue
        act = nodes[c]
        bounds = clip_bounds(act, inits) if act.domain in ("", "ai.onnx") else None
        if bounds is None or act.input[0] != spec.output:
            continue
        spec.act_min, spec.act_max = max(spec.act_min, bounds[0]), min(spec.act_max, bounds[1])
        spec.output = act.output[0]
        spec.fused.append(act.name)
        removed.add(c)

    for i, spec in _native_concats(nodes, specs, removed).items():
        specs[i] = spec

    available = {i.name for i in g.input} | set(inits) | {""}
    pending = [i for i in range(len(nodes)) if i not in removed]
    steps: list[Step] = []
    while pending:
        progressed = False
        seg: list[int] = []
        seg_out: set[str] = set()
        for i in pending:  # one pass in graph order collects every runnable standard node
            n = nodes[i]
            if i in specs:
                continue
            if all(x in available or x in seg_out for x in n.input) and not _uses_outer(n, available | seg_out):
                seg.append(i)
                seg_out.update(n.output)
        if seg:
            steps.append(Step("ort", [nodes[i] for i in seg]))
            available |= seg_out
            progressed = True
        done = set(seg)
        for i in pending:
            if i in specs and i not in done:
                spec = specs[i]
                needs = ([spec.input] if isinstance(spec, QuantSpec) else list(spec.inputs)
                         if isinstance(spec, ConcatSpec)
                         else [nodes[i].input[0]] + ([spec.residual] if spec.residual else []))
                if all(x in available for x in needs):
                    outs = spec.outputs if isinstance(spec, QuantSpec) else [spec.output]
                    kind = "quant" if isinstance(spec, QuantSpec) else "concat" if isinstance(spec, ConcatSpec) else "layer"
                    steps.append(Step(kind, [nodes[i]], needs, outs, spec))
                    available |= set(outs)
                    done.add(i)
                    progressed = True
        pending = [i for i in pending if i not in done]
        if not progressed:
            missing = sorted({x for i in pending for x in nodes[i].input if x not in available})
            raise DecomposedModelError(f"graph cannot be scheduled: inputs never produced: {', '.join(missing[:5])}")
    return _hoist_segments(steps)


def _hoist_segments(steps: list[Step]) -> list[Step]:
    """Move each onnxruntime segment earlier among the native steps just before it, to where it
    separates the fewest quantizer → layer pairs (then the fewest float tensors; ties: it stays).

    The scheduler emits a segment when nothing native can run without it, which can be between a
    quantizer and its layer: ResNet-CIFAR's shortcut (Slice, Slice, Pad) came after the quantizer
    of the block's second convolution, whose layer adds the Pad output. A quantizer read across
    a segment cannot join a chain (runtime/chains.py), nor can its layer, so both ran from Python.
    Before the block's first quantizer the segment splits only a float tensor (a chain's export)."""
    steps = list(steps)
    for s in range(len(steps)):
        if steps[s].kind != "ort":
            continue
        produced = {o for n in steps[s].nodes for o in n.output}
        needs = {x for n in steps[s].nodes for x in all_inputs(n)} - produced
        start = s
        while start > 0 and steps[start - 1].kind != "ort" and not needs & set(steps[start - 1].outputs):
            start -= 1
        if start == s:
            continue

        def split(cut: int) -> tuple[int, int, int]:
            before = {o: steps[i].kind for i in range(start, cut) for o in steps[i].outputs}
            crossing = {x: before[x] for i in range(cut, len(steps)) if steps[i].kind != "ort"
                        for x in steps[i].inputs if x in before}
            codes = sum(kind == "quant" for kind in crossing.values())
            return codes, len(crossing) - codes, -cut

        cut = min(range(start, s + 1), key=split)
        steps[cut:s + 1] = [steps[s], *steps[cut:s]]
    return steps


def all_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, including outer-scope names its subgraphs read."""
    names = list(node.input)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for sn in a.g.node for o in sn.output} | {i.name for i in a.g.input}
            names += [x for sn in a.g.node for x in all_inputs(sn) if x not in inner]
    return names


def _native_concats(nodes: list[onnx.NodeProto], specs: dict, removed: set[int]) -> dict[int, ConcatSpec]:
    """The Concat nodes (axis 1) of two or more distinct native layer outputs, each of which no
    other such Concat reads: the runtime concatenates them itself (in a chain, for free)."""
    layer_out = {sp.output for sp in specs.values() if isinstance(sp, LayerSpec)}
    cands = {}
    for i, n in enumerate(nodes):
        if (i in removed or n.op_type != "Concat" or n.domain not in ("", "ai.onnx") or len(n.output) != 1
                or _attrs(n).get("axis") != 1):
            continue
        ins = list(n.input)
        if len(ins) >= 2 and len(set(ins)) == len(ins) and all(x in layer_out for x in ins):
            cands[i] = ConcatSpec(n.name, ins, n.output[0])
    uses: dict[str, int] = {}
    for c in cands.values():
        for x in c.inputs:
            uses[x] = uses.get(x, 0) + 1
    return {i: c for i, c in cands.items() if all(uses[x] == 1 for x in c.inputs)}


def _uses_outer(node: onnx.NodeProto, available: set[str]) -> bool:
    """True if a node's subgraphs read outer-scope names that are not produced yet."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for sn in a.g.node for o in sn.output} | {i.name for i in a.g.input} | {t.name for t in a.g.initializer}
            if any(x and x not in inner and x not in available for sn in a.g.node for x in sn.input):
                return True
    return False
