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
