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

from typing import Optional

import torch

from .options import LayerDecisions, OptimizerOptions  # noqa: F401
from .base import (OPTIMIZER_COSTS, OPTIMIZER_OPTIONS, OPTIMIZERS, LayerContext, OptimizerFn, OptimizerResult,  # noqa: F401
                   check_optimizer_options, get_optimizer, register_optimizer)
from ..formats import FormatSpec
from ..seeding import layer_rng
from .objective import output_sqnr_db
from .smoothquant import SMOOTHQUANT_FORMAT, quantize_smoothed
# the optimizers, one module each, registered on import
from . import rtn, gptq, learned_rounding, quip  # noqa: F401,E402  (rtn first: the registry's order)


def run_optimizer(fn: OptimizerFn, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Run optimizer ``fn`` on one layer as the pipeline does: formats that transform the weight before
    quantizing it (SmoothQuant) wrap the optimizer, and every result reports its output SQNR on the
    calibration activations when there are any (round-to-nearest included, for comparison)."""
    if not spec.cls.on_grid:  # fp16 (asked for, or a layer's fallback): the format's own conversion
        fn = rtn.rtn
    if spec.format == SMOOTHQUANT_FORMAT:
        return quantize_smoothed(fn, w, spec, ctx)
    res = fn(w, spec, ctx)
    if ctx.stats is not None and res.info.get("output_sqnr_db") is None and res.qw.scale is not None:
        h = ctx.stats.hessian_mean(device=w.device)
        res.info["output_sqnr_db"] = output_sqnr_db(w.float(), res.qw.dequantize().to(w.device), h)
    return res


def quantize_layer(fn: OptimizerFn, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext,
                   seed: Optional[int] = None) -> OptimizerResult:
    """One layer, the one way every caller runs it (the pipeline, so both multi-rank loops through
    ``ConversionJob.process``, and ``model_quant``): ``run_optimizer`` with the layer's own random
    numbers (``seeding.layer_rng``: they depend on its name and ``--manual_seed`` only)."""
    with layer_rng(ctx.base, ctx.device, seed):
        return run_optimizer(fn, w, spec, ctx)
