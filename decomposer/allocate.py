"""Per-layer (k, Q) allocation under a budget: `convert --budget KQ` and `--target-drop D`.

Cost of a layer is MACs·kernel_cost(k, Q, its channels): the cheaper of the two kernel families, in
k·Q units (lookup tables: grow with k, and with Q above 4 by their byte counters' flushes and
table sets;
popcount: k in 4 or 8 lanes, Q bit planes plus fixed costs); the budget is the MAC-weighted mean
of that cost.
Error of a layer at (k, Q) is its relative output error on calibration patches — the bases for k
fitted to the layer's float output (fit.output_fits; weight-only with `--method weight`), the
layer's own calibrated quantizer for Q, bias corrected — computed from Gram
statistics so the whole k × Q grid costs one Gram matrix per Q (only the Q the cost model can
prefer, `useful_qs`) — times the layer's measured
sensitivity (how much of it reaches the network's output, `sensitivity`). The allocation
minimises the sum of the layers' errors for a given budget by Lagrangian relaxation (each layer independently picks
argmin err + λ·cost; λ bisected to meet the budget).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bdecomp.decomposer import calibrate, decompose, fold

K_CHOICES = tuple(range(1, 9))
Q_CHOICES = tuple(range(2, 9))
MIN_ALLOCATED_K = 2  # see allocatable
GRAM_MAX_DEPTH = 4608


@dataclass
class LayerCosts:
    """err[k_index, q_index] (relative output MSE), the layer's MACs and its kernel cost grid
    (cost_grid of its input channels; the default is that of 64 or more)."""

    name: str
    macs: int
    err: np.ndarray
    cost: np.ndarray = field(default_factory=lambda: cost_grid())


def layer_errors(weight: np.ndarray, group: int, sampler: calibrate.PatchSampler,
                 qparams_for: Callable[[int], calibrate.QParams],
                 decomps: dict[int, decompose.Decomposition], qs=Q_CHOICES) -> np.ndarray:
    """Relative output MSE of one layer for every (k, Q) in K_CHOICES × Q_CHOICES, with the
    quantizer `qparams_for(Q)` and the bases `decomps[k]` (fit.output_fits or weight-only) of the
    unfolded weight: per-channel steps are applied to the inputs, and these bases stand in for those
    of the folded weight, which are not fitted at this stage. Only the Q in `qs` are measured
    (`useful_qs`); the others are inf."""
    P = sampler.patches()
    cout_g = weight.shape[0] // group
    err = np.zeros((len(K_CHOICES), len(Q_CHOICES)))
    err[:, [Q_CHOICES.index(q) for q in Q_CHOICES if q not in qs]] = np.inf
    den = 0.0
    n, depth = P.shape[0], P.shape[2]
    # the Gram route costs D²·P once per Q plus D²·Cout per k, the direct one P·D·Cout per k: the
    # latter wins for wide layers with few patches (ResNet-50's layer4: ~4x fewer flops)
    use_gram = depth <= GRAM_MAX_DEPTH and depth * depth * (n + len(K_CHOICES) * cout_g) <= len(K_CHOICES) * n * depth * cout_g
    for g in range(group):
        rows = slice(g * cout_g, (g + 1) * cout_g)
        X = P[:, g, :]
        Y = X @ weight[rows].T.astype(np.float32)
        den += float((Y.astype(np.float64) ** 2).sum())
        for qi, q in enumerate(Q_CHOICES):
            if q not in qs:
                continue
            qp = qparams_for(q)
            es = (None if qp.channel_scales is None
                  else fold.element_scales(qp.channel_scales, group, weight.shape[1])[g])
            Xh = calibrate.quantize_dequantize(X, qp, es)
            if use_gram:
                G = (Xh.T @ Xh).astype(np.float64)
                T = (Xh.T @ Y).astype(np.float64)
                mx = Xh.mean(axis=0, dtype=np.float64)
                my = Y.mean(axis=0, dtype=np.float64)
            for ki, k in enumerate(K_CHOICES):
                V = decomps[k].reconstruct()[rows]  # [cout_g, D]
                if use_gram:
                    sse = float(((V @ G) * V).sum() - 2 * (V * T.T).sum() + (Y.astype(np.float64) ** 2).sum())
                    shift = my - V @ mx  # bias correction removes the mean error
                    sse -= len(X) * float((shift ** 2).sum())
                else:
                    diff = Y - Xh @ V.T.astype(np.float32)
                    diff = diff - diff.mean(axis=0)
                    sse = float((diff.astype(np.float64) ** 2).sum())
                err[ki, qi] += max(sse, 0.0)
    return err / den if den > 0 else err


def weighted(err: np.ndarray, sensitivity: float) -> np.ndarray:
    """A layer's error grid times its sensitivity, ruled-out entries (inf) kept out: a layer whose
    error does not reach the output has sensitivity 0, and inf·0 = NaN, which argmin takes first
    (it gave such a layer k = 1, the choice `allocatable` rules out)."""
    out = np.full_like(err, np.inf, dtype=np.float64)
    np.multiply(err, sensitivity, out=out, where=~np.isinf(err))
    return out


def useful_qs(cost: np.ndarray) -> tuple[int, ...]:
    """The Q in Q_CHOICES that some allocatable k prices below every larger Q: a Q that costs at
    least as much as a larger one at every k buys nothing the larger one does not give (more bits,
    less error), so layer_errors need not measure it. With 64 or more input channels per group the
    lookup-table kernel prices Q = 3 as Q = 4 and Q = 6, 7 as Q = 8 (16–32 channels: also Q = 2
    and 5, where popcount is not cheaper either), which saves 3 (5) of the 7 quantizers' Gram
    matrices per layer."""
    ks = [i for i, k in enumerate(K_CHOICES) if k >= MIN_ALLOCATED_K]
    return tuple(q for j, q in enumerate(Q_CHOICES)
                 if any(all(cost[i, j] < cost[i, jj] for jj in range(j + 1, len(Q_CHOICES))) for i in ks))


def allocatable(err: np.ndarray) -> np.ndarray:
    """A free layer's error grid with k below MIN_ALLOCATED_K ruled out. One basis (sign codes
    times one scale per output) looks cheap and good enough layer by layer, but the grid
    underestimates what it does to the network: SqueezeNet `--budget 9` put conv10 (the
    classifier) at k = 1 and scored 34.3 % top-1 on 1,000 held-out images, 48.3 % without k = 1;
    ResNet-56 `--budget 9` chose it for 3 of 55 layers, and without it top-1 rose on two
    calibration subsets (128 and 500 images) and two disjoint 1,000-image evaluation sets by
    +0.7 / +1.3 / +1.9 / +1.0 points (agreement +0.5…+1.1). Allocations without k = 1 are
    unchanged (SqueezeNet `--budget 16`: the same file). A layer config can still give k = 1."""
    out = np.array(err, dtype=np.float64, copy=True)
    out[: K_CHOICES.index(MIN_ALLOCATED_K)] = np.inf
    return out


def kernel_cost(k: int, q: int, cin_g: int = 64) -> float:
    """Work per MAC of the faster native kernel family for a layer with cin_g input channels per
    group, in k·Q units (the lookup-table kernel at (4, 4) = 16), modelled on per-layer timings of
    both families (benchmarks/bench_families.py; AVX-512 VPOPCNTDQ Zen 4, one thread, 3×3 and 1×1
    layers of 16–512 channels, k = 2…8, Q = 2…8; on AVX2 popcount is slower still):

    * lookup tables: 4·k up to Q = 4; 5·k at Q = 5 (one table set, its byte counters flushed every
      second lookup: measured 1.04–1.31x Q = 4, median 1.2); 7·k at Q = 6 (one set flushed after
      every lookup: 1.2–1.9x, median 1.7) and Q = 7, 8 (two sets: 1.3–1.95x, median 1.78);
    * popcount: 0.9·KP·(Q + 2), KP = k rounded up to 4 or 8 lanes, times the share of each 64-bit
      word that input channels leave empty. Its fixed costs per bit plane and per output made it
      slower than the tables in 50 of 56 timings; only (8, 2) and (4, 2) on 128+ channels come
      out even (0.9–1.3x, the model says 0.9). The model before priced popcount at KP·Q, i.e.
      (4, 2) at half of (4, 4), and ResNet-56 `--budget 9` filled 16 layers with (4, 2), which ran
      at 88 % of (4, 4)'s time.

    The tables' lanes (cout_g·k) run in 32-lane blocks, so 25 output channels at k = 2 fill 50 of
    64; counting that made the model price ESPNet's 25-channel layers' third basis at 1.5x the
    second, when fixed per-pixel costs keep the real step at ~1.2x, and its `--budget 16` fell from
    55.8 to 51.7 mIoU (55.7 without it): blocks are left out.
    (4, 4) → 16, (2, 4) → 8, (3, 3) → 12, (4, 2) → 14.4, (4, 5) → 20, (8, 2) → 28.8, (2, 8) → 14,
    (8, 8) → 56."""
    return min(lut_cost(k, q), popcount_cost(k, q, cin_g))


def lut_cost(k: int, q: int) -> float:
    """The lookup-table kernel's share of kernel_cost: 4 per basis; Q = 5: 5/4 of that; Q > 5: 7/4."""
    return 4 * k * (1.0 if q <= 4 else 1.25 if q == 5 else 1.75)


