#!/usr/bin/env python
"""The kernel families on typical layer shapes, against the allocator's cost model (a script, not a test).

    python benchmarks/bench_families.py [--threads 1] [--runs 60]

For each layer shape (3×3 and 1×1 convolutions of 16–512 channels) and (k, Q), prints the median C
time of the lookup-table and popcount kernels on this machine (the runtime runs the faster), their
ratio, and what `allocate.kernel_cost` predicts for both: the allocator's `--budget` is a
MAC-weighted mean of that cost, so the model should rank settings as the kernels do here.
"""
from __future__ import annotations

import argparse

import numpy as np

import bdecomp.native as native
from bdecomp.decomposer import allocate
from bdecomp.runtime.speed_profile import median_ms, random_conv

SHAPES = [(16, 16, 3, 32), (64, 64, 3, 8), (64, 64, 3, 16), (128, 128, 3, 14), (256, 256, 3, 7),
          (64, 256, 1, 28), (256, 64, 1, 28), (512, 512, 3, 7)]  # (cin, cout, kernel, H = W)
SETTINGS = [(2, 4), (4, 2), (4, 4), (8, 2), (8, 4), (3, 3), (2, 8)]


def bench_start(doc: str, unit: str = "") -> tuple[argparse.Namespace, np.random.Generator]:
    """The options of this script (--threads, --runs), the random generator of its layers and
    inputs, and the line saying what the times are."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()
    print(f"isa {native.default_isa()}, {args.threads} thread(s); times are medians of {args.runs} runs{unit}")
    return args, np.random.default_rng(0)


def main() -> None:
    args, rng = bench_start(__doc__)
    print(f"{'cin':>4} {'cout':>4} {'ks':>2} {'hw':>3} {'k':>2} {'Q':>2} {'lut ms':>8} {'lut64 ms':>8} {'pop ms':>8} "
          f"{'pop/lut':>7} {'model lut':>9} {'model pop':>9} {'model pop/lut':>13}")
    for cin, cout, ks, hw in SHAPES:
        for k, q in SETTINGS:
            conv = random_conv(rng, cin, cout, ks, k, q)
            x = rng.random((1, cin, hw, hw), dtype=np.float32)
            act = native.quantize_pack(x, scale=0.1, zero_point=0, bits=q, groups=1)
            t = {fam: median_ms(lambda fam=fam: conv.run(act, 1, hw, hw, family=fam, threads=args.threads), args.runs)
                 for fam in conv.families(None)}
            lut, pop = allocate.lut_cost(k, q), allocate.popcount_cost(k, q, cin)
            row = f"{cin:4d} {cout:4d} {ks:2d} {hw:3d} {k:2d} {q:2d} "
            t_lut = t.get("lut", float("nan"))  # no tables on the scalar ISA (lut64: AVX-512 VBMI only)
            row += f"{t_lut:8.4f} {t.get('lut64', float('nan')):8.4f} {t['popcount']:8.4f} {t['popcount'] / t_lut:7.2f} "
            print(row + f"{lut:9.1f} {pop:9.1f} {pop / lut:13.2f}")


if __name__ == "__main__":
    main()
