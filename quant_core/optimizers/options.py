"""Typed optimizer options (torchao-style): one frozen dataclass per optimizer family, each field with
its type and its one default, built alike from the CLI's flags, the Quantize node's JSON and the API's
dict (``OptimizerOptions.from_dict``). An unknown key or a value of the wrong type is an error naming
the key; nothing is coerced. ``None`` for a field always means "its default".

Per-layer decisions (the memory policy's row segments, where the Hessian is factored, bf16 rotations)
are not options: they live in ``LayerDecisions`` beside the options in each ``LayerContext``, and a
user's dict cannot set them. ``OptimizerOptions`` is also a read-only ``Mapping`` from option name to
value (decisions included, once bound to a layer), so ``objective.opt(options, name, default)`` reads
either the same way.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

from ..errors import PlanError, display_name

# field metadata: ("int"|"float"|"bool"|"str"|tuple of choices, (lo, hi) bounds or None)
INT, FLOAT, BOOL, STR = "an integer", "a finite number", "true or false", "a string"


def _f(default, kind, bounds: Optional[Tuple[float, float]] = None, doc: str = ""):
    return field(default=default, metadata={"kind": kind, "bounds": bounds, "doc": doc})


@dataclass(frozen=True)
class ObjectiveOptions:
    """What the calibrated optimizers minimize (``objective.py``)."""
    top_p: float = _f(0.2, FLOAT, (0.0, 1.0), "weight-only objective: share of the rank kept as top singular directions")
    min_k: int = _f(64, INT, (1, None))
    max_k: int = _f(1024, INT, (1, None))
    calibration_lora: Optional[str] = _f(None, STR)
    calibration_lora_weight: float = _f(1.0, FLOAT, (0.0, 1e6))
    scale_search: bool = _f(True, BOOL, doc="search a clipped abs-max scale per group (false: abs-max)")


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ / LDLQ (``gptq.py``; QuIP and learned rounding use the same sweep)."""
    gptq_damp: float = _f(0.03, FLOAT, (0.0, 1000.0))
    gptq_block_size: int = _f(128, INT, (1, None))
    gptq_actorder: bool = _f(False, BOOL)


@dataclass(frozen=True)
class QuIPOptions:
    """QuIP (``quip.py``)."""
    quip_seed: int = _f(0, INT, (0, 2 ** 64 - 1))
    quip_actorder: bool = _f(False, BOOL)
    quip_hadamard: bool = _f(True, BOOL)
    quip_store_transformed: bool = _f(False, BOOL)
    quip_requant_scheme: Optional[str] = _f(None, ("tensor", "block"))
    quip_checkpointed: bool = _f(False, BOOL)
    quip_checkpoint_threshold: int = _f(8192, INT, (1, None))
    quip_checkpoint_segments: int = _f(4, INT, (1, None))


@dataclass(frozen=True)
class LearnedRoundingOptions:
    """Learned rounding (``learned_rounding.py``: original, adamw, radam); ``None``: the defaults
    declared there."""
    num_iter: int = _f(1000, INT, (1, None))
    lr: float = _f(8.0773e-3, FLOAT, (0.0, 1000.0))
    lr_schedule: str = _f("adaptive", ("adaptive", "exponential", "plateau"))
    lr_gamma: float = _f(0.99, FLOAT, (0.0, 1.0))
    lr_patience: int = _f(10, INT, (0, None))
    lr_factor: float = _f(0.5, FLOAT, (0.0, 1.0))
    lr_min: float = _f(1e-8, FLOAT, (0.0, 1000.0))
    lr_cooldown: int = _f(0, INT, (0, None))
    lr_threshold: float = _f(0.0, FLOAT, (0.0, None))
    early_stop_loss: Optional[float] = _f(None, FLOAT, (0.0, None))
    early_stop_lr: Optional[float] = _f(None, FLOAT, (0.0, None))
    early_stop_stall: Optional[int] = _f(None, INT, (1, None))
    rounding_init: Optional[str] = _f(None, ("gptq", "nearest"))
    polish_sweeps: Optional[int] = _f(None, INT, (0, None))
    round_reg: Optional[float] = _f(None, FLOAT, (0.0, None))
    eval_every: Optional[int] = _f(None, INT, (1, None))
    allow_tf32: Optional[bool] = _f(None, BOOL)


@dataclass(frozen=True)
class CalibratedStepOptions:
    """Steps that need calibration statistics (SmoothQuant, bias correction) and run-wide settings."""
    smoothquant: bool = _f(False, BOOL)
    smoothquant_alpha: float = _f(0.5, FLOAT, (0.0, 1.0), "SmoothQuant migration strength, in [0, 1]")
    bias_correction: bool = _f(False, BOOL)
    static_activations: bool = _f(False, BOOL)
    input_scale: bool = _f(False, BOOL)
    full_precision_matrix_mult: bool = _f(False, BOOL)
    calib_samples: Optional[int] = _f(None, INT, (1, None))
    manual_seed: Optional[int] = _f(None, INT, (0, 2 ** 64 - 1))


@dataclass(frozen=True)
class MemoryOptions:
    """The memory policy's inputs (``memory.policy_from_options``)."""
    streaming_mode: str = _f("auto", ("off", "minimal", "balanced", "aggressive", "auto"))
    no_memory_limits: bool = _f(False, BOOL)
    bf16_compute: str = _f("off", ("auto", "on", "off"))
    bf16_threshold: Optional[int] = _f(None, INT, (0, None))
    bf16_hadamard_threshold: Optional[int] = _f(None, INT, (0, None))
    bf16_hessian_threshold: Optional[int] = _f(None, INT, (0, None))


