#!/usr/bin/env python
"""Accuracy / size / conversion-time Pareto of one model over decomposition settings (issue 6;
a script, not a test).

    python benchmarks/pareto.py MODEL.onnx --calib CALIB_DIR --data MEASURE_DIR [--limit N] \
        [--out OUT_DIR] [--uniform 8,6,4,3] [--budgets 16,9,6] [--threads 1]

For every setting it runs `bdecomp convert ... --report R.json --quiet` (timed, wall clock) and
measures the converted file on the *measure* set (never the calibration set):

* original   — uniform k = Q, `--method weight --no-bias-correction --act-scales tensor
               --min-depth 0` (every layer decomposed; activation ranges still calibrated on CALIB_DIR)
* data-aware-all — uniform k = Q, default options but `--min-depth 0` (every layer decomposed)
* data-aware-tensor — uniform k = Q, data-aware fit + bias correction, one step per tensor
* data-aware — uniform k = Q, default options (data-aware fit + bias correction, per-channel steps at
               Q <= 4, layers with D < 64 left float)
* allocated  — `--budget B` (per-layer k, Q for a MAC-weighted mean k*Q of B), default options

Accuracy is computed with the onnxruntime backend (`bdecomp.load(p, backend="onnxruntime")`: the
decomposed maths through the ONNX function bodies), top-1 for classifiers, mIoU for segmentation
(ground-truth void ignored, see bdecomp.runtime.metrics), each drop with its paired 95 % interval
on the measure set (`drop_interval`: rows whose intervals overlap are not told apart). x axis of the plot: the report's
totals.mac_weighted_kq. Prints a markdown table, writes OUT/pareto.md, OUT/pareto.json and
OUT/pareto.png; conversion time is given as wall clock and as CPU time of the convert process
(user + system, all threads: the fairer number on a shared machine). Converted files are kept in OUT and re-used when their report exists (--force to redo).

`--select DIR` (after a run) picks "the cheapest setting within --max-drop points" on a labelled
selection set, e.g. the labelled calibration images, so the choice is not tuned on the reported images.

Helper for CIFAR: `--cifar-split DIR` builds OUT_ROOT/cifar-calib (every 10th image of the sorted
set, symlinks) and OUT_ROOT/cifar-measure (labels.tsv + symlinks of `--limit` images evenly spread
over the others) and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

BDECOMP = str(Path(sys.executable).with_name("bdecomp"))


def cifar_split(src: Path, root: Path, limit: int) -> None:
    from bdecomp.models.datasets import classification_set, spread

    items = classification_set(src)
    items.sort(key=lambda s: s.path.name)
    calib = [s for i, s in enumerate(items) if i % 10 == 0]
    rest = [s for i, s in enumerate(items) if i % 10 != 0]
    meas = spread(rest, limit)
    cdir, mdir = root / "cifar-calib", root / "cifar-measure"
    for d in (cdir, mdir):
        shutil.rmtree(d, ignore_errors=True)
        (d / "images").mkdir(parents=True)
    for s in calib:
        os.symlink(s.path.resolve(), cdir / "images" / s.path.name)
    with open(mdir / "labels.tsv", "w") as f:
        for s in meas:
            os.symlink(s.path.resolve(), mdir / "images" / s.path.name)
            f.write(f"{s.path.name}\t{s.label}\n")
    assert not {s.path.name for s in calib} & {s.path.name for s in meas}
    print(f"{cdir}: {len(calib)} calibration images; {mdir}: {len(meas)} measure images (disjoint)")


def evaluate(path: Path, data: Path, limit: int | None, threads: int, batch: int) -> dict:
    """Top-1/top-5 (classification) or pixel accuracy/mIoU (segmentation) of `path` on `data`,
    onnxruntime backend. Also returns the predictions for agreement with the float model."""
    import bdecomp
    from bdecomp.decomposer.convert import resolve_recipe
    from bdecomp.decomposer.feed import classes_first
    from bdecomp.models.datasets import (classification_set, detect, iter_batches, load_label_mask,
                                         segmentation_set, spread)
    from bdecomp.runtime import metrics

    m = bdecomp.load(path, backend="onnxruntime", threads=threads)
    recipe, info = resolve_recipe(path, m.model, None)
    seg = detect(data) == "segmentation"
    items = spread(segmentation_set(data) if seg else classification_set(data), limit)
    t0 = time.perf_counter()
    if not seg:
        acc = metrics.ClassificationAccumulator()
        for x, meta in iter_batches(items, recipe, batch_size=batch):
            acc.update(np.asarray(m.run(x)[0]).reshape(len(meta), -1), [s.label for s in meta])
        r = acc.result()
        return {"task": "classification", "n": acc.n, "top1": r["top1"], "top5": r["top5"],
                "metric": r["top1"], "pred": acc.predictions, "per_image": acc.top1_correct,
                "eval_s": time.perf_counter() - t0}
    ignore = int(info["ignore_index"]) if info.get("ignore_index") not in (None, "") else None
    preds, cms = [], []
    for x, meta in iter_batches(items, recipe, batch_size=batch):
        y = classes_first(m.run(x)[0], recipe.channels_last)
        p = np.argmax(y, axis=1)
        for i, s in enumerate(meta):
            mask = load_label_mask(s.label_path, p.shape[1:3])
            cms.append(metrics.confusion_matrix(p[i], mask, y.shape[1], ignore))
            preds.append(p[i].astype(np.uint8))
    sc = metrics.segmentation_scores(np.sum(cms, axis=0), ignore)
    return {"task": "segmentation", "n": len(items), "pixel_acc": sc["pixel_acc"], "miou": sc["miou"],
            "metric": sc["miou"], "pred": preds, "per_image": cms, "ignore": ignore,
            "eval_s": time.perf_counter() - t0}


def drop_interval(fl: dict, ev: dict) -> tuple[float, float] | None:
    """The 95 % interval of the drop (points; float minus decomposed) on the same images: paired
    normal approximation for top-1, paired bootstrap over images for mIoU (bdecomp.runtime.metrics)."""
    from bdecomp.runtime import metrics

    if ev["task"] == "classification":
        d = metrics.paired_difference(fl["per_image"], ev["per_image"])
    else:
        d = metrics.bootstrap_miou_difference(fl["per_image"], ev["per_image"], ev["ignore"])
    return None if d is None else (-100 * d["high"], -100 * d["low"])


def agreement(a, b) -> float:
    if isinstance(a[0], np.ndarray):
        return float(sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.size for x in a))
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def convert(model: Path, out: Path, args_extra: list[str], calib: Path, calib_limit: int | None,
            threads: int, force: bool) -> dict:
    rep = out.with_suffix(".json")
    meta = out.with_suffix(".meta.json")
    if not force and rep.exists() and out.exists() and meta.exists():
        return json.loads(meta.read_text())
    cmd = [BDECOMP, "convert", str(model), "-o", str(out), "--calib", str(calib), "--report", str(rep),
           "--quiet", "--threads", str(threads)] + args_extra
    if calib_limit:
        cmd += ["--calib-limit", str(calib_limit)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"convert failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()[-2000:]}")
    r = json.loads(rep.read_text())
    info = {"cmd": " ".join(cmd), "wall_s": wall, "cpu_s": cpu, "report_s": r["totals"].get("seconds"),
            "mac_weighted_kq": r["totals"]["mac_weighted_kq"], "bytes": out.stat().st_size,
            "allocation": r.get("allocation")}
    meta.write_text(json.dumps(info, indent=1))
    return info


def render(data: dict, out: Path, stem: str, title: str | None, cpu_json: Path | None) -> None:
    rows, metric_name, float_bytes = data["rows"], data["metric"], data["float_bytes"]
    fl = data["float"]
    cpu = json.loads(cpu_json.read_text()) if cpu_json and cpu_json.exists() else {}
    for r in rows:
        if "file" in r and r.get("cpu_s") is None and r["file"] in cpu:
            r["cpu_s"] = cpu[r["file"]]["cpu_s"]
    title = title or stem
    lines = [f"### {title}: {metric_name} on {fl['n']} images of {data['data']} (calibration: {data['calib']}; "
             f"onnxruntime backend)", "",
             f"float: {metric_name} {100 * fl['metric']:.2f}, {float_bytes:,} bytes", "",
             f"| method | setting | MAC-wt k·Q | {metric_name} | drop vs float (pts) | 95 % CI | agreement | bytes "
             f"| % of float | convert wall s | convert CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['setting']} | FAILED: {r['error'].splitlines()[-1][:80]} | | | | | | | | |")
            continue
        c = f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "–"
        ci = f"{r['drop_ci95'][0]:+.2f} to {r['drop_ci95'][1]:+.2f}" if r.get("drop_ci95") else "–"
        lines.append(f"| {r['method']} | {r['setting']} | {r['mac_weighted_kq']:.2f} | {100 * r['metric']:.2f} | "
                     f"{r['drop']:+.2f} | {ci} | {100 * r['agreement']:.1f}% | {r['bytes']:,} | "
                     f"{100 * r['size_vs_float']:.1f}% | {r['wall_s']:.0f} | {c} |")
    md = "\n".join(lines)
    print(md)
    (out / f"{stem}.pareto.md").write_text(md + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, mk in (("original", "o-"), ("data-aware-tensor", "d-"), ("data-aware-all", "v-"), ("data-aware", "s-"),
                       ("allocated", "^-")):
        pts = sorted((r["mac_weighted_kq"], 100 * r["metric"]) for r in rows
                     if r["method"] == method and "error" not in r)
        if pts:
            ax.plot(*zip(*pts), mk, label=method)
    ax.axhline(100 * fl["metric"], color="k", ls="--", lw=1, label=f"float ({100 * fl['metric']:.1f})")
    ax.set_xscale("log", base=2)
    ticks = sorted({round(r["mac_weighted_kq"]) for r in rows if "error" not in r})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("MAC-weighted mean k·Q (log scale)")
    ax.set_ylabel(f"{metric_name} (%)")
    ax.set_title(textwrap.fill(f"{title}: {metric_name} vs k·Q ({fl['n']} held-out images)", 70))  # long titles wrap
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.pareto.png", dpi=110)
    print(f"wrote {out / (stem + '.pareto.md')}, .png", file=sys.stderr)


def select(a) -> None:
    """Pick the setting on a selection set (see --select); writes OUT/STEM.select.json."""
    stem = a.model.stem
    data = json.loads((a.out / f"{stem}.pareto.json").read_text())
    from bdecomp.models.datasets import detect
    batch = a.batch or (2 if detect(a.select) == "segmentation" else 16)
    fl = evaluate(a.model, a.select, a.select_limit, a.threads, batch)
    res = []
    for r in data["rows"]:
        if "error" in r or r["method"] not in a.methods.split(","):
            continue
        ev = evaluate(Path(r["file"]), a.select, a.select_limit, a.threads, batch)
        res.append({"method": r["method"], "setting": r["setting"], "file": r["file"],
                    "mac_weighted_kq": r["mac_weighted_kq"], "select_metric": ev["metric"],
                    "select_drop": 100 * (fl["metric"] - ev["metric"]), "measure_metric": r["metric"],
                    "measure_drop": r["drop"]})
        print(f"{r['method']:>10} {r['setting']:>12}  kq {r['mac_weighted_kq']:6.2f}  selection-set "
              f"{100 * ev['metric']:.2f} (drop {res[-1]['select_drop']:+.2f})", file=sys.stderr, flush=True)
    ok = [r for r in res if r["select_drop"] <= a.max_drop]
    best = min(ok, key=lambda r: (r["mac_weighted_kq"], r["select_drop"])) if ok else None
    out = {"selection_set": str(a.select), "limit": a.select_limit, "n": fl["n"], "float": fl["metric"],
           "max_drop": a.max_drop, "rows": res, "chosen": best}
    (a.out / f"{stem}.select.json").write_text(json.dumps(out, indent=1))
    print("| method | setting | MAC-wt k·Q | selection-set metric | drop (sel.) | measure-set drop |")
    print("|---|---|---:|---:|---:|---:|")
    for r in res:
        mark = " **chosen**" if best is r else ""
        print(f"| {r['method']}{mark} | {r['setting']} | {r['mac_weighted_kq']:.2f} | {100 * r['select_metric']:.2f} | "
              f"{r['select_drop']:+.2f} | {r['measure_drop']:+.2f} |")
    print(f"float on selection set: {100 * fl['metric']:.2f} ({fl['n']} images); chosen: "
          f"{best and (best['method'] + ' ' + best['setting'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path)
    ap.add_argument("--calib-limit", type=int, default=None, help="passed to convert [convert's default]")
    ap.add_argument("--data", type=Path, help="measure set (labels.tsv folder or segmentation pairs)")
    ap.add_argument("--limit", type=int, default=None, help="measure images, evenly spread")
    ap.add_argument("--out", type=Path, default=Path("/tmp/meas/pareto"))
    ap.add_argument("--uniform", default="8,6,4,3", help="uniform k = Q values")
    ap.add_argument("--budgets", default="16,9,6", help="--budget values for 'allocated'")
    ap.add_argument("--methods", default="original,data-aware-tensor,data-aware-all,data-aware,allocated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--title", default=None)
    ap.add_argument("--cifar-split", type=Path, default=None, metavar="DIR")
    ap.add_argument("--cpu-json", type=Path, default=None,
                    help="JSON {output path: {cpu_s: ...}} of conversion CPU times (sampled from /proc by an "
                         "external monitor); adds a 'convert CPU s' column")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render the table and plot from OUT/STEM.pareto.json (no conversion or evaluation)")
    ap.add_argument("--select", type=Path, default=None, metavar="DIR",
                    help="with --render-only data: measure float and every converted file on this labelled "
                         "*selection* set (e.g. the labelled calibration images, never the reported ones) and "
                         "name the smallest MAC-weighted k*Q whose metric stays within --max-drop points of float")
    ap.add_argument("--select-limit", type=int, default=None)
    ap.add_argument("--max-drop", type=float, default=5.0)
    a = ap.parse_args()

    if a.cifar_split:
        cifar_split(a.cifar_split, a.out, a.limit or 1000)
        return
    if a.select:
        select(a)
        return
    if a.render_only:
        render(json.loads((a.out / f"{a.model.stem}.pareto.json").read_text()), a.out, a.model.stem, a.title,
               a.cpu_json)
        return
    if a.calib is None or a.data is None:
        ap.error("--calib and --data are required")
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.model.stem
    methods = a.methods.split(",")
    settings: list[tuple[str, str, list[str]]] = []
    for kq in [int(v) for v in a.uniform.split(",") if v]:
        if "original" in methods:
            settings.append(("original", f"k=Q={kq}", ["-k", str(kq), "-q", str(kq), "--method", "weight",
                                                       "--no-bias-correction", "--act-scales", "tensor",
                                                       "--min-depth", "0"]))
        if "data-aware-tensor" in methods:
            settings.append(("data-aware-tensor", f"k=Q={kq}", ["-k", str(kq), "-q", str(kq), "--act-scales",
                                                                "tensor"]))
        if "data-aware-all" in methods:
            settings.append(("data-aware-all", f"k=Q={kq}", ["-k", str(kq), "-q", str(kq), "--min-depth", "0"]))
        if "data-aware" in methods:
            settings.append(("data-aware", f"k=Q={kq}", ["-k", str(kq), "-q", str(kq)]))
    if "allocated" in methods:
        for b in [float(v) for v in a.budgets.split(",") if v]:
            settings.append(("allocated", f"budget {b:g}", ["--budget", f"{b:g}"]))

    from bdecomp.models.datasets import detect
    seg = detect(a.data) == "segmentation"
    batch = a.batch or (2 if seg else 16)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    log(f"float {a.model.name} on {a.data} (limit {a.limit}) ...")
    fl = evaluate(a.model, a.data, a.limit, a.threads, batch)
    float_bytes = a.model.stat().st_size
    metric_name = "mIoU" if seg else "top-1"
    log(f"  float {metric_name} {100 * fl['metric']:.2f} on {fl['n']} images ({fl['eval_s']:.0f} s)")

    rows = []
    for method, label, extra in settings:
        tag = f"{method}-{label.replace('=', '').replace(' ', '')}"
        out = a.out / f"{stem}.{tag}.bd.onnx"
        log(f"{method} {label}: converting ...")
        try:
            c = convert(a.model, out, extra, a.calib, a.calib_limit, a.threads, a.force)
            ev = evaluate(out, a.data, a.limit, a.threads, batch)
        except Exception as e:  # keep going: report the failure in the table
            log(f"  FAILED: {e}")
            rows.append({"method": method, "setting": label, "error": str(e)})
            continue
        row = {"method": method, "setting": label, "file": str(out), **c,
               "metric": ev["metric"], "drop": 100 * (fl["metric"] - ev["metric"]),
               "drop_ci95": drop_interval(fl, ev), "agreement": agreement(ev["pred"], fl["pred"]),
               "size_vs_float": c["bytes"] / float_bytes}
        if not seg:
            row["top5"] = ev["top5"]
        else:
            row["pixel_acc"] = ev["pixel_acc"]
        rows.append(row)
        log(f"  {metric_name} {100 * ev['metric']:.2f} (drop {row['drop']:+.2f}), kq {c['mac_weighted_kq']:.2f}, "
            f"{c['bytes']} B, convert {c['wall_s']:.0f} s, eval {ev['eval_s']:.0f} s")

    data = {"model": str(a.model), "data": str(a.data), "limit": a.limit, "calib": str(a.calib),
            "metric": metric_name, "float": {k: v for k, v in fl.items() if k not in ("pred", "per_image")},
            "float_bytes": float_bytes, "rows": rows}
    (a.out / f"{stem}.pareto.json").write_text(json.dumps(data, indent=1))
    render(data, a.out, stem, a.title, a.cpu_json)


if __name__ == "__main__":
    main()
