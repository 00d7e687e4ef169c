"""`bdecomp compare`: accuracy, speed and size of a decomposed model against its original in
onnxruntime fp32 and (optionally) onnxruntime's own int8 static quantization, side by side.

    report = compare("model.onnx", "model.bd.onnx", data="val/", int8=True, calib="calib/",
                     per_layer=True, out_dir="report/")

The report is a plain dict (written as report.json); `report_md` renders the markdown, the
terminal table and the plots. What is measured and how:

* accuracy — every image of --data (or --limit of them, evenly spread over the sorted set) runs
  through all models at the same preprocessing; top-1/top-5 (ties: lower class index wins) and
  top-1 agreement with the original, or pixel accuracy / mIoU / per-class IoU from confusion
  matrices summed over the set plus pixel agreement with the original's mask.
* latency — batch 1, the same input for all, same thread count for all, warm-up, then
  interleaved rounds in rotating order until each median is stable (95% CI within ±2%) or the
  time budget is spent (at least 20 runs each); median and p90.
* size — bytes on disk, and bits per weight = 8·bytes / number of Conv/Gemm/MatMul weights of the
  original.
* per layer — see `per_layer_report`.
"""
from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bdecomp.decomposer.feed import (TASKS, classes_first, fixed_batch, input_dtype, model_input, output_shape,
                                     output_task, run_batched)
from bdecomp.decomposer.load import model_bytes
from bdecomp.errors import ConfigError, InputFileError, ModelError
from bdecomp.runtime import metrics

CALIB_DEFAULT = 64  # images for onnxruntime's int8 calibration
PER_LAYER_IMAGES = 16
MODEL_KEYS = ("original", "decomposed", "int8")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


# ---------------------------------------------------------------- small helpers


