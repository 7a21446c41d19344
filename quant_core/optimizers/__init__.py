"""Optimizer registry: how a layer's float weight becomes integers of its planned format.

Every optimizer has the same signature::

    fn(w: Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult

``w`` is the float32 weight (original space, on ``ctx.device``). The optimizer must return a
``QuantizedWeight`` of exactly ``spec``'s format and parameters (the plan already wrote the header),
choosing integers and scales through the format's interface (``to_storage``, ``compute_scale``,
``expand_scale``, ``pack``). ``ctx.stats`` holds the layer's calibration statistics when the user gave
some (Hessian XᵀX, activation abs-max and mean) and is ``None`` otherwise: never invent activations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ..errors import PlanError
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


def register_optimizer(name: str):
    def deco(fn: OptimizerFn) -> OptimizerFn:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not fn:
            raise ValueError(f"optimizer {name!r} registered twice")
        OPTIMIZERS[name] = fn
        return fn
    return deco


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
    import math
    from ..errors import display_name
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


@register_optimizer("rtn")
def rtn(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Round to nearest (ties to even) with the format's abs-max scales: the baseline."""
    t0 = time.perf_counter()
    from ..memory import quantize_rtn  # bf16 weight rotation when the memory policy asks for it
    qw = quantize_rtn(w, spec, ctx.options, ctx.orig_dtype)
    return OptimizerResult(qw, {"seconds": time.perf_counter() - t0})


def run_optimizer(fn: OptimizerFn, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Run optimizer ``fn`` on one layer as the pipeline does: formats that transform the weight before
    quantizing it (SmoothQuant) wrap the optimizer, and every result reports its output SQNR on the
    calibration activations when there are any (round-to-nearest included, for comparison)."""
    from .smoothquant import SMOOTHQUANT_FORMAT, quantize_smoothed
    if spec.format == SMOOTHQUANT_FORMAT:
        return quantize_smoothed(fn, w, spec, ctx)
    res = fn(w, spec, ctx)
    if ctx.stats is not None and res.info.get("output_sqnr_db") is None and res.qw.scale is not None:
        from .objective import output_sqnr_db
        h = ctx.stats.hessian_mean(device=w.device)
        res.info["output_sqnr_db"] = output_sqnr_db(w.float(), res.qw.dequantize().to(w.device), h)
    return res


# the optimizers, one module each, registered on import
from . import gptq, learned_rounding, quip  # noqa: E402,F401
