#!/usr/bin/env python
"""Batch-1 latency of decomposed models against onnxruntime fp32 on their originals (a script,
not a test): the speed part of `bdecomp compare` without labelled data, for many models at once.

    python benchmarks/bench_models.py ORIGINAL.onnx=DECOMPOSED.onnx [...] [--threads 1] [--seconds 12]

Each pair is timed as `compare` times it (runtime/bench.py: the two interleaved in one process,
onnxruntime's threads spinning during its runs) on one random input of the original's declared
size (for inputs whose height and width are free: the size the decomposed file was converted
for, or --size H,W). Prints one table row per pair:
medians, the ratio, and the decomposed file's size against the original's (external data
included).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import bdecomp
from bdecomp.decomposer.convert import example_input, resolve_recipe
from bdecomp.decomposer.load import model_bytes
from bdecomp.runtime.bench import measure_latency
from bdecomp.runtime.compare import OrtModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="ORIGINAL.onnx=DECOMPOSED.onnx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=12.0, help="time budget per pair")
    ap.add_argument("--size", help="H,W for inputs whose size is free (default: what the decomposed file "
                                   "was converted for)")
    args = ap.parse_args()
    print(f"{'model':32s} {'fp32 ms':>9s} {'native ms':>10s} {'speed-up':>9s} {'size':>7s}  ({args.threads} thread(s))")
    for pair in args.pairs:
        orig_path, dec_path = (Path(p) for p in pair.split("=", 1))
        orig = OrtModel(orig_path, args.threads)
        dec = bdecomp.load(dec_path, threads=args.threads)
        recipe, _ = resolve_recipe(dec_path, dec.model, {"size": args.size})
        shape = [1] + list(example_input(dec.model, recipe).shape[1:])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        lat = measure_latency({"fp32": lambda: orig.run(x), "native": lambda: dec.run(x)}, seconds=args.seconds)
        a, b = lat["fp32"]["median_ms"], lat["native"]["median_ms"]
        size = model_bytes(dec_path) / model_bytes(orig_path)
        print(f"{orig_path.stem:32s} {a:9.2f} {b:10.2f} {a / b:8.2f}x {100 * size:6.1f}%", flush=True)


if __name__ == "__main__":
    main()