def _tqdm(total: int | None, desc: str, enabled: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def count_weights(model: onnx.ModelProto) -> int:
    """Number of weights in the Conv / ConvTranspose / Gemm / MatMul initializers of a float model."""
    inits = {t.name: t for t in model.graph.initializer}
    seen, total = set(), 0
    for n in model.graph.node:
        if n.op_type in WEIGHT_OPS:
            for name in n.input[1:2] if n.op_type != "MatMul" else n.input[:2]:
                if name in inits and name not in seen:
                    seen.add(name)
                    total += int(np.prod(inits[name].dims)) if inits[name].dims else 1
    return total


def decomposed_layer_storage(model: onnx.ModelProto) -> dict:
    """Storage of the decomposed layers themselves: bits per original weight as stored (packed basis
    bits with their padding + float32 scales + float32 bias) and by the formula (k·D + 32k + 32)/D,
    both averaged over the layers by weight count; plus k and the number of layers."""
    from bdecomp.decomposer import ops

    inits = {t.name: t for t in model.graph.initializer}
    stored_bits = formula_bits = weights = 0.0
    n_layers = 0
    for n in model.graph.node:
        if n.domain != ops.DOMAIN or n.op_type not in (ops.CONV, ops.GEMM):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        depth = int(attrs.get("depth", 0))
        names = list(n.input[3:6])
        if depth <= 0 or any(x not in inits for x in names):
            continue
        basis, coeffs, bias = (numpy_helper.to_array(inits[x]) for x in names)
        cout = coeffs.shape[0]
        k = coeffs.shape[1] if coeffs.ndim > 1 else 1
        w = cout * depth
        weights += w
        stored_bits += 8 * basis.nbytes + 32 * coeffs.size + 32 * bias.size
        formula_bits += w * metrics.decomposed_bits_per_weight(k, depth)
        n_layers += 1
    if not weights:
        return {"layers": 0}
    return {"layers": n_layers, "weights": int(weights), "bits_per_weight_stored": stored_bits / weights,
            "bits_per_weight_formula": formula_bits / weights}


def _batch_size(dims: list) -> int:
    """1 if the model's batch dimension is fixed (to 1), else a small batch for throughput."""
    return 8 if dims and dims[0] in (None, 0) else 1


# ---------------------------------------------------------------- int8 baseline


def quantize_int8(original: Path, out_path: Path, calib_images: list[Path], recipe, input_name: str,
                  progress: bool = True) -> dict:
    """onnxruntime's own static quantization of `original`: QDQ, per-channel int8 weights, uint8
    activations, MinMax calibration on `calib_images` (after onnxruntime's quant_pre_process
    when that succeeds). Returns notes about what was done."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from bdecomp.models.datasets import iter_batches

    notes = {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
             "weights": "QInt8", "activations": "QUInt8", "calibration": "MinMax",
             "calib_images": len(calib_images)}
    bar = _tqdm(len(calib_images), "int8 calibration", progress)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter_batches(calib_images, recipe, batch_size=1)

        def get_next(self):
            nxt = next(self.it, None)
            if nxt is None:
                return None
            bar.update(1)
            return {input_name: nxt[0]}

    with tempfile.TemporaryDirectory(prefix="bdecomp-int8-") as tmp:
        src = original
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
                quant_pre_process(str(original), str(pre), skip_symbolic_shape=True)
            src = pre
            notes["pre_process"] = "quant_pre_process (shape inference + onnxruntime optimisation)"
        except Exception as e:  # pre-processing is only an optimisation
            notes["pre_process"] = f"skipped ({type(e).__name__})"
        try:
            import logging

            logging.getLogger().setLevel(logging.ERROR)
            quantize_static(str(src), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"onnxruntime could not quantize {original} to int8: {msg[:300]}") from None
        finally:
            bar.close()
    return notes


# ---------------------------------------------------------------- per-layer recording hook


@contextlib.contextmanager
def record_layers(model, callback: Callable[[Any, dict, np.ndarray, float], None]):
    """While active, every native layer step of `model` (a runtime.model.Model on the native backend)
    calls callback(step, env, output, seconds) after it ran. Restores the model afterwards."""
    inner, chained = model._run_layer, model.chains

    def run_layer(step, env, *rest):
        t0 = time.perf_counter()
        y = inner(step, env, *rest)
        callback(step, env, y, time.perf_counter() - t0)
        return y

    model._run_layer, model.chains = run_layer, False  # every layer through Python, one by one
    try:
        yield model
    finally:
        del model._run_layer
        model.chains = chained


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return m


def _single_node_model(original: onnx.ModelProto, node: onnx.NodeProto, in_shape) -> onnx.ModelProto | None:
    """The original layer alone (its weights as initializers), or None if its weights are not constant."""
    inits = {t.name: t for t in original.graph.initializer}
    extra = [x for x in node.input[1:] if x]
    if any(x not in inits for x in extra):
        return None
    n = onnx.NodeProto()
    n.CopyFrom(node)
    g = helper.make_graph([n], "layer", [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT,
                                                                        list(in_shape))],
                          [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                          [inits[x] for x in extra])
    return helper.make_model(g, opset_imports=list(original.opset_import), ir_version=original.ir_version)


def _original_layer_node(original: onnx.ModelProto, dec_node: onnx.NodeProto, name: str) -> onnx.NodeProto | None:
    """The Conv/Gemm/MatMul of the original that became `dec_node` (through a folded BatchNorm)."""
    producer = {o: n for n in original.graph.node for o in n.output}
    p = producer.get(dec_node.output[0])
    if p is not None and p.op_type == "BatchNormalization":
        p = producer.get(p.input[0])
    if p is not None and p.op_type in WEIGHT_OPS:
        return p
    by_name = [n for n in original.graph.node if n.name == name and n.op_type in WEIGHT_OPS]
    return by_name[0] if by_name else None


def per_layer_report(original_path: Path, dec_model, images: list[Path], recipe, threads: int,
                     seconds: float = 10.0, progress: bool = True) -> dict:
    """For every decomposed layer of `dec_model` (native backend):

    * sqnr_db — the layer's own error: the native layer fed the *original* network's input of that
      layer (and its residual operand), against the original's tensor at the layer's output (after
      a fused residual Add and Relu/Clip, and after a folded BatchNorm), summed over `images`;
    * sqnr_cumulative_db — the same output inside the decomposed network (errors of all earlier
      layers included);
    * native_ms — median time of the native step (quantize + pack + AND/popcount + scaling) in
      batch-1 runs of the whole decomposed network; ort_ms — median time of the original layer
      alone (a one-node onnxruntime fp32 model on the same input), the two timed in interleaved
      rounds with the same thread count;
    * bit_ops — AND+popcount bit positions per image = (output elements)·D·k·Q, rate = bit_ops /
      native time, efficiency = rate / (measured one-thread popcount peak × threads).
    """
    import onnxruntime as ort

    from bdecomp import native
    from bdecomp.models.datasets import iter_batches
    from bdecomp.runtime.model import _Quantized, dynamic_qparams, session_options

    original = onnx.load(str(original_path))
    graph_input = original.graph.input[0].name
    layers = [s for s in dec_model._steps if s.kind == "layer"]
    qspecs = {s.spec.name: s.spec for s in dec_model._steps if s.kind == "quant"}
    orig_tensors = {o for n in original.graph.node for o in n.output} | {graph_input}
    rows: dict[str, dict] = {}
    want: set[str] = set()
    for st in layers:
        spec = st.spec
        qs = qspecs[spec.quant]
        onode = _original_layer_node(original, st.nodes[0], spec.name)
        row = {"name": spec.name, "op": spec.op, "k": int(spec.k), "q": int(qs.bits), "depth": int(spec.depth),
               "fused": list(spec.fused), "original_op": onode.op_type if onode is not None else None,
               "_onode": onode, "_qs": qs, "_step": st,
               "_ref": spec.output if spec.output in orig_tensors else None,
               "_sig": 0.0, "_noise": 0.0, "_noise_cum": 0.0, "_native_t": [], "_ort_t": []}
        if row["_ref"]:
            want.add(row["_ref"])
        if qs.input in orig_tensors:
            want.add(qs.input)
        if spec.residual in orig_tensors:  # a fused residual Add's other operand
            want.add(spec.residual)
        if onode is not None:
            want.add(onode.input[0])
        rows[spec.name] = row
    want.discard(graph_input)
    so = session_options(threads)  # the per-layer onnxruntime timings: spinning as users run it
    probe = ort.InferenceSession(_with_outputs(original, sorted(want)).SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
    probe_names = [o.name for o in probe.get_outputs()]

    def original_tensors(x: np.ndarray) -> dict[str, np.ndarray]:
        vals = dict(zip(probe_names, probe.run(None, {graph_input: x})))
        vals[graph_input] = x
        return vals

    current: dict[str, np.ndarray] = {}

    def on_layer(step, env, y, dt):
        row = rows[step.spec.name]
        ref = current.get(row["_ref"]) if row["_ref"] else None
        row["_native_t"].append(dt)
        row["_out_elems"] = int(y.size // max(1, y.shape[0]))
        if ref is None or ref.shape != y.shape:
            return
        row["_sig"] += float(np.square(ref, dtype=np.float64).sum())
        row["_noise_cum"] += float(np.square(ref.astype(np.float64) - y).sum())
        xin = current.get(row["_qs"].input)
        residual = current.get(step.spec.residual) if step.spec.residual else None
        if xin is None or (step.spec.residual and residual is None):
            return
        qs = row["_qs"]
        xin = np.ascontiguousarray(xin, dtype=np.float32)
        scale, zp = dynamic_qparams(xin, qs.bits) if qs.dynamic else (qs.scale, qs.zero_point)
        env = {step.inputs[0]: _Quantized(xin, qs, scale, zp, dec_model.threads)}
        if residual is not None:
            env[step.spec.residual] = residual
        own = inner_run(step, env)
        row["_noise"] += float(np.square(ref.astype(np.float64) - own).sum())

    inner_run = dec_model._run_layer
    bar = _tqdm(len(images), "per-layer error", progress)
    first_x = None
    with record_layers(dec_model, on_layer):
        for x, _ in iter_batches(images, recipe, batch_size=1):
            if first_x is None:
                first_x = x
            current = original_tensors(x)
            dec_model.run(x)
            bar.update(1)
    bar.close()
    if first_x is None:
        raise InputFileError("no images for the per-layer report")
    for row in rows.values():  # the error pass also ran the layers: time them separately below
        row["_native_t"].clear()

    # --- timing: interleaved rounds (whole native network once, then every one-node ORT layer once)
    current = original_tensors(first_x)
    ort_layers = {}
    for name, row in rows.items():
        onode = row["_onode"]
        if onode is None or onode.input[0] not in current:
            continue
        xin = np.ascontiguousarray(current[onode.input[0]], dtype=np.float32)
        one = _single_node_model(original, onode, xin.shape)
        if one is None:
            continue
        try:
            sess = ort.InferenceSession(one.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:
            continue
        feed = {onode.input[0]: xin}
        ort_layers[name] = (sess, feed)

    def time_native(step, env, y, dt):
        rows[step.spec.name]["_native_t"].append(dt)
        rows[step.spec.name]["_shape"] = env[step.inputs[0]].x.shape  # the key of the plan timed

    start, rounds = time.perf_counter(), 0
    bar = _tqdm(None, "per-layer timing", progress, unit="round")
    with record_layers(dec_model, time_native):
        for warm in range(2):
            dec_model.run(first_x)
            for sess, feed in ort_layers.values():
                sess.run(None, feed)
        for row in rows.values():
            row["_native_t"].clear()
        while rounds < 200 and (rounds < 10 or time.perf_counter() - start < seconds):
            dec_model.run(first_x)
            for name, (sess, feed) in ort_layers.items():
                t0 = time.perf_counter()
                sess.run(None, feed)
                rows[name]["_ort_t"].append(time.perf_counter() - t0)
            rounds += 1
            bar.update(1)
    bar.close()

    isa = dec_model.isa or native.default_isa()
    peak = native.popcount_peak(isa, seconds=0.3)
    out_rows = []
    for row in rows.values():
        r = {k: v for k, v in row.items() if not k.startswith("_")}
        r["sqnr_db"] = _db(row["_sig"], row["_noise"]) if row["_ref"] else None
        r["sqnr_cumulative_db"] = _db(row["_sig"], row["_noise_cum"]) if row["_ref"] else None
        nat = float(np.median(row["_native_t"])) if row["_native_t"] else None
        ortt = float(np.median(row["_ort_t"])) if row["_ort_t"] else None
        r["native_ms"] = nat * 1e3 if nat else None
        r["ort_ms"] = ortt * 1e3 if ortt else None
        r["speedup"] = ortt / nat if nat and ortt else None
        bitops = row.get("_out_elems", 0) * row["depth"] * row["k"] * row["q"]
        r["kernel"] = _settled_kernel(row["_step"], row.get("_shape"))
        r["bit_ops"] = int(bitops)
        r["gbitops_per_s"] = bitops / nat / 1e9 if nat else None
        r["efficiency"] = bitops / nat / (peak * threads) if nat else None
        if not row["_ref"]:
            r["note"] = "output tensor not in the original graph"
        out_rows.append(r)
    return {"images": len(images), "timing_rounds": rounds, "isa": isa, "threads": threads,
            "popcount_peak_gbitops_per_thread": peak / 1e9, "layers": out_rows,
            "native_total_ms": sum(r["native_ms"] or 0 for r in out_rows),
            "ort_total_ms": sum(r["ort_ms"] or 0 for r in out_rows)}


def _settled_kernel(step, shape: tuple | None) -> str | None:
    """How the runtime runs a layer after the first input of `shape` (the input it was timed on; the
    way can differ between batch sizes, and `compare` runs batches before it times one image): its
    kernel family (lut, lut64, popcount, depthwise), "+patches" on packed patches; None if it never
    ran on that shape or has not settled on one way."""
    plan = step.plans.get(shape)
    if plan is None or len(plan[0]) != 1:
        return None
    _, family, patches = plan[0][0]
    return family + ("+patches" if patches else "")


def _db(sig: float, noise: float) -> float | None:
    """metrics.sqnr_db_of, but None (shown as "—") for a layer whose reference output is all zero."""
    return None if sig == 0 else metrics.sqnr_db_of(sig, noise)


# ---------------------------------------------------------------- the comparison


class OrtModel:
    """A float (or int8) model in one onnxruntime session as users run it: its threads spin while
    a run lasts (onnxruntime's default; not spinning made ResNet-56 at 2 threads 2.37 instead of
    1.39 ms) and stop when it returns (session.force_spinning_stop, set for every session here),
    so they do not steal the cores the next model timed in the interleaved rounds needs."""

    def __init__(self, path: Path, threads: int):
        from bdecomp.decomposer import ops
        from bdecomp.decomposer.load import read_model
        from bdecomp.runtime.model import _session

        self.path = Path(path)
        self.model = read_model(self.path)
        self.decomposed = any(n.domain == ops.DOMAIN for n in self.model.graph.node)
        self.input_name, self.input_shape = model_input(self.model)
        self.input_dtype = input_dtype(self.model)
        self.batch = fixed_batch(self.model)
        self.session = None if self.decomposed else _session(self.model, threads)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        try:
            x = np.ascontiguousarray(x, dtype=self.input_dtype)
            return run_batched(lambda c: self.session.run(None, {self.input_name: c}), x, self.batch)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"onnxruntime failed on {self.path.name}: {msg[:300]}") from None



def _data_items(data: Path, labels: Path | None, task: str, limit: int | None):
    from bdecomp.models.datasets import classification_set, detect, segmentation_set, spread

    if labels is not None:
        if task != "segmentation":
            raise ConfigError("--labels (a folder of label images) is for segmentation models")
        full = segmentation_set(data, labels)
        return "segmentation", spread(full, limit), len(full)
    layout = detect(data)
    if task == "outputs":  # any images: labels are not used
        full = segmentation_set(data) if layout == "segmentation" else classification_set(data)
        return layout, spread(full, limit), len(full)
    if task == "segmentation":
        if layout != "segmentation":
            raise ConfigError(f"{data}: a segmentation model needs images + label images (DIR/test + DIR/testannot, "
                              f"a folder with a sibling FOLDERannot, or --labels DIR); found a {layout} layout")
        full = segmentation_set(data)
        return layout, spread(full, limit), len(full)
    if layout == "segmentation":
        raise ConfigError(f"{data}: a segmentation data set, but the model is a classifier")
    full = classification_set(data)
    return layout, spread(full, limit), len(full)


def compare(original: str | Path, decomposed: str | Path, data: str | Path, *, labels: str | Path | None = None,
            limit: int | None = None, threads: int | None = None, int8: bool = False,
            calib: str | Path | None = None, per_layer: bool = False, out_dir: str | Path | None = None,
            recipe_overrides: dict | None = None, ignore_index: int | None = None, seconds: float = 20.0,
            progress: bool = True, log: Callable[[str], None] | None = None, task: str | None = None) -> dict:
    """Run the comparison; returns the report dict (see the module docstring). Nothing is written
    here except the int8 model (into `out_dir`, or a temporary folder). `task` (feed.TASKS)
    overrides what the files' metadata or the output's shape say."""
    import onnxruntime as ort

    import bdecomp
    from bdecomp import native
    from bdecomp.decomposer.convert import resolve_recipe
    from bdecomp.models.datasets import iter_batches, list_images, load_label_mask, spread
    from bdecomp.runtime.bench import measure_latency
    from bdecomp.runtime.model import load

    say = log or (lambda s: None)
    original, decomposed, data = Path(original), Path(decomposed), Path(data)
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    if seconds <= 0:
        raise ConfigError("--seconds must be positive")
    if int8 and calib is None:
        raise ConfigError("--int8 needs --calib DIR (onnxruntime calibrates its int8 model on those images; "
                          "never on the images you report on)")
    threads = int(threads or native.usable_cpus())  # the same default as the native runtime's
    if threads < 1:
        raise ConfigError("--threads must be at least 1")
    notes: list[str] = []

    orig_m = OrtModel(original, threads)
    dec_m = load(decomposed, backend="native", threads=threads)
    if orig_m.decomposed:
        raise ConfigError(f"{original}: this is a decomposed model; give the original first")
    if orig_m.input_dtype != "float32":
        notes.append(f"the original computes in {orig_m.input_dtype}: \"fp32\" in this report stands for the "
                     "original as onnxruntime runs it")
    if not dec_m.decomposed:
        raise ConfigError(f"{decomposed}: not a decomposed model (no ai.bdecomp nodes); run bdecomp convert first")
    recipe, info = resolve_recipe(decomposed, dec_m.model, recipe_overrides)
    o_recipe, o_info = resolve_recipe(original, orig_m.model, recipe_overrides)
    if not info.get("task") and o_info.get("task"):
        recipe, info = o_recipe, o_info
    elif o_info.get("task") and recipe != o_recipe:
        notes.append("the two files imply different preprocessing; the decomposed file's recipe is used")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    task_given = task is not None
    task = task or output_task(output_shape(dec_m.model), recipe.channels_last, info.get("task"))
    if ignore_index is None and task == "segmentation" and info.get("ignore_index") not in (None, ""):
        ignore_index = int(info["ignore_index"])
    layout, items, n_total = _data_items(data, Path(labels) if labels else None, task, limit)
    if not items:
        raise InputFileError(f"{data}: no images")

    models: dict[str, Any] = {"original": orig_m, "decomposed": dec_m}
    tmpdir = None
    int8_info = None
    if int8:
        calib_imgs = spread(list_images(calib), CALIB_DEFAULT)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            int8_path = Path(out_dir) / (original.stem + ".int8.onnx")
        else:
            tmpdir = tempfile.TemporaryDirectory(prefix="bdecomp-compare-")
            int8_path = Path(tmpdir.name) / (original.stem + ".int8.onnx")
        if orig_m.input_dtype != "float32":
            raise ModelError(f"--int8: onnxruntime's static quantization takes float32 models; {original.name} "
                             f"computes in {orig_m.input_dtype}")
        say(f"quantizing {original.name} to int8 with onnxruntime (calibration: {len(calib_imgs)} images of {calib})")
        int8_info = quantize_int8(original, int8_path, calib_imgs, recipe, orig_m.input_name, progress)
        int8_info["path"] = str(int8_path)
        models["int8"] = OrtModel(int8_path, threads)

    # --- accuracy
    batch = _batch_size(orig_m.input_shape)
    labelled = layout != "images" and task != "outputs"
    cls_acc = {k: metrics.ClassificationAccumulator() for k in models}
    cms: dict[str, list[np.ndarray]] = {}  # per image: summed for the scores, resampled for the mIoU interval
    agree_px = {k: 0 for k in models}
    n_px = 0
    label_max, n_cls = -1, None  # segmentation: the largest label id seen (not ignored), the model's classes
    fidelity = {k: metrics.FidelityAccumulator([o.name for o in orig_m.model.graph.output])
                for k in models if k != "original" and task == "outputs"}
    n_images = 0
    first_x = None
    bar = _tqdm(len(items), "accuracy" if task != "outputs" else "outputs", progress)
    for x, meta in iter_batches(items, recipe, batch_size=batch):
        if first_x is None:
            first_x = np.ascontiguousarray(x[:1])
        if task == "outputs":
            raw = {k: m.run(x) for k, m in models.items()}
            for k, acc in fidelity.items():
                acc.update(raw["original"], raw[k])
            n_images += len(meta)
            bar.update(len(meta))
            continue
        outs = {k: classes_first(m.run(x)[0], recipe.channels_last) for k, m in models.items()}
        if task == "classification":
            lab = [s.label for s in meta]
            for k, y in outs.items():
                cls_acc[k].update(np.asarray(y).reshape(len(meta), -1), lab)
        else:
            preds = {k: np.argmax(y, axis=1) for k, y in outs.items()}  # ties: lower class index
            n_cls = outs["original"].shape[1]
            for i, s in enumerate(meta):
                mask = load_label_mask(s.label_path, preds["original"].shape[1:3])
                ids = mask[mask != ignore_index] if ignore_index is not None else mask
                label_max = max(label_max, int(ids.max())) if ids.size else label_max
                for k, p in preds.items():
                    cm = metrics.confusion_matrix(p[i], mask, n_cls, ignore_index)
                    cms.setdefault(k, []).append(cm)
                    agree_px[k] += int((p[i] == preds["original"][i]).sum())
                n_px += preds["original"][i].size
        n_images += len(meta)
        bar.update(len(meta))
    bar.close()
    if task == "segmentation" and n_cls is not None and label_max >= 0:
        top = n_cls - 2 if ignore_index == n_cls - 1 else n_cls - 1  # the largest id a label can score
        if label_max >= n_cls:
            notes.append(f"the labels use class ids up to {label_max} but the model predicts {n_cls} classes "
                         f"(0-{n_cls - 1}): pixels of the other ids can never be right; check that both follow "
                         "the same class list")
        elif label_max < top:
            notes.append(f"the labels seen use class ids 0-{label_max}"
                         + (f" (besides the ignored {ignore_index})" if ignore_index is not None else "")
                         + f" of the model's {n_cls}: the scores compare ids as they are")

    entries: dict[str, dict] = {}
    for k in models:
        e: dict[str, Any] = {}
        if task == "outputs":
            if k != "original":
                per_output = fidelity[k].result()
                worst = min(per_output.values(), key=lambda r: r["sqnr_db"])
                e.update(worst, outputs=per_output)
        elif task == "classification":
            r = cls_acc[k].result()
            e.update(top1=r["top1"], top5=r["top5"])
            e["agreement"] = metrics.agreement(cls_acc[k].predictions, cls_acc["original"].predictions)
            if k != "original":
                e["top1_diff"] = metrics.paired_difference(cls_acc["original"].top1_correct, cls_acc[k].top1_correct)
        else:
            e.update(metrics.segmentation_scores(np.sum(cms[k], axis=0), ignore_index))
            if k != "original":
                e["miou_diff"] = metrics.bootstrap_miou_difference(cms["original"], cms[k], ignore_index)
            e["agreement"] = agree_px[k] / n_px if n_px else None
        entries[k] = e

    # --- latency
    # a model whose batch is fixed to B > 1 runs B images (the one timed, padded) per call
    lat_batch = orig_m.batch or 1
    say(f"timing batch-{lat_batch} latency, {threads} thread(s) each, interleaved (budget {seconds:g} s)")
    runners = {k: (lambda m=m: m.run(first_x)) for k, m in models.items()}
    bar = _tqdm(None, "latency", progress, unit="round")
    lat = measure_latency(runners, seconds=seconds, progress=lambda r: bar.update(1))
    bar.close()
    for k, s in lat.items():
        entries[k].update(latency_ms=s["median_ms"], latency_p90_ms=s["p90_ms"], latency=s)
    base = lat["original"]["median_ms"]
    for k in models:
        m = lat[k]["median_ms"]
        entries[k]["speedup_vs_fp32"] = base / m if m else None

    # --- size
    n_weights = count_weights(orig_m.model)
    paths = {"original": original, "decomposed": decomposed}
    if int8:
        paths["int8"] = Path(int8_info["path"])
    sizes = {k: model_bytes(p) for k, p in paths.items()}
    for k, p in paths.items():
        b = sizes[k]
        entries[k].update(path=str(p), bytes=b, bits_per_weight=8 * b / n_weights if n_weights else None,
                          size_vs_fp32=b / sizes["original"])
    entries["decomposed"]["layers"] = decomposed_layer_storage(dec_m.model)
    if int8_info:
        entries["int8"]["quantization"] = int8_info

    report: dict[str, Any] = {
        "task": task,
        "n_images": n_images,
        "threads": threads,
        "data": {"dir": str(data), "layout": layout, "labelled": labelled, "limit": limit,
                 "n_available": n_total,
                 "selection": "all" if len(items) == n_total else "evenly spread over the sorted set",
                 "batch": batch},
        "recipe": recipe.to_json() if hasattr(recipe, "to_json") else str(recipe),
        "model": info.get("name"),
        "original": entries["original"],
        "decomposed": entries["decomposed"],
        "int8": entries.get("int8"),
        "agreement": entries["decomposed"].get("agreement"),
        "n_weights": n_weights,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
                    "isa": dec_m.isa or native.default_isa(), "onnxruntime": ort.__version__,
                    "bdecomp": getattr(bdecomp, "__version__", None)},
        "latency_method": {"batch": lat_batch, "warmup": 3, "min_runs": 20, "stop": "median 95% CI within ±2% or "
                           f"{seconds:g} s budget", "interleaved": True, "threads": threads,
                           "onnxruntime_spinning": "within a run, stopped after it"},
        "notes": notes,
    }
    if task == "segmentation":
        report["ignore_index"] = ignore_index
        if info.get("labels"):
            try:
                from bdecomp.models.labels import class_names

                report["class_names"] = class_names(info["labels"])
            except Exception:
                pass
    elif task == "outputs":
        shape = "x".join(str(d) if d else "?" for d in output_shape(orig_m.model))
        why = ("--task outputs" if task_given else
               f"the output ({shape}) is neither class scores nor a class map, so no label scores it")
        notes.append(f"{why}: each model's raw outputs are compared with the original's (SQNR over all images, "
                     "per-image relative error; with several outputs the table shows the worst)")
    elif not labelled:
        notes.append("the images have no labels: only agreement with the original is reported")
    elif info.get("labels"):
        report["labels"] = info["labels"]

    # --- per layer
    if per_layer:
        if calib is not None:
            pl_imgs = spread(list_images(calib), PER_LAYER_IMAGES)
            src = f"{len(pl_imgs)} images of --calib {calib}"
        else:
            pl_imgs = [s.path for s in items[:PER_LAYER_IMAGES]]
            src = f"the first {len(pl_imgs)} images of --data {data} (no --calib given)"
        say(f"per-layer report on {src}")
        report["per_layer"] = per_layer_report(original, dec_m, pl_imgs, recipe, threads,
                                               seconds=max(3.0, seconds / 2), progress=progress)
        report["per_layer"]["image_source"] = src
    if tmpdir is not None:
        entries["int8"]["path"] = None
        entries["int8"].setdefault("quantization", {})["path"] = "(temporary, deleted)"
        report["int8"] = entries["int8"]
        models.pop("int8", None)
        tmpdir.cleanup()
    return report
