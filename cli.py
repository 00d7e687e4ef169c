"""The `bdecomp` command: convert, infer, models.

User errors (bdecomp.errors) become one line on stderr with the error's own exit code; anything
else is a bug and says so in one line (BDECOMP_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from bdecomp.errors import BdecompError, ModelError

INTERNAL_ERROR = 70


class _Group(click.Group):
    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kwargs)
            sys.exit(code if isinstance(code, int) else 0)
        except click.exceptions.Abort:
            click.echo("bdecomp: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"bdecomp: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except BdecompError as e:
            click.echo(f"bdecomp: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("bdecomp: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("bdecomp: error: out of memory", err=True)
            sys.exit(INTERNAL_ERROR)
        except Exception as e:  # a bug: still one line unless asked for more
            if os.environ.get("BDECOMP_DEBUG"):
                traceback.print_exc()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if type(e).__module__.startswith("onnxruntime"):  # onnxruntime refusing the user's model
                click.echo(f"bdecomp: error: onnxruntime cannot run the model: {msg[:300]}", err=True)
                sys.exit(ModelError.exit_code)
            click.echo(f"bdecomp: internal error: {type(e).__name__}: {msg} (BDECOMP_DEBUG=1 shows the traceback)",
                       err=True)
            sys.exit(INTERNAL_ERROR)


def _recipe_options(f):
    """Preprocessing flags shared by the commands that read images."""
    opts = [
        click.option("--size", help="network input size H,W (or HxW); alone: squash the image to it"),
        click.option("--resize", help="resize the short side to N, then centre-crop"),
        click.option("--crop", help="centre crop H,W after --resize"),
        click.option("--mean", help="per-channel mean a,b,c (after --scale)"),
        click.option("--std", help="per-channel std a,b,c"),
        click.option("--scale", help="divide 0..255 pixels by this first (e.g. 255)"),
        click.option("--bgr", is_flag=True, default=None, help="feed BGR instead of RGB"),
        click.option("--channels-last/--channels-first", "channels_last", default=None,
                     help="feed [N,H,W,3] / [N,3,H,W] images (default: what the model's input shape says)"),
        click.option("--grayscale/--rgb", "grayscale", default=None,
                     help="feed one luminance channel / RGB (default: what the model's input shape says)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _task_option(f):
    return click.option("--task", type=click.Choice(["classification", "segmentation", "outputs"]),
                        help="what the model's output holds (default: the file's metadata, else its shape); "
                             "outputs: compare raw tensors")(f)


def _overrides(kw: dict) -> dict:
    return {k: kw.pop(k) for k in ("size", "resize", "crop", "mean", "std", "scale", "bgr", "channels_last", "grayscale")}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bdecomp", prog_name="bdecomp")
def main() -> None:
    """Binary decomposition of pretrained CNNs (ONNX), run with AND/popcount kernels."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="output file [MODEL.bd.onnx]")
@click.option("-k", "--bases", default=8, show_default=True, type=int, help="binary bases per output channel")
@click.option("-q", "--act-bits", default=8, show_default=True, type=int, help="activation bits Q")
@click.option("--calib", type=click.Path(path_type=Path), help="folder of calibration images "
              "(none: the original method's run-time min/max)")
@click.option("--calib-limit", default=128, show_default=True, type=int,
              help="calibration images used (evenly spread over the sorted folder)")
@click.option("--range", "range_method", type=click.Choice(["output", "mse", "minmax"]), default="output",
              show_default=True,
              help="how calibrated ranges are chosen: output = the MSE range with its steps scaled to "
                   "minimise the consuming layers' output error; mse = the activations' own error; "
                   "minmax = the observed range")
@click.option("--act-scales", type=click.Choice(["auto", "channel", "tensor"]), default="auto", show_default=True,
              help="calibrated activation steps: one per input channel (folded into the weights), one per "
                   "tensor, or auto: per channel for Q <= 4 and depthwise inputs, per tensor elsewhere")
@click.option("--method", type=click.Choice(["data", "weight"]), default="data", show_default=True,
              help="data: fit bases to each layer's output on calibration patches; weight: the original "
                   "weight-only fit (always used without --calib)")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="fold the mean output shift on calibration data into the bias")
