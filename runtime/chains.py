"""Runs of native steps executed by one C call (native.Chain).

Between two onnxruntime segments a decomposed network is a run of quantizer and layer steps;
called one by one from Python they cost ~8 µs each (ResNet-56, 55 layers: ~10 % of its latency).
Once every layer of a run has settled how it runs for an input shape (kernel family chosen, static
quantizer, residual added in the kernel), the run is compiled into a native.Chain: one C call,
one arena for its intermediate tensors, the same C entry points and so the same bits.

A step joins a chain when it can run there for this input shape:
* a layer: a single settled way to run that is a direct convolution (not packed patches, not the
  depthwise kernel), its quantizer static and in the same chain, its residual (if any) a float32
  tensor of the output's shape (the kernel adds it, then clamps);
* a quantizer: static, and no step after the chain reads its output;
* an onnxruntime segment whose outputs nothing reads (skipped anyway);
* a channel Concat of batch-1 layer outputs, every one produced in the same chain: its layers
  write their parts of the concatenated buffer (native.Chain.concat), so it costs nothing.
Tensors a chain reads from outside (its quantizers' inputs, residuals) are its external inputs;
tensors it produces that later steps or the graph's outputs read are exported as arena views.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class ChainRun:
    """A compiled run of steps [start, end)."""

    start: int
    end: int
    chain: Any  # native.Chain
    externals: list[str] = field(default_factory=list)
    exports: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)

    def run(self, env: dict[str, Any], arenas: list) -> bool:
        """Run the chain and put its exports into env (views of its arena, appended with the
        chain to `arenas`: release them when the run's outputs no longer alias them); False
        (nothing done) if an external input does not have the shape the chain was built for."""
        ext = [np.ascontiguousarray(env[name], dtype=np.float32) for name in self.externals]
        if any(a.shape != s for a, s in zip(ext, self.chain.external_shapes)):
            return False
        arena = self.chain.run(ext)
        arenas.append((self.chain, arena))
        view = self.chain.view
        for name, ref, shape in self.exports:
            env[name] = view(arena, ref, shape)
        return True


def eligible_steps(steps, env: dict[str, Any], layer_way: Callable[[Any, dict], tuple | None]) -> list[bool]:
    """Per step, whether it can run in a chain on its own terms (before the chain-level rules).
    layer_way(step, env) → (kernel, family, (n, h, w), groups, channel axis, output shape) or None."""
    out = []
    for s in steps:
        if s.kind == "ort":
            out.append(s.session is None)
        elif s.kind == "quant":
            out.append(not s.spec.dynamic)
        elif s.kind == "concat":
            parts = [env.get(x) for x in s.inputs]
            out.append(all(type(p) is np.ndarray and p.dtype == np.float32 and p.ndim >= 2 and p.shape[0] == 1
                           for p in parts) and len({p.shape[2:] for p in parts}) == 1)
        else:
            out.append(layer_way(s, env) is not None)
    return out


def chain_spans(steps, elig: list[bool], needed_after: list[set[str]]) -> list[tuple[int, int]]:
    """Maximal runs of eligible steps where every layer's quantizer and every concatenated
    layer output is produced in the same run and no quantizer's output is read after it; runs
    without a layer are dropped."""
    elig = list(elig)
    producer = {}
    for i, s in enumerate(steps):
        if s.kind in ("quant", "layer"):
            producer[s.outputs[0]] = i
    while True:
        spans, i = [], 0
        while i < len(steps):
            if not elig[i]:
                i += 1
                continue
            j = i
            while j < len(steps) and elig[j]:
                j += 1
            spans.append((i, j))
            i = j
        changed = False
        for a, b in spans:
            for i in range(a, b):
                s = steps[i]
                if s.kind == "quant" and s.spec.outputs[0] in needed_after[b - 1]:
                    elig[i], changed = False, True
                elif s.kind == "layer" and not a <= producer.get(s.inputs[0], -1) < b:
                    elig[i], changed = False, True
                elif s.kind == "concat" and not all(a <= producer.get(x, -1) < b for x in s.inputs):
                    elig[i], changed = False, True
        if not changed:
            return [(a, b) for a, b in spans if any(steps[i].kind == "layer" for i in range(a, b))]


def build(steps, span: tuple[int, int], env: dict[str, Any], needed_after: list[set[str]], layer_way,
          chain_factory, isa: str | None, threads: int | None) -> ChainRun:
    """Compile steps[a:b] with the tensors of a completed run (env: shapes, quantizer steps)."""
    a, b = span
    chain = chain_factory()
    refs: dict[str, int] = {}  # tensor name → buffer reference (float32 tensors)
    shapes: dict[str, tuple[int, ...]] = {}
    packed: dict[tuple[str, int, int], int] = {}
    run = ChainRun(a, b, chain)

    def float_ref(name: str) -> int:
        if name not in refs:
            shape = tuple(np.shape(env[name]))
            refs[name], shapes[name] = chain.external(shape), shape
            run.externals.append(name)
        return refs[name]

    quant_inputs: dict[str, str] = {}
    for i in range(a, b):
        s = steps[i]
        if s.kind == "quant":
            quant_inputs[s.spec.outputs[0]] = s.spec.input
        elif s.kind == "layer":
            kernel, family, (n, h, w), groups, axis, out_shape = layer_way(s, env)
            qz = env[s.inputs[0]]
            key = (s.inputs[0], groups, axis)
            if key not in packed:
                src = float_ref(quant_inputs[s.inputs[0]])
                packed[key], _ = chain.quantize_pack(src, shapes[quant_inputs[s.inputs[0]]],
                                                     **qz.pack_options(groups, axis))
            residual = None if s.spec.residual is None else float_ref(s.spec.residual)
            out, _ = chain.conv(kernel, packed[key], n, h, w, residual=residual, isa=isa, threads=threads,
                                scale=s.spec.scale or qz.scale, zero_point=qz.zero_point, family=family)
            refs[s.spec.output], shapes[s.spec.output] = out, tuple(out_shape)
        elif s.kind == "concat":
            parts = [shapes[x] for x in s.inputs]
            refs[s.spec.output] = chain.concat([refs[x] for x in s.inputs])
            shapes[s.spec.output] = (1, sum(p[1] for p in parts), *parts[0][2:])
    produced = [steps[i].spec.output for i in range(a, b) if steps[i].kind in ("layer", "concat")]
    run.exports = [(name, refs[name], shapes[name]) for name in produced if name in needed_after[b - 1]]
    for _, ref, _ in run.exports:
        chain.keep(ref)
    return run

