"""Per-layer settings: global k and Q, overridden by a --layer-config file (JSON or TOML).

Accepted shapes (keys `bases`/`k`, `act_bits`/`q`, `skip`; layers by node name or output name):

    {"defaults": {"k": 6, "q": 6}, "layers": {"conv1": {"skip": true}, "fire2/squeeze1x1": {"k": 4}}}
    {"layers": [{"name": "conv1", "k": 8, "q": 8}, ...]}          # a `convert --report` JSON works as is

Unknown layer names are an error: a typo silently ignored would be a wrong model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdecomp.errors import ConfigError, InputFileError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

MAX_K = 8
MAX_Q = 8
SKIPPED = "skipped by layer config"  # the reason a report gives for a layer skipped on request


@dataclass(frozen=True)
class LayerSetting:
    k: int
    q: int
    skip: bool = False


def check_kq(k: int, q: int, where: str = "") -> None:
    if not (isinstance(k, int) and 1 <= k <= MAX_K):
        raise ConfigError(f"{where}bases (k) must be an integer in 1..{MAX_K}, got {k!r}")
    if not (isinstance(q, int) and 1 <= q <= MAX_Q):
        raise ConfigError(f"{where}act_bits (Q) must be an integer in 1..{MAX_Q}, got {q!r}")


def _entry(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("k", "bases"):
            out["k"] = value
        elif key in ("q", "act_bits"):
            out["q"] = value
        elif key == "skip":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: skip must be true or false")
            out["skip"] = value
    return out


@dataclass
class LayerConfig:
    """Defaults plus per-layer overrides."""

    k: int = 8
    q: int = 8
    overrides: dict[str, dict[str, Any]] | None = None

    def setting(self, names: tuple[str, ...]) -> LayerSetting:
        """The setting of the layer known by any of `names` (node name first, then output)."""
        over: dict[str, Any] = {}
        for n in names:
            if self.overrides and n in self.overrides:
                over = self.overrides[n]
                break
        s = LayerSetting(over.get("k", self.k), over.get("q", self.q), over.get("skip", False))
        check_kq(s.k, s.q, f"layer {names[0]}: ")
        return s

    def overridden(self, names: tuple[str, ...]) -> bool:
        """True if the config fixes this layer's k or Q (allocation then leaves it alone)."""
        return any(n in (self.overrides or {}) and ({"k", "q"} & set(self.overrides[n])) for n in names)

    def check_names(self, known: set[str]) -> None:
        unknown = sorted(set(self.overrides or {}) - known)
        if unknown:
            raise ConfigError(f"layer config names unknown layers: {', '.join(unknown[:5])}"
                              + (" ..." if len(unknown) > 5 else ""))


def load_layer_config(path: str | Path | None, k: int, q: int) -> LayerConfig:
    check_kq(k, q)
    if path is None:
        return LayerConfig(k, q, None)
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such layer-config file")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object with a 'layers' entry")
    defaults = _entry(raw.get("defaults", {}), f"{path}: defaults")
    layers = raw.get("layers", {})
    overrides: dict[str, dict[str, Any]] = {}
    if isinstance(layers, list):
        for i, item in enumerate(layers):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ConfigError(f"{path}: layers[{i}] needs a 'name'")
            overrides[item["name"]] = _entry(item, f"{path}: layers[{i}]")
    elif isinstance(layers, dict):
        overrides = {name: _entry(v, f"{path}: layer {name}") for name, v in layers.items()}
    else:
        raise ConfigError(f"{path}: 'layers' must be a list or a table")
    for item in raw.get("float_layers", []) if isinstance(raw.get("float_layers"), list) else []:
        # a conversion report: layers it skipped on request stay skipped when it is fed back
        if isinstance(item, dict) and item.get("reason") == SKIPPED and isinstance(item.get("name"), str):
            overrides[item["name"]] = {"skip": True}
    cfg = LayerConfig(defaults.get("k", k), defaults.get("q", q), overrides)
    check_kq(cfg.k, cfg.q, f"{path}: defaults: ")
    return cfg