@click.option("--budget", type=float, help="choose k and Q per layer for this MAC-weighted mean kernel cost in k*Q "
                                           "units: 4k per MAC up to Q = 4, 5k at Q = 5 and 7k for Q = 6-8 (the "
                                           "lookup-table kernel), or the popcount kernel's cost where lower; k=Q=4 "
                                           "costs 16 (needs --calib)")
@click.option("--target-drop", type=float, help="choose k and Q per layer for the smallest budget that keeps top-1 "
              "agreement with the original on the calibration images within this many points (needs --calib)")
@click.option("--min-depth", default=64, show_default=True, type=click.IntRange(0),
              help="layers with fewer weights per output (D = Cg*KH*KW), and convolutions over at most 4 "
                   "input channels (image inputs), stay float: they waste most of each 64-bit word and "
                   "run slower than float (0: decompose every layer)")
@click.option("--float-when-faster", is_flag=True,
              help="keep float the convolutions (and MatMuls over many rows) estimated faster in onnxruntime "
                   "fp32 than decomposed at their k and Q (small channel counts on large images): a faster, "
                   "more accurate, larger file")
@click.option("--speed-profile", help="what --float-when-faster's speed estimates are based on: a file written by "
              "`bdecomp speed-profile -o` (e.g. on the machine you deploy to) or 'builtin' [this machine's, "
              "measured once (~5 s) and cached]")
@click.option("--sequential/--no-sequential", default=None,
              help="refit each layer's bases, in graph order, to the inputs the layers before it produce once "
                   "decomposed (about one more run of the network over the calibration images). Default: on "
                   "with --calib and --method data when the decoded calibration images fit in 1 GiB")
@click.option("--block-reconstruction/--no-block-reconstruction", default=True, show_default=True,
              help="within the sequential refit, refit each convolution together with the convolutions that read "
                   "its output, directly or through its ReLU / ReLU6 (and through a float depthwise layer: MobileNet's "
                   "next pointwise layer), to their float outputs (about 1-15 s per block)")
