"""Interleaved latency measurement for `bdecomp compare`.

All candidates run in the same process with the same thread count; every round runs each of
them in turn, in an order that rotates from round to round, so slow phases of a noisy machine
(other jobs, frequency changes) hit all of them alike and the *ratios* stay meaningful.

Each turn is one untimed run, then `block` timed runs: onnxruntime's workers spin for a while
after a run (its default, and its best speed), so whatever runs right after it on a multi-threaded
setting can find a core taken; the untimed run absorbs that hand-over (SqueezeNet, 2 threads, one
measurement: the native runtime timed 16.0 ms right after onnxruntime, 11.8 ms alone).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

from bdecomp.runtime.metrics import latency_stats


def measure_latency(runners: Mapping[str, Callable[[], object]], *, warmup: int = 3, min_runs: int = 20,
                    max_runs: int = 2000, seconds: float = 20.0, rel_ci: float = 0.02, block: int = 4,
                    clock: Callable[[], float] = time.perf_counter,
                    progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Time each zero-argument callable; returns {name: latency_stats(...) + "stopped"}.

    Warm-up: `warmup` interleaved rounds, not recorded. Then rounds (per candidate: one untimed
    run, `block` timed ones) until every candidate has at least `min_runs` runs and the 95% CI of
    each median is within ±`rel_ci` of it, or `seconds` of measuring have passed (min_runs is
    honoured even past the budget), or `max_runs`. `clock`: wall time by default.
    """
    names = list(runners)
    if not names:
        return {}
    for _ in range(max(0, warmup)):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    stopped = "max_runs"
    r = rounds = 0
    block = max(1, block)
    while r < max_runs:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        rounds += 1
        for name in order:
            fn = runners[name]
            fn()  # the hand-over from the previous candidate
            for _ in range(block):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        r += block
        if progress is not None:
            progress(block)
        if r < min_runs:
            continue
        if r % (5 * block) < block or time.perf_counter() - start > seconds:
            stats = {n: latency_stats(times[n]) for n in names}
            if all((s["median_rel_ci"] or 0) <= rel_ci for s in stats.values()):
                stopped = "stable"
                break
        if time.perf_counter() - start > seconds:
            stopped = "time budget"
            break
    out = {}
    for n in names:
        s = latency_stats(times[n])
        s["stopped"] = stopped
        out[n] = s
    return out
