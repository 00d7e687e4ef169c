"""Pure-numpy metrics for `bdecomp compare`: top-k accuracy, agreement, segmentation confusion
matrices (pixel accuracy, IoU), SQNR and latency statistics.

Conventions (tested in tests/test_metrics.py):

* top-k ties: when several classes have the same score, the **lower class index wins** (a stable
  sort of the negated scores), so results never depend on the sort implementation.
* segmentation: the confusion matrix has ground truth in rows and prediction in columns. Pixels
  whose *ground truth* is the ignore index are left out entirely; a *prediction* of the ignore
  class (or of any class index ≥ the number of classes) on a labelled pixel counts as an error.
  IoU of class c = TP / (TP + FP + FN); classes with TP + FP + FN = 0 (absent from both the labels
  and the predictions) have no IoU (NaN) and are left out of the mean; the ignore class never counts.
* SQNR = 10·log10(Σ y² / Σ (y − ŷ)²) in dB (∞ when equal).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------- classification


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class indices by decreasing score; ties go to the lower class index."""
    s = np.asarray(scores)
    if s.ndim == 1:
        s = s[None]
    s = s.reshape(s.shape[0], -1)
    k = max(1, min(int(k), s.shape[1]))
    return np.argsort(-s.astype(np.float64), axis=1, kind="stable")[:, :k]


def topk_correct(scores: np.ndarray, labels: Sequence[int], k: int) -> np.ndarray:
    """Bool [N]: is the label among the top k (tie rule of topk_indices)."""
    idx = topk_indices(scores, k)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
    return (idx == lab).any(axis=1)


class ClassificationAccumulator:
    """Counts top-1 / top-5 hits of one model over a streamed data set (labels may be None)."""

    def __init__(self) -> None:
        self.n = 0
        self.top5_hits = 0
        self.predictions: list[int] = []
        self.top1_correct: list[bool] = []  # per labelled image, in order (for paired_difference)

    @property
    def n_labelled(self) -> int:
        return len(self.top1_correct)

    def update(self, scores: np.ndarray, labels: Sequence[int | None]) -> np.ndarray:
        s = np.asarray(scores).reshape(len(labels), -1)
        pred = topk_indices(s, 1)[:, 0]
        self.predictions.extend(int(p) for p in pred)
        self.n += len(labels)
        have = [i for i, lab in enumerate(labels) if lab is not None]
        if have:
            lab = np.array([labels[i] for i in have], dtype=np.int64)
            self.top1_correct.extend(bool(h) for h in topk_correct(s[have], lab, 1))
            self.top5_hits += int(topk_correct(s[have], lab, 5).sum())
        return pred

    def result(self) -> dict:
        if not self.n_labelled:
            return {"top1": None, "top5": None, "n_labelled": 0}
        return {"top1": sum(self.top1_correct) / self.n_labelled, "top5": self.top5_hits / self.n_labelled,
                "n_labelled": self.n_labelled}


def paired_difference(correct_a: Sequence[bool], correct_b: Sequence[bool], z: float = 1.96) -> dict | None:
    """Top-1 of b minus top-1 of a on the same images, with its normal-approximation confidence
    interval from the per-image differences (paired: only images where exactly one model is right
    add variance). SqueezeNet `--budget 16` on 1,000 ImageNet images (85 % agreement): −2.9 points,
    95 % interval −4.9 to −0.9, so settings 1 point apart are not told apart there; users comparing
    them on their own images need to see that. None without images; one image gives an interval of zero width."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} vs {b.size} images")
    if not a.size:
        return None
    d = b.astype(np.float64) - a
    half = z * float(d.std(ddof=1)) / np.sqrt(d.size) if d.size > 1 else 0.0
    mean = float(d.mean())
    return {"diff": mean, "low": mean - half, "high": mean + half, "z": z, "n": int(d.size),
            "only_a": int((a & ~b).sum()), "only_b": int((b & ~a).sum())}


def agreement(pred_a: Sequence[int] | np.ndarray, pred_b: Sequence[int] | np.ndarray) -> float | None:
    """Fraction of equal entries (top-1 classes, or mask pixels)."""
    a, b = np.asarray(pred_a).ravel(), np.asarray(pred_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"agreement: shapes differ ({a.shape} vs {b.shape})")
    return float((a == b).mean()) if a.size else None


# ---------------------------------------------------------------- segmentation


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int | None = None) -> np.ndarray:
    """[C, C+1] int64 counts (rows: ground truth 0..C-1, columns: prediction 0..C-1, and a last
    column for predictions outside 0..C-1). Ground-truth pixels equal to `ignore_index` or outside
    0..C-1 are skipped; `ignore_index` may be < C (its row then stays zero)."""
    p = np.asarray(pred).astype(np.int64).ravel()
    t = np.asarray(target).astype(np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction and label sizes differ: {np.shape(pred)} vs {np.shape(target)}")
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    p, t = p[keep], t[keep]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    return np.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


def segmentation_scores(cm: np.ndarray, ignore_index: int | None = None) -> dict:
    """Pixel accuracy, mean IoU and per-class IoU (list, None where undefined) of a matrix from
    confusion_matrix (extra prediction column allowed)."""
    cm = np.asarray(cm, dtype=np.int64)
    c = cm.shape[0]
    tp = np.diag(cm[:, :c]).astype(np.float64)
    total = cm.sum()
    gt = cm.sum(axis=1).astype(np.float64)  # includes predictions in the extra column
    predicted = cm[:, :c].sum(axis=0).astype(np.float64)
    union = gt + predicted - tp
    iou = np.full(c, np.nan)
    ok = union > 0
    iou[ok] = tp[ok] / union[ok]
    valid = ok.copy()
    if ignore_index is not None and 0 <= ignore_index < c:
        valid[ignore_index] = False
        iou[ignore_index] = np.nan
    return {
        "pixel_acc": float(tp.sum() / total) if total else None,
        "miou": float(iou[valid].mean()) if valid.any() else None,
        "per_class_iou": [None if math.isnan(v) else float(v) for v in iou],
        "n_pixels": int(total),
    }


def bootstrap_miou_difference(cms_a: Sequence[np.ndarray], cms_b: Sequence[np.ndarray],
                              ignore_index: int | None = None, resamples: int = 1000, level: float = 0.95,
                              seed: int = 0) -> dict | None:
    """mIoU of b minus mIoU of a over the same images (their per-image confusion matrices), with a
    paired percentile-bootstrap interval: mIoU is a ratio of sums over the whole set, not a mean of
    per-image values, so the images are resampled (the same draw for both models) and the
    difference recomputed. Fixed seed: the same report for the same predictions. None without
    images."""
    A, B = np.asarray(cms_a, np.int64), np.asarray(cms_b, np.int64)
    if A.shape != B.shape:
        raise ValueError(f"bootstrap_miou_difference: {A.shape} vs {B.shape}")
    if not len(A):
        return None
    miou = lambda cm: segmentation_scores(cm, ignore_index)["miou"]
    whole_a, whole_b = miou(A.sum(0)), miou(B.sum(0))
    if whole_a is None or whole_b is None:
        return None
    diff = whole_b - whole_a
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(A), len(A))
        da, db = miou(A[idx].sum(0)), miou(B[idx].sum(0))
        if da is not None and db is not None:
            draws.append(db - da)
    low, high = (np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if draws else (diff, diff))
    return {"diff": diff, "low": float(low), "high": float(high), "level": level, "n": len(A),
            "resamples": resamples}


# ---------------------------------------------------------------- layers


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10·log10(Σ y² / Σ (y − ŷ)²); +inf when identical, -inf when the reference is all zero."""
    y = np.asarray(reference, dtype=np.float64)
    e = y - np.asarray(approx, dtype=np.float64)
    return sqnr_db_of(float((y * y).sum()), float((e * e).sum()))


