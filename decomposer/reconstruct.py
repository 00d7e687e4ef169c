"""Block reconstruction: a layer A and the layers that read ReLU(A) refitted together.

(ReLU, a Clip such as ReLU6, or none: ESPNet's reduce convolution feeds its dilated branches
directly. In MobileNet the readers are the pointwise layers behind a float depthwise layer and its
Clip, which the block passes through.)

At k = 2 the fit layer by layer leaves most of ResNet-56's error in the weights (with k = 8 and the
same activation bits its `--budget 9` file loses nothing). `fit.refit_codes` fits each layer to
its own float output; A's error then reaches its readers through ReLU and their quantizers, where
some of it is clipped, some rounded away and the rest weighted by their weights. Fitting A's and
the readers' codes to the readers' float outputs (BRECQ's block reconstruction with AdaRound's
relaxed rounding: Li et al. 2021, Nagel et al. 2020) lets A put its error where they do not see it.

Each weight chooses between the two of its row's 2^k code values that bracket its float weight,
through a relaxed choice h ∈ [0, 1] (a rectified sigmoid) fitted by Adam on calibration samples of
the block, with a regulariser that drives h to 0 or 1. The scales (whose code values bound the
choice) and A's bias are fitted along at small steps; the code width, so the file layout and the
kernels, stay as they were. Pure numpy on samples the sequential passes take:
`NestedSampler` (A's decomposed-network input around each sampled output position of the readers)
and `TargetSampler` (the float network's reader outputs there).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from bdecomp.decomposer import calibrate, decompose, fold, simplify
from bdecomp.decomposer.rewrite import Layer, Plan
from bdecomp.runtime.graph import clip_bounds

ITERATIONS = 500
LEARNING_RATE = 0.05
BATCH = 256
REGULARISER = 0.01  # weight of the rounding regulariser, per weight, against the relative output error
WARMUP = 0.2  # fraction of the iterations without the regulariser
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed over the rest
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
HELD_OUT = 0.2  # share of the samples that only judge the result: kept only if it lowers their error
MAX_BYTES = 96 << 20  # nested patches per block
MIN_SAMPLES = 1024  # blocks whose first layer is so deep that MAX_BYTES holds fewer positions are left alone
MIN_SAMPLED = 256  # nor blocks whose calibration images gave fewer positions
MAX_STEP_FLOPS = 2e9  # nor blocks whose every step costs more (~15 s a block here; VGG-16's conv3-5 pairs)
SCALE_RATE = 0.003  # Adam step of the scales, relative to each row's mean scale
BIAS_RATE = 0.003  # and of A's bias, relative to the spread of each of its outputs


Bounds = tuple[float, float]  # an activation clip(x, lo, hi): ReLU (0, inf), ReLU6 (0, 6)
RELU: Bounds = (0.0, np.inf)
LINEAR: Bounds = (-np.inf, np.inf)


@dataclass(frozen=True, eq=False)  # (keys of the sequential refit's samplers, by identity)
class Block:
    """A layer (plan index `a`) and the layers reading act(a's output), which nothing else reads:
    decomposed ones (plan indexes `readers`) and ones left float (`fixed`: their Layers), the
    latter fitted for too (their output error counts) but not changed. `act` is ReLU, a Clip or
    LINEAR (the readers read a's output itself).
    With `through` (a float depthwise convolution, MobileNet's), the readers are pointwise and
    read act'(through(act(a's output))) instead, `through_act` being act'."""

    a: int
    readers: tuple[int, ...]
    fixed: tuple[Layer, ...] = ()
    act: Bounds = RELU
    through: Layer | None = None
    through_act: Bounds = RELU

    @property
    def last(self) -> int:
        """The plan after whose refit the block is refitted."""
        return max(self.readers)


def _taps(L: Layer) -> list[tuple[int, int]]:
    """(dy, dx) of every tap, (ky, kx) order, relative to output position × stride."""
    kh, kw = L.weight_shape[2:]
    return [(ky * L.dilations[0] - L.pads[0], kx * L.dilations[1] - L.pads[1]) for ky in range(kh) for kx in range(kw)]


