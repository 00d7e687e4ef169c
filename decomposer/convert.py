"""`convert`: read → simplify → calibrate → decompose → rewrite → write, with a report.

The input file is only read; the output is written atomically and is byte-identical for the same
model, images and options (no timestamps, seeded sampling, deterministic serialisation).
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from bdecomp.decomposer import (allocate, calibrate, decompose, feed, load, probe, reconstruct, refine, rewrite,
                                 simplify, speed)
from bdecomp.decomposer.feed import model_input
from bdecomp.decomposer.fit import data_aware_fits, fit_layer, output_fits, refit_codes
from bdecomp.decomposer.config import SKIPPED, LayerSetting, load_layer_config
from bdecomp.decomposer.report import LayerRow, Report
from bdecomp.errors import ConfigError, ModelError
from bdecomp.models import datasets, registry
from bdecomp.models.preprocess import Recipe, recipe_with_overrides
from bdecomp.runtime import speed_profile as machine_speed

META_PREFIX = "bdecomp."
METHODS = ("data", "weight")
RANGES = ("output", "mse", "minmax")
ACT_SCALES = ("auto", "channel", "tensor")
CHANNEL_MAX_BITS = 4  # "auto": per-channel steps up to this Q (and for depthwise inputs at any Q)
MIN_DEPTH = 64  # layers with fewer weights per output stay float unless asked (see `convert`)
IMAGE_CHANNELS = 4  # with min_depth > 0, convolutions over at most this many channels stay float too
MATMUL_MIN_ROWS = 8  # --float-when-faster weighs MatMuls over at least this many rows per image (one kernel block)


def resolve_recipe(path: str | Path, model: onnx.ModelProto, overrides: dict[str, Any] | None) -> tuple[Recipe, dict]:
    """Preprocessing of a model: its own metadata, else the registry (by sha256), else torchvision
    statistics at the model's input size; CLI overrides on top. Returns (recipe, model info)."""
    meta = {p.key: p.value for p in model.metadata_props}
    info: dict[str, Any] = {}
    base: Recipe | None = None
    if META_PREFIX + "recipe" in meta:
        base = Recipe.from_json(meta[META_PREFIX + "recipe"])
        info = {k: meta.get(META_PREFIX + k) for k in ("task", "labels", "name", "ignore_index")}
    else:
        known = registry.identify(path)
        if known is not None:
            base = known.recipe
            info = {"task": known.task, "labels": known.labels, "name": known.name,
                    "ignore_index": known.ignore_index}
    overrides = {k: v for k, v in (overrides or {}).items()
                 if v is not None and (v is not False or k in ("channels_last", "grayscale"))}
    if base is None:
        _, dims = model_input(model)
        # an input declared [N, H, W, 3 or 1] (not [N, 3 or 1, H, W]) takes channels-last images;
        # one channel, grayscale ones
        last = overrides.setdefault("channels_last", len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3))
        if len(dims) == 4:
            overrides.setdefault("grayscale", dims[3 if last else 1] == 1)
        hw = dims[1:3] if last else dims[2:4]
        size = tuple(hw) if len(dims) == 4 and None not in hw else None
        if size is not None and "size" not in overrides and "crop" not in overrides:
            overrides["size"] = size
    recipe = recipe_with_overrides(base, **overrides) if (overrides or base is None) else base
    info = {k: v for k, v in info.items() if v is not None}
    return recipe, info


def example_input(model: onnx.ModelProto, recipe: Recipe) -> np.ndarray:
    """An input for measuring shapes: zeros of the declared input size where every dimension past
    the batch is known, else a mid-grey image as the recipe prepares it (its size, layout)."""
    from PIL import Image

    from bdecomp.models.preprocess import preprocess

    _, dims = model_input(model)
    if dims and all(d for d in dims[1:]):
        return np.zeros([1] + list(dims[1:]), np.float32)
    return preprocess(Image.new("RGB", (64, 64), (128, 128, 128)), recipe)


def _progress(total: int | None, desc: str, enabled: bool):
    # disable=None: shown on a terminal, silent in logs and pipes
    return tqdm(total=total, desc=desc, unit="img" if "calib" in desc else "layer", disable=None if enabled else True,
                leave=False, dynamic_ncols=True)


