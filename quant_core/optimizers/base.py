"""What every optimizer shares: the per-layer context, the result, the registry (with each optimizer's
memory and time estimate, declared beside it) and the check of the options dict. Imports nothing else of
the optimizers package, so every optimizer module can import it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..errors import PlanError, display_name
from ..formats import FormatSpec, QuantizedWeight


@dataclass
class LayerContext:
    base: str
    device: torch.device = torch.device("cpu")
    stats: Optional[Any] = None  # calibration statistics for this layer's input, if any
    options: Dict[str, Any] = field(default_factory=dict)  # optimizer knobs from the CLI / node
    orig_dtype: torch.dtype = torch.bfloat16
    log: Callable[[str], None] = lambda msg: None
    lora_delta: Optional[torch.Tensor] = None  # --calibration-lora: this layer's LoRA weight delta, if any


@dataclass
class OptimizerResult:
    qw: QuantizedWeight
    info: Dict[str, Any] = field(default_factory=dict)  # objective before/after, iterations, notes


OptimizerFn = Callable[[torch.Tensor, FormatSpec, LayerContext], OptimizerResult]
OPTIMIZERS: Dict[str, OptimizerFn] = {}


@dataclass(frozen=True)
class LayerEstimate:
    """Bytes a layer's optimizer holds on its device at the same time (float32 unless noted)."""

    weight: int  # weight, its storage-space copy, scales, temporaries, integers, quality check
    sweep: int  # GPTQ/LDLQ per-segment working rows (divided by the number of row segments)
    hessian: int  # H (objective + data copy + the sweep's clone)
    factor: int  # float64 Cholesky of H and H⁻¹ (movable to the CPU)

    def total(self, segments: int = 1, factor_on_device: bool = True) -> int:
        return (self.weight + -(-self.sweep // max(segments, 1)) + self.hessian
                + (self.factor if factor_on_device else self.hessian // 3))


@dataclass(frozen=True)
class OptimizerCost:
    """What an optimizer declares beside itself for the memory policy (``memory.place_layer``) and the
    multi-rank work split (``distributed.layer_cost``).

    ``estimate(out, in, rotated)``: its working set on one layer [out, in] (factors read off its code,
    checked against measured peak VRAM by ``benchmarks/scale.py``); ``row_sweep``: it runs the GPTQ/LDLQ
    row sweep over a factored Hessian, so a placement may split rows and factor on the CPU;
    ``time(out, in)``: relative run time, only compared between layers."""

    estimate: Callable[[int, int, bool], LayerEstimate]
    row_sweep: bool = False
    time: Callable[[int, int], float] = lambda out, inn: float(out) * inn
    release: Optional[Callable[[], None]] = None  # drops caches it keeps between layers (GPU memory)


def _rtn_estimate(out: int, inn: int, rotated: bool) -> LayerEstimate:
    # round-to-nearest: w (float32), ws / w/scale temporary, int8, dequantized copy for the report
    n = out * inn
    return LayerEstimate(weight=13 * n + (4 * n if rotated else 0), sweep=0, hessian=0, factor=0)


RTN_COST = OptimizerCost(_rtn_estimate)
OPTIMIZER_COSTS: Dict[str, OptimizerCost] = {}


def register_optimizer(name: str, cost: OptimizerCost = RTN_COST):
    """Decorator: register ``fn`` as optimizer ``name`` with its memory / time estimate."""
    def deco(fn: OptimizerFn) -> OptimizerFn:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not fn:
            raise ValueError(f"optimizer {name!r} registered twice")
        OPTIMIZERS[name] = fn
        OPTIMIZER_COSTS[name] = cost
        return fn
    return deco


def optimizer_cost(name: str) -> OptimizerCost:
    """The estimate ``name`` declared (round-to-nearest's for a name not registered)."""
    return OPTIMIZER_COSTS.get(name, RTN_COST)


def get_optimizer(name: str) -> OptimizerFn:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise PlanError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}") from None


# Every key ``ConvertOptions.optimizer_options`` may hold (the CLI's optimizer/memory flags, the node's
# optimizer_options JSON, the API's dict) and its JSON type. ``None`` always means "the default".
# ``check_optimizer_options`` refuses unknown keys and wrong types: no silent coercion.
_INT, _FLOAT, _BOOL, _STR = "an integer", "a number", "true or false", "a string"
OPTIMIZER_OPTIONS: Dict[str, Any] = {
    **dict.fromkeys(("num_iter", "min_k", "max_k", "lr_patience", "lr_cooldown", "early_stop_stall",
                     "gptq_block_size", "polish_sweeps", "quip_seed", "quip_checkpoint_threshold",
                     "quip_checkpoint_segments", "bf16_threshold", "bf16_hadamard_threshold",
                     "bf16_hessian_threshold", "calib_samples", "manual_seed", "eval_every", "row_segments"), _INT),
    **dict.fromkeys(("lr", "top_p", "lr_gamma", "lr_factor", "lr_min", "lr_threshold", "early_stop_loss",
                     "early_stop_lr", "gptq_damp", "smoothquant_alpha", "calibration_lora_weight",
                     "round_reg"), _FLOAT),
    **dict.fromkeys(("gptq_actorder", "quip_actorder", "quip_hadamard", "quip_store_transformed",
                     "quip_checkpointed", "smoothquant", "static_activations", "bias_correction", "input_scale",
                     "full_precision_matrix_mult", "no_memory_limits", "allow_tf32", "scale_search",
                     "bf16_hadamard", "bf16_hessian"), _BOOL),
    **dict.fromkeys(("calibration_lora", "hessian_device"), _STR),
    "lr_schedule": ("adaptive", "exponential", "plateau"),
    "rounding_init": ("gptq", "nearest"),
    "quip_requant_scheme": ("tensor", "block"),
    "streaming_mode": ("off", "minimal", "balanced", "aggressive", "auto"),
    "bf16_compute": ("auto", "on", "off"),
}


def check_optimizer_options(options: Optional[Dict[str, Any]], where: str = "optimizer_options") -> None:
    """Refuse an options dict with unknown keys or values of the wrong JSON type, naming the key."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise PlanError(f"{where} must be an object of option names, got {type(options).__name__}")
    unknown = [k for k in options if k not in OPTIMIZER_OPTIONS]
    if unknown:
        shown = ", ".join(repr(k) if isinstance(k, str) else display_name(repr(k)) for k in unknown[:5])
        raise PlanError(f"{where}: unknown option(s) {shown}; known: {', '.join(sorted(OPTIMIZER_OPTIONS))}")
    for key, v in options.items():
        kind = OPTIMIZER_OPTIONS[key]
        if v is None:
            continue
        if isinstance(kind, tuple):
            ok, what = isinstance(v, str) and v in kind, "one of " + ", ".join(kind)
        elif kind == _BOOL:
            ok, what = isinstance(v, bool), kind
        elif kind == _INT:
            ok, what = isinstance(v, int) and not isinstance(v, bool), kind
        elif kind == _FLOAT:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            what = "a finite number"
        else:
            ok, what = isinstance(v, str), kind
        if not ok:
            shown = repr(v) if isinstance(v, str) else type(v).__name__ + " " + display_name(repr(v)[:80])
            raise PlanError(f"{where}: option {key!r} must be {what}, got {shown}")


