"""The conversion report: per-layer rows and totals, as a terminal table and as JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from bdecomp.decomposer.speed import BUILTIN


@dataclass
class LayerRow:
    name: str
    op: str
    depth: int
    cout: int
    k: int
    q: int
    macs: int
    weight_error: float
    bytes_before: int
    bytes_after: int
    scale: float | None
    zero_point: int | None
    output_error: float | None = None  # relative, on calibration patches (None without calibration)


@dataclass
class Report:
    source: str
    output: str
    layers: list[LayerRow] = field(default_factory=list)
    float_layers: list[dict] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    calibration_images: int = 0
    folded_batchnorms: int = 0
    allocation: dict = field(default_factory=dict)  # what --budget / --target-drop chose and tried
    faster_in_float: dict = field(default_factory=dict)  # layers --float-when-faster would keep float
    speed_profile: str = ""  # the speed profile that decided them (SpeedProfile.short()), if one did
    blocks: list[dict] = field(default_factory=list)  # what block reconstruction did, block by block

    @property
    def mac_weighted_kq(self) -> float:
        macs = sum(r.macs for r in self.layers)
        return sum(r.macs * r.k * r.q for r in self.layers) / macs if macs else 0.0

    def totals(self) -> dict:
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "size_ratio": self.bytes_after / self.bytes_before if self.bytes_before else None,
            "mac_weighted_kq": self.mac_weighted_kq,
            "decomposed_layers": len(self.layers),
            "float_layers": len(self.float_layers),
            "decomposed_macs": sum(r.macs for r in self.layers),
            "float_macs": sum(f.get("macs", 0) for f in self.float_layers),  # of the layers bdecomp could decompose
            "calibration_images": self.calibration_images,
            "folded_batchnorms": self.folded_batchnorms,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "output": self.output,
                           "layers": [asdict(r) for r in self.layers],
                           "float_layers": self.float_layers, "allocation": self.allocation,
                           "faster_in_float": self.faster_in_float, "speed_profile": self.speed_profile,
                           "blocks": self.blocks, "totals": self.totals()}, indent=2)

    def table(self) -> str:
        head = (f"{'layer':<28} {'op':<6} {'D':>6} {'Cout':>5} {'k':>2} {'Q':>2} {'w.err':>6} {'out.err':>7} "
                f"{'bytes':>10} {'-> bytes':>9}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(f"{r.name[:28]:<28} {r.op:<6} {r.depth:>6} {r.cout:>5} {r.k:>2} {r.q:>2} "
                         f"{r.weight_error:>6.3f} {'-' if r.output_error is None else f'{r.output_error:.3f}':>7} "
                         f"{r.bytes_before:>10,} {r.bytes_after:>9,}")
        for f in self.float_layers:
            lines.append(f"{f['name'][:28]:<28} {f['op']:<6} float: {f['reason']}")
        t = self.totals()
        ratio = f"{100 * t['size_ratio']:.1f}%" if t["size_ratio"] else "-"
        lines.append("-" * len(head))
        macs = t["decomposed_macs"] + t["float_macs"]
        share = f" ({100 * t['float_macs'] / macs:.1f}% of the MACs)" if t["float_macs"] and macs else ""
        cost = self.allocation.get("mac_weighted_cost") if self.allocation else None
        kernel = f", kernel cost {cost:.1f}" if cost is not None else ""  # what --budget bounds
        lines.append(f"{len(self.layers)} layers decomposed, {len(self.float_layers)} left float{share}; "
                     f"MAC-weighted k*Q {t['mac_weighted_kq']:.1f}{kernel} (decomposed layers); file "
                     f"{self.bytes_before:,} -> {self.bytes_after:,} bytes ({ratio}); {self.seconds:.1f} s")
        if self.blocks:
            lines.append(self.blocks_line())
        if self.speed_profile:
            lines.append(f"speed profile: {self.speed_profile}")
        return "\n".join(lines + self.notes())

    def blocks_line(self) -> str:
        """Block reconstruction in one line: how many blocks kept their refit, by how much it
        lowered their held-out error."""
        kept = [b for b in self.blocks if b["kept"]]
        line = f"block reconstruction: {len(kept)} of {len(self.blocks)} blocks refitted"
        if kept:
            drops = sorted(100 * (1 - b["error_after"] / b["error_before"]) for b in kept)
            line += (f", held-out block error {drops[0]:.0f}-{drops[-1]:.0f}% lower "
                     f"(median {drops[len(drops) // 2]:.0f}%)")
        return line

    def notes(self) -> list[str]:
        """What the user should know beyond the table (also printed with --quiet)."""
        if self.faster_in_float:
            return [self.float_hint()]
        if not self.layers and any(f["reason"].endswith("(--float-when-faster)") for f in self.float_layers):
            return ["note: every layer that could be decomposed is estimated faster in onnxruntime fp32 by the "
                    "speed profile, so none is: the file computes as the original does (without "
                    "--float-when-faster it is smaller and slower)"]
        return []

    def float_hint(self) -> str:
        """One line on the decomposed layers estimated faster in float ('' if none)."""
        f = self.faster_in_float
        if not f:
            return ""
        how = ("; estimated with the built-in speed profile of another CPU: `bdecomp speed-profile` measures "
               "this one" if self.speed_profile.startswith(BUILTIN.machine) else "")
        return (f"note: {len(f['layers'])} decomposed layer(s) are estimated faster in onnxruntime fp32 "
                f"(together {f['est_ms']:.2f} ms per image on one thread); --float-when-faster keeps them "
                f"float (faster and exact, a larger file){how}")