def _grid(L: Layer) -> tuple:
    """What fixes a convolution's output grid on a given input, whatever its size."""
    kh, kw = L.weight_shape[2:]
    return (L.strides, L.pads[0] + L.pads[2] - L.dilations[0] * (kh - 1),
            L.pads[1] + L.pads[3] - L.dilations[1] * (kw - 1))


def _plain_2d(L: Layer) -> bool:
    """An ungrouped 2-D convolution (the samplers' patch geometry)."""
    return L.op == "Conv" and L.group == 1 and len(L.weight_shape) == 4


def _depthwise(L: Layer) -> bool:
    return L.op == "Conv" and len(L.weight_shape) == 4 and L.weight_shape[1] == 1 and L.group == L.cout > 1


def _pointwise(L: Layer) -> bool:
    """Reads one input position per output position, the same one (its grid is its input's)."""
    return (_plain_2d(L) and tuple(L.weight_shape[2:]) == (1, 1) and tuple(L.strides) == (1, 1)
            and not any(L.pads))


def sampled_taps(readers: list[Layer], through: Layer | None = None) -> list[tuple[int, int]]:
    """The taps a block's samples of A's output cover, sorted: every reader's, or `through`'s
    (which its pointwise readers read)."""
    return sorted({t for L in ([through] if through is not None else readers) for t in _taps(L)})


def find_blocks(model: onnx.ModelProto, plans: list[Plan], layers: list[Layer]) -> list[Block]:
    """The blocks reconstruction handles: ungrouped convolutions with calibrated quantizers whose
    output is read only by convolutions (at least one decomposed, all on the same output grid: a
    fire module's expand 1×1 and 3×3, ESPNet's dilated branches), directly or through a ReLU or
    constant Clip, or through a float depthwise convolution and its ReLU / Clip to pointwise
    ones (MobileNet); within `affordable`'s memory and time. In a chain (VGG, MobileNet's
    pointwise layers) consecutive blocks share a layer, the reader of one being the first layer
    of the next: the sequential refit samples a block's inputs in its last reader's pass, after
    the block before it is refitted."""
    readers = simplify.consumers(model.graph)
    inits = simplify.initializers(model.graph)
    graph_outputs = {o.name for o in model.graph.output}
    plan_of = {p.layer.name: i for i, p in enumerate(plans)}
    layer_of = {L.name: L for L in layers}

    def activation(tensor: str) -> tuple[str, Bounds] | None:
        """The output and bounds of the ReLU / Clip that alone reads `tensor`, if it is one;
        `tensor` itself, unbounded, if only layers read it (ESPNet's reduce convolution)."""
        r = readers.get(tensor, [])
        if not r or tensor in graph_outputs:
            return None
        if all(n.name in layer_of for n in r):
            return tensor, LINEAR
        bounds = clip_bounds(r[0], inits) if len(r) == 1 else None
        if bounds is None or not bounds[0] < bounds[1] or r[0].output[0] in graph_outputs:
            return None
        return r[0].output[0], bounds

    blocks: list[Block] = []
    for i, p in enumerate(plans):
        A = p.layer
        found = activation(A.output) if _plain_2d(A) and p.qparams is not None else None
        if found is None:
            continue
        act, bounds = found
        nodes = readers.get(act, [])
        through, through_act = None, RELU
        if len(nodes) == 1 and nodes[0].name in layer_of and nodes[0].name not in plan_of:
            F = layer_of[nodes[0].name]
            if _depthwise(F) and F.input == act and (deeper := activation(F.output)):
                through, (act, through_act) = F, deeper
                nodes = readers.get(act, [])
        if not nodes or any(n.name not in layer_of for n in nodes):
            continue
        Ls = [layer_of[n.name] for n in nodes]
        if any(not _plain_2d(L) or L.input != act for L in Ls) or \
                len({_grid(L) for L in Ls}) != 1 or (through is not None and not all(map(_pointwise, Ls))):
            continue
        ours = [plan_of[L.name] for L in Ls if L.name in plan_of]
        if not ours or any(j <= i or plans[j].qparams is None for j in ours) or not affordable(A, Ls, through):
            continue
        blocks.append(Block(i, tuple(sorted(ours)), tuple(L for L in Ls if L.name not in plan_of),
                            bounds, through, through_act))
    return blocks


