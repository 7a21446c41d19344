"""Model presets, read from ``presets/*.json`` (data, not code).

A preset is a list of key substrings to keep in high precision (``skip``), keys to drop from the output
(``drop``), optionally ``quantize_only`` (only keys containing one of these are quantized), and a
``detect`` rule used to recognise the model family from its tensor names: ``all`` (each substring occurs
in some key), ``any`` (at least one occurs), ``none`` (none occurs). ``default.json`` is the default skip
list, applied on top of every preset unless ``--no-default-skip`` is given.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterable, Optional, Tuple

from .errors import PlanError

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")

# When several presets' detect rules match, the first in this list wins (most specific first).
DETECT_PRIORITY = (
    "radiance", "nerf_large", "zimage_refiner", "zimage", "distillation_large", "flux2", "flux",
    "hunyuan", "qwen", "wan", "t5xxl", "visual", "mistral", "bert", "lora",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    skip: Tuple[str, ...]
    drop: Tuple[str, ...] = ()
    quantize_only: Tuple[str, ...] = ()
    detect: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    seed_preset: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name

    def matches(self, keys: Iterable[str]) -> bool:
        if not self.detect:
            return False
        keys = list(keys)

        def present(sub):
            return any(sub in k for k in keys)

        if not all(present(s) for s in self.detect.get("all", ())):
            return False
        if self.detect.get("any") and not any(present(s) for s in self.detect["any"]):
            return False
        return not any(present(s) for s in self.detect.get("none", ()))


@lru_cache(maxsize=1)
def _load_all() -> Tuple[Tuple[str, ...], Dict[str, Preset]]:
    if not os.path.isdir(PRESET_DIR):
        raise PlanError(f"preset folder {PRESET_DIR} is missing (broken install?)")
    default_skip: Tuple[str, ...] = ()
    presets: Dict[str, Preset] = {}
    for fname in sorted(os.listdir(PRESET_DIR)):
        if not fname.endswith(".json"):
            continue
        with open(os.path.join(PRESET_DIR, fname), encoding="utf-8") as f:
            d = json.load(f)
        if d["name"] == "default":
            default_skip = tuple(d["skip"]) + tuple(d.get("embedding_tables", ()))
            continue
        presets[d["name"]] = Preset(
            name=d["name"], description=d.get("description", ""), skip=tuple(d.get("skip", ())),
            drop=tuple(d.get("drop", ())), quantize_only=tuple(d.get("quantize_only", ())),
            detect={k: tuple(v) for k, v in d.get("detect", {}).items()},
            seed_preset=bool(d.get("seed_preset", True)))
    return default_skip, presets


def default_skip() -> Tuple[str, ...]:
    return _load_all()[0]


def all_presets() -> Dict[str, Preset]:
    return dict(_load_all()[1])


def get_preset(name: str) -> Preset:
    presets = _load_all()[1]
    if name not in presets:
        raise PlanError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}, auto")
    return presets[name]


def detect_family(keys: Iterable[str]) -> Optional[str]:
    """Name of the preset whose detect rule matches these tensor names, or None."""
    keys = list(keys)
    presets = _load_all()[1]
    ordered = [n for n in DETECT_PRIORITY if n in presets] + sorted(set(presets) - set(DETECT_PRIORITY))
    for name in ordered:
        if presets[name].matches(keys):
            return name
    return None


def first_match(key: str, substrings: Iterable[str]) -> Optional[str]:
    for s in substrings:
        if s in key:
            return s
    return None
