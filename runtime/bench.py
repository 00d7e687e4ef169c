"""Interleaved latency measurement for `bdecomp compare`.

All candidates run in the same process with the same thread count; every round runs each of
them once, in an order that rotates from round to round, so slow phases of a noisy machine
(other jobs, frequency changes) hit all of them alike and the *ratios* stay meaningful.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping

from bdecomp.runtime.metrics import latency_stats


def measure_latency(runners: Mapping[str, Callable[[], object]], *, warmup: int = 3, min_runs: int = 20,
                    max_runs: int = 2000, seconds: float = 20.0, rel_ci: float = 0.02,
                    progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Time each zero-argument callable; returns {name: latency_stats(...) + "stopped"}.

    Warm-up: `warmup` interleaved rounds, not recorded. Then rounds until every candidate has at
    least `min_runs` runs and the 95% CI of each median is within ±`rel_ci` of it, or `seconds`
    of measuring have passed (min_runs is honoured even past the budget), or `max_runs`.
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
    r = 0
    while r < max_runs:
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = runners[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        r += 1
        if progress is not None:
            progress(r)
        if r < min_runs:
            continue
        if r % 5 == 0 or time.perf_counter() - start > seconds:
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
