"""Rendering a `bdecomp compare` report: terminal table, report.md, report.json and PNG plots.

Plots need matplotlib (`pip install "bdecomp[plot]"`); without it they are skipped with a note
and everything else is written as usual.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from bdecomp.runtime.compare import MODEL_KEYS

LABELS = {"original": "original (onnxruntime fp32)", "decomposed": "decomposed (native)",
          "int8": "int8 (onnxruntime QDQ)"}


# ---------------------------------------------------------------- formatting helpers


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt="{:.2f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return fmt.format(v)


def _mb(b) -> str:
    return "–" if b is None else f"{b / 1e6:.2f} MB"


def _models(report: dict) -> list[str]:
    return [k for k in MODEL_KEYS if report.get(k)]


def _db(v) -> str:
    return _num(v, "{:.1f} dB")


def _acc_cols(report: dict) -> list[tuple[str, str, Callable[[Any], str]]]:
    """(title, report key, formatter) of the columns that say how close each model stays."""
    if report["task"] == "segmentation":
        return [("pixel acc", "pixel_acc", _pct), ("mIoU", "miou", _pct), ("agreement", "agreement", _pct)]
    if report["task"] == "outputs":
        return [("output SQNR", "sqnr_db", _db), ("median rel. error", "rel_err_median", _pct),
                ("p90 rel. error", "rel_err_p90", _pct)]
    return [("top-1", "top1", _pct), ("top-5", "top5", _pct), ("top-1 agreement", "agreement", _pct)]


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["model"] + [c for c, _, _ in _acc_cols(report)] + ["median ms", "p90 ms", "speed vs fp32", "size",
                                                                "size vs fp32", "bits/weight"]
    rows = []
    for k in _models(report):
        e = report[k]
        rows.append([k] + [fmt(e.get(key)) for _, key, fmt in _acc_cols(report)] + [
            _num(e.get("latency_ms")), _num(e.get("latency_p90_ms")), _num(e.get("speedup_vs_fp32"), "{:.2f}x"),
            _mb(e.get("bytes")), _pct(e.get("size_vs_fp32")), _num(e.get("bits_per_weight"), "{:.2f}")])
    return head, rows


def headline(report: dict) -> list[str]:
    """One sentence per non-original model: the ratios users decide on."""
    out = []
    main_key = "miou" if report["task"] == "segmentation" else "top1"
    main_name = "mIoU" if report["task"] == "segmentation" else "top-1"
    o = report["original"]
    for k in ("decomposed", "int8"):
        e = report.get(k)
        if not e:
            continue
        parts = []
        if e.get("speedup_vs_fp32"):
            parts.append(f"{e['speedup_vs_fp32']:.2f}x the speed of fp32")
        if k == "decomposed" and report.get("int8") and report["int8"].get("latency_ms") and e.get("latency_ms"):
            parts.append(f"{report['int8']['latency_ms'] / e['latency_ms']:.2f}x the speed of int8")
        if e.get("size_vs_fp32") is not None:
            parts.append(f"{100 * e['size_vs_fp32']:.1f}% of the fp32 size")
        if e.get(main_key) is not None and o.get(main_key) is not None:
            ci = e.get("top1_diff" if main_key == "top1" else "miou_diff")
            parts.append(f"{main_name} {100 * (e[main_key] - o[main_key]):+.1f} points" + (
                f" (95% CI {100 * ci['low']:+.1f} to {100 * ci['high']:+.1f} on {ci['n']:,} images)"
                if ci and ci["n"] > 1 else ""))
        if e.get("sqnr_db") is not None:
            parts.append(f"output SQNR {_db(e['sqnr_db'])}, median relative error {_pct(e.get('rel_err_median'))}")
        if e.get("agreement") is not None:
            parts.append(f"{100 * e['agreement']:.1f}% agreement with fp32")
        out.append(f"{k}: " + ", ".join(parts))
    return out


def _table_text(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(head), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def _table_md(head: list[str], rows: list[list[str]], align_first_left: bool = True) -> str:
    sep = ["---" if i == 0 and align_first_left else "---:" for i in range(len(head))]
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in [head, sep] + rows)


def _layer_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    pl = report["per_layer"]
    head = ["layer", "op", "k", "Q", "D", "kernel", "SQNR dB (own)", "SQNR dB (cumulative)", "native ms",
            "ort fp32 ms", "speed-up", "Gbit-op/s", "of peak"]
    rows = []
    for r in pl["layers"]:
        rows.append([r["name"], r["op"].replace("Bin", ""), r["k"], r["q"], r["depth"], r.get("kernel") or "–",
                     _num(r["sqnr_db"], "{:.1f}"),
                     _num(r["sqnr_cumulative_db"], "{:.1f}"), _num(r["native_ms"], "{:.3f}"),
                     _num(r["ort_ms"], "{:.3f}"), _num(r["speedup"], "{:.2f}x"),
                     _num(r["gbitops_per_s"], "{:.0f}"), _pct(r["efficiency"])])
    return head, rows


def _context(report: dict) -> str:
    d = report["data"]
    m = report["machine"]
    return (f"{report['task']} on {report['n_images']} images of {d['dir']} ({d['layout']}, "
            f"{d['selection']}); {report['threads']} thread(s) for every model, "
            f"batch-{report.get('latency_method', {}).get('batch', 1)} latency; "
            f"{m['machine']}, kernels {m['isa']}, onnxruntime {m['onnxruntime']}")


# ---------------------------------------------------------------- terminal


def terminal_text(report: dict) -> str:
    head, rows = _rows(report)
    parts = [_context(report), "", _table_text(head, rows), ""] + headline(report)
    if report.get("per_layer"):
        pl = report["per_layer"]
        h, r = _layer_rows(report)
        parts += ["", f"per layer ({pl['image_source']}; popcount peak {pl['popcount_peak_gbitops_per_thread']:.0f} "
                      f"Gbit-op/s per thread on {pl['isa']}):", _table_text(h, r)]
    for n in report.get("notes", []):
        parts.append(f"note: {n}")
    return "\n".join(parts)


# ---------------------------------------------------------------- markdown


def markdown(report: dict, plots: dict[str, str]) -> str:
    head, rows = _rows(report)
    o = report["original"]
    lines = ["# bdecomp compare", "",
             f"* original: `{o['path']}`", f"* decomposed: `{report['decomposed']['path']}`"]
    if report.get("int8"):
        q = report["int8"].get("quantization", {})
        lines.append(f"* int8: `{report['int8'].get('path') or q.get('path')}` — onnxruntime `quantize_static`, "
                     f"{q.get('format')}, per-channel {q.get('weights')} weights, {q.get('activations')} activations, "
                     f"{q.get('calibration')} calibration on {q.get('calib_images')} images")
    lines += [f"* {_context(report)}", "", "## Headline", ""] + [f"* {h}" for h in headline(report)]
    lines += ["", "## Side by side", "", _table_md(head, rows), ""]
    lm = report["latency_method"]
    lines.append(f"Latency: batch 1, {lm['warmup']} warm-up runs, then the models interleaved round by round "
                 f"(rotating order) until {lm['stop']}, at least {lm['min_runs']} runs each; "
                 f"{report['threads']} thread(s) for all; onnxruntime's threads spin while a run lasts (its default) "
                 "and stop when it returns (left spinning they would steal the cores of the next model). Absolute "
                 "milliseconds depend on the machine and its load; the ratios are what carries over.")
    lat_rows = []
    for k in _models(report):
        s = report[k]["latency"]
        ci = s.get("median_ci95_ms") or [None, None]
        lat_rows.append([k, s["runs"], _num(s["median_ms"]), f"{_num(ci[0])}–{_num(ci[1])}", _num(s["p10_ms"]),
                         _num(s["p90_ms"]), _num(s["min_ms"]), s.get("stopped", "")])
    lines += ["", _table_md(["model", "runs", "median ms", "95% CI of median", "p10 ms", "p90 ms", "min ms",
                              "stopped by"], lat_rows), ""]
    lines.append(f"Size: bytes on disk; bits/weight = 8·bytes / {report['n_weights']:,} Conv/Gemm/MatMul weights "
                 "of the original.")
    lay = report["decomposed"].get("layers") or {}
    if lay.get("layers"):
        lines.append(f"The {lay['layers']} decomposed layers alone store {lay['bits_per_weight_stored']:.2f} bits per "
                     f"weight (packed basis bits + float32 scales and bias; formula (k·D + 32k + 32)/D: "
                     f"{lay['bits_per_weight_formula']:.2f}).")
    if "accuracy_vs_size" in plots:
        lines += ["", f"![accuracy vs size]({plots['accuracy_vs_size']})"]
    if "latency" in plots:
        lines += ["", f"![latency]({plots['latency']})"]
    if report["task"] == "segmentation":
        names = report.get("class_names") or []
        lines += ["", "## Per-class IoU", "",
                  f"Confusion matrices summed over the set; ground-truth pixels of class {report.get('ignore_index')} "
                  "(ignore index) are left out, predictions of it count as errors; mIoU averages the classes present.",
                  ""]
        ncls = len(report["original"]["per_class_iou"])
        head2 = ["class"] + _models(report)
        rows2 = []
        for c in range(ncls):
            if c == report.get("ignore_index"):
                continue
            name = f"{c} {names[c]}" if c < len(names) else str(c)
            rows2.append([name] + [_pct(report[k]["per_class_iou"][c]) for k in _models(report)])
        lines += [_table_md(head2, rows2)]
    if report.get("per_layer"):
        pl = report["per_layer"]
        h, r = _layer_rows(report)
        lines += ["", "## Per layer", "",
                  f"On {pl['image_source']}. *SQNR (own)*: the native layer fed the original network's input of that "
                  "layer, against the original layer's output (after any fused Relu/Clip and folded BatchNorm); "
                  "*cumulative*: the same tensor inside the decomposed network (earlier layers' errors included). "
                  "SQNR = 10·log10(Σy² / Σ(y−ŷ)²). *native ms*: the native step (quantize, pack, AND/popcount, "
                  "scale) in batch-1 runs of the whole network; *ort fp32 ms*: the original layer alone in "
                  f"onnxruntime on the same input, timed in the same {pl['timing_rounds']} interleaved rounds with "
                  f"{pl['threads']} thread(s). *kernel*: the kernel family the runtime settled on for the layer (the fastest "
                  f"on the first input of its shape). Bit-ops per image = output elements · D · k · Q (AND+popcount bit "
                  f"positions); *of peak* = bit-op rate / (popcount peak measured now, "
                  f"{pl['popcount_peak_gbitops_per_thread']:.0f} Gbit-op/s per thread on {pl['isa']}, × threads).",
                  "", _table_md(h, r), "",
                  f"Sum over the decomposed layers: native {pl['native_total_ms']:.2f} ms, onnxruntime fp32 "
                  f"{pl['ort_total_ms']:.2f} ms."]
        for key, title in (("layer_time", "per-layer time"), ("layer_sqnr", "per-layer error")):
            if key in plots:
                lines += ["", f"![{title}]({plots[key]})"]
    notes = list(report.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def make_plots(report: dict, out_dir: Path) -> tuple[dict[str, str], str | None]:
    """PNG files in out_dir: {key: file name}, or ({}, reason) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return {}, 'plots skipped: matplotlib is not installed (pip install "bdecomp[plot]")'
    files: dict[str, str] = {}
    models = _models(report)
    colours = {"original": "#4c72b0", "decomposed": "#dd8452", "int8": "#55a868"}
    seg = report["task"] == "segmentation"
    key, name = ("miou", "mIoU") if seg else ("top1", "top-1")
    if all(report[k].get(key) is None for k in models):
        key, name = "agreement", "agreement with fp32"
    unit, scale = "%", 100.0
    if report["task"] == "outputs":  # the original has no error to plot against itself
        key, name, unit, scale = "sqnr_db", "output SQNR vs fp32", "dB", 1.0

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k in models:
        e = report[k]
        if e.get(key) is None or not math.isfinite(e[key]):
            continue
        ax.scatter(e["bytes"] / 1e6, scale * e[key], s=80, color=colours[k], label=LABELS[k], zorder=3)
        ax.annotate(f"{e.get('latency_ms') or 0:.1f} ms", (e["bytes"] / 1e6, scale * e[key]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"{name} ({unit})")
    ax.set_title(f"{name} vs size ({report['n_images']} images; labels: median latency)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_size.png", dpi=110)
    plt.close(fig)
    files["accuracy_vs_size"] = "accuracy_vs_size.png"

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    med = [report[k]["latency_ms"] for k in models]
    p90 = [report[k]["latency_p90_ms"] for k in models]
    y = range(len(models))
    ax.barh(list(y), med, color=[colours[k] for k in models], label="median")
    ax.errorbar(p90, list(y), fmt="k|", markersize=14, label="p90")
    ax.set_yticks(list(y), [LABELS[k] for k in models], fontsize=8)
    ax.set_xlabel(f"batch-{report.get('latency_method', {}).get('batch', 1)} latency (ms), {report['threads']} thread(s)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=110)
    plt.close(fig)
    files["latency"] = "latency.png"

    pl = report.get("per_layer")
    if pl and pl["layers"]:
        layers = pl["layers"]
        names = [r["name"] for r in layers]
        h = max(3.0, 0.22 * len(layers) + 1.2)
        fig, ax = plt.subplots(figsize=(7, h))
        idx = list(range(len(layers)))
        ax.barh([i - 0.2 for i in idx], [r["ort_ms"] or 0 for r in layers], height=0.4, color=colours["original"],
                label="onnxruntime fp32 (layer alone)")
        ax.barh([i + 0.2 for i in idx], [r["native_ms"] or 0 for r in layers], height=0.4,
                color=colours["decomposed"], label="native decomposed")
        ax.set_yticks(idx, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"time per layer (ms, median, {pl['threads']} thread(s))")
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "layer_time.png", dpi=110)
        plt.close(fig)
        files["layer_time"] = "layer_time.png"

        fig, ax = plt.subplots(figsize=(7, h))
        fin = lambda v: v if v is not None and math.isfinite(v) else 0
        ax.barh([i - 0.2 for i in idx], [fin(r["sqnr_db"]) for r in layers], height=0.4, color="#8172b2",
                label="own (original input)")
        ax.barh([i + 0.2 for i in idx], [fin(r["sqnr_cumulative_db"]) for r in layers], height=0.4, color="#c44e52",
                label="cumulative (in the decomposed network)")
        ax.set_yticks(idx, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR of the layer output (dB, higher is better)")
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "layer_sqnr.png", dpi=110)
        plt.close(fig)
        files["layer_sqnr"] = "layer_sqnr.png"
    return files, None


# ---------------------------------------------------------------- files


def _jsonable(v: Any) -> Any:
    """Strict JSON: NaN → null, ±inf → "inf"/"-inf"."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, out_dir: str | Path, json_path: str | Path | None = None,
                 plots: bool = True) -> list[Path]:
    """report.json, report.md and (with matplotlib) PNGs into out_dir; also the JSON at json_path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if plots:
        files, why = make_plots(report, out)
        if why and why not in report.setdefault("notes", []):
            report["notes"].append(why)
    report["plots"] = sorted(files.values())
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False)
    written = []
    _atomic_write(out / "report.json", text + "\n")
    written.append(out / "report.json")
    if json_path is not None:
        _atomic_write(Path(json_path), text + "\n")
        written.append(Path(json_path))
    _atomic_write(out / "report.md", markdown(report, files))
    written.append(out / "report.md")
    written += [out / f for f in sorted(files.values())]
    return written
