"""Activation statistics on calibration images and the quantizer parameters chosen from them.

The float model is run by onnxruntime with the decomposed layers' inputs added as outputs; each
batch updates per-tensor min/max and a bounded, seeded random sample of values, so memory does not
grow with the number of images. Step and zero point minimise the quantization MSE of that sample
(DESIGN §2), searched on a histogram so the search costs nothing next to the inference.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from bdecomp.decomposer import feed
from bdecomp.decomposer.simplify import boundary, input_infos, node_reads, submodel, upstream, upstream_nodes

SAMPLES_PER_BATCH = 8192
MAX_SAMPLES = 1 << 20
HIST_BINS = 2048


@dataclass
class TensorStats:
    """Running min/max and a bounded random sample of one tensor's values."""

    lo: float = np.inf
    hi: float = -np.inf
    chunks: list[np.ndarray] = field(default_factory=list)
    count: int = 0

    def update(self, x: np.ndarray, rng: np.random.Generator) -> None:
        flat = x.reshape(-1)
        finite = flat[np.isfinite(flat)]
        if finite.size == 0:
            return
        self.lo = min(self.lo, float(finite.min()))
        self.hi = max(self.hi, float(finite.max()))
        if finite.size > SAMPLES_PER_BATCH:
            finite = finite[rng.choice(finite.size, SAMPLES_PER_BATCH, replace=False)]
        self.chunks.append(finite.astype(np.float32, copy=True))
        self.count += finite.size
        if self.count > 2 * MAX_SAMPLES:
            self._shrink(rng)

    def _shrink(self, rng: np.random.Generator) -> None:
        allv = np.concatenate(self.chunks)
        self.chunks = [allv[rng.choice(allv.size, MAX_SAMPLES, replace=False)]]
        self.count = MAX_SAMPLES

    def sample(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(1, np.float32)


@dataclass(frozen=True)
class QParams:
    """Affine activation quantizer: q = clip(round(x/scale) + zero_point, 0, 2^bits − 1).

    With `channel_scales` every input channel c has its own step (x/channel_scales[c]) and all
    share the zero point; the consuming layers carry the steps in their weights (fold.py), so the
    binary inner product stays integer."""

    scale: float
    zero_point: int
    bits: int
    channel_scales: tuple[float, ...] | None = None


def qparams_from_range(lo: float, hi: float, bits: int) -> QParams:
    """Step and integer zero point for [lo, hi] widened to contain 0 (zero padding stays exact).
    A zero range (an all-zero input) gets step 1, so nothing divides by zero."""
    qmax = (1 << bits) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not hi > lo:
        return QParams(1.0, 0, bits)
    scale = np.float32((hi - lo) / qmax)
    if scale <= 0 or not np.isfinite(scale):
        return QParams(1.0, 0, bits)
    zp = int(np.clip(np.round(-lo / float(scale)), 0, qmax))
    return QParams(float(scale), zp, bits)


def _quant_mse(centers: np.ndarray, counts: np.ndarray, q: QParams) -> float:
    qmax = (1 << q.bits) - 1
    codes = np.clip(np.rint(centers / q.scale) + q.zero_point, 0, qmax)
    return float((counts * (centers - (codes - q.zero_point) * q.scale) ** 2).sum())


def choose_qparams(stats: TensorStats, bits: int, method: str = "mse") -> QParams:
    """`minmax`: the observed range. `mse`: the clipping range minimising the expected squared
    quantization error on the sample (a grid over the fractions of the negative and positive
    extremes kept; non-negative inputs keep z = 0)."""
    if not np.isfinite(stats.lo):
        return QParams(1.0, 0, bits)
    full = qparams_from_range(stats.lo, stats.hi, bits)
    if method == "minmax":
        return full
    if method != "mse":
        raise ValueError(f"unknown range method {method!r}")
    lo, hi = min(stats.lo, 0.0), max(stats.hi, 0.0)
    if not hi > lo:
        return full
    counts, edges = np.histogram(stats.sample(), bins=HIST_BINS, range=(lo, hi))
    centers = 0.5 * (edges[1:] + edges[:-1])
    fractions = np.concatenate([np.linspace(0.05, 1.0, 40), [1.0]])
    lo_fracs = fractions if lo < 0 else np.array([1.0])
    hi_fracs = fractions if hi > 0 else np.array([1.0])
    best, best_err = full, _quant_mse(centers, counts, full)
    for fl in lo_fracs:
        for fh in hi_fracs:
            q = qparams_from_range(lo * fl, hi * fh, bits)
            err = _quant_mse(centers, counts, q)
            if err < best_err:
                best, best_err = q, err
    return best


@dataclass
class ChannelStats:
    """Per-channel running min/max and a bounded seeded sample of positions (every channel at the
    same positions) of one tensor, channels along `axis` (1 for NCHW, −1 for rows of features)."""

    axis: int
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    chunks: list[np.ndarray] = field(default_factory=list)
    count: int = 0

    def update(self, x: np.ndarray, rng: np.random.Generator) -> None:
        v = np.moveaxis(np.asarray(x, np.float32), self.axis, 0)
        v = v.reshape(v.shape[0], -1)
        v = np.where(np.isfinite(v), v, np.float32(0))
        if v.shape[1] == 0:
            return
        lo, hi = v.min(axis=1), v.max(axis=1)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        cap = self.cap(v.shape[0])
        per_batch = max(1, min(v.shape[1], cap // 16))
        if v.shape[1] > per_batch:
            v = v[:, np.sort(rng.choice(v.shape[1], per_batch, replace=False))]
        self.chunks.append(np.ascontiguousarray(v))
        self.count += v.shape[1]
        if self.count > 2 * cap:
            allv = np.concatenate(self.chunks, axis=1)
            self.chunks = [allv[:, np.sort(rng.choice(allv.shape[1], cap, replace=False))]]
            self.count = cap

    @staticmethod
    def cap(channels: int) -> int:
        """Sample columns kept: about 2^19 values per tensor, 64..4096 per channel."""
        return int(np.clip((1 << 19) // max(1, channels), 64, 4096))

    def sample(self) -> np.ndarray:
        """[C, S] float32."""
        return np.concatenate(self.chunks, axis=1) if self.chunks else np.zeros((0, 1), np.float32)


CHANNEL_FRACTIONS = np.concatenate([np.linspace(0.1, 1.0, 24), [1.0]])


def choose_channel_scales(cs: ChannelStats, base: QParams, method: str = "mse") -> QParams:
    """Per-channel steps sharing `base`'s zero point: each channel's range (widened to contain 0)
    mapped onto the codes around z, then, for "mse", the fraction of it kept that minimises that
    channel's squared quantization error on the sample. A channel that is always 0 keeps
    `base.scale`. Returns `base` with channel_scales set."""
    if method not in ("mse", "minmax"):
        raise ValueError(f"unknown range method {method!r}")
    if cs.lo is None:
        return base
    z, qmax = base.zero_point, (1 << base.bits) - 1
    lo, hi = np.minimum(cs.lo, 0.0).astype(np.float64), np.maximum(cs.hi, 0.0).astype(np.float64)
    pos = hi / (qmax - z) if qmax > z else np.zeros_like(hi)
    neg = -lo / z if z > 0 else np.zeros_like(lo)
    full = np.maximum(pos, neg)
    # a range so small that a fraction of it underflows float32 (seen: ESPNet) counts as dead
    live = (full * min(CHANNEL_FRACTIONS)).astype(np.float32) >= np.finfo(np.float32).tiny
    scales = np.where(live, full, base.scale)
    if method == "mse" and live.any():
        V = cs.sample()[live].astype(np.float32)
        fl = full[live]

        def err(s: np.ndarray) -> np.ndarray:
            s32 = s.astype(np.float32)[:, None]
            codes = np.clip(np.rint(V / s32) + z, 0, qmax)
            return (((codes - z) * s32 - V) ** 2).sum(axis=1, dtype=np.float64)

        best, best_err = fl.copy(), err(fl)
        for f in CHANNEL_FRACTIONS:
            e = err(fl * f)
            better = e < best_err
            best, best_err = np.where(better, fl * f, best), np.where(better, e, best_err)
        scales[live] = best
    s32 = scales.astype(np.float32)
    s32 = np.where(np.isfinite(s32) & (s32 > 0), s32, np.float32(base.scale))
    return QParams(base.scale, base.zero_point, base.bits, tuple(float(v) for v in s32))


def _session(model: onnx.ModelProto, outputs: list[str], threads: int | None) -> ort.InferenceSession:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors surface as exceptions; logs would add lines to stderr
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _known(vi: onnx.ValueInfoProto | None) -> bool:
    """Whether every dimension past the batch is a number."""
    dims = feed.declared_dims(vi) if vi is not None else None
    return bool(dims) and None not in dims[1:]


def measure_shapes(model: onnx.ModelProto, x: np.ndarray, threads: int | None = None) -> dict[str, list[int]]:
    """The sizes of Conv inputs and outputs and MatMul inputs that shape inference left unknown,
    from one onnxruntime run on `x` (batch first). torch.onnx writes `chunk` / `split` as Slices
    with computed bounds (YOLOv8's C2f blocks), and every size after one is unknown to onnx's
    inference: the layers' MACs (report, --budget's weights, the speed model) then counted one
    pixel each and SAME padding could not be resolved. Never written into the output file (a fixed
    size could contradict a dynamic one). A conv input's size, which fixes SAME padding, is
    measured only when the model's input size is fixed: at any other size it could be wrong.
    {} when nothing is missing or the run fails."""
    g = model.graph
    vi = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    fixed_size = _known(vi.get(feed.model_input(model)[0]))
    wanted = []
    for n in g.node:
        if n.domain in ("", "ai.onnx") and n.op_type in ("Conv", "MatMul") and n.input:
            io = [n.input[0]] if n.op_type == "MatMul" else [n.input[0]] * fixed_size + [n.output[0]]
            wanted += [t for t in io if not _known(vi.get(t))]
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return {}
    try:
        sess = _session(model, wanted, threads)
        name, batch = sess.get_inputs()[0].name, feed.fixed_batch(model)
        x = np.repeat(x[:1], batch or 1, axis=0).astype(feed.input_dtype(model), copy=False)
        outs = sess.run(wanted, {name: x})
    except Exception:
        return {}
    return {t: list(np.shape(y)) for t, y in zip(wanted, outs)}


def first_outputs(model: onnx.ModelProto, xs: list[np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """The first output of `model` (float or decomposed, through onnxruntime) for each batch."""
    sess = _session(model, [], threads)
    name, dtype, batch = sess.get_inputs()[0].name, feed.input_dtype(model), feed.fixed_batch(model)
    return [np.asarray(feed.run_batched(lambda c: sess.run(None, {name: c}), x.astype(dtype, copy=False), batch)[0],
                       np.float32) for x in xs]


def collect_stats(model: onnx.ModelProto, tensors: list[str], batches: Iterable[np.ndarray],
                  threads: int | None = None, seed: int = 0,
                  on_batch: Callable[[int], None] | None = None,
                  samplers: "list[PatchSampler] | None" = None,
                  channel_stats: dict[tuple[str, int], ChannelStats] | None = None) -> dict[str, TensorStats]:
    """Run the float model over `batches` and gather statistics of `tensors` (graph inputs
    included); `samplers` also collect their layers' input patches and `channel_stats`, keyed by
    (tensor, channel axis), are updated in place."""
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    channel_stats = channel_stats or {}
    wanted = list(dict.fromkeys(list(tensors) + [sp.tensor for sp in samplers or ()] + [t for t, _ in channel_stats]))
    inner = [t for t in wanted if t not in graph_inputs]
    sess = _session(model, inner, threads)
    input_name, dtype, batch = sess.get_inputs()[0].name, feed.input_dtype(model), feed.fixed_batch(model)
    rng = np.random.default_rng(seed)
    channel_rng = np.random.default_rng(seed + 1)  # its own stream: tensor samples do not depend on it
    stats = {t: TensorStats() for t in tensors}
    for x, rows in (c for b in batches for c in feed.chunks(b.astype(dtype, copy=False), batch)):
        values = dict(zip(inner, sess.run(inner, {input_name: x}))) if inner else {}
        values.update({n: x for n in wanted if n in graph_inputs})
        values = {n: feed.real_rows(v, rows, batch) for n, v in values.items()}
        for t in tensors:
            stats[t].update(np.asarray(values[t], np.float32), rng)
        for (t, _), cs in channel_stats.items():
            cs.update(np.asarray(values[t], np.float32), channel_rng)
        for sp in samplers or ():
            sp.update(np.asarray(values[sp.tensor], np.float32))
        if on_batch:
            on_batch(rows)
    return stats


def conv_out_size(h: int, w: int, kernel, strides, pads, dilations) -> tuple[int, int]:
    """A convolution's output height and width on an h × w input (pads: top, left, bottom, right)."""
    (kh, kw), (sh, sw), (dh, dw), (t, l, b, r) = kernel, strides, dilations, pads
    return (h + t + b - (kh - 1) * dh - 1) // sh + 1, (w + l + r - (kw - 1) * dw - 1) // sw + 1


def sample_positions(rng: np.random.Generator, n: int, oh: int, ow: int,
                     per_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, y, x) of min(per_image·n, all) distinct output positions of n images, in order:
    two samplers with the same seed draw the same ones (reconstruct.py's pair of samplers)."""
    total = n * max(oh, 0) * max(ow, 0)
    pick = np.sort(rng.choice(total, min(per_image * n, total), replace=False))
    ni, rem = np.divmod(pick, max(oh * ow, 1))
    oy, ox = np.divmod(rem, max(ow, 1))
    return ni, oy, ox


def conv_patches(x: np.ndarray, ni: np.ndarray, oy: np.ndarray, ox: np.ndarray, kernel, strides, pads,
                 dilations) -> np.ndarray:
    """The im2col rows of x [n, C, H, W] at output positions (oy, ox) of images ni (any shape,
    ni broadcast against it from the left): [*oy.shape, C·KH·KW] in the weights' (c, ky, kx) order."""
    (kh, kw), (sh, sw), (dh, dw), (t, l, b, r) = kernel, strides, dilations, pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    ni = np.broadcast_to(ni.reshape(ni.shape + (1,) * (oy.ndim - ni.ndim)), oy.shape)
    iy = (oy * sh)[..., None] + np.arange(kh) * dh  # [..., kh]
    ix = (ox * sw)[..., None] + np.arange(kw) * dw
    P = xp[ni[..., None, None, None], np.arange(x.shape[1])[:, None, None], iy[..., None, :, None],
           ix[..., None, None, :]]
    return P.reshape(oy.shape + (-1,))


class PatchSampler:
    """A seeded sample of one layer's input patches (im2col rows in the (c, ky, kx) order of the
    weights), for the data-aware fit. Memory is capped: at most `max_patches` rows, fewer for
    wide layers."""

    def __init__(self, tensor: str, depth: int, kind: str, kernel=(1, 1), strides=(1, 1),
                 pads=(0, 0, 0, 0), dilations=(1, 1), group: int = 1, per_image: int = 512,
                 max_bytes: int = 32 << 20, max_patches: int = 8192, seed: int = 0):
        self.tensor, self.depth, self.kind = tensor, depth, kind
        self.seed = seed
        self.rng = np.random.default_rng(seed)  # its own stream: patch positions don't depend on other layers
        self.kernel, self.strides, self.pads, self.dilations, self.group = kernel, strides, pads, dilations, group
        self.per_image = per_image
        self.cap = max(256, min(max_patches, max_bytes // (4 * depth * group)))
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def fresh(self) -> "PatchSampler":
        """An empty sampler of the same layer and seed: fed the same images, it samples the same
        positions (of another network's tensor there, for fit.refit_codes)."""
        new = copy.copy(self)
        new.rng, new.chunks, new.count = np.random.default_rng(self.seed), [], 0
        return new

    def update(self, x: np.ndarray) -> None:
        rng = self.rng
        if self.count >= self.cap:
            return
        if self.kind == "Conv":
            rows = self._conv_patches(x, rng)
        else:
            flat = x.reshape(-1, x.shape[-1])
            take = rng.choice(flat.shape[0], min(self.per_image, flat.shape[0]), replace=False)
            rows = flat[np.sort(take)][:, None, :]
        rows = rows[: self.cap - self.count]
        self.chunks.append(np.ascontiguousarray(rows, dtype=np.float32))
        self.count += rows.shape[0]

    def _conv_patches(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[m, G, D] patches at m random output positions of image 0.. of the batch."""
        n, _, h, w = x.shape
        oh, ow = conv_out_size(h, w, self.kernel, self.strides, self.pads, self.dilations)
        ni, oy, ox = sample_positions(rng, n, oh, ow, self.per_image)
        return conv_patches(x, ni, oy, ox, self.kernel, self.strides, self.pads, self.dilations).reshape(
            len(ni), self.group, -1)

    def patches(self) -> np.ndarray:
        """[P, G, D] float32."""
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, self.group, self.depth), np.float32)


def quantize_dequantize(x: np.ndarray, q: QParams, scales: np.ndarray | None = None) -> np.ndarray:
    """What the layer really sees: s·(clip(round(x/s) + z, 0, 2^Q − 1) − z); `scales` (broadcast
    against x) replaces q.scale for per-channel quantizers."""
    qmax = (1 << q.bits) - 1
    s = np.float32(q.scale) if scales is None else np.asarray(scales, np.float32)
    return ((np.clip(np.rint(x / s) + q.zero_point, 0, qmax) - q.zero_point) * s).astype(np.float32)



class FrontierPasses:
    """Patch samples of a sequence of partly decomposed networks (convert --sequential), each pass
    started from the values earlier passes left instead of from the images.

    Pass r needs the inputs of some layers in the network with every layer before them
    decomposed. What it computes upstream of those inputs depends on no layer decomposed later
    (graph order), so every later network computes the same values there: the tensors of that
    region that the rest of the graph reads (its frontier) are kept, and the next pass runs only
    the nodes between the frontier and its own layers' inputs. Without this, pass after pass
    recomputed the network from the image (quadratic in depth). A frontier larger than
    `max_bytes` is dropped (the next pass runs from the images and keeps its own); a pass that
    needs a value no pass kept, or any pass when the images are not in memory, runs from them."""

    def __init__(self, batches: Callable[[], Iterable[np.ndarray]], in_memory: bool, input_name: str, dtype: str,
                 batch: int | None, threads: int | None, max_bytes: int = 1 << 30):
        """`batches()` gives the images again on each call; `in_memory`: from memory (else no
        frontier is kept either)."""
        self.batches = batches
        self.chunks = [c for b in batches() for c in feed.chunks(b.astype(dtype, copy=False), batch)] if in_memory else []
        self.input_name, self.batch, self.threads, self.max_bytes = input_name, batch, threads, max_bytes
        self.kept: dict[str, list[np.ndarray]] | None = {} if in_memory else None  # None: every pass from the images
        self.done: set[str] = set()  # tensors of the region earlier passes computed

    def sample(self, model: onnx.ModelProto, samplers: "list[PatchSampler]") -> None:
        g = model.graph
        targets = list(dict.fromkeys(sp.tensor for sp in samplers))
        have = set(self.kept or ()) | {self.input_name}
        nodes = upstream_nodes(g, targets, have)
        feeds = boundary(nodes, {t.name for t in g.initializer})
        unmade = set(targets) - {o for n in nodes for o in n.output}
        if self.kept is None or not set(feeds) | unmade <= have:
            self.kept = None
            return self._from_images(model, samplers, targets)
        made = {o for n in nodes for o in n.output if o}
        self.done |= made
        outside = [n for n in g.node if not set(o for o in n.output if o) <= self.done]
        frontier = {t for n in outside for t in node_reads(n) if t in self.done}
        lost = frontier - set(self.kept) - made  # (after `forget`): recomputed when a pass needs them
        self.done -= lost
        frontier -= lost
        new = sorted(frontier - set(self.kept))
        wanted = [t for t in targets if t not in have] + [t for t in new if t not in targets]
        values = self._run(model, nodes, feeds, wanted) if wanted else [{} for _ in self.chunks]
        for i, (x, rows) in enumerate(self.chunks):
            got = values[i]
            for sp in samplers:
                v = got[sp.tensor] if sp.tensor in got else x if sp.tensor == self.input_name else self.kept[sp.tensor][i]
                sp.update(np.asarray(feed.real_rows(v, rows, self.batch), np.float32))
        kept = {t: v for t, v in self.kept.items() if t in frontier}
        kept.update({t: [got[t] for got in values] for t in new})
        # too large: the next pass runs from the images and keeps its own frontier if that fits
        self.kept = kept if sum(a.nbytes for v in kept.values() for a in v) <= self.max_bytes else {}

    def forget(self, model: onnx.ModelProto, tensor: str) -> None:
        """Drop what was computed from `tensor`, whose producer has changed (reconstruct.py
        refits a block's first layer after its readers' pass): every value downstream of it in
        `model`, and every kept value `model` does not name (tensors a rewrite added), to be safe.
        The next pass recomputes them from the values still kept, or runs from the images."""
        if self.kept is None:
            return
        stale = {tensor}
        for n in model.graph.node:  # (graph order is topological: one sweep reaches everything downstream)
            if stale.intersection(node_reads(n)):
                stale.update(o for o in n.output if o)
        named = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
        self.kept = {t: v for t, v in self.kept.items() if t not in stale and t in named}
        self.done = {t for t in self.done if t not in stale and t in named}

    def _run(self, model, nodes, feeds, wanted) -> list[dict[str, np.ndarray]]:
        first = {t: (self.chunks[0][0] if t == self.input_name else self.kept[t][0]) for t in feeds}
        sess = _session(submodel(model, nodes, input_infos(first), wanted), [], self.threads)
        out = []
        for i, (x, _) in enumerate(self.chunks):
            f = {t: (x if t == self.input_name else self.kept[t][i]) for t in feeds}
            out.append(dict(zip(wanted, sess.run(wanted, f))))
        return out

    def _from_images(self, model, samplers, targets) -> None:
        collect_stats(upstream(model, targets), [], self.batches(), threads=self.threads, samplers=samplers)