class _Sampler:
    """What calibrate.collect_stats / FrontierPasses feed: `tensor`, `update(x)`, `count`."""

    def __init__(self, tensor: str, cap: int, per_image: int, seed: int):
        self.tensor, self.cap, self.per_image, self.seed = tensor, cap, per_image, seed
        self.rng = np.random.default_rng(seed)
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self.count = 0

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


def nested_cap(A: Layer, readers: list[Layer], through: Layer | None = None) -> int:
    """How many positions a block's NestedSampler keeps."""
    return int(min(8192, MAX_BYTES // (4 * len(sampled_taps(readers, through)) * A.depth)))


def affordable(A: Layer, readers: list[Layer], through: Layer | None = None) -> bool:
    """Enough positions fit in memory and a step (A forward and its gradient: 4 flops per
    multiply-add, the others' 6) stays within MAX_STEP_FLOPS."""
    taps = len(sampled_taps(readers, through))
    flops = BATCH * (4 * taps * A.depth * A.cout + 6 * sum(L.depth * L.cout for L in readers)
                     + (6 * taps * through.cout if through is not None else 0))
    return nested_cap(A, readers, through) >= MIN_SAMPLES and flops <= MAX_STEP_FLOPS


class NestedSampler(_Sampler):
    """At sampled positions of the readers' output: A's input patches for each tap any reader
    (or `through`, which the readers read pointwise) has, [m, U, D_A] in A's (c, ky, kx) order,
    and whether each lies inside A's output (else padding is read there)."""

    def __init__(self, A: Layer, readers: list[Layer], per_image: int, seed: int, through: Layer | None = None):
        super().__init__(A.input, nested_cap(A, readers, through), per_image, seed)
        self.A, self.reader, self.through = A, through if through is not None else readers[0], through
        self.union = sampled_taps(readers, through)

    def tap_index(self, L: Layer) -> np.ndarray:
        """Where each of L's taps ((ky, kx) order) is in the sampled union; a reader behind
        `through` reads its one output position."""
        if self.through is not None and L is not self.through:
            return np.zeros(1, np.intp)
        return np.array([self.union.index(t) for t in _taps(L)], np.intp)

    def _take(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        A, B = self.A, self.reader
        n, _, h, w = x.shape
        ha, wa = calibrate.conv_out_size(h, w, A.weight_shape[2:], A.strides, A.pads, A.dilations)
        oh, ow = calibrate.conv_out_size(ha, wa, B.weight_shape[2:], B.strides, B.pads, B.dilations)
        ni, oy, ox = calibrate.sample_positions(self.rng, n, oh, ow, self.per_image)
        dy, dx = (np.array(d) for d in zip(*self.union))
        by = (oy * B.strides[0])[:, None] + dy[None]  # [m, U]: positions in B's input = A's output
        bx = (ox * B.strides[1])[:, None] + dx[None]
        valid = (by >= 0) & (by < ha) & (bx >= 0) & (bx < wa)
        P = calibrate.conv_patches(x, ni, np.clip(by, 0, ha - 1), np.clip(bx, 0, wa - 1), A.weight_shape[2:],
                                   A.strides, A.pads, A.dilations)
        return P.astype(np.float32), valid


class TargetSampler(_Sampler):
    """A reader's output channels at the positions its block's NestedSampler takes."""

    def __init__(self, nested: NestedSampler, reader: Layer):
        super().__init__(reader.output, nested.cap, nested.per_image, nested.seed)

    def _take(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        n, _, oh, ow = x.shape
        ni, oy, ox = calibrate.sample_positions(self.rng, n, oh, ow, self.per_image)
        return (x[ni, :, oy, ox].astype(np.float32),)


def _layer_input(P: np.ndarray, plan: Plan) -> np.ndarray:
    """Patches [..., D] as the decomposed layer multiplies them (fold.py units, quantized)."""
    flat = P.reshape(-1, 1, P.shape[-1])
    folded = fold.fold_patches(flat, plan.layer, plan.qparams)
    return calibrate.quantize_dequantize(folded, fold.layer_quantizer(plan.qparams)).reshape(P.shape)


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
            np.take_along_axis(order, lo_i, axis=1).astype(np.uint8),
            np.take_along_axis(order, hi_i, axis=1).astype(np.uint8))


def _h(alpha: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-alpha)) * np.float32(ZETA - GAMMA) + np.float32(GAMMA), 0, 1)


def _dh(alpha: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-alpha))
    raw = s * np.float32(ZETA - GAMMA) + np.float32(GAMMA)
    return s * (1 - s) * np.float32(ZETA - GAMMA) * ((raw > 0) & (raw < 1))


