"""The allocator's sensitivity probes: the network's first output with one layer replaced, run
from the float network's values at the boundary of what that layer changes.

A probe changes one layer; everything that does not depend on it equals the float network, so
only the layer and the nodes downstream of it need to run (ESPNet at 360×480: every probe had
run the whole network on 16 images, 69 of its 200 s of conversion). The float values the probes
read are computed segment by segment in graph order: each probe keeps those at its boundary, and
the next computes its own from them (in a chain, each float node once), as
calibrate.FrontierPasses does for the --sequential refit.
"""
from __future__ import annotations

import numpy as np
import onnx

from bdecomp.decomposer import feed
from bdecomp.decomposer.calibrate import _session, first_outputs
from bdecomp.decomposer.simplify import boundary, input_infos, node_reads, submodel, upstream_nodes


def downstream(nodes: list[onnx.NodeProto], start: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`start` and every node after it in `nodes` (graph order: topological) that reads what they
    or the nodes taken before compute, in graph order."""
    ids = {id(n) for n in start}
    made = {o for n in start for o in n.output if o}
    out = []
    for n in nodes:
        if id(n) in ids or any(t in made for t in node_reads(n)):
            out.append(n)
            made.update(o for o in n.output if o)
    return out


class ProbeRuns:
    """first_outputs of one-layer probes of `model` on the images `xs` (batch-1 arrays), layers
    probed in graph order. The float values a probe reads (its boundary) are kept for the next
    one, which computes its own from them. A skip tensor that a later layer's downstream reads is
    in the boundary of every layer it spans, so it stays; what a probe needs from outside the
    kept values (a parallel branch's own input) is computed again from the image. Memory: one
    probe's boundary for the images, which its own run needs anyway."""

    def __init__(self, model: onnx.ModelProto, xs: list[np.ndarray], threads: int | None):
        g = model.graph
        self.model, self.threads = model, threads
        self.input_name, self.dtype = feed.model_input(model)[0], feed.input_dtype(model)
        self.xs = [x.astype(self.dtype, copy=False) for x in xs]
        self.constants = {t.name for t in g.initializer}
        self.original = {n.SerializeToString() for n in g.node}
        # one image input, batch 1: anything else (a fixed batch of 8, a second input) runs whole networks
        self.whole = (feed.fixed_batch(model) not in (None, 1) or len({i.name for i in g.input} - self.constants) != 1
                      or any(len(x) != 1 for x in self.xs))
        self.cache: dict[str, list[np.ndarray]] = {}
        self.float_nodes_run = 0  # for tests: how much of the float network the probes recomputed

    def outputs(self, probe: onnx.ModelProto) -> list[np.ndarray] | None:
        """calibrate.first_outputs of `probe` (the model with this step's layer rewritten) on the
        images; None when the layer does not reach the first output (it is the float model's)."""
        if self.whole:
            return first_outputs(probe, self.xs, self.threads)
        changed = [n for n in probe.graph.node if n.SerializeToString() not in self.original]
        run = downstream(list(probe.graph.node), changed)
        out0 = probe.graph.output[0].name
        if out0 not in {o for n in run for o in n.output}:
            return None
        feeds = boundary(run, self.constants | {t.name for t in probe.graph.initializer})
        self._float_values(feeds)
        sess = _session(submodel(probe, run, input_infos(self._feed(feeds, 0)), [out0]), [], self.threads)
        return [np.asarray(sess.run([out0], self._feed(feeds, i))[0], np.float32) for i in range(len(self.xs))]

    def _feed(self, names: list[str], i: int) -> dict[str, np.ndarray]:
        return {t: self.xs[i] if t == self.input_name else self.cache[t][i] for t in names}

    def _float_values(self, names: list[str]) -> None:
        """Makes the cache hold the float values of `names` and nothing else, running only the
        nodes between what it held (or the image) and them."""
        have = set(self.cache) | {self.input_name}
        missing = [t for t in names if t not in have]
        if missing:
            nodes = upstream_nodes(self.model.graph, missing, have)
            reads = boundary(nodes, self.constants)  # ⊆ have: the walk stops there or at the image
            sess = _session(submodel(self.model, nodes, input_infos(self._feed(reads, 0)), missing), [], self.threads)
            values = [sess.run(missing, self._feed(reads, i)) for i in range(len(self.xs))]
            self.float_nodes_run += len(nodes)
            for j, t in enumerate(missing):
                self.cache[t] = [v[j] for v in values]
        self.cache = {t: v for t, v in self.cache.items() if t in names}  # what the probe itself holds
