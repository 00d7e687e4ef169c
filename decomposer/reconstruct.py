"""Block reconstruction: a layer A and the layer B that reads ReLU(A) refitted together.

At k = 2 the fit layer by layer leaves most of ResNet-56's error in the weights (with k = 8 and the
same activation bits its `--budget 9` file loses nothing). `fit.refit_codes` fits each layer to
its own float output; A's error then reaches B through ReLU and B's quantizer, where some of it is
clipped, some rounded away and the rest weighted by B. Fitting both layers' codes to B's float
output (BRECQ's block reconstruction, AdaRound's relaxed rounding: Li et al. 2021, Nagel et al.
2020) lets A spend its error where B does not see it.

Each weight chooses between the two values of its row's 2^k code values that bracket its float
weight, through a relaxed choice h ∈ [0, 1] (a rectified sigmoid) fitted by Adam on calibration
samples of the block, with a regulariser that drives h to 0 or 1. The scales stay as fitted (so
the file layout and the kernels are unchanged). Pure numpy on samples the sequential passes take:
`NestedSampler` (A's decomposed-network input around each sampled position of B's output) and
`TargetSampler` (the float network's B output there).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx

from bdecomp.decomposer import calibrate, decompose, fold
from bdecomp.decomposer.rewrite import Layer, Plan

ITERATIONS = 500
LEARNING_RATE = 0.05
BATCH = 256
REGULARISER = 0.01  # weight of the rounding regulariser, per weight, against the relative output error
WARMUP = 0.2  # fraction of the iterations without the regulariser
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed over the rest
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
HELD_OUT = 0.2  # share of the samples that only judge the result: kept only if it lowers their error
MAX_BYTES = 96 << 20  # nested patches per pair


@dataclass(frozen=True)
class Pair:
    """Plans a and b (indexes): b's input is ReLU(a's output), read by nothing else."""

    a: int
    b: int


def _out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + pad - dilation * (k - 1) - 1) // stride + 1


def find_pairs(model: onnx.ModelProto, plans: list[Plan]) -> list[Pair]:
    """The (A, B) pairs block reconstruction handles: ungrouped convolutions, both with calibrated
    quantizers, A's output read only by a Relu whose output only B reads. In a chain of such
    layers (VGG) the pairs do not overlap: a pair's samples of A's inputs are taken before the
    pair before it is refitted, so a layer in two pairs would be fitted to stale inputs."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in set(n.input):
            readers.setdefault(t, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    by_input: dict[str, list[int]] = {}
    for i, p in enumerate(plans):
        by_input.setdefault(p.layer.input, []).append(i)
    pairs: list[Pair] = []
    taken: set[int] = set()
    for i, p in enumerate(plans):
        r = readers.get(p.layer.output, [])
        if len(r) != 1 or r[0].op_type != "Relu" or p.layer.output in graph_outputs:
            continue
        act = r[0].output[0]
        if len(readers.get(act, [])) != 1 or len(by_input.get(act, [])) != 1 or act in graph_outputs:
            continue
        j = by_input[act][0]
        A, B = p.layer, plans[j].layer
        if (A.op == B.op == "Conv" and A.group == B.group == 1 and p.qparams is not None
                and plans[j].qparams is not None and j > i and i not in taken):
            pairs.append(Pair(i, j))
            taken.add(j)
    return pairs


def _positions(rng: np.random.Generator, n: int, oh: int, ow: int, per_image: int) -> tuple[np.ndarray, ...]:
    """Sorted sample of (image, y, x) output positions, the same for both samplers of a pair."""
    total = n * oh * ow
    pick = np.sort(rng.choice(total, min(per_image * n, total), replace=False))
    ni, rem = np.divmod(pick, oh * ow)
    oy, ox = np.divmod(rem, ow)
    return ni, oy, ox


class _Sampler:
    """What calibrate.collect_stats / FrontierPasses feed: `tensor`, `update(x)`, `count`."""

    def __init__(self, tensor: str, cap: int, per_image: int, seed: int):
        self.tensor, self.cap, self.per_image, self.seed = tensor, cap, per_image, seed
        self.rng = np.random.default_rng(seed)
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self.count = 0

    def fresh(self):
        new = copy.copy(self)
        new.rng, new.chunks, new.count = np.random.default_rng(self.seed), [], 0
        return new

    def update(self, x: np.ndarray) -> None:
        if self.count >= self.cap:
            return
        rows = self._take(x)
        rows = tuple(np.ascontiguousarray(r[: self.cap - self.count]) for r in rows)
        self.chunks.append(rows)
        self.count += len(rows[0])

    def _take(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(parts) for parts in zip(*self.chunks))


def nested_cap(A: Layer, B: Layer) -> int:
    taps = int(np.prod(B.weight_shape[2:]))
    return int(max(256, min(8192, MAX_BYTES // (4 * taps * A.depth))))


class NestedSampler(_Sampler):
    """At sampled positions of B's output: A's input patches for each of B's taps, [m, T, D_A]
    in A's (c, ky, kx) order, and whether each tap lies inside B's input (else B reads padding)."""

    def __init__(self, A: Layer, B: Layer, per_image: int, seed: int):
        super().__init__(A.input, nested_cap(A, B), per_image, seed)
        self.A, self.B = A, B

    def b_grid(self, h: int, w: int) -> tuple[int, int, int, int]:
        A, B = self.A, self.B
        (akh, akw), (bkh, bkw) = A.weight_shape[2:], B.weight_shape[2:]
        ha = _out_size(h, akh, A.strides[0], A.pads[0] + A.pads[2], A.dilations[0])
        wa = _out_size(w, akw, A.strides[1], A.pads[1] + A.pads[3], A.dilations[1])
        return (ha, wa, _out_size(ha, bkh, B.strides[0], B.pads[0] + B.pads[2], B.dilations[0]),
                _out_size(wa, bkw, B.strides[1], B.pads[1] + B.pads[3], B.dilations[1]))

    def _take(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        A, B = self.A, self.B
        n, c, h, w = x.shape
        ha, wa, oh, ow = self.b_grid(h, w)
        ni, oy, ox = _positions(self.rng, n, oh, ow, self.per_image)
        (akh, akw), (bkh, bkw) = A.weight_shape[2:], B.weight_shape[2:]
        by = (oy * B.strides[0] - B.pads[0])[:, None] + np.arange(bkh)[None] * B.dilations[0]  # [m, bkh]
        bx = (ox * B.strides[1] - B.pads[1])[:, None] + np.arange(bkw)[None] * B.dilations[1]
        by, bx = np.repeat(by, bkw, axis=1), np.tile(bx, (1, bkh))  # [m, T], (ky, kx) order
        valid = (by >= 0) & (by < ha) & (bx >= 0) & (bx < wa)
        by, bx = np.clip(by, 0, ha - 1), np.clip(bx, 0, wa - 1)
        xp = np.pad(x, ((0, 0), (0, 0), (A.pads[0], A.pads[2]), (A.pads[1], A.pads[3])))
        iy = (by * A.strides[0])[..., None] + np.arange(akh)[None, None] * A.dilations[0]  # [m, T, akh]
        ix = (bx * A.strides[1])[..., None] + np.arange(akw)[None, None] * A.dilations[1]
        P = xp[ni[:, None, None, None, None], np.arange(c)[None, None, :, None, None],
               iy[:, :, None, :, None], ix[:, :, None, None, :]]
        return P.reshape(len(ni), bkh * bkw, -1).astype(np.float32), valid


class TargetSampler(_Sampler):
    """B's output channels at the positions a NestedSampler of the same seed and cap takes."""

    def __init__(self, nested: NestedSampler):
        super().__init__(nested.B.output, nested.cap, nested.per_image, nested.seed)

    def _take(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        n, _, oh, ow = x.shape
        ni, oy, ox = _positions(self.rng, n, oh, ow, self.per_image)
        return (x[ni, :, oy, ox].astype(np.float32),)


def _layer_input(P: np.ndarray, plan: Plan) -> np.ndarray:
    """Patches [..., D] as the decomposed layer multiplies them (fold.py units, quantized)."""
    L, qp = plan.layer, plan.qparams
    unit = fold.unit_qparams(qp) if qp.channel_scales else qp
    flat = P.reshape(-1, 1, P.shape[-1])
    return calibrate.quantize_dequantize(fold.fold_patches(flat, L, qp), unit).reshape(P.shape)


def _bracket(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per weight: the row's code values just below and above its float weight (the lowest /
    highest where it lies outside them), and their codes."""
    dec, W = plan.dec, plan.layer.weight
    vals = dec.coeffs.astype(np.float64) @ decompose.code_table(dec.k).T  # [Cout, 2^k]
    order = np.argsort(vals, axis=1, kind="stable")
    sv = np.take_along_axis(vals, order, axis=1)
    above = np.stack([np.searchsorted(sv[r], W[r]) for r in range(len(W))])
    hi_i = np.clip(above, 0, sv.shape[1] - 1)
    lo_i = np.clip(above - 1, 0, sv.shape[1] - 1)
    return (np.take_along_axis(sv, lo_i, axis=1), np.take_along_axis(sv, hi_i, axis=1),
            np.take_along_axis(order, lo_i, axis=1).astype(np.uint8), np.take_along_axis(order, hi_i, axis=1).astype(np.uint8))


def _h(alpha: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-alpha)) * np.float32(ZETA - GAMMA) + np.float32(GAMMA), 0, 1)


def _dh(alpha: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-alpha))
    raw = s * np.float32(ZETA - GAMMA) + np.float32(GAMMA)
    return s * (1 - s) * np.float32(ZETA - GAMMA) * ((raw > 0) & (raw < 1))


class _Relaxed:
    """One layer's relaxed codes: value = lo + h(α)·(hi − lo), started at its current codes."""

    def __init__(self, plan: Plan):
        lo, hi, self.code_lo, self.code_hi = _bracket(plan)
        now = plan.dec.reconstruct()
        W = plan.layer.weight.astype(np.float64)
        span = hi - lo
        frac = np.where(span > 0, (W - lo) / np.where(span > 0, span, 1), 0.5)
        # the current code where it is one of the two (most weights), else the float weight's place
        p = np.where(np.isclose(now, hi) & (span > 0), 0.8, np.where(np.isclose(now, lo) & (span > 0), 0.2, frac))
        p = np.clip(p, 0.01, 0.99)
        s = (p - GAMMA) / (ZETA - GAMMA)
        self.lo, self.span = lo.astype(np.float32), span.astype(np.float32)
        self.alpha = np.log(s / (1 - s)).astype(np.float32)
        self.m = np.zeros_like(self.alpha)
        self.v = np.zeros_like(self.alpha)

    def soft(self) -> np.ndarray:
        return self.lo + _h(self.alpha) * self.span

    def hard(self) -> np.ndarray:
        return self.lo + (_h(self.alpha) >= 0.5) * self.span

    def codes(self) -> np.ndarray:
        return np.where(_h(self.alpha) >= 0.5, self.code_hi, self.code_lo)

    def step(self, grad_value: np.ndarray, t: int, reg: float, beta: float) -> None:
        dh = _dh(self.alpha)
        g = grad_value * self.span * dh
        if reg:
            x = 2 * _h(self.alpha) - 1
            g = g - reg * 2 * beta * np.abs(x) ** (beta - 1) * np.sign(x) * dh
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        mh, vh = self.m / (1 - 0.9 ** t), self.v / (1 - 0.999 ** t)
        self.alpha = (self.alpha - LEARNING_RATE * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)


class _Block:
    """B(Q_B(ReLU(A(Q_A(x))))) on nested samples, and its gradient with respect to A's and B's
    weight values (through ReLU and, straight-through, B's quantizer)."""

    def __init__(self, A: Plan, B: Plan):
        qb = B.qparams
        self.taps = int(np.prod(B.layer.weight_shape[2:]))
        self.ca = A.layer.cout
        steps = np.asarray(qb.channel_scales if qb.channel_scales else [qb.scale] * self.ca, np.float32)
        self.steps = steps[None, None, :]  # per channel of ReLU(A)
        self.folded = qb.channel_scales is not None  # B's weights carry the steps: it reads the codes
        self.zp, self.qmax = qb.zero_point, (1 << qb.bits) - 1
        self.bias_a = A.layer.bias.astype(np.float32)
        self.bias_b = B.layer.bias.astype(np.float32)

    def forward(self, xa: np.ndarray, valid: np.ndarray, va: np.ndarray, vb: np.ndarray):
        h = xa @ va.T + self.bias_a  # [m, T, Ca]
        r = np.rint(np.maximum(h, 0) * valid[..., None] / self.steps) + self.zp
        inside = (r >= 0) & (r <= self.qmax)
        q = np.clip(r, 0, self.qmax) - self.zp
        if not self.folded:
            q = q * self.steps
        qv = q.astype(np.float32).transpose(0, 2, 1).reshape(len(q), -1)  # B's (c, ky, kx) order
        return qv @ vb.T + self.bias_b, (h, inside, qv, valid)

    def backward(self, xa: np.ndarray, vb: np.ndarray, gy: np.ndarray, cache) -> tuple[np.ndarray, np.ndarray]:
        h, inside, qv, valid = cache
        gvb = gy.T @ qv
        gq = (gy @ vb).reshape(len(gy), self.ca, self.taps).transpose(0, 2, 1)
        if not self.folded:
            gq = gq * self.steps
        gh = (gq * (inside & (h > 0) & valid[..., None]) / self.steps).astype(np.float32)
        gva = gh.reshape(-1, self.ca).T @ xa.reshape(-1, xa.shape[-1])
        return gva, gvb


def _error(block: _Block, xa, valid, y, va, vb) -> float:
    out, _ = block.forward(xa, valid, va, vb)
    return float(((out - y).astype(np.float64) ** 2).sum() / max((y.astype(np.float64) ** 2).sum(), 1e-30))


def reconstruct_pair(A: Plan, B: Plan, patches: np.ndarray, valid: np.ndarray, target: np.ndarray,
                     seed: int = 0, iterations: int = ITERATIONS) -> tuple[decompose.Decomposition,
                                                                             decompose.Decomposition, float, float]:
    """Refit A's and B's codes together to B's float output `target` [m, Cout_B] from A's inputs
    `patches` [m, T, D_A] (the decomposed network's, original units) with B's taps `valid` [m, T].
    Returns (A's decomposition, B's, relative output error on the held-out samples before, after);
    the starting codes come back unchanged when the result does not lower that error."""
    xa = _layer_input(patches, A)
    m = len(xa)
    held = max(1, int(m * HELD_OUT))
    order = np.random.default_rng(seed).permutation(m)
    fit_i, test_i = np.sort(order[held:]), np.sort(order[:held])
    block = _Block(A, B)
    ra, rb = _Relaxed(A), _Relaxed(B)
    before = _error(block, xa[test_i], valid[test_i], target[test_i],
                    A.dec.reconstruct().astype(np.float32), B.dec.reconstruct().astype(np.float32))
    rng = np.random.default_rng(seed + 1)
    energy = float((target[fit_i].astype(np.float64) ** 2).sum() / len(fit_i)) or 1.0
    for t in range(1, iterations + 1):
        idx = fit_i[rng.integers(0, len(fit_i), min(BATCH, len(fit_i)))]
        x, v, y = xa[idx], valid[idx], target[idx]
        va, vb = ra.soft(), rb.soft()
        out, cache = block.forward(x, v, va, vb)
        gy = (2.0 / (len(idx) * energy)) * (out - y)
        gva, gvb = block.backward(x, vb, gy.astype(np.float32), cache)
        done = (t - 1) / iterations
        reg = REGULARISER if done >= WARMUP else 0.0
        beta = BETA[0] + (BETA[1] - BETA[0]) * max(0.0, (done - WARMUP) / (1 - WARMUP))
        ra.step(gva, t, reg, beta)
        rb.step(gvb, t, reg, beta)
    after = _error(block, xa[test_i], valid[test_i], target[test_i], ra.hard(), rb.hard())
    if not after < before:
        return A.dec, B.dec, before, before
    return (decompose.Decomposition(ra.codes(), A.dec.coeffs, A.dec.k),
            decompose.Decomposition(rb.codes(), B.dec.coeffs, B.dec.k), before, after)