def popcount_cost(k: int, q: int, cin_g: int = 64) -> float:
    """The popcount kernel's share of kernel_cost: 0.9·KP·(Q + 2) per full 64-bit word."""
    return 0.9 * (4 if k <= 4 else 8) * (q + 2) * (-(-cin_g // 64) * 64 / cin_g)


def cost_grid(cin_g: int = 64) -> np.ndarray:
    """kernel_cost over K_CHOICES × Q_CHOICES for a layer with cin_g input channels per group."""
    return np.array([[kernel_cost(k, q, cin_g) for q in Q_CHOICES] for k in K_CHOICES], np.float64)


def allocate(layers: list[LayerCosts], budget: float) -> list[tuple[int, int]]:
    """(k, Q) per layer minimising Σ err subject to a MAC-weighted mean kernel_cost ≤ budget."""
    total = float(sum(L.macs for L in layers)) or 1.0

    def pick(lam: float) -> tuple[list[tuple[int, int]], float]:
        choice, cost = [], 0.0
        for L in layers:
            obj = L.err + lam * (L.macs / total) * L.cost
            ki, qi = np.unravel_index(int(np.argmin(obj)), obj.shape)
            choice.append((K_CHOICES[ki], Q_CHOICES[qi]))
            cost += L.macs / total * L.cost[ki, qi]
        return choice, cost

    choice, cost = pick(0.0)
    if cost <= budget:
        return choice
    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)[0]


def _mac_mean(layers: list[LayerCosts], values) -> float:
    """Σ MACs·value / Σ MACs over the layers (values: one per layer, in order)."""
    total = float(sum(L.macs for L in layers)) or 1.0
    return float(sum(L.macs * v for L, v in zip(layers, values)) / total)


def mac_weighted_cost(layers: list[LayerCosts], choice: list[tuple[int, int]]) -> float:
    return _mac_mean(layers, (L.cost[K_CHOICES.index(k), Q_CHOICES.index(q)] for L, (k, q) in zip(layers, choice)))


def mac_weighted_kq(layers: list[LayerCosts], choice: list[tuple[int, int]]) -> float:
    return _mac_mean(layers, (k * q for k, q in choice))


BUDGETS = (2, 3, 4, 5, 6, 8, 9, 10, 12, 16, 20, 25, 30, 36, 42, 49, 56, 64)
EVAL_IMAGES = 128
SENSITIVITY_IMAGES = 16
PROBE = (2, 4)  # (k, Q) a layer is put at, alone, to measure how its error reaches the output


def centered(x: np.ndarray) -> np.ndarray:
    """x minus its mean over the class axis (axis 1: per image, or per pixel of a dense output),
    as float64: the part of logits that softmax and argmax see (a common offset changes neither)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=1, keepdims=True) if x.ndim >= 2 and x.shape[1] > 1 else x


def output_energy(reference: list[np.ndarray], centre: bool = True) -> float:
    """Σ of the squared (centred) reference outputs: sensitivity's denominator, the same for every
    layer (pass it as `energy` to compute it once)."""
    c = centered if centre else (lambda x: np.asarray(x, dtype=np.float64))
    return sum(float(np.square(c(a)).sum()) for a in reference)


def sensitivity(reference: list[np.ndarray], outputs: list[np.ndarray], layer_error: float | None,
                centre: bool = True, energy: float | None = None) -> float:
    """How much of a layer's own relative output error reaches the network's output: relative
    squared error of the outputs when only this layer is decomposed (at PROBE), divided by that
    layer's relative squared output error on its calibration patches. Multiplying the layer's
    error grid by it makes the allocation's Σ err an estimate of the *network's* output error
    (errors of different layers add up about linearly when small), instead of counting an early
    layer's 1 % the same as a last layer's 1 %.

    Outputs are compared `centered` over classes: a shift common to all logits is most of their
    energy (SqueezeNet: the centred part is 17 % of it) and changes no decision. With raw logits
    the classifier conv10 at (2, 4) reached 0.80 % relative error for 19 points of agreement lost
    (300 held-out images), and fire9-expand3x3 at (2, 4) 0.45 % for 4.3 points; centred, 4.6 %
    and 1.5 %, in proportion to the damage. With raw errors and kernel_cost's pricing, SqueezeNet
    `--budget 16` traded conv10's third basis for Q = 8 elsewhere: 63.2 % top-1 on 1,000 held-out
    images; centred, 69.4 % (85.2 % agreement with float, as the previous pricing's 70.5 %).
    ResNet-56's logits carry no common offset: the same files either way. Outputs that are not
    class scores (feed.output_task "outputs", e.g. a detector's boxes beside its scores) are
    compared raw (`centre=False`): their axis 1 is not a set of classes."""
    c = centered if centre else (lambda x: np.asarray(x, dtype=np.float64))
    # centring is linear: c(a) − c(b) = c(a − b), one pass over the (dense: ESPNet 16 × 12 × 360 ×
    # 480) outputs instead of two; the difference of float32 outputs is exact in float64
    num = sum(float(np.square(c(np.asarray(a, np.float64) - b)).sum()) for a, b in zip(reference, outputs))
    den = output_energy(reference, centre) if energy is None else energy
    if not layer_error or den == 0:
        return 1.0
    return (num / den) / layer_error ** 2


def agreement(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Share of argmax decisions (per image, or per pixel for dense outputs) that agree."""
    same = total = 0
    for a, b in zip(reference, outputs):
        pa, pb = a.argmax(axis=1), b.argmax(axis=1)
        same += int((pa == pb).sum())
        total += pa.size
    return same / total if total else 1.0


def search_budget(costs: list[LayerCosts], fixed: dict[int, tuple[int, int]], target_drop: float,
                  evaluate) -> tuple[list[tuple[int, int]], list[dict]]:
    """Smallest budget in BUDGETS whose allocation keeps calibration agreement ≥ 1 − drop/100.

    `evaluate(choice) -> agreement` builds and runs the candidate (weight-only bases with bias
    correction, so the final data-aware fit can only do better). Bisection over the sorted
    budgets: agreement grows with the budget in practice; the largest budget is taken if none
    qualifies."""
    tried: list[dict] = []

    def choice_for(b: float) -> list[tuple[int, int]]:
        ch = allocate(costs, b)
        return [fixed.get(i, c) for i, c in enumerate(ch)]

    lo, hi = 0, len(BUDGETS) - 1
    best = choice_for(BUDGETS[hi])
    while lo <= hi:
        mid = (lo + hi) // 2
        ch = choice_for(BUDGETS[mid])
        agr = evaluate(ch)
        tried.append({"budget": BUDGETS[mid], "mac_weighted_kq": mac_weighted_kq(costs, ch),
                      "mac_weighted_cost": mac_weighted_cost(costs, ch), "agreement": agr})
        if 100 * (1 - agr) <= target_drop:
            best, hi = ch, mid - 1
        else:
            lo = mid + 1
    return best, tried