@click.option("--layer-config", type=click.Path(path_type=Path), help="per-layer k/q/skip (JSON or TOML)")
@click.option("--report", type=click.Path(path_type=Path), help="write the conversion report as JSON")
@click.option("--threads", type=int, help="onnxruntime threads during calibration")
@click.option("--quiet", is_flag=True, help="no progress bars and no table")
@_recipe_options
def convert(model, output, bases, act_bits, calib, calib_limit, range_method, act_scales, method, bias_correction, budget,
            target_drop, min_depth, float_when_faster, speed_profile, sequential, block_reconstruction, layer_config,
            report, threads, quiet, **kw):
    """Decompose MODEL into binary bases + quantized inputs; writes a standard ONNX file."""
    from bdecomp.decomposer.convert import convert as run_convert

    rep = run_convert(model, output, bases=bases, act_bits=act_bits, calib=calib, calib_limit=calib_limit,
                      layer_config=layer_config, range_method=range_method, act_scales=act_scales, method=method,
                      bias_correction=bias_correction, budget=budget, target_drop=target_drop,
                      min_depth=min_depth, float_when_faster=float_when_faster, recipe_overrides=_overrides(kw),
                      progress=not quiet, report_path=report, threads=threads, sequential=sequential,
                      block_reconstruction=block_reconstruction, speed_profile=speed_profile)
    if not quiet:
        click.echo(rep.table())
    else:
        for line in rep.notes():
            click.echo(line)
    click.echo(f"wrote {rep.output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option("--backend", type=click.Choice(["native", "onnxruntime"]), default="native", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@click.option("--threads", type=int, help="threads for onnxruntime and the C kernels")
@click.option("--masks", "mask_dir", type=click.Path(path_type=Path), default=Path("masks"), show_default=True,
              help="segmentation models: folder for the colour mask PNGs")
@click.option("--overlay", is_flag=True, help="segmentation models: also write mask-over-image PNGs")
@click.option("--save-outputs", "save_dir", type=click.Path(path_type=Path),
              help="also write each image's raw outputs to DIR/IMAGE.npz (one array per output name)")
@_task_option
@_recipe_options
def infer(model, images, top_k, backend, as_json, threads, mask_dir, overlay, save_dir, task, **kw):
    """Classify (or segment) IMAGES with MODEL, original or decomposed. A folder stands for every
    image under it (sorted). Models whose output is neither class scores nor a class map (detector
    heads, depth maps) get each output's shape and range; --save-outputs keeps the tensors."""
    import io

    import numpy as np
    from tqdm import tqdm

    from bdecomp.decomposer.convert import resolve_recipe
    from bdecomp.decomposer.feed import classes_first
    from bdecomp.decomposer.load import write_atomic
    from bdecomp.models import load_image, preprocess
    from bdecomp.models.datasets import list_images
    from bdecomp.runtime.model import load
    from bdecomp.runtime.present import Presenter

    images = [p for path in images for p in (list_images(path) if path.is_dir() else [path])]
    m = load(model, backend=backend, threads=threads)
    recipe, info = resolve_recipe(model, m.model, _overrides(kw))
    present = Presenter({**info, "task": task} if task else info, top_k, mask_dir, overlay)
    results = []
    # with --json nothing is printed until the end: a bar on stderr (terminals only) shows progress
    for path in tqdm(images, desc="infer", unit="img", leave=False, disable=None if as_json else True):
        img = load_image(path)
        outs = dict(zip(m.output_names, m.run(preprocess(img, recipe))))
        if save_dir is not None:
            res_path = save_dir / (path.stem + ".npz")
            buf = io.BytesIO()
            np.savez(buf, **outs)
            save_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(buf.getvalue(), res_path)
        y = classes_first(next(iter(outs.values())), recipe.channels_last)
        res = present.result(path, img, y, outs)
        if save_dir is not None:
            res["saved"] = str(res_path)
        results.append(res)
        if not as_json:
            click.echo(present.text(res))
    if as_json:
        click.echo(json.dumps(results, indent=2))


@main.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("decomposed", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="labelled images: labels.tsv folder, ImageFolder tree, or segmentation pairs (DIR/test + "
                   "DIR/testannot, or a folder with a sibling FOLDERannot); any images for --task outputs")
@click.option("--labels", "label_dir", type=click.Path(path_type=Path),
              help="segmentation: folder of label images (same file names as --data)")
@click.option("--limit", type=int, help="use N images, evenly spread over the sorted set")
@click.option("--threads", type=int, help="threads for every model (default: all cores)")
@click.option("--int8", is_flag=True, help="add onnxruntime's own static int8 quantization (needs --calib)")
@click.option("--calib", type=click.Path(path_type=Path),
              help="calibration images for --int8 and --per-layer (not the images you report on)")
@click.option("--per-layer", is_flag=True, help="per-layer error (SQNR), time and bit-op rate")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path("compare-report"),
              show_default=True, help="folder for report.md, report.json and the plots")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the JSON report here")
@click.option("--ignore-index", type=int, help="segmentation: ground-truth class left out of the metrics "
              "[the model's void class]")
@click.option("--seconds", default=20.0, show_default=True, type=float, help="time budget of the latency runs")
@click.option("--no-plots", is_flag=True, help="do not draw PNG plots")
@click.option("--quiet", is_flag=True, help="no progress bars")
@_task_option
@_recipe_options
def compare(original, decomposed, data, label_dir, limit, threads, int8, calib, per_layer, output_dir, json_path,
            ignore_index, seconds, no_plots, quiet, task, **kw):
    """Accuracy, speed and size of DECOMPOSED against ORIGINAL (onnxruntime fp32, optionally int8)."""
    from bdecomp.runtime.compare import compare as run_compare
    from bdecomp.runtime.report_md import terminal_text, write_report

    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    rep = run_compare(original, decomposed, data, labels=label_dir, limit=limit, threads=threads, int8=int8,
                      calib=calib, per_layer=per_layer, out_dir=output_dir, recipe_overrides=_overrides(kw),
                      ignore_index=ignore_index, seconds=seconds, progress=not quiet, log=log, task=task)
    click.echo(terminal_text(rep))
    for p in write_report(rep, output_dir, json_path, plots=not no_plots):
        click.echo(f"wrote {p}")