def sqnr_db_of(signal: float, noise: float) -> float:
    """10·log10(signal / noise) from energies already summed; +inf without noise, -inf without signal."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class FidelityAccumulator:
    """How close a model's raw outputs stay to the reference model's, per output tensor, over a
    streamed set of images (axis 0 of every output is the image): SQNR over the whole set, each
    image's relative L2 error ‖ŷ − y‖ / ‖y‖ (median and p90; ∞ where y = 0 ≠ ŷ), the largest
    absolute difference. For outputs no label can score (detector heads, depth maps)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.signal = [0.0] * len(self.names)
        self.noise = [0.0] * len(self.names)
        self.max_abs = [0.0] * len(self.names)
        self.rel: list[list[float]] = [[] for _ in self.names]

    def update(self, reference: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> None:
        for i, (y, yh) in enumerate(zip(reference, approx)):
            y = np.asarray(y, dtype=np.float64)
            y = y.reshape(len(y), -1) if y.ndim else y.reshape(1, 1)
            e = y - np.asarray(yh, dtype=np.float64).reshape(y.shape)
            sig, noise = (y * y).sum(axis=1), (e * e).sum(axis=1)
            self.signal[i] += float(sig.sum())
            self.noise[i] += float(noise.sum())
            self.max_abs[i] = max(self.max_abs[i], float(np.abs(e).max()) if e.size else 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(noise == 0, 0.0, np.sqrt(noise / sig))
            self.rel[i].extend(float(r) for r in rel)

    def result(self) -> dict[str, dict]:
        out = {}
        for i, name in enumerate(self.names):
            rel = np.asarray(self.rel[i])
            out[name] = {"sqnr_db": sqnr_db_of(self.signal[i], self.noise[i]), "rel_err_median": float(np.median(rel)) if rel.size else None,
                         "rel_err_p90": float(np.percentile(rel, 90, method="higher")) if rel.size else None,
                         "max_abs_err": self.max_abs[i]}
        return out


def decomposed_bits_per_weight(k: int, depth: int) -> float:
    """Storage of one output channel of a decomposed layer per original weight:
    (k·D basis bits + 32·k scale bits + 32 bias bits) / D."""
    return (k * depth + 32 * k + 32) / depth


# ---------------------------------------------------------------- latency


def latency_stats(seconds: Sequence[float]) -> dict:
    """Median, p10/p90, mean and the 95% confidence interval of the median (order statistics,
    distribution-free) in milliseconds, plus its half-width relative to the median."""
    t = np.sort(np.asarray(seconds, dtype=np.float64)) * 1e3
    n = t.size
    if n == 0:
        return {"runs": 0, "median_ms": None, "p90_ms": None}
    med = float(np.median(t))
    lo_i = max(0, int(math.floor(n / 2 - 0.98 * math.sqrt(n))))
    hi_i = min(n - 1, int(math.ceil(n / 2 + 0.98 * math.sqrt(n))))
    ci = (float(t[lo_i]), float(t[hi_i]))
    return {"runs": int(n), "median_ms": med, "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()), "min_ms": float(t[0]),
            "median_ci95_ms": list(ci),
            "median_rel_ci": float((ci[1] - ci[0]) / 2 / med) if med > 0 else None}