def convert(model_path: str | Path, output_path: str | Path | None = None, *, bases: int = 8, act_bits: int = 8,
            calib: str | Path | None = None, calib_limit: int | None = 128, layer_config: str | Path | None = None,
            range_method: str = "output", method: str = "data", bias_correction: bool = True,
            act_scales: str = "auto",
            budget: float | None = None, target_drop: float | None = None, min_depth: int = MIN_DEPTH,
            float_when_faster: bool = False, recipe_overrides: dict[str, Any] | None = None, progress: bool = True,
            report_path: str | Path | None = None, threads: int | None = None, sequential: bool | None = None,
            block_reconstruction: bool = True,
            speed_profile: str | Path | speed.SpeedProfile | None = None) -> Report:
    """Decompose `model_path` and write the decomposed ONNX file; returns the conversion report.

    sequential (with method "data" and calibration images): after the fits, refit each layer's
    codes in graph order to the inputs the network with the layers before it decomposed produces
    (fit.refit_codes). None (default): when the data-aware fit runs and the decoded calibration
    images fit in memory (`_kept_batches`), where its passes cost about one more run of the
    network over them; True asks for it whatever that costs, False never.
    block_reconstruction: within that refit, each convolution whose output only convolutions
    read (directly, through its ReLU / Clip, or also through a float depthwise layer and its
    ReLU / Clip) is refitted together with them to their float outputs (reconstruct.py).

    method "data" (with calibration images) fits each layer's bases to its output on calibration
    patches seen through its own quantizer; "weight" is the original weight-only fit.
    bias_correction folds the mean output shift on calibration data into the bias.
    range_method "mse" picks each calibrated range for the activations' own squared quantization
    error, "minmax" takes the observed range, and "output" (default) scales the MSE steps by the
    factor in refine.STEP_MULTIPLIERS that minimises the output error of the layers reading the
    tensor (it needs their calibration patches: "mse" for `--method weight
    --no-bias-correction`). Against "mse" on held-out images (top-1 / agreement with float,
    1,000 images): SqueezeNet k=Q=4 66.0 → 67.7 % / 79.6 → 80.6 %, k=8 Q=4 68.6 → 69.5 % /
    83.2 → 85.9 %, budget 9 49.4 → 51.8 %; ResNet-56 k=Q=4 79.3 → 80.3 %, k=Q=3 78.1 → 77.4 %,
    budget 16 80.1 → 79.1 % (noise level there); MobileNet v1 0.25 unchanged (every factor 1);
    ESPNet k=Q=4 mIoU 51.6 → 51.2.
    act_scales "channel" gives every input channel of a calibrated quantizer its own step (folded
    into the consuming layers' weights); "tensor" one step per tensor; "auto" per channel where it
    was measured to help — Q ≤ 4, and inputs of depthwise layers — and per tensor elsewhere (at
    Q = 6–8 per-channel steps cost SqueezeNet 1.4–4.4 points of agreement).
    budget (MAC-weighted mean allocate.kernel_cost: the cheaper kernel family's work in k·Q units)
    or target_drop (points of top-1 agreement with the float model on the calibration images) let
    bdecomp choose k and Q per layer; layers whose k or Q the layer config fixes keep them.
    min_depth: layers with D (weights per output: Cg·KH·KW) below it stay float unless the layer
    config gives their k or Q. Such layers fill less than one 64-bit word per output (a first
    layer's 27 taps, 1×1 convolutions on 16–48 channels), so the binary kernels waste most of
    every word and ran 3–6x slower than onnxruntime's float on them (SqueezeNet, measured on AVX2
    and AVX-512); their weights are a small fraction of the model. With min_depth > 0 a
    convolution over at most IMAGE_CHANNELS input channels per group (a first layer on the image,
    whatever its kernel size) stays float too: 3 of every 64 bits per tap, or a patch-packing pass,
    made ResNet-18's 7×7 conv1 cost 5.0 ms of 40 (float: the whole model 36.0 ms; AlexNet's 11×11
    conv1: 14.8 → 13.1 ms, AVX-512, one thread).
    float_when_faster: convolutions (and MatMuls over MATMUL_MIN_ROWS+ rows per image) that
    speed.py estimates faster in onnxruntime's fp32 than decomposed at their (k, Q) stay float
    (faster *and* exact, at the price of their float weights' bytes) when, with their neighbours,
    they save more than a switch between the runtimes costs (speed.float_runs), and so do decomposed
    layers whose saving does not pay for the switches on their sides (speed.switch_worthy); with a
    budget, first those slower even at the cheapest setting, then those slower at the one allocated. Layers whose k or Q the layer config gives are decomposed.
    ResNet-56 `--budget 12`: its 16-channel first stage stays float, 1.25x faster end to end
    (1.93 vs 2.41 ms, one thread, AVX-512 Zen 4).
    speed_profile: the speed.SpeedProfile those estimates use (a profile, a file written by
    `bdecomp speed-profile -o`, or "builtin"); None: $BDECOMP_SPEED_PROFILE, else this machine's,
    which --float-when-faster measures the first time (runtime/speed_profile.py, cached)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if range_method not in RANGES:
        raise ConfigError(f"range must be one of {', '.join(RANGES)}, got {range_method!r}")
    if act_scales not in ACT_SCALES:
        raise ConfigError(f"act_scales must be one of {', '.join(ACT_SCALES)}, got {act_scales!r}")
    t0 = time.perf_counter()
    model_path = Path(model_path)
    output_path = Path(output_path) if output_path else model_path.with_name(model_path.stem + ".bd.onnx")
    if output_path.exists() and output_path.resolve() == model_path.resolve():
        raise ConfigError(f"{output_path}: refusing to overwrite the input model")
    cfg = load_layer_config(layer_config, bases, act_bits)
    allocating = budget is not None or target_drop is not None
    if allocating and calib is None:
        raise ConfigError("--budget and --target-drop need calibration images (--calib DIR)")
    if sequential and (calib is None or method != "data"):
        raise ConfigError("--sequential refits the data-aware fit: it needs --calib DIR and --method data")
    if budget is not None and target_drop is not None:
        raise ConfigError("give either --budget or --target-drop, not both")
    if budget is not None and not 1 <= budget <= 64:
        raise ConfigError(f"--budget must be a MAC-weighted k*Q in 1..64, got {budget}")
    if target_drop is not None and not 0 <= target_drop <= 100:
        raise ConfigError(f"--target-drop must be in 0..100 points, got {target_drop}")
    if not isinstance(min_depth, int) or min_depth < 0:
        raise ConfigError(f"--min-depth must be an integer >= 0, got {min_depth!r}")
    if calib_limit is not None and calib_limit < 1:
        raise ConfigError("--calib-limit must be at least 1")

    original = load.read_model(model_path)
    if any(o.domain == "ai.bdecomp" for o in original.opset_import):
        raise ModelError(f"{model_path}: already a decomposed model")
    bytes_before = load.model_bytes(model_path)
    recipe, info = resolve_recipe(model_path, original, recipe_overrides)
    task = feed.output_task(feed.output_shape(original), recipe.channels_last, info.get("task"))
    if target_drop is not None and task == "outputs":
        raise ConfigError(f"--target-drop bounds the share of class decisions that change, and the output of "
                          f"{model_path.name} is neither class scores nor a class map: use --budget")
    model = load.upgrade_opset(original, model_path)
    del original  # big models: keep one copy of the weights alive, not several
    rewrite.ensure_node_names(model)
    model, _ = simplify.constant_weights(model)
    model, folded = simplify.fold_batchnorm(model)
    model = simplify.infer_shapes(model)
    layers, floats = rewrite.find_layers(model, calibrate.measure_shapes(model, example_input(model, recipe), threads))
    if not layers and (any(why == rewrite.QUANTIZED_WEIGHT for *_, why in floats)
                       or any(n.op_type in rewrite.QUANTIZED_OPS for n in model.graph.node)):
        raise ModelError(f"{model_path}: an int8-quantized model (its layers' weights are already integers); "
                         "bdecomp decomposes float models: convert the float original")
    cfg.check_names({L.name for L in layers} | {L.output for L in layers})
    # --float-when-faster measures this machine the first time; the hint without it uses what is there
    profile = machine_speed.resolve(speed_profile, measure_if_missing=float_when_faster, progress=progress)

    chosen = []
    float_layers = [{"name": n, "op": op, "reason": why} for n, op, why in floats]
    for L in layers:
        s = cfg.setting((L.name, L.output))
        if s.skip:
            float_layers.append({"name": L.name, "op": L.op, "reason": SKIPPED, "macs": L.macs})
        elif not cfg.overridden((L.name, L.output)) and (why := _narrow(L, min_depth)):
            float_layers.append({"name": L.name, "op": L.op, "macs": L.macs, "reason": why})
        else:
            chosen.append((L, s))
    order = [L.name for L in layers]
    neighbours = rewrite.native_neighbours(model, layers)
    if float_when_faster:  # an allocation can give any setting: float must beat the cheapest
        chosen, slow = _keep_faster_float(order, chosen, cfg, {f["name"] for f in float_layers},
                                          lambda s: _allocation_settings() if allocating else [(s.k, s.q)], profile,
                                          neighbours)
        float_layers += slow

    qparams: dict[tuple[str, int, int], calibrate.QParams] = {}
    samplers: dict[str, calibrate.PatchSampler] = {}
    used_range = "dynamic-minmax"  # what the file's quantizers really got (recorded in its metadata)
    search: dict = {}
    n_calib = 0
    if calib is not None and chosen:
        images = datasets.spread(datasets.list_images(calib), calib_limit)
        n_calib = len(images)
        tensors = sorted({L.input for L, _ in chosen})
        if method == "data" or bias_correction or allocating:
            per_image = max(32, 8192 // max(1, len(images)))
            samplers = {L.name: calibrate.PatchSampler(
                L.input, L.depth, "Conv" if L.op == "Conv" else "Gemm", tuple(L.weight_shape[2:]) if L.op == "Conv" else (1, 1),
                L.strides, L.pads, L.dilations, L.group, per_image=per_image, seed=i) for i, (L, _) in enumerate(chosen)}
        cstats = ({(L.input, _channel_axis(L)): calibrate.ChannelStats(_channel_axis(L)) for L, _ in chosen}
                  if act_scales != "tensor" else {})
        depthwise_inputs = {L.input for L, _ in chosen if _depthwise(L)}

        def per_channel(L, q: int) -> bool:
            if act_scales != "auto":
                return act_scales == "channel"
            return q <= CHANNEL_MAX_BITS or L.input in depthwise_inputs

        with _progress(len(images), "calibrating", progress) as bar:
            batches = (x for x, _ in datasets.iter_batches(images, recipe, batch_size=feed.fixed_batch(model) or 1))
            stats = calibrate.collect_stats(model, tensors, batches, threads=threads, on_batch=bar.update,
                                            samplers=list(samplers.values()), channel_stats=cstats)

        base_range = "mse" if range_method == "output" else range_method
        # "output" needs the readers' calibration patches; without them the ranges stay "mse"
        used_range = base_range if range_method == "output" and not samplers else range_method

        def qparams_for(L, q: int) -> calibrate.QParams:
            key = (L.input, q, _channel_axis(L))
            if key not in qparams:
                qp = calibrate.choose_qparams(stats[L.input], q, base_range)
                qp = (calibrate.choose_channel_scales(cstats[key[0], key[2]], qp, base_range)
                      if per_channel(L, q) else qp)
                if used_range == "output":
                    uses = [(samplers[M.name].patches(), M.weight, M.group) for M, _ in chosen
                            if (M.input, _channel_axis(M)) == (key[0], key[2]) and samplers[M.name].count]
                    qp = refine.refine_for_outputs(qp, uses)
                qparams[key] = qp
            return qparams[key]

        if allocating:
            chosen, search = _allocate(model, chosen, cfg, qparams_for, samplers, budget, target_drop, task,
                                       images, recipe, threads, progress, method)
            if float_when_faster:  # now at the settings allocated
                chosen, slow = _keep_faster_float(order, chosen, cfg, {f["name"] for f in float_layers},
                                                  lambda s: [(s.k, s.q)], profile, neighbours)
                float_layers += slow
                search.update(_mac_means(chosen))
        qparams = {(L.input, s.q, _channel_axis(L)): qparams_for(L, s.q) for L, s in chosen}

    faster_in_float = {} if float_when_faster else _float_hint(order, chosen, cfg, {f["name"] for f in float_layers},
                                                                profile, neighbours)
    plans, rows = _fit_all(chosen, qparams, samplers, method, bias_correction, progress)
    refitted = False
    blocks: list[dict] = []
    if sequential is not False and samplers and method == "data":  # (no layer left to decompose: nothing to refit)
        plans, refitted, blocks = _refit_sequential(model, plans, rows, samplers, images, recipe, threads, progress,
                                                    cheap_only=sequential is None,
                                                    blocks_of=layers if block_reconstruction else None)
    out = rewrite.rewrite(model, plans)
    meta = {"version": "1", "recipe": recipe.to_json(), "source_sha256": registry.file_sha256(model_path),
            "options": json.dumps({"calib_images": n_calib,
                                   "method": method if n_calib else "weight",
                                   "bias_correction": bool(bias_correction and n_calib),
                                   "range_method": used_range,
                                   "act_scales": act_scales if n_calib else "tensor",
                                   "sequential": refitted,
                                   "blocks": sum(b["kept"] for b in blocks),
                                   **({"speed_profile": profile.machine} if float_when_faster else {})},
                                  sort_keys=True)}
    meta.update({k: str(v) for k, v in info.items()})
    existing = {p.key for p in out.metadata_props}
    for k, v in sorted(meta.items()):
        if META_PREFIX + k not in existing:
            out.metadata_props.add(key=META_PREFIX + k, value=v)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:  # a bug of ours, not the user's input
        raise RuntimeError(f"decomposed model fails the ONNX checker: {str(e).splitlines()[0]}") from None
    bytes_after = load.save_model(out, output_path)
    report = Report(str(model_path), str(output_path), rows, float_layers, bytes_before, bytes_after,
                    time.perf_counter() - t0, n_calib, folded, search, faster_in_float,
                    profile.short() if float_when_faster or faster_in_float else "", blocks)
    if report_path:
        load.write_atomic(report.to_json().encode(), report_path)
    return report


def _narrow(L: rewrite.Layer, min_depth: int) -> str | None:
    """Why `L` stays float under --min-depth (None: it is decomposed)."""
    if L.depth < min_depth:
        return f"D = {L.depth} < --min-depth {min_depth} (float is faster)"
    if min_depth > 0 and L.op == "Conv" and len(L.weight_shape) == 4 and L.weight_shape[1] <= IMAGE_CHANNELS:
        return f"{L.weight_shape[1]} input channels (float is faster)"
    return None


def _allocation_settings() -> list[tuple[int, int]]:
    """Every setting an allocation can give a layer (the fastest decides whether it can beat float)."""
    return [(k, q) for k in allocate.K_CHOICES if k >= allocate.MIN_ALLOCATED_K for q in allocate.Q_CHOICES]


def _estimates(L: rewrite.Layer, settings: list[tuple[int, int]],
               profile: speed.SpeedProfile) -> tuple[float, float, int, int] | None:
    """(decomposed ms at the fastest of `settings`, float ms, that k, that Q) for the layers that
    --float-when-faster may leave float, else None. Convolutions, and MatMuls over several rows
    per image (ConvNeXt's and ViT's [N, H, W, C] / [N, tokens, C] inputs), which the kernels run
    as 1×1 convolutions over the rows and onnxruntime as a GEMM: at stage 1 of ConvNeXt-T (3136
    rows, 96 ↔ 384 channels) fp32 was faster at k=Q=4. Not depthwise layers, which run their own
    kernel, nor a Gemm or one-row MatMul: at batch 1 those are memory-bound, where binary weights
    read a fraction of the float bytes."""
    if L.op == "MatMul" and (L.out_pixels or 1) >= MATMUL_MIN_ROWS:
        cin, taps, in_pixels = L.depth, 1, L.out_pixels
    elif L.op != "Conv" or _depthwise(L) or L.out_pixels is None or len(L.weight_shape) != 4:
        return None
    else:
        cin, taps = L.weight_shape[1] * L.group, L.weight_shape[2] * L.weight_shape[3]
        in_pixels = L.out_pixels * L.strides[0] * L.strides[1]
    t_dec, (k, q) = min((profile.decomposed_ms(cin, L.cout, L.group, taps, in_pixels, L.out_pixels, k, q), (k, q))
                        for k, q in settings)
    return t_dec, profile.float_ms(cin, L.cout, L.group, taps, L.out_pixels), k, q


def _faster_float_layers(order, chosen, cfg, floats, settings_of, profile, neighbours) -> dict[str, tuple[float, str]]:
    """{name: (ms saved, reason)} of the layers of `chosen` that --float-when-faster leaves float:
    speed.float_runs of those estimated faster in float at settings_of(setting), then those of the
    rest whose saving does not pay for their switches between the runtimes (speed.switch_worthy);
    layers whose k or Q the layer config gives are decomposed."""
    est = {L.name: e for L, s in chosen
           if not cfg.overridden((L.name, L.output)) and (e := _estimates(L, settings_of(s), profile))}
    go = speed.float_runs(order, {n: t_dec - t_float for n, (t_dec, t_float, _, _) in est.items() if t_float < t_dec},
                          floats, profile.switch_ms)
    rest = {L.name for L, _ in chosen} - go
    keep, switches = speed.switch_worthy({n: t_float - t_dec for n, (t_dec, t_float, _, _) in est.items()},
                                         neighbours, rest, profile.switch_ms)
    out = {}
    for name in order:
        if name in go or name in rest - keep:
            t_dec, t_float, k, q = est[name]
            how = "" if name in go else " and its switches between the runtimes"
            out[name] = (t_dec - t_float + switches.get(name, 0.0),
                         f"faster in float{how}: est. {t_float:.3f} ms vs {t_dec:.3f} ms at k={k}, Q={q} "
                         f"(--float-when-faster)")
    return out


def _keep_faster_float(order, chosen, cfg, floats, settings_of, profile, neighbours):
    """`chosen` without the layers --float-when-faster leaves float, and their float_layers entries."""
    go = _faster_float_layers(order, chosen, cfg, floats, settings_of, profile, neighbours)
    slow = [{"name": L.name, "op": L.op, "macs": L.macs, "reason": go[L.name][1]} for L, _ in chosen if L.name in go]
    return [(L, s) for L, s in chosen if L.name not in go], slow


def _float_hint(order, chosen, cfg, floats, profile, neighbours) -> dict:
    """Without --float-when-faster: the decomposed layers it would keep float, and the time they
    are estimated to cost over onnxruntime fp32 (one thread), for the report to point at the
    option ({} if none). Users converting depthwise-separable networks at k=Q=4 otherwise find a
    model slower than the original with no word why (MobileNet v2: 0.66x; with the option 0.98x)."""
    go = _faster_float_layers(order, chosen, cfg, floats, lambda s: [(s.k, s.q)], profile, neighbours)
    if not go:
        return {}
    return {"layers": list(go), "est_ms": round(sum(gain for gain, _ in go.values()), 4)}


def _channel_axis(L: rewrite.Layer) -> int:
    """Where a layer's input keeps its channels: NCHW for Conv, the last axis for Gemm/MatMul."""
    return 1 if L.op == "Conv" else -1


