"""Estimated one-thread latency of a convolution, decomposed or left float (`convert --float-when-faster`).

The native kernels pay, per output pixel, for work that does not shrink with k or Q: the lookup
tables of the input codes, quantize + pack, the integer and float epilogue of every (channel,
basis) lane. On layers with few channels per pixel that work outweighs what the binary inner
product saves, and onnxruntime's fp32 convolution is faster: measured here, a 16-channel 3×3 layer
on 32×32 pixels (ResNet-56's first stage) takes 0.064 ms decomposed at (2, 4) and 0.075 ms at
(4, 4) against 0.048 ms in fp32, while a 128-channel one on 28×28 takes 0.59 / 1.08 ms against
1.99 ms; 1×1 layers of 16–64 channels on 55×55 (SqueezeNet's squeeze and expand1x1) are 2.6–4x
slower decomposed.

Both models are least-squares fits (relative error) to benchmarks/bench_vs_float.py on an
AVX-512 VPOPCNTDQ Zen 4 core, 20 layer shapes (3×3 and 1×1, 16–512 channels, 7×7 to 55×55
pixels) × 6 settings (k = 2…6, Q = 4 and 8): median error 6 % (max 30 %) decomposed, 3 % (max
11 %) float, and the faster of the two agrees with the measurement in 116 of 120 cases (the four
others within 4 % of a tie, or one 1×1 layer on 13×13 pixels at (2, 4): 0.065 vs 0.057 ms, estimated
0.046). Refitted after the lookup-table kernel's padded tables and basis-major epilogue (2026-11-30),
which made small layers 15–40 % faster; re-measured after that session's last kernel changes, these
constants still pick the faster side in 117 of 120 cases. Only their ratio is used, and both sides are SIMD-width
bound, so it carries over to AVX2 machines better than the absolute times do.
"""
from __future__ import annotations

from bdecomp.decomposer import allocate

# decomposed: per output pixel, per output pixel and (channel, basis, table set) lane, per input
# pixel and channel (quantize + pack, tables), per MAC and allocate.kernel_cost unit; in ms
DEC_PIXEL, DEC_LANE, DEC_INPUT, DEC_WORK = 2.18e-5, 2.59e-7, 6.57e-7, 5.53e-10
# onnxruntime fp32: per MAC, per output pixel and channel, per output pixel; in ms
FLOAT_MAC, FLOAT_OUTPUT, FLOAT_PIXEL = 1.73e-8, 1.50e-7, 1.85e-6


def decomposed_ms(cin: int, cout: int, groups: int, taps: int, in_pixels: int, out_pixels: int,
                  k: int, q: int) -> float:
    """One image through the native kernel (the faster family) at (k, Q), quantize + pack included."""
    macs = out_pixels * cout * (cin // groups) * taps
    sets = 2 if q > 4 else 1  # the tables' second set, or popcount's extra planes: ~2x the lanes' work
    return (DEC_PIXEL * out_pixels + DEC_LANE * out_pixels * cout * k * sets + DEC_INPUT * in_pixels * cin
            + DEC_WORK * macs * allocate.kernel_cost(k, q, cin // groups))


def float_ms(cin: int, cout: int, groups: int, taps: int, out_pixels: int) -> float:
    """One image through onnxruntime's fp32 convolution (+ activation)."""
    macs = out_pixels * cout * (cin // groups) * taps
    return FLOAT_MAC * macs + FLOAT_OUTPUT * out_pixels * cout + FLOAT_PIXEL * out_pixels


# a float layer between decomposed ones costs a switch to an onnxruntime segment and back (~0.03 ms
# on one thread: ResNet-56 `--budget 14`, 5 isolated 32- and 64-channel layers each estimated
# 0.007 ms faster in float made the model 0.12 ms slower when left float)
SWITCH_MS = 0.03


def float_runs(order: list[str], gains: dict[str, float], floats: set[str]) -> set[str]:
    """The layers of `gains` (name → ms saved in float) worth leaving float: runs of consecutive
    layers in `order` (graph order) that are in `gains` or already float; a run goes float when
    it touches an already-float layer (no new switch) or saves more than SWITCH_MS in all."""
    out: set[str] = set()
    run: list[str] = []
    touches = False
    for name in [*order, None]:
        if name is not None and (name in gains or name in floats):
            run += [name] if name in gains else []
            touches |= name in floats
            continue
        if run and (touches or sum(gains[n] for n in run) > SWITCH_MS):
            out.update(run)
        run, touches = [], False
    return out