@dataclass(frozen=True)
class LayerDecisions:
    """What the pipeline decides for one layer (memory policy, bf16 compute): never a user option."""
    row_segments: int = 1
    hessian_device: Optional[str] = None
    bf16_hadamard: bool = False
    bf16_hessian: bool = False


GROUPS = {"objective": ObjectiveOptions, "gptq": GPTQOptions, "quip": QuIPOptions,
          "learned_rounding": LearnedRoundingOptions, "calibrated": CalibratedStepOptions, "memory": MemoryOptions}
_KEY_GROUP: Dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
DECISION_KEYS = tuple(f.name for f in dataclasses.fields(LayerDecisions))


def _check_value(key: str, v, kind, bounds, where: str):
    if isinstance(kind, tuple):
        ok, what = isinstance(v, str) and v in kind, "one of " + ", ".join(kind)
    elif kind == BOOL:
        ok, what = isinstance(v, bool), kind
    elif kind == INT:
        ok, what = isinstance(v, int) and not isinstance(v, bool), kind
    elif kind == FLOAT:
        ok, what = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), kind
    else:
        ok, what = isinstance(v, str), kind
    if ok and bounds is not None and kind in (INT, FLOAT):
        lo, hi = bounds
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            ok = False
            what = f"{what} in [{lo:g}, {hi:g}]" if hi is not None else f"{what} >= {lo:g}"
    if not ok:
        shown = repr(v) if isinstance(v, str) else type(v).__name__ + " " + display_name(repr(v)[:80])
        raise PlanError(f"{where}: option {key!r} must be {what}, got {shown}")


@dataclass(frozen=True)
class OptimizerOptions(Mapping):
    """Every optimizer's options, typed, grouped by optimizer family; a read-only Mapping by name."""
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    quip: QuIPOptions = field(default_factory=QuIPOptions)
    learned_rounding: LearnedRoundingOptions = field(default_factory=LearnedRoundingOptions)
    calibrated: CalibratedStepOptions = field(default_factory=CalibratedStepOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    decisions: LayerDecisions = field(default_factory=LayerDecisions)  # bound per layer, never from a user

    @classmethod
    def from_dict(cls, options: Optional[Dict[str, Any]], where: str = "optimizer_options") -> "OptimizerOptions":
        """From the CLI's flags / the node's JSON / the API's dict: unknown keys and wrong types or
        ranges are a ``PlanError`` naming the key; ``None`` values keep the default."""
        if options is None:
            return cls()
        if isinstance(options, OptimizerOptions):
            return options
        if not isinstance(options, dict):
            raise PlanError(f"{where} must be an object of option names, got {type(options).__name__}")
        unknown = [k for k in options if k not in _KEY_GROUP]
        if unknown:
            shown = ", ".join(repr(k) if isinstance(k, str) else display_name(repr(k)) for k in unknown[:5])
            decided = [k for k in unknown if k in DECISION_KEYS]
            why = (f" ({', '.join(decided)}: decided per layer by the memory policy, not an option)"
                   if decided else "")
            raise PlanError(f"{where}: unknown option(s) {shown}{why}; known: {', '.join(sorted(_KEY_GROUP))}")
        per_group: Dict[str, Dict[str, Any]] = {g: {} for g in GROUPS}
        fields = {f.name: f for cls_ in GROUPS.values() for f in dataclasses.fields(cls_)}
        for key, v in options.items():
            if v is None:
                continue
            f = fields[key]
            _check_value(key, v, f.metadata["kind"], f.metadata["bounds"], where)
            per_group[_KEY_GROUP[key]][key] = float(v) if f.metadata["kind"] == FLOAT else v
        o = cls(**{g: GROUPS[g](**kw) for g, kw in per_group.items()})
        if o.objective.max_k < o.objective.min_k:
            raise PlanError(f"{where}: option 'max_k' ({o.objective.max_k}) must be >= 'min_k' ({o.objective.min_k})")
        return o

    def with_decisions(self, decisions: LayerDecisions) -> "OptimizerOptions":
        return dataclasses.replace(self, decisions=decisions)

    # --- Mapping: option name -> value ----------------------------------------------------------
    def __getitem__(self, key: str):
        g = _KEY_GROUP.get(key)
        if g is not None:
            return getattr(getattr(self, g), key)
        if key in DECISION_KEYS:
            return getattr(self.decisions, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_KEY_GROUP) + list(DECISION_KEYS))

    def __len__(self) -> int:
        return len(_KEY_GROUP) + len(DECISION_KEYS)

    def user_dict(self) -> Dict[str, Any]:
        """The options that differ from their defaults (for reports and error messages)."""
        base = OptimizerOptions()
        return {k: self[k] for k in _KEY_GROUP if self[k] != base[k]}


def option_kinds() -> Dict[str, Any]:
    """name -> its JSON kind (a string, or the tuple of allowed values): what ``OPTIMIZER_OPTIONS`` lists."""
    return {f.name: f.metadata["kind"] for cls in GROUPS.values() for f in dataclasses.fields(cls)}


def layer_options(options, decisions: Optional[LayerDecisions] = None) -> OptimizerOptions:
    """Options for one layer: a dict (old callers, tests) is checked and its decision keys become the
    layer's decisions; typed options are bound to ``decisions``."""
    if isinstance(options, OptimizerOptions):
        return options.with_decisions(decisions) if decisions is not None else options
    d = dict(options or {})
    dec = {k: d.pop(k) for k in DECISION_KEYS if k in d}
    o = OptimizerOptions.from_dict(d)
    if decisions is None:
        decisions = LayerDecisions(**{k: v for k, v in dec.items() if v is not None})
    return o.with_decisions(decisions)