class _Adam:
    """Adam's moment estimates for one array (β 0.9, 0.999); `step` gives the normalised update."""

    def __init__(self, like: np.ndarray, eps: float):
        self.m, self.v, self.eps = np.zeros_like(like), np.zeros_like(like), eps

    def step(self, g: np.ndarray, t: int) -> np.ndarray:
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        return (self.m / (1 - 0.9 ** t)) / (np.sqrt(self.v / (1 - 0.999 ** t)) + self.eps)


class _Relaxed:
    """One layer's relaxed codes and its scales c: value = lo + h(α)·(hi − lo), lo and hi being
    the bracketing codes' signs times c; started at its current codes and scales."""

    def __init__(self, plan: Plan):
        lo, hi, self.code_lo, self.code_hi = _bracket(plan)
        now = plan.dec.reconstruct()
        self.start = now.astype(np.float32)  # the values it starts from, exactly
        W = plan.layer.weight.astype(np.float64)
        span = hi - lo
        frac = np.where(span > 0, (W - lo) / np.where(span > 0, span, 1), 0.5)
        # the current code where it is one of the two (most weights), else the float weight's place
        p = np.where(np.isclose(now, hi) & (span > 0), 0.8, np.where(np.isclose(now, lo) & (span > 0), 0.2, frac))
        p = np.clip(p, 0.01, 0.99)
        s = (p - GAMMA) / (ZETA - GAMMA)
        self.alpha = np.log(s / (1 - s)).astype(np.float32)
        self.coeffs = plan.dec.coeffs.astype(np.float32)
        table = decompose.code_table(plan.dec.k).astype(np.float32)
        self.sign_lo, self.sign_hi = table[self.code_lo], table[self.code_hi]  # [Cout, D, k]
        self.rate_c = SCALE_RATE * np.abs(self.coeffs).mean(axis=1, keepdims=True)
        self.adam_alpha, self.adam_c = _Adam(self.alpha, 1e-8), _Adam(self.coeffs, 1e-30)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.einsum("rdj,rj->rd", self.sign_lo, self.coeffs)
        return lo, np.einsum("rdj,rj->rd", self.sign_hi, self.coeffs) - lo

    def soft(self) -> np.ndarray:
        lo, span = self._bounds()
        return lo + _h(self.alpha) * span

    def hard(self) -> np.ndarray:
        lo, span = self._bounds()
        return lo + (_h(self.alpha) >= 0.5) * span

    def codes(self) -> np.ndarray:
        return np.where(_h(self.alpha) >= 0.5, self.code_hi, self.code_lo)

    def step(self, grad_value: np.ndarray, t: int, reg: float, beta: float) -> None:
        h, dh = _h(self.alpha), _dh(self.alpha)
        _, span = self._bounds()
        gc = np.einsum("rd,rdj->rj", grad_value, self.sign_lo + h[..., None] * (self.sign_hi - self.sign_lo))
        g = grad_value * span * dh
        if reg:
            x = 2 * h - 1
            g = g - reg * 2 * beta * np.abs(x) ** (beta - 1) * np.sign(x) * dh
        self.alpha = (self.alpha - LEARNING_RATE * self.adam_alpha.step(g, t)).astype(np.float32)
        self.coeffs = (self.coeffs - self.rate_c * self.adam_c.step(gc, t)).astype(np.float32)


