"""Turning model outputs into what `bdecomp infer` shows: top-k classes, or segmentation masks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bdecomp.decomposer.feed import output_task
from bdecomp.models.labels import class_names, palette


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    e = np.exp(z)
    return e / e.sum()


def guess_labels(n_classes: int, dense: bool = False) -> str | None:
    """The label set a model of unknown origin most likely uses, from its number of classes."""
    return {12: "camvid"}.get(n_classes) if dense else {1000: "imagenet", 10: "cifar10"}.get(n_classes)


class Presenter:
    """Formats one image's output; writes masks for segmentation models."""

    def __init__(self, info: dict[str, Any], top_k: int, mask_dir: Path, overlay: bool):
        self.info, self.top_k, self.mask_dir, self.overlay = info, top_k, Path(mask_dir), overlay

    def _labels(self, n: int, dense: bool) -> str | None:
        return self.info.get("labels") or guess_labels(n, dense)

    def _names(self, n: int, dense: bool = False) -> list[str]:
        labels = self._labels(n, dense)
        names = class_names(labels) if labels else []
        return names if len(names) == n else [str(i) for i in range(n)]

    def result(self, path: Path, image: Image.Image, y: np.ndarray,
               outputs: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """One image's result from its first output `y` (classes on axis 1), or from all its
        `outputs` by name when they are neither class scores nor a class map."""
        y = np.asarray(y)
        task = output_task(y.shape, False, self.info.get("task"))  # classes first here
        if task == "outputs":
            return {"image": str(path), "outputs": [
                {"name": name, "shape": list(v.shape), "min": float(v.min()), "max": float(v.max()),
                 "mean": float(v.mean(dtype=np.float64))} if v.size else {"name": name, "shape": list(v.shape)}
                for name, v in (outputs or {"output": y}).items()]}
        if task == "segmentation":
            return self._segmentation(path, image, y.reshape((-1,) + y.shape[-3:])[0])
        logits = y.reshape(-1)
        probs = softmax(logits)
        names = self._names(logits.size)
        order = sorted(range(logits.size), key=lambda i: (-probs[i], i))[: self.top_k]
        return {"image": str(path), "top": [{"index": int(i), "label": names[i], "prob": float(probs[i])} for i in order]}

    def _segmentation(self, path: Path, image: Image.Image, scores: np.ndarray) -> dict[str, Any]:
        n = scores.shape[0]
        mask = scores.argmax(axis=0).astype(np.uint8)
        pal = palette(self._labels(n, True), n)
        names = self._names(n, dense=True)
        self.mask_dir.mkdir(parents=True, exist_ok=True)
        out = self.mask_dir / (Path(path).stem + "_mask.png")
        colour = Image.fromarray(pal[mask])
        colour.save(out)
        res: dict[str, Any] = {"image": str(path), "mask": str(out)}
        if self.overlay:
            base = image.convert("RGB").resize(colour.size, Image.BILINEAR)
            ov = self.mask_dir / (Path(path).stem + "_overlay.png")
            Image.blend(base, colour, 0.5).save(ov)
            res["overlay"] = str(ov)
        counts = np.bincount(mask.ravel(), minlength=n) / mask.size
        res["classes"] = [{"index": i, "label": names[i], "fraction": float(counts[i])}
                          for i in range(n) if counts[i] > 0]
        return res

    def text(self, res: dict[str, Any]) -> str:
        if "outputs" in res:
            return res["image"] + "\n" + "\n".join(
                f"  {o['name']} [{', '.join(map(str, o['shape']))}]"
                + (f" min {o['min']:.4g} max {o['max']:.4g} mean {o['mean']:.4g}" if "min" in o else "")
                for o in res["outputs"])
        if "top" in res:
            lines = [res["image"]]
            lines += [f"  {t['prob']:6.1%}  {t['label']} ({t['index']})" for t in res["top"]]
            return "\n".join(lines)
        parts = ", ".join(f"{c['label']} {c['fraction']:.1%}" for c in sorted(res["classes"], key=lambda c: -c["fraction"])[:5])
        return f"{res['image']}: mask {res['mask']} ({parts})"
