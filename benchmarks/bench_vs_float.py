#!/usr/bin/env python
"""One convolution decomposed (native, quantize + pack included) against onnxruntime fp32, measured
and as decomposer/speed.py estimates it (a script, not a test).

    python benchmarks/bench_vs_float.py [--threads 1] [--runs 60]

`convert --float-when-faster` keeps float the layers the model says are faster in float; this
prints, for typical layer shapes and settings, the measured and estimated times of both sides and
whether the model picks the faster one. onnxruntime's time is that of a Conv + Relu session minus
that of a Relu-only session on the same input (its fixed cost per run is not a layer's).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bdecomp.native as native
from bdecomp.decomposer import speed
from bench_families import bench_start, median_ms, random_conv  # (run as a script: benchmarks/ is on sys.path)

SHAPES = [(16, 16, 3, 32), (32, 32, 3, 16), (64, 64, 3, 8), (16, 64, 3, 55), (32, 128, 3, 27), (48, 192, 3, 13),
          (64, 256, 3, 13), (128, 128, 3, 28), (256, 256, 3, 14), (512, 512, 3, 7), (64, 64, 3, 56),
          (64, 16, 1, 55), (128, 32, 1, 27), (256, 48, 1, 13), (512, 64, 1, 13), (16, 64, 1, 55), (64, 256, 1, 13),
          (256, 256, 1, 14), (512, 1000, 1, 13), (32, 32, 1, 32)]  # (cin, cout, kernel, H = W), stride 1
SETTINGS = [(2, 4), (3, 4), (4, 4), (6, 4), (4, 8), (6, 8)]


def session(cin: int, cout: int, ks: int, hw: int, conv: bool, threads: int, rng) -> ort.InferenceSession:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if conv:
        inits = [numpy_helper.from_array(rng.standard_normal((cout, cin, ks, ks)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[ks // 2] * 4),
                 helper.make_node("Relu", ["c"], ["y"])]
    else:
        inits, nodes = [], [helper.make_node("Relu", ["x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    args, rng = bench_start(__doc__, ", ms")
    print(f"{'cin':>4} {'cout':>4} {'ks':>2} {'hw':>3} {'k':>2} {'Q':>2} {'decomposed':>10} {'est.':>7} "
          f"{'fp32':>7} {'est.':>7} {'faster':>7} {'model says':>10}")
    agree = total = 0
    for cin, cout, ks, hw in SHAPES:
        x = rng.random((1, cin, hw, hw), dtype=np.float32)
        with_conv, relu_only = (session(cin, cout, ks, hw, c, args.threads, rng) for c in (True, False))
        t_float = (median_ms(lambda: with_conv.run(None, {"x": x}), args.runs)
                   - median_ms(lambda: relu_only.run(None, {"x": x}), args.runs))
        e_float = speed.float_ms(cin, cout, 1, ks * ks, hw * hw)
        for k, q in SETTINGS:
            conv = random_conv(rng, cin, cout, ks, k, q)
            act = native.quantize_pack(x, scale=0.1, zero_point=0, bits=q, groups=1)
            t_pack = median_ms(lambda: native.quantize_pack(x, scale=0.1, zero_point=0, bits=q, groups=1), args.runs)
            t_dec = t_pack + min(median_ms(lambda fam=fam: conv.run(act, 1, hw, hw, family=fam, threads=args.threads),
                                           args.runs) for fam in conv.families(None))
            e_dec = speed.decomposed_ms(cin, cout, 1, ks * ks, hw * hw, hw * hw, k, q)
            faster, says = ("float" if t_float < t_dec else "dec"), ("float" if e_float < e_dec else "dec")
            agree += faster == says
            total += 1
            print(f"{cin:4d} {cout:4d} {ks:2d} {hw:3d} {k:2d} {q:2d} {t_dec:10.4f} {e_dec:7.4f} {t_float:7.4f} "
                  f"{e_float:7.4f} {faster:>7} {says:>10}")
    print(f"the model picks the faster side in {agree} of {total} cases")


if __name__ == "__main__":
    main()