class _Reader:
    """One layer reading act(A): its taps in the sampled union, its quantizer (None: a float
    layer, which reads the float values) and bias."""

    def __init__(self, L: Layer, plan: Plan | None, taps: np.ndarray):
        self.taps, self.cin = taps, L.weight.shape[1] // len(taps)
        self.bias = L.bias.astype(np.float32)
        self.decomposed = plan is not None
        qp = plan.qparams if plan is not None else None
        self.quantized = qp is not None
        if qp is not None:
            steps = np.asarray(qp.channel_scales if qp.channel_scales else [qp.scale] * self.cin, np.float32)
            self.steps = steps[None, None, :]
            self.folded = qp.channel_scales is not None  # its weights carry the steps: it reads the codes
            self.zp, self.qmax = qp.zero_point, (1 << qp.bits) - 1

    def forward(self, a: np.ndarray, v: np.ndarray):
        a = a[:, self.taps, :]  # [m, T, C]
        inside = None
        if self.quantized:
            r = np.rint(a / self.steps) + self.zp
            inside = (r >= 0) & (r <= self.qmax)
            a = np.clip(r, 0, self.qmax) - self.zp
            if not self.folded:
                a = a * self.steps
        xv = a.astype(np.float32).transpose(0, 2, 1).reshape(len(a), -1)  # the layer's (c, ky, kx) order
        return xv @ v.T + self.bias, (inside, xv)

    def backward(self, v: np.ndarray, gy: np.ndarray, cache, ga: np.ndarray) -> np.ndarray | None:
        """Adds the gradient with respect to ReLU(A) into `ga`; returns the one of its own values."""
        inside, xv = cache
        gx = (gy @ v).reshape(len(gy), self.cin, len(self.taps)).transpose(0, 2, 1)
        if self.quantized:  # straight through the rounding, zero where clipped
            gx = gx * inside
            if self.folded:  # it reads a / step
                gx = gx / self.steps
        ga[:, self.taps, :] += gx
        return gy.T @ xv if self.decomposed else None


class _Block:
    """The readers' outputs from A's patches: R_j(act(A(Q_A(x)))), or R_j(act'(F(act(A(Q_A(x))))))
    through a float depthwise F, and their gradient with respect to A's and the decomposed
    readers' weight values (through the activations and, straight through, each reader's
    quantizer)."""

    def __init__(self, A: Plan, readers: list[_Reader], act: Bounds = RELU, through: Layer | None = None,
                 through_act: Bounds = RELU):
        self.readers, self.act, self.through_act = readers, act, through_act
        self.bias_a = A.layer.bias.astype(np.float32)
        self.through = None
        if through is not None:  # its weights [U, C], U its taps in the samples' order
            union = sampled_taps([], through)
            w = np.zeros((len(union), through.cout), np.float32)
            w[[union.index(t) for t in _taps(through)]] = through.weight.T
            self.through = (w, through.bias.astype(np.float32))

    def forward(self, xa: np.ndarray, valid: np.ndarray, va: np.ndarray, vs: list[np.ndarray]):
        h = xa @ va.T + self.bias_a  # [m, U, Ca]
        a = np.clip(h, *self.act) * valid[..., None]
        z = None
        if self.through is not None:
            w, b = self.through
            z = np.einsum("muc,uc->mc", a, w) + b
            a = np.clip(z, *self.through_act)[:, None, :]
        outs, caches = zip(*(r.forward(a, v) for r, v in zip(self.readers, vs)))
        return list(outs), (h, valid, z, a.shape, caches)

    def backward(self, xa: np.ndarray, vs: list[np.ndarray], gys: list[np.ndarray], cache):
        h, valid, z, shape, caches = cache
        ga = np.zeros(shape, np.float32)
        gvs = [r.backward(v, gy, c, ga) for r, v, gy, c in zip(self.readers, vs, gys, caches)]
        if z is not None:
            lo, hi = self.through_act
            gz = ga[:, 0, :] * ((z > lo) & (z < hi))
            ga = gz[:, None, :] * self.through[0][None]
        lo, hi = self.act
        gh = ga * ((h > lo) & (h < hi) & valid[..., None])
        return gh.reshape(-1, h.shape[-1]).T @ xa.reshape(-1, xa.shape[-1]), gh.sum(axis=(0, 1)), gvs


def _error(block: _Block, xa, valid, ys, va, vs) -> float:
    outs, _ = block.forward(xa, valid, va, vs)
    num = sum(float(((o - y).astype(np.float64) ** 2).sum()) for o, y in zip(outs, ys))
    return num / max(sum(float((y.astype(np.float64) ** 2).sum()) for y in ys), 1e-30)


