"""SmoothQuant (``--smoothquant``, ``--smoothquant-alpha``): move activation outliers into the weight.

Per input channel ``j``: ``f_j = max|x_j|^α / max|W_:,j|^(1−α)`` from the *real* activation abs-max of the
calibration data. The layer computes ``(x / f) · (W · diag(f))ᵀ``, the same function, but ``x / f`` has
its outlier channels tamed, so per-token int8 activations (W8A8) lose much less.

Where ``f`` goes: folding ``1/f`` into a preceding op is only exact when that op's output feeds nothing
but these layers; the calibration capture cannot prove that (in BERT, for one, the LayerNorm output
also feeds the residual), so we never fold. Smoothed layers are stored as ``int8_smoothquant`` with the
factors (``formats_extra.py``); our runtime divides the activations by ``f``, and stock ComfyUI refuses
the format name instead of computing a wrong result. Layers without calibration statistics, rotated
(convrot) and block-wise layers are not smoothed; the plan notes say which.

Any optimizer can run on the smoothed weight: its objective uses the smoothed statistics
(``diag(1/f) H diag(1/f)``), which describe exactly the same layer-output error.
"""
from __future__ import annotations

import dataclasses
import time
from typing import List

import torch

from ..calibration import LayerStats
from ..errors import CalibrationError, PlanError
from ..formats import FormatSpec, Int8Tensorwise
from ..formats_extra import Int8SmoothQuant
from .base import LayerContext, OptimizerFn, OptimizerResult
from .objective import output_sqnr_db

SMOOTHQUANT_FORMAT = Int8SmoothQuant.name
F_MIN, F_MAX = 1e-4, 1e4


def smoothing_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``f = max|x|^α / max|W|^(1−α)`` per input channel; channels that never saw an input (or whose
    weights are all zero) keep ``f = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise PlanError(f"--smoothquant-alpha must be in [0, 1], got {alpha}")
    ax = act_absmax.to(w.device, torch.float32)
    aw = w.abs().amax(dim=0).float()
    f = ax.clamp(min=1e-12).pow(alpha) / aw.clamp(min=1e-12).pow(1.0 - alpha)
    f = torch.where((ax > 0) & (aw > 0), f, torch.ones_like(f))
    return f.clamp(F_MIN, F_MAX)


def smooth_stats(stats: LayerStats, f: torch.Tensor) -> LayerStats:
    """Statistics of ``x / f``."""
    inv = (1.0 / f).to(stats.hessian.device, torch.float32)
    h = stats.hessian.float() * inv.reshape(-1, 1) * inv.reshape(1, -1)
    return LayerStats(stats.name, h, stats.absmax.float() * inv, stats.mean.float() * inv,
                      stats.n_tokens, stats.n_seen)


def quantize_smoothed(fn: OptimizerFn, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Smooth ``w`` with factors from ``ctx.stats``, quantize it with optimizer ``fn`` as per-row/tensor
    int8, and store it as ``int8_smoothquant`` with the factors."""
    t0 = time.perf_counter()
    if ctx.stats is None:
        raise CalibrationError(f"{ctx.base}: SmoothQuant needs calibration statistics for this layer")
    alpha = ctx.options.calibrated.smoothquant_alpha
    w = w.float()
    f = smoothing_factors(ctx.stats.absmax, w, alpha)
    ws = w * f.reshape(1, -1)
    inner = FormatSpec(Int8Tensorwise.name, Int8Tensorwise.Params(scaling=spec.params.scaling))
    lora = ctx.lora_delta
    ctx2 = dataclasses.replace(ctx, stats=smooth_stats(ctx.stats, f),
                               lora_delta=None if lora is None else lora.float() * f.cpu().reshape(1, -1).to(lora.device))
    res = fn(ws, inner, ctx2)
    qw = Int8SmoothQuant.pack_smoothed(res.qw.qdata, res.qw.scale, f.cpu(), spec.params, ctx.orig_dtype)
    info = dict(res.info)
    if info.get("output_sqnr_db") is None:
        h = ctx.stats.hessian_mean(device=w.device)
        info["output_sqnr_db"] = output_sqnr_db(w, qw.dequantize().to(w.device), h)
    info["smoothquant_alpha"] = alpha
    info["smooth_factor_range"] = [float(f.min()), float(f.max())]
    info["seconds"] = time.perf_counter() - t0
    return OptimizerResult(qw, info)


def plans_smoothquant(plan) -> bool:
    return any(lp.spec.format == SMOOTHQUANT_FORMAT for lp in plan.quantized_layers())


def apply_to_plan(plan, calibration, options, log=lambda m: None) -> List[str]:
    """Layers the plan gave ``int8_smoothquant`` (``formats.spec_from_choice``) but that have no
    calibration statistics are stored as ``int8_tensorwise`` with the same scaling (before the output
    header is computed); the factors come from real activation abs-max values, never invented ones.
    Returns plan notes."""
    if calibration is None:
        raise PlanError("int8_smoothquant needs calibration_data: the smoothing factors come from real "
                        "activation abs-max values, which are never invented")
    alpha = options.calibrated.smoothquant_alpha  # typed, range checked once (optimizers/options.py)
    smoothed, no_stats, other = 0, [], []
    for lp in plan.quantized_layers():
        spec = lp.spec
        if spec.format != SMOOTHQUANT_FORMAT:
            if spec.format != "fp16":
                other.append(lp.base)
            continue
        if calibration.resolve(lp.base) is None:
            no_stats.append(lp.base)
            lp.spec = FormatSpec(Int8Tensorwise.name, Int8Tensorwise.Params(scaling=spec.params.scaling))
            continue
        smoothed += 1
    notes = [f"SmoothQuant (alpha {alpha:g}): {smoothed} layers stored as {SMOOTHQUANT_FORMAT} "
             "(our loader only; stock ComfyUI refuses the format)"]
    if no_stats:
        notes.append(f"SmoothQuant: {len(no_stats)} layers have no calibration statistics and are not smoothed "
                     f"(e.g. {no_stats[0]})")
    if other:
        notes.append(f"SmoothQuant: {len(other)} rotated or block-wise layers are not smoothed (e.g. {other[0]})")
    return notes