def _allocate(model, chosen, cfg, qparams_for, samplers, budget, target_drop, task, images, recipe, threads,
              progress, method):
    """Choose (k, Q) per layer; returns the new `chosen` list and what the search saw. `task`
    (feed.TASKS) says whether the output's axis 1 holds classes (see allocate.sensitivity)."""
    free = [i for i, (L, _) in enumerate(chosen) if not cfg.overridden((L.name, L.output))]
    fixed = {i: (s.k, s.q) for i, (_, s) in enumerate(chosen) if i not in free}
    costs = []
    with _progress(len(chosen), "measuring layers", progress) as bar:
        for i, (L, s) in enumerate(chosen):
            if i in free:
                decomps = (output_fits(L, samplers[L.name], allocate.K_CHOICES) if method == "data" else
                           {k: decompose.decompose(L.weight, k) for k in allocate.K_CHOICES})
                err = allocate.allocatable(allocate.layer_errors(L.weight, L.group, samplers[L.name],
                                                                 lambda q, L=L: qparams_for(L, q), decomps,
                                                                 allocate.useful_qs(_cost_grid(L))))
            else:
                err = np.full((len(allocate.K_CHOICES), len(allocate.Q_CHOICES)), np.inf)
                err[allocate.K_CHOICES.index(s.k), allocate.Q_CHOICES.index(max(s.q, 2))] = 0.0
            costs.append(allocate.LayerCosts(L.name, L.macs, err, _cost_grid(L)))
            bar.update(1)
    n_eval = allocate.SENSITIVITY_IMAGES if budget is not None else allocate.EVAL_IMAGES
    eval_images = images[:: max(1, len(images) // n_eval)][:n_eval]
    xs = [x for x, _ in datasets.iter_batches(eval_images, recipe, batch_size=1)]

    def outputs(m: onnx.ModelProto, batch: list[np.ndarray]) -> list[np.ndarray]:
        return [feed.classes_first(y, recipe.channels_last) for y in calibrate.first_outputs(m, batch, threads)]

    ref = outputs(model, xs)
    probe_ref = ref[: allocate.SENSITIVITY_IMAGES]
    energy = allocate.output_energy(probe_ref, centre=task != "outputs")
    probes = probe.ProbeRuns(model, xs[: allocate.SENSITIVITY_IMAGES], threads)
    weights = {}
    with _progress(len(free), "measuring sensitivity", progress) as bar:
        for i in free:
            L = chosen[i][0]
            qp = qparams_for(L, allocate.PROBE[1])
            dec, L2, layer_err = fit_layer(L, allocate.PROBE[0], qp, samplers[L.name], "weight", True)
            out = probes.outputs(rewrite.rewrite(model, [rewrite.Plan(L2, dec, allocate.PROBE[1], qp)]))
            out = probe_ref if out is None else [feed.classes_first(y, recipe.channels_last) for y in out]
            weights[L.name] = allocate.sensitivity(probe_ref, out, layer_err,
                                                   centre=task != "outputs", energy=energy)
            costs[i].err = allocate.weighted(costs[i].err, weights[L.name])
            bar.update(1)
    if budget is not None:
        choice = [fixed.get(i, c) for i, c in enumerate(allocate.allocate(costs, budget))]
        search = {"budget": budget}
    else:
        fitted: dict[tuple[str, int, int], rewrite.Plan] = {}

        def evaluate(ch):
            """Agreement of a candidate built with weight-only bases + bias correction (the final
            data-aware fit can only do better; without the bias correction low-Q candidates look
            far worse than they end up)."""
            plans = []
            for (L, _), (k, q) in zip(chosen, ch):
                if (L.name, k, q) not in fitted:
                    qp = qparams_for(L, q)
                    dec, L2, _ = fit_layer(L, k, qp, samplers.get(L.name), "weight", True)
                    fitted[L.name, k, q] = rewrite.Plan(L2, dec, q, qp)
                plans.append(fitted[L.name, k, q])
            return allocate.agreement(ref, outputs(rewrite.rewrite(model, plans), xs))

        choice, tried = allocate.search_budget(costs, fixed, target_drop, evaluate)
        search = {"target_drop": target_drop, "tried": tried, "eval_images": len(xs)}
    search["sensitivity"] = {name: round(float(w), 6) for name, w in weights.items()}
    new = [(L, LayerSetting(k, q, False)) for (L, _), (k, q) in zip(chosen, choice)]
    search.update(_mac_means(new))
    return new, search


def _mac_means(chosen) -> dict[str, float]:
    """The MAC-weighted k·Q and kernel cost of the decomposed layers' settings (the report's
    allocation totals)."""
    costs = [allocate.LayerCosts(L.name, L.macs, np.zeros(0), _cost_grid(L)) for L, _ in chosen]
    choice = [(s.k, s.q) for _, s in chosen]
    return {"mac_weighted_kq": allocate.mac_weighted_kq(costs, choice),
            "mac_weighted_cost": allocate.mac_weighted_cost(costs, choice)}


def _depthwise(L: rewrite.Layer) -> bool:
    """One input and one output channel per group (groups = C = Cout > 1): the runtime's depthwise kernel."""
    return L.op == "Conv" and L.group > 1 and L.group == L.cout and L.weight_shape[1] == 1


def _cost_grid(L: rewrite.Layer) -> np.ndarray:
    """allocate.cost_grid of a layer's input channels per group; depthwise layers run their own
    kernel (no packed words to fill) and keep the default grid."""
    if _depthwise(L):
        return allocate.cost_grid()
    return allocate.cost_grid(L.weight_shape[1] if L.op == "Conv" else L.depth)


def _refit_sequential(model, plans, rows, samplers, images, recipe, threads, progress, cheap_only=False,
                      blocks_of=None):
    """fit.refit_codes for every layer in graph order, each fed by the network with the layers
    before it decomposed (their refitted codes included); updates the rows' weight errors (their
    output errors stay those of the first fit, on float inputs). Layers beyond the data-aware
    fit's limits (fit.data_aware_fits: big FC layers) keep their bases. Layers in a row whose
    inputs do not depend on each other's outputs share a pass (`_shared_passes`). With
    `blocks_of` (the model's layers as find_layers gave them, where a block's float readers come
    from), each block (reconstruct.find_blocks) is refitted right after its last reader: that
    reader's pass also takes the block's reconstruct.NestedSampler, and one float pass beforehand
    every block's targets. Returns (plans, whether it refitted, what each block gave: layer
    names, held-out block error before and after, whether it was kept): with `cheap_only`, not
    when the calibration images do not fit in memory (every pass would decode them and run the
    network from them)."""
    batch = feed.fixed_batch(model)
    read, in_memory = _kept_batches(images, recipe, batch or 1)
    if cheap_only and not in_memory:
        return plans, False, []
    passes = calibrate.FrontierPasses(read, in_memory, feed.model_input(model)[0], feed.input_dtype(model), batch, threads)
    todo = [i for i, p in enumerate(plans) if p.qparams is not None and samplers.get(p.layer.name) is not None
            and samplers[p.layer.name].count and data_aware_fits(p.layer, p.dec.k)]
    blocks = [b for b in reconstruct.find_blocks(model, plans, blocks_of)
              if b.a in todo and set(b.readers) <= set(todo)] if blocks_of is not None else []
    nested, targets = {}, {}
    for b in blocks:
        A, readers = plans[b.a].layer, [plans[j].layer for j in b.readers] + list(b.fixed)
        cap = reconstruct.nested_cap(A, readers, b.through)
        nested[b] = reconstruct.NestedSampler(A, readers, max(16, -(-cap // max(1, len(images)))), seed=b.a,
                                              through=b.through)
        targets[b] = [reconstruct.TargetSampler(nested[b], L) for L in readers]
    if targets:  # the float network's outputs of every block's readers: one pass
        wanted = [t for ts in targets.values() for t in ts]
        calibrate.collect_stats(simplify.upstream(model, [t.tensor for t in wanted]), [], read(),
                                threads=threads, samplers=wanted)
    results = []
    with _progress(len(todo) + len(blocks), "refitting to decomposed inputs", progress) as bar:
        for run in _shared_passes(model, [plans[i].layer for i in todo]):
            first = todo[run[0]]
            fresh = {todo[r]: samplers[plans[todo[r]].layer.name].fresh() for r in run}
            partly = rewrite.rewrite(model, plans[:first]) if first else model
            # a block's inputs come from its last reader's pass: after the blocks before it are refitted
            passes.sample(partly, list(fresh.values()) + [nested[b] for b in blocks if b.last in fresh])
            for i, seq in fresh.items():
                plan = plans[i]
                plans[i] = replace(plan, dec=refit_codes(plan, samplers[plan.layer.name].patches(), seq.patches()))
                rows[i].weight_error = decompose.total_relative_error(plan.layer.weight, plans[i].dec)
                bar.update(1)
            for b in (b for b in blocks if b.last in fresh):
                sampler, outs = nested.pop(b), targets.pop(b)
                if sampler.count >= reconstruct.MIN_SAMPLED and all(t.count == sampler.count for t in outs):
                    patches, valid = sampler.arrays()
                    ys = [t.arrays()[0] for t in outs]
                    readers = [plans[j] for j in b.readers]
                    taps = [sampler.tap_index(L) for L in [p.layer for p in readers] + list(b.fixed)]
                    new, before, after = reconstruct.reconstruct_block(
                        plans[b.a], readers, list(b.fixed), taps, patches, valid, ys, seed=b.a, act=b.act,
                        through=b.through, through_act=b.through_act)
                    kept = new[0] is not plans[b.a]
                    if kept:  # the passes kept values computed with the old A
                        passes.forget(model, plans[b.a].layer.output)
                    results.append({"first": plans[b.a].layer.name, "readers": [p.layer.name for p in readers],
                                    "float_readers": [L.name for L in b.fixed],
                                    "through": b.through.name if b.through is not None else None,
                                    "positions": len(patches), "error_before": before, "error_after": after,
                                    "kept": kept})
                    for i, plan in zip((b.a,) + b.readers, new):
                        plans[i] = plan
                        rows[i].weight_error = decompose.total_relative_error(plan.layer.weight, plan.dec)
                bar.update(1)
    return plans, True, results


def _shared_passes(model: onnx.ModelProto, layers: list[rewrite.Layer]) -> list[list[int]]:
    """`layers` (in graph order) cut into runs of consecutive layers none of whose inputs depends
    on another's output in the run: one --sequential pass gives all their inputs as the layer by
    layer passes would (a fire module's two expand layers, a downsampling shortcut beside its
    block's first conv, parallel branches)."""
    runs: list[list[int]] = []
    for i, L in enumerate(layers):
        below = {o for n in simplify.upstream_nodes(model.graph, [L.input]) for o in n.output}
        if runs and not any(layers[j].output in below for j in runs[-1]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _kept_batches(images, recipe, batch: int, max_bytes: int = 1 << 30):
    """(a function giving the calibration batches again on each call, whether they are in memory):
    decoded once and kept when they fit in `max_bytes`, else decoded again each time.
    The --sequential refit reads them again (decoding was a third of its passes' time on SqueezeNet)
    and keeps its frontier only when they are in memory (calibrate.FrontierPasses)."""
    read = lambda: (x for x, _ in datasets.iter_batches(images, recipe, batch_size=batch))
    first = next(read(), None)
    if first is None or first.nbytes * -(-len(images) // batch) > max_bytes:
        return read, False
    kept = list(read())
    return (lambda: iter(kept)), True


def _fit_all(chosen, qparams, samplers, method, bias_correction, progress):
    """Fit every chosen layer; returns the rewrite plans and the report rows."""
    plans, rows = [], []
    with _progress(len(chosen), "decomposing", progress) as bar:
        for L, s in chosen:
            qp = qparams.get((L.input, s.q, _channel_axis(L)))
            sampler = samplers.get(L.name) if qp is not None else None
            dec, L2, out_err = fit_layer(L, s.k, qp, sampler, method, bias_correction)
            plans.append(rewrite.Plan(L2, dec, s.q, qp))
            err = decompose.total_relative_error(L2.weight, dec)
            bytes_after = dec.packed_bytes() + 4 * dec.coeffs.size + 4 * L.cout
            rows.append(LayerRow(L.name, L.op, L.depth, L.cout, s.k, s.q, L.macs, err, 4 * (L.weight.size + L.cout),
                                 bytes_after, qp.scale if qp else None, qp.zero_point if qp else None, out_err))
            bar.update(1)
    return plans, rows