def reconstruct_block(A: Plan, readers: list[Plan], fixed: list[Layer], taps: list[np.ndarray],
                      patches: np.ndarray, valid: np.ndarray, targets: list[np.ndarray], seed: int = 0,
                      iterations: int = ITERATIONS, act: Bounds = RELU, through: Layer | None = None,
                      through_act: Bounds = RELU) -> tuple[list[Plan], float, float]:
    """Refit A's and its decomposed readers' codes and scales, and A's bias, together to the
    readers' (decomposed, then `fixed`) float outputs `targets` [m, Cout_j] from A's input
    `patches` [m, U, D_A] (the decomposed network's, original units) with `valid` [m, U] taps;
    `taps` gives each reader's taps in U; `act` is A's activation, `through` and `through_act`
    a float depthwise layer and its activation between it and the readers. The decomposed
    readers' biases then take up their mean output shift: their bias correction was for their old
    codes, and a shift the per-position error barely weighs is what a global pooling after them
    passes on whole. Returns (A's and the readers' plans, relative
    output error on the held-out samples before, after); the plans come back unchanged when the
    result does not lower that error."""
    xa = _layer_input(patches, A)
    m = len(xa)
    held = max(1, int(m * HELD_OUT))
    order = np.random.default_rng(seed).permutation(m)
    fit_i, test_i = np.sort(order[held:]), np.sort(order[:held])
    block = _Block(A, [_Reader(p.layer, p, t) for p, t in zip(readers, taps)] +
                   [_Reader(L, None, t) for L, t in zip(fixed, taps[len(readers):])], act, through, through_act)
    relaxed = [_Relaxed(p) for p in [A] + readers]
    floats = [L.weight.astype(np.float32) for L in fixed]
    start = [r.start for r in relaxed]
    before = _error(block, xa[test_i], valid[test_i], [y[test_i] for y in targets], start[0], start[1:] + floats)
    rng = np.random.default_rng(seed + 1)
    adam_b = _Adam(block.bias_a, 1e-30)
    rate_b = BIAS_RATE * (xa[fit_i[:BATCH]] @ start[0].T).reshape(-1, A.layer.cout).std(axis=0)
    energy = sum(float((y[fit_i].astype(np.float64) ** 2).sum()) for y in targets) / len(fit_i) or 1.0
    for t in range(1, iterations + 1):
        idx = fit_i[rng.integers(0, len(fit_i), min(BATCH, len(fit_i)))]
        x = xa[idx]
        values = [r.soft() for r in relaxed]
        outs, cache = block.forward(x, valid[idx], values[0], values[1:] + floats)
        scale = np.float32(2.0 / (len(idx) * energy))
        gys = [scale * (o - y[idx]) for o, y in zip(outs, targets)]
        ga, gb, gvs = block.backward(x, values[1:] + floats, gys, cache)
        done = (t - 1) / iterations
        reg = REGULARISER if done >= WARMUP else 0.0
        beta = BETA[0] + (BETA[1] - BETA[0]) * max(0.0, (done - WARMUP) / (1 - WARMUP))
        for r, g in zip(relaxed, [ga] + gvs[:len(readers)]):
            r.step(g, t, reg, beta)
        block.bias_a = (block.bias_a - rate_b * adam_b.step(gb, t)).astype(np.float32)
    hard = [r.hard() for r in relaxed]
    outs, _ = block.forward(xa[fit_i], valid[fit_i], hard[0], hard[1:] + floats)
    shifts = [(targets[j][fit_i] - outs[j]).mean(axis=0, dtype=np.float64) for j in range(len(readers))]
    for reader, shift in zip(block.readers, shifts):
        reader.bias = (reader.bias + shift).astype(np.float32)
    after = _error(block, xa[test_i], valid[test_i], [y[test_i] for y in targets], hard[0], hard[1:] + floats)
    plans = [A] + readers
    if not after < before:
        return plans, before, before
    bias_a = A.layer.bias + (block.bias_a - A.layer.bias.astype(np.float32))  # in its own precision
    new = [Plan(replace(A.layer, bias=bias_a.astype(A.layer.bias.dtype)),
                decompose.Decomposition(relaxed[0].codes(), relaxed[0].coeffs, A.dec.k), A.q, A.qparams)]
    for p, r, shift in zip(readers, relaxed[1:], shifts):
        layer = replace(p.layer, bias=(p.layer.bias + shift).astype(p.layer.bias.dtype))
        new.append(Plan(layer, decompose.Decomposition(r.codes(), r.coeffs, p.dec.k), p.q, p.qparams))
    return new, before, after
