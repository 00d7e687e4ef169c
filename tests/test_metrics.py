"""bdecomp.runtime.metrics on tiny hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bdecomp.runtime import metrics


# ---------------------------------------------------------------- top-k


def test_topk_ties_go_to_the_lower_class_index():
    s = np.array([[1.0, 3.0, 3.0, 2.0]])
    assert metrics.topk_indices(s, 1).tolist() == [[1]]
    assert metrics.topk_indices(s, 3).tolist() == [[1, 2, 3]]
    assert not metrics.topk_correct(s, [2], 1)[0]  # tied with class 1, which wins
    assert metrics.topk_correct(s, [2], 2)[0]


def test_topk_all_equal_scores_take_the_first_k_classes():
    s = np.zeros((1, 8), np.float32)
    assert metrics.topk_indices(s, 5).tolist() == [[0, 1, 2, 3, 4]]
    assert metrics.topk_correct(s, [4], 5)[0] and not metrics.topk_correct(s, [5], 5)[0]


def test_topk_with_fewer_classes_than_k():
    s = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert metrics.topk_indices(s, 5).tolist() == [[1, 0], [0, 1]]
    assert metrics.topk_correct(s, [0, 1], 5).all()


def test_classification_accumulator_counts_hits_and_skips_unlabelled():
    acc = metrics.ClassificationAccumulator()
    s = np.array([[0, 5, 1, 2, 3, 4, 9], [9, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1.0]])
    # sample 0: top-1 = 6, label 1 → top-5 hit (ranks: 6, 1, 5, 4, 3); sample 1 top-1 hit; sample 2 unlabelled
    pred = acc.update(s, [1, 0, None])
    assert pred.tolist() == [6, 0, 0]
    r = acc.result()
    assert r == {"top1": 0.5, "top5": 1.0, "n_labelled": 2}
    assert acc.predictions == [6, 0, 0]


def test_paired_difference_by_hand():
    r = metrics.paired_difference([1, 1, 1, 0], [1, 0, 1, 1])
    # per-image differences 0, −1, 0, +1: mean 0, sample std √(2/3), half-width 1.96·√(2/3)/2
    assert r["diff"] == 0.0 and r["n"] == 4 and r["only_a"] == 1 and r["only_b"] == 1
    assert r["high"] == pytest.approx(1.96 * math.sqrt(2 / 3) / 2) and r["low"] == pytest.approx(-r["high"])


def test_paired_difference_of_identical_answers_has_no_width():
    r = metrics.paired_difference([1, 0, 1], [1, 0, 1])
    assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
    assert metrics.paired_difference([], []) is None
    with pytest.raises(ValueError):
        metrics.paired_difference([1], [1, 0])


def test_paired_difference_interval_covers_the_true_drop_about_95_percent_of_the_time():
    """Two models right on 80 % / 77 % of images, agreeing on most: the interval around the
    observed drop on 1,000 images must contain the true −3 points in ~95 % of repeats."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        u = rng.random(1000)
        a = u < 0.80
        b = (u < 0.74) | ((u >= 0.80) & (u < 0.83))  # right on 74 % shared + 3 % a missed: 77 %
        r = metrics.paired_difference(a, b)
        covered += r["low"] <= -0.03 <= r["high"]
    assert 0.93 <= covered / 2000 <= 0.97


def test_accumulator_keeps_per_image_top1_hits_of_labelled_images():
    acc = metrics.ClassificationAccumulator()
    acc.update(np.array([[0, 1.0], [1, 0], [1, 0]]), [1, 1, None])
    assert acc.top1_correct == [True, False]


def _image_cms(rng, n, wrong_rate):
    """Per-image confusion matrices of 3 classes, 400 pixels each, a share of them mislabelled."""
    out = []
    for _ in range(n):
        t = rng.integers(0, 3, 400)
        p = np.where(rng.random(400) < wrong_rate, (t + 1) % 3, t)
        out.append(metrics.confusion_matrix(p, t, 3))
    return out


def test_miou_difference_is_that_of_the_summed_matrices_and_its_interval_holds_it():
    rng = np.random.default_rng(1)
    a, b = _image_cms(rng, 40, 0.05), _image_cms(rng, 40, 0.15)
    r = metrics.bootstrap_miou_difference(a, b)
    miou = lambda cms: metrics.segmentation_scores(np.sum(cms, axis=0))["miou"]
    assert r["diff"] == pytest.approx(miou(b) - miou(a)) and r["diff"] < 0 and r["n"] == 40
    assert r["low"] <= r["diff"] <= r["high"] < 0  # 10 points worse on every image: resolved
    assert metrics.bootstrap_miou_difference(a, b) == r  # fixed seed


