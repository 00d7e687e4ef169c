#!/usr/bin/env python
"""Per-layer and end-to-end speed of the native kernels on a decomposed model (a script, not a test).

    python benchmarks/bench_kernels.py model.bd.onnx --original model.onnx --threads 1 [--runs 30]

Prints, for every decomposed layer: geometry, k, Q, the kernel family used, the C time of the
layer (bd_conv alone, median), the whole layer step (Python wrapper + quantize/pack + C), the
bit-operation rate Cout·OH·OW·D·k·Q / C time and its fraction of `popcount_peak()` × threads; then
where the rest of the native run goes (quantize_pack, onnxruntime segments, Python), and the
end-to-end latency of the native runtime against onnxruntime fp32 on the original model with the
same thread count (intra_op_num_threads), measured interleaved in one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bdecomp.decomposer.convert import example_input, resolve_recipe
import bdecomp.native as native
import bdecomp.runtime.model as rm
from bdecomp.runtime.model import Model

CONV_FNS = ("bd_conv", "bd_conv_lut", "bd_conv_lut64", "bd_conv_depthwise")  # the layers' C entry points
clock = time.perf_counter  # --clock cpu: time.thread_time (1 thread: immune to other processes)


class _TimedLib:
    """Proxy for native.lib that times each C entry point (the cffi lib cannot be patched)."""

    def __init__(self, lib, sink):
        self._lib, self._sink = lib, sink

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if name not in (*CONV_FNS, "bd_quantize_pack", "bd_im2col_quantize_pack", "bd_quantize_codes"):
            return fn
        sink = self._sink

        def timed(*a):
            t0 = clock()
            r = fn(*a)
            sink(name, clock() - t0)
            return r

        return timed


class _TimedSession:
    def __init__(self, sess, sink):
        self._s, self._sink = sess, sink

    def run(self, *a, **kw):
        t0 = clock()
        r = self._s.run(*a, **kw)
        self._sink("ort", clock() - t0)
        return r


def profile(model: Model, x: np.ndarray, runs: int):
    """Per-layer C / step times and the split of one native run (medians over `runs`)."""
    current = [None]
    per_run: list[dict] = []
    rec: dict = {}

    def sink(what, dt):
        key = (what, current[0]) if what in CONV_FNS else (what, None)
        rec[key] = rec.get(key, 0.0) + dt

    orig_lib, orig_run_layer = native.lib, Model._run_layer
    steps = model._steps
    sessions = [(s, s.session) for s in steps if s.kind == "ort"]

    def run_layer(self, step, env, *rest):
        current[0] = step.spec.name
        t0 = clock()
        r = orig_run_layer(self, step, env, *rest)
        rec[("step", step.spec.name)] = rec.get(("step", step.spec.name), 0.0) + clock() - t0
        current[0] = None
        return r

    native.lib = _TimedLib(orig_lib, sink)
    Model._run_layer = run_layer
    for s, sess in sessions:
        if sess is not None:
            s.session = _TimedSession(sess, sink)
    try:
        model.run(x)  # warm-up
        for _ in range(runs):
            rec = {}
            t0 = clock()
            model.run(x)
            rec[("total", None)] = clock() - t0
            per_run.append(rec)
    finally:
        native.lib, Model._run_layer = orig_lib, orig_run_layer
        for s, sess in sessions:
            s.session = sess
    keys = set().union(*per_run)
    return {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in keys}


def layer_rows(model: Model, x: np.ndarray):
    """Geometry of every decomposed layer on input x (from one run of the model)."""
    shapes = {}
    orig = Model._run_layer

    def run_layer(self, step, env, *rest):
        y = orig(self, step, env, *rest)
        shapes[step.spec.name] = (env[step.inputs[0]].x.shape, y.shape)
        return y

    Model._run_layer = run_layer
    try:
        model.run(x)
    finally:
        Model._run_layer = orig
    rows = []
    for s in model._steps:
        if s.kind != "layer":
            continue
        spec = s.spec
        xin, y = shapes[spec.name]
        q = model._quant_spec(spec.quant)
        cout = spec.basis.shape[0]
        spatial = int(np.prod(y[2:])) if spec.op == rm.ops.CONV else 1
        rows_ = int(np.prod(y[:-1])) if spec.op != rm.ops.CONV else int(y[0])
        if spec.op == rm.ops.CONV:
            kh, kw = spec.weight_shape[2:]
            geo = (f"{xin[1]}x{xin[2]}x{xin[3]}>{cout} {kh}x{kw}/{spec.strides[0]}"
                   + (f" g{spec.group}" if spec.group > 1 else ""))
        else:
            geo = f"gemm {rows_}x{spec.depth}>{cout}"
        _, family, im2col = s.plans[tuple(xin)][0][0]  # the way the first run measured fastest
        bitops = rows_ * spatial * cout * spec.depth * spec.k * q.bits
        rows.append(dict(name=spec.name, geo=geo + (" (im2col)" if im2col else ""), k=spec.k,
                         q=q.bits, bitops=bitops, family=family))
    return rows


def ort_fp32(path: str, threads: int):
    import onnxruntime as ort

    so = rm.session_options(threads)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="decomposed model (.bd.onnx)")
    ap.add_argument("--original", help="original fp32 model for the onnxruntime comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30, help="timed runs (per-layer profile and end-to-end)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--isa", default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this thread's CPU time (only meaningful with --threads 1; robust on a "
                         "loaded machine)")
    args = ap.parse_args()
    global clock
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu needs --threads 1")
        clock = time.thread_time

    model = Model(args.model, threads=args.threads, isa=args.isa)
    # the declared input size, else (free height / width) the size the file was converted for
    recipe, _ = resolve_recipe(args.model, model.model, None)
    shape = [args.batch] + list(example_input(model.model, recipe).shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    isa = args.isa or native.default_isa()
    peak1 = native.popcount_peak(isa, 0.3)
    peak = peak1 * args.threads

    model.chains = False  # the instrumented runs time every step from Python, one by one
    rows = layer_rows(model, x)
    prof = profile(model, x, args.runs)
    model.chains = True
    print(f"# {args.model}  isa={isa}  threads={args.threads}  batch={args.batch}  clock={args.clock}  "
          f"popcount_peak={peak1 / 1e9:.0f} Gbit-op/s per thread")
    hdr = f"{'layer':<28} {'shape':<34} {'k':>2} {'Q':>2} {'kern':>8} {'C ms':>7} {'step ms':>7} {'Gbop/s':>7} {'%peak':>6}"
    print(hdr)
    print("-" * len(hdr))
    c_total = step_total = 0.0
    for r in rows:
        c = sum(prof.get((f, r["name"]), 0.0) for f in CONV_FNS)
        st = prof.get(("step", r["name"]), 0.0)
        c_total += c
        step_total += st
        rate = r["bitops"] / c if c > 0 else 0.0
        print(f"{r['name'][:28]:<28} {r['geo'][:34]:<34} {r['k']:>2} {r['q']:>2} {r['family']:>8} "
              f"{c * 1e3:7.3f} {st * 1e3:7.3f} {rate / 1e9:7.1f} {100 * rate / peak:5.1f}%")
    total = prof[("total", None)]
    qp = sum(prof.get((f, None), 0.0) for f in ("bd_quantize_pack", "bd_im2col_quantize_pack", "bd_quantize_codes"))
    ort_t = prof.get(("ort", None), 0.0)
    all_bitops = sum(r["bitops"] for r in rows)
    print("-" * len(hdr))
    print(f"C kernels {c_total * 1e3:.3f} ms ({all_bitops / c_total / 1e9:.1f} Gbit-op/s, "
          f"{100 * all_bitops / c_total / peak:.1f}% of peak) | layer steps {step_total * 1e3:.3f} ms "
          f"(incl. quantize_pack {qp * 1e3:.3f} ms) | onnxruntime segments {ort_t * 1e3:.3f} ms | "
          f"other Python {max(0.0, total - step_total - ort_t) * 1e3:.3f} ms | native run (instrumented, "
          f"steps one by one) {total * 1e3:.3f} ms")

    # end-to-end, interleaved, no instrumentation: as bdecomp runs (runs of native steps in one C
    # call each) and with every step called from Python
    def run(chains: bool):
        model.chains = chains
        return model.run(x)

    runners = {"native": lambda: run(True), "steps": lambda: run(False)}
    if args.original:
        f = ort_fp32(args.original, args.threads)
        runners["ort_fp32"] = lambda: f(x)
    from bdecomp.runtime.bench import measure_latency

    lat = measure_latency(runners, min_runs=args.runs, max_runs=args.runs, seconds=0.0, clock=clock)
    med = {n: s["median_ms"] / 1e3 for n, s in lat.items()}
    line = (f"end-to-end (threads={args.threads}, median of {args.runs}, interleaved): native {med['native'] * 1e3:.3f} ms"
            f" (steps one by one from Python: {med['steps'] * 1e3:.3f} ms)")
    if "ort_fp32" in med:
        line += (f" | onnxruntime fp32 {med['ort_fp32'] * 1e3:.3f} ms | native/ort = "
                 f"{med['native'] / med['ort_fp32']:.2f}x time (speed-up {med['ort_fp32'] / med['native']:.2f}x)")
    print(line)


if __name__ == "__main__":
    main()