@main.command("speed-profile")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="also write the profile to this file")
@click.option("--remeasure", is_flag=True, help="measure even if this machine's profile is cached")
@click.option("--quiet", is_flag=True, help="no progress bar")
def speed_profile_cmd(output, remeasure, quiet):
    """Measure this CPU's speed profile: what `convert --float-when-faster` decides by.

    Times 20 convolution shapes at 6 (k, Q) settings, binary kernels against onnxruntime fp32 on
    one thread (~5 s), fits the estimates' constants and caches them for this machine; with -o,
    writes them where `convert --speed-profile FILE` can use them (e.g. on another machine)."""
    from bdecomp.runtime import speed_profile as sp

    cases = None
    profile = None if remeasure else sp.cached(measure_if_missing=False)
    if profile is None:
        profile, cases = sp.measure(progress=not quiet)
        cache = sp.write_cache(profile)
    else:
        cache = sp.cache_path()
    click.echo(f"speed profile: {profile.short()}")
    if cases is not None:
        click.echo(f"on the cases it was fitted to, it picks the side measured faster in "
                   f"{sp.agreement(profile, cases)} of {len(cases)} layer x setting cases (the built-in profile: "
                   f"{sp.agreement(sp.speed.BUILTIN, cases)})")
    if cache is None:
        click.echo(f"could not cache it in {sp.cache_path().parent} (BDECOMP_CACHE_DIR sets where)")
    else:
        click.echo(f"cached in {cache}" + ("" if cases is not None else " (--remeasure measures again)"))
    if output:
        sp.write(profile, output)
        click.echo(f"wrote {output}")


@main.group()
def models() -> None:
    """The model registry: builders, known pretrained files and their preprocessing."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True)
def models_list(as_json):
    """Known models (recognised by sha256 when you bring the file)."""
    from bdecomp.models.registry import KNOWN

    rows = [{"name": k.name, "task": k.task, "labels": k.labels, "sha256": k.sha256, "source": k.source,
             "recipe": json.loads(k.recipe.to_json())} for k in KNOWN]
    from bdecomp.models.builders import BUILDERS, LABELS, RECIPES, TASKS

    rows += [{"name": n, "task": TASKS[n], "labels": LABELS[n], "sha256": None,
              "source": f"bdecomp models build {n} (random weights)", "recipe": json.loads(RECIPES[n].to_json()),
              "builder": True} for n in BUILDERS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        sha = (r["sha256"] or ("(builder)" if r.get("builder") else "(no verified hash)"))[:16]
        click.echo(f"{r['name']:<34} {r['task']:<14} {r['labels']:<8} {sha:<18} {r['source']}")


@models.command("build")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="ONNX file to write")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="seed of the random weights")
@click.option("--batch", default="N", show_default=True, help="batch dimension: a number, or a name for a dynamic one")
@click.option("--width", default=1.0, show_default=True, type=float, help="scale every channel count (small test models)")
@click.option("--size", help="input size H,W (default: the model's own, 224x224 or SegNet 360x480)")
def models_build(name, output, seed, batch, width, size):
    """Write an ONNX model NAME (alexnet, vgg16, resnet18/50/152, segnet) with random weights."""
    from bdecomp.decomposer.load import save_model
    from bdecomp.models.builders import BUILDERS, build, parameter_count
    from bdecomp.models.preprocess import parse_size

    if name not in BUILDERS:
        raise click.BadParameter(f"{name!r} is not a model builder; choose from {', '.join(BUILDERS)}",
                                 param_hint="NAME")
    batch = int(batch) if batch.strip().isdigit() else batch.strip()
    model = build(name, seed, batch, width=width, size=parse_size(size) if size else None)
    params = parameter_count({t.name: tuple(t.dims) for t in model.graph.initializer})
    nbytes = save_model(model, output)
    click.echo(f"wrote {output} ({nbytes / 1e6:.1f} MB, {params:,} parameters, seed {seed})")


if __name__ == "__main__":  # pragma: no cover
    main()
