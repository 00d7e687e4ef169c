"""Graph simplification before decomposition: constant weights as initializers, shape inference
and BatchNorm folding.

Folding BN into the preceding Conv/Gemm makes the decomposed weights absorb the per-channel affine
map, so the quantized layer output matches the float network without an extra float op.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            if i:
                out[i].append(n)
    return out


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def constant_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Weights that exporters leave as graph nodes become initializers, so their layers can be
    decomposed: a Constant node's tensor, and an Identity of an initializer (how torch.onnx writes
    a shared weight) is bypassed. Outputs that are graph outputs are left alone. Returns (model,
    number of nodes removed)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    graph_outputs = {o.name for o in g.output}
    inits = initializers(g)
    in_subgraphs = {i for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                    for sn in a.g.node for i in sn.input}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        out = n.output[0] if len(n.output) == 1 else None
        if out is None or out in graph_outputs or n.domain not in ("", "ai.onnx"):
            keep.append(n)
        elif n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = out
            g.initializer.append(t)
            inits[out] = t
        elif n.op_type == "Identity" and rename.get(n.input[0], n.input[0]) in inits and out not in in_subgraphs:
            rename[out] = rename.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    removed = len(g.node) - len(keep)
    if removed:
        del g.node[:]
        g.node.extend(keep)
        prune_initializers(model)
    return model, removed


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every BatchNormalization whose input is a Conv (or Gemm with transB and 2-D output) that
    feeds only that BN and has constant weights. Returns (model, number folded)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = initializers(g)
    cons = consumers(g)
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    remove, folded = [], 0
    for bn in list(g.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 and any(bn.output[1:]):
            continue
        src = producer.get(bn.input[0])
        if src is None or src.op_type not in ("Conv", "Gemm") or len(cons[bn.input[0]]) != 1:
            continue
        if bn.input[0] in graph_outputs or any(p not in inits for p in bn.input[1:5]):
            continue
        if src.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in src.attribute}
            if attrs.get("transA", 0) or not attrs.get("transB", 0):
                continue
        if len(src.input) < 2 or src.input[1] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in bn.input[1:5])
        W = numpy_helper.to_array(inits[src.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[src.input[2]]).astype(np.float64)
             if len(src.input) > 2 and src.input[2] else np.zeros(W.shape[0]))
        factor = gamma / np.sqrt(var + eps)
        W2 = W * factor.reshape((-1,) + (1,) * (W.ndim - 1))
        b2 = (b - mean) * factor + beta
        wname, bname = f"{src.name or src.output[0]}_bnfold_W", f"{src.name or src.output[0]}_bnfold_B"
        g.initializer.extend([numpy_helper.from_array(W2.astype(np.float32), wname),
                              numpy_helper.from_array(b2.astype(np.float32), bname)])
        del src.input[1:]
        src.input.extend([wname, bname])
        src.output[0] = bn.output[0]
        remove.append(bn)
        folded += 1
    for n in remove:
        g.node.remove(n)
    prune_initializers(model)
    return model, folded


def prune_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node (or subgraph) uses any more, and their graph-input entries."""
    used = {o.name for o in model.graph.output}
    for n in model.graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used.update(i for sn in a.g.node for i in sn.input)
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every name `node` reads, those its subgraphs take from the outer scope included."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        names += [i for g in graphs for sn in g.node for i in node_reads(sn)]
    return names


def upstream_nodes(graph: onnx.GraphProto, tensors: list[str], available=frozenset()) -> list[onnx.NodeProto]:
    """The nodes of `graph` that `tensors` depend on, in graph order, not looking past the
    `available` tensors (values a caller already has)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    keep: set[int] = set()
    stack = list(tensors)
    while stack:
        t = stack.pop()
        n = producer.get(t) if t not in available else None
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(node_reads(n))
    return [n for n in graph.node if id(n) in keep]


def boundary(nodes: list[onnx.NodeProto], constants: set[str]) -> list[str]:
    """The names `nodes` read that none of them computes (constants excluded), sorted: what a
    submodel of them must be fed."""
    made = {o for n in nodes for o in n.output if o}
    return sorted({t for n in nodes for t in node_reads(n)} - made - constants)


def input_infos(values: dict[str, np.ndarray]) -> list[onnx.ValueInfoProto]:
    """Graph inputs for a submodel fed these arrays: their element types and sizes, the batch
    axis left symbolic."""
    return [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                               ["N", *a.shape[1:]] if a.ndim else [])
            for t, a in values.items()]


def submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
             outputs: list[str]) -> onnx.ModelProto:
    """A model of `nodes` from `model` (its initializers, functions and opsets), with those inputs
    and the named outputs; initializers nothing reads are dropped."""
    g = model.graph
    given = {i.name for i in inputs}
    graph = onnx.helper.make_graph(nodes, g.name, inputs, [onnx.ValueInfoProto(name=t) for t in outputs],
                                   list(g.initializer), value_info=[v for v in g.value_info if v.name not in given])
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 functions=list(model.functions))
    prune_initializers(out)
    return out


def upstream(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """`model` cut down to the nodes that `tensors` depend on, with `tensors` as its outputs.
    onnxruntime runs every node of a graph whatever outputs a run asks for, so a calibration pass
    that needs one early tensor would otherwise pay for the whole network (convert --sequential
    makes one pass per layer). `model` itself when `tensors` are all graph inputs."""
    g = model.graph
    produced = {o for n in g.node for o in n.output if o}
    wanted = [t for t in dict.fromkeys(tensors) if t in produced]
    if not wanted:
        return model
    return submodel(model, upstream_nodes(g, wanted), list(g.input), wanted)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails the conversion (unknown shapes just stay unknown)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model
