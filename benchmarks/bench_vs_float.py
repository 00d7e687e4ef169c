#!/usr/bin/env python
"""One convolution decomposed (native, quantize + pack included) against onnxruntime fp32, measured
and as the speed profiles estimate it (a script, not a test).

    python benchmarks/bench_vs_float.py [--threads 1] [--runs 60] [--profile FILE]

`convert --float-when-faster` keeps float the layers a speed profile (decomposer/speed.py) says
are faster in float. This measures the shapes and settings `bdecomp speed-profile` fits its
profile to (runtime/speed_profile.py) and prints, for each, the measured and estimated times of
both sides and which side each profile picks: the built-in one, this machine's cached one (or
--profile FILE), and one fitted to this very run. onnxruntime's time is that of the layer after
another convolution, less that convolution (speed_profile.float_session).
"""
from __future__ import annotations

import argparse

import bdecomp.native as native
from bdecomp.decomposer import speed
from bdecomp.runtime import speed_profile as sp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--profile", help="a profile file to check (default: this machine's cached one, if any)")
    args = ap.parse_args()
    print(f"isa {native.default_isa()}, {args.threads} thread(s); times are medians of {args.runs} runs, ms")
    cases = sp.measure_cases(runs=args.runs, threads=args.threads)
    profiles = {"built-in": speed.BUILTIN}
    mine = sp.read(args.profile) if args.profile else sp.cached(measure_if_missing=False)
    if mine is not None:
        profiles["this machine's" if not args.profile else args.profile] = mine
    profiles["fitted to this run"] = sp.fit(cases, sp.machine_name())
    print(f"{'cin':>4} {'cout':>4} {'ks':>2} {'hw':>3} {'k':>2} {'Q':>2} {'decomposed':>10} {'fp32':>7} {'faster':>7} "
          + " ".join(f"{'est. dec / fp32 (' + str(i) + ')':>24}" for i in range(len(profiles))))
    for c in cases:
        row = (f"{c.cin:4d} {c.cout:4d} {c.ks:2d} {c.hw:3d} {c.k:2d} {c.q:2d} {c.decomposed_ms:10.4f} {c.float_ms:7.4f} "
               f"{'float' if c.float_ms < c.decomposed_ms else 'dec':>7}")
        for p in profiles.values():
            e_dec, e_float = c.estimates(p)
            row += f" {e_dec:9.4f} / {e_float:7.4f} {'float' if e_float < e_dec else 'dec':>5}"
        print(row)
    for i, (name, p) in enumerate(profiles.items()):
        print(f"({i}) {name} ({p.machine}): picks the faster side in {sp.agreement(p, cases)} of {len(cases)} cases")


if __name__ == "__main__":
    main()