def test_miou_difference_of_identical_predictions_has_no_width():
    a = _image_cms(np.random.default_rng(2), 10, 0.1)
    r = metrics.bootstrap_miou_difference(a, a)
    assert (r["diff"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
    assert metrics.bootstrap_miou_difference([], []) is None


def test_agreement():
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert metrics.agreement([], []) is None
    with pytest.raises(ValueError):
        metrics.agreement([1, 2], [1])


# ---------------------------------------------------------------- segmentation


def test_hand_computed_confusion_matrix_with_an_ignore_index():
    target = np.array([[0, 0, 1, 1], [2, 2, 0, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
    cm = metrics.confusion_matrix(pred, target, 3, ignore_index=2)
    # ground-truth 2 pixels are dropped; the prediction "2" on a class-0 pixel is an error
    assert cm.tolist() == [[1, 1, 1, 0],
                           [1, 2, 0, 0],
                           [0, 0, 0, 0]]
    s = metrics.segmentation_scores(cm, ignore_index=2)
    assert s["pixel_acc"] == pytest.approx(3 / 6)
    # IoU0 = 1 / (3 + 2 - 1), IoU1 = 2 / (3 + 3 - 2); class 2 (ignored) has none
    assert s["per_class_iou"] == [pytest.approx(0.25), pytest.approx(0.5), None]
    assert s["miou"] == pytest.approx(0.375)
    assert s["n_pixels"] == 6


def test_classes_absent_everywhere_are_left_out_of_miou_and_out_of_range_predictions_are_errors():
    target = np.array([0, 0, 1, 1, 255])
    pred = np.array([0, 7, 1, 1, 1])  # 7 is no class: an error for class 0; label 255 is not a class
    cm = metrics.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 0, 0, 0, 1], [0, 2, 0, 0, 0], [0] * 5, [0] * 5]
    s = metrics.segmentation_scores(cm)
    assert s["pixel_acc"] == pytest.approx(0.75)
    assert s["per_class_iou"] == [pytest.approx(0.5), pytest.approx(1.0), None, None]
    assert s["miou"] == pytest.approx(0.75)


def test_a_class_only_predicted_counts_with_iou_zero():
    cm = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2)
    s = metrics.segmentation_scores(cm)
    assert s["per_class_iou"] == [pytest.approx(0.5), 0.0]
    assert s["miou"] == pytest.approx(0.25)


def test_confusion_matrices_add_up_over_images():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 5, (2, 10, 10)), rng.integers(0, 5, (2, 10, 10))
    whole = metrics.confusion_matrix(p, t, 5, ignore_index=4)
    parts = metrics.confusion_matrix(p[0], t[0], 5, 4) + metrics.confusion_matrix(p[1], t[1], 5, 4)
    assert (whole == parts).all()
    assert whole.sum() == (t != 4).sum()


# ---------------------------------------------------------------- layers, size, latency


def test_sqnr():
    y = np.array([3.0, 4.0])
    assert metrics.sqnr_db(y, y) == math.inf
    assert metrics.sqnr_db(y, y * 0.9) == pytest.approx(20.0)  # error 10% of the signal → 20 dB
    assert metrics.sqnr_db(np.zeros(2), np.ones(2)) == -math.inf


def test_decomposed_bits_per_weight():
    assert metrics.decomposed_bits_per_weight(8, 64) == pytest.approx((8 * 64 + 256 + 32) / 64)


def test_latency_stats():
    s = metrics.latency_stats([0.001 * i for i in range(1, 101)])
    assert s["runs"] == 100
    assert s["median_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(90.1)
    lo, hi = s["median_ci95_ms"]
    assert lo < 50.5 < hi and hi - lo < 25
    assert metrics.latency_stats([])["median_ms"] is None


def test_measure_latency_interleaves_and_stops():
    from bdecomp.runtime.bench import measure_latency

    calls = []
    out = measure_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2,
                          min_runs=20, seconds=0.5, block=3)
    assert out["a"]["runs"] == out["b"]["runs"] >= 20
    assert calls[:4] == ["a", "b", "a", "b"]
    # turns of one untimed + 3 timed runs, in an order that rotates from round to round
    assert "".join(calls[4:20]) == "aaaabbbb" + "bbbbaaaa"
