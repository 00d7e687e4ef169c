"""Estimated one-thread latency of a convolution, decomposed or left float (`convert --float-when-faster`).

The native kernels pay, per output pixel, for work that does not shrink with k or Q: the lookup
tables of the input codes, quantize + pack, the integer and float epilogue of every (channel,
basis) lane. On layers with few channels per pixel that work outweighs what the binary inner
product saves, and onnxruntime's fp32 convolution is faster: measured on a Zen 4 core, a 16-channel 3×3 layer
on 32×32 pixels (ResNet-56's first stage) takes 0.064 ms decomposed at (2, 4) and 0.075 ms at
(4, 4) against 0.048 ms in fp32, while a 128-channel one on 28×28 takes 0.59 / 1.08 ms against
1.99 ms; 1×1 layers of 16–64 channels on 55×55 (SqueezeNet's squeeze and expand1x1) are 2.6–4x
slower decomposed.

Both models are linear in a few constants, a SpeedProfile: fitted to timings of 20 layer shapes
(3×3 and 1×1, 16–512 channels, 7×7 to 55×55 pixels) × 6 settings (k = 2…6, Q = 4 and 8) on the
machine that converts (runtime/speed_profile.py), or BUILTIN, fitted on an AVX-512 VPOPCNTDQ
Zen 4 core: there median error 6 % (max 30 %) decomposed, 3 % (max 11 %) float, and the faster of
the two agreed with the measurement in 116 of 120 cases. Not across machines: on an Intel Xeon
with two AVX-512 FMA units onnxruntime's fp32 ran ~1.8x as fast as on the Zen 4 and BUILTIN
picked the faster side in 92 of 120 cases, the profile measured there in 115.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import nnls

from bdecomp.decomposer import allocate
from bdecomp.errors import ConfigError

PROFILE_FORMAT = 1


@dataclass(frozen=True)
class SpeedProfile:
    """The constants of both time models, and the machine they were measured on.

    decomposed: per output pixel, per output pixel and (channel, basis, table set) lane, per input
    pixel and channel (quantize + pack, tables), per MAC and allocate.kernel_cost unit; float:
    per MAC, per output pixel and channel, per output pixel; all in ms on one thread."""

    dec_pixel: float
    dec_lane: float
    dec_input: float
    dec_work: float
    float_mac: float
    float_output: float
    float_pixel: float
    switch_ms: float  # a switch from the native runtime to onnxruntime and back (not measured: see BUILTIN)
    machine: str

    def decomposed_ms(self, cin: int, cout: int, groups: int, taps: int, in_pixels: int, out_pixels: int,
                      k: int, q: int) -> float:
        """One image through the native kernel (the faster family) at (k, Q), quantize + pack included."""
        return float(np.dot(self._dec_vector(), decomposed_features(cin, cout, groups, taps, in_pixels,
                                                                    out_pixels, k, q)))

    def float_ms(self, cin: int, cout: int, groups: int, taps: int, out_pixels: int) -> float:
        """One image through onnxruntime's fp32 convolution (+ activation)."""
        return float(np.dot(self._float_vector(), float_features(cin, cout, groups, taps, out_pixels)))

    def _dec_vector(self) -> np.ndarray:
        return np.array([self.dec_pixel, self.dec_lane, self.dec_input, self.dec_work])

    def _float_vector(self) -> np.ndarray:
        return np.array([self.float_mac, self.float_output, self.float_pixel])

    def to_json(self) -> str:
        return json.dumps({"format": PROFILE_FORMAT, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "speed profile") -> "SpeedProfile":
        """Parse a profile written by to_json; ConfigError (one line) for anything else."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.pop("format", None) != PROFILE_FORMAT:
                raise ValueError(f"not a format-{PROFILE_FORMAT} bdecomp speed profile")
            p = cls(**d)
            values = np.array([v for k, v in asdict(p).items() if k != "machine"], dtype=float)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(p.machine, str) or not np.all(np.isfinite(values)) or np.any(values < 0) \
                or p.dec_work <= 0 or p.float_mac <= 0:
            raise ConfigError(f"{where}: its constants must be finite, non-negative numbers (and the per-MAC ones positive)")
        return p

    def short(self) -> str:
        """One line for reports: its machine, and the rates it estimates on a large layer (256 → 256
        channels, 3×3, 28×28 pixels), fp32 and at k = Q = 4."""
        macs = 256 * 256 * 9 * 784
        t_float, t_dec = self.float_ms(256, 256, 1, 9, 784), self.decomposed_ms(256, 256, 1, 9, 784, 784, 4, 4)
        return (f"{self.machine}: on a 256-channel 3x3 layer, fp32 {macs / t_float / 1e6:.0f} G multiply-adds/s, "
                f"binary kernels at k = Q = 4 {macs / t_dec / 1e6:.0f} G/s")


# Least-squares fit (relative error) to benchmarks/bench_vs_float.py on an AVX-512 VPOPCNTDQ Zen 4
# core; the fallback where this machine's profile is not measured (see runtime/speed_profile.py).
# switch_ms is what whole models showed: ResNet-56 on that core (speed.float_runs), and on an Intel
# Xeon YOLOv8n `--budget 16 --float-when-faster` ran at 0.97x / 1.00x / 1.00x / 0.99x of fp32 with
# switches priced at 0 / 0.03 / 0.06 / 0.09 ms (15 / 8 / 4 / 3 layers decomposed). An
# onnxruntime graph split in two, timed alone, cost 0.01–0.05 ms: too noisy, and only part of it.
BUILTIN = SpeedProfile(dec_pixel=2.18e-5, dec_lane=2.59e-7, dec_input=6.57e-7, dec_work=5.53e-10,
                       float_mac=1.73e-8, float_output=1.50e-7, float_pixel=1.85e-6, switch_ms=0.03,
                       machine="built in (AMD EPYC Zen 4, AVX-512 VPOPCNTDQ)")


def decomposed_features(cin: int, cout: int, groups: int, taps: int, in_pixels: int, out_pixels: int,
                        k: int, q: int) -> np.ndarray:
    """What the decomposed time is linear in (SpeedProfile's dec_* constants, in order)."""
    macs = out_pixels * cout * (cin // groups) * taps
    sets = 2 if q > 6 else 1  # the lookup tables' second set (or popcount's extra planes): ~2x the lanes' work
    return np.array([out_pixels, out_pixels * cout * k * sets, in_pixels * cin,
                     macs * allocate.kernel_cost(k, q, cin // groups)], dtype=float)


def float_features(cin: int, cout: int, groups: int, taps: int, out_pixels: int) -> np.ndarray:
    """What the float time is linear in (SpeedProfile's float_* constants, in order)."""
    macs = out_pixels * cout * (cin // groups) * taps
    return np.array([macs, out_pixels * cout, out_pixels], dtype=float)


def fit_profile(dec_rows: list[tuple[np.ndarray, float]], float_rows: list[tuple[np.ndarray, float]],
                switch_ms: float, machine: str) -> SpeedProfile:
    """Non-negative least squares on the relative error of each side: rows of (features, measured
    ms). Relative, so the many small layers weigh as much as the few large ones: which side is
    faster is decided on both. Rows measured at 0 ms or less (noise on tiny layers) are dropped."""
    def solve(rows, n):
        rows = [(f, t) for f, t in rows if t > 0]
        if len(rows) < n:
            raise ValueError(f"need at least {n} positive timings, got {len(rows)}")
        A = np.array([f / t for f, t in rows])
        scale = A.max(axis=0)
        scale[scale == 0] = 1.0
        x, _ = nnls(A / scale, np.ones(len(rows)))
        return x / scale
    d, f = solve(dec_rows, 4), solve(float_rows, 3)
    return SpeedProfile(*(float(v) for v in d), *(float(v) for v in f), switch_ms=float(switch_ms), machine=machine)


def float_runs(order: list[str], gains: dict[str, float], floats: set[str], switch_ms: float) -> set[str]:
    """The layers of `gains` (name → ms saved in float) worth leaving float: runs of consecutive
    layers in `order` (graph order) that are in `gains` or already float; a run goes float when
    it touches an already-float layer (no new switch) or saves more than a switch to onnxruntime
    and back (switch_ms: ~0.03 ms on one Zen 4 thread, where on ResNet-56 `--budget 14` 5 isolated
    32- and 64-channel layers each estimated 0.007 ms faster in float made the model 0.12 ms
    slower when left float)."""
    out: set[str] = set()
    run: list[str] = []
    touches = False
    for name in [*order, None]:
        if name is not None and (name in gains or name in floats):
            run += [name] if name in gains else []
            touches |= name in floats
            continue
        if run and (touches or sum(gains[n] for n in run) > switch_ms):
            out.update(run)
        run, touches = [], False
    return out


def switch_worthy(margins: dict[str, float], neighbours: dict, decomposed: set[str],
                  switch_ms: float) -> tuple[set[str], dict[str, float]]:
    """The layers of `decomposed` that stay decomposed once the switches between the runtimes are
    priced, and for each one that does not, the switches' cost it saves by going float (ms).

    margins: name → ms the layer is estimated to save decomposed (layers not in it always stay);
    neighbours: rewrite.native_neighbours. Each side of a layer where a native and an onnxruntime
    step meet is half a switch to onnxruntime and back (switch_ms): decomposed, a side costs that
    unless it reaches only decomposed layers (or the graph's input / outputs); float, unless it
    reaches none. A layer whose margin does not pay for the difference goes float, which changes
    its neighbours' sums, so this repeats until nothing changes (smallest surplus first:
    deterministic). On SiLU networks every decomposed layer pays both sides (its Sigmoid and Mul
    run in onnxruntime)."""
    dec = set(decomposed)
    saved: dict[str, float] = {}

    def extra(name: str) -> float:  # switches decomposed minus switches float, in ms
        here = dec - {name}
        n = 0
        for side in neighbours[name]:
            n += (side is None or not side <= here) - (side is not None and bool(side & here))
        return switch_ms * n / 2

    changed = True
    while changed:
        changed = False
        for name in sorted((n for n in dec if n in margins), key=lambda n: (margins[n] - extra(n), n)):
            if name in dec and margins[name] < (cost := extra(name)):
                dec.discard(name)
                saved[name] = cost
                changed = True
    return dec, saved
