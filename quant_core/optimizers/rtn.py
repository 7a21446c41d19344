"""Round to nearest (``--optimizer rtn``, ``--simple``): the format's abs-max scales, ties to even."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional

import torch

from ..bf16 import rotate_groups_bf16
from ..formats import FormatSpec
from .base import LayerContext, OptimizerResult, register_optimizer


def storage_weight(w: torch.Tensor, spec, options: Optional[Dict[str, Any]]) -> torch.Tensor:
    """``spec``'s storage-space weight (the convrot rotation), with bf16 operands when the pipeline set
    ``bf16_hadamard`` for this layer."""
    p = spec.params
    if (options or {}).get("bf16_hadamard") and getattr(p, "convrot", False):
        return rotate_groups_bf16(w, p.convrot_groupsize)
    return spec.cls.to_storage(w, p)


def quantize_rtn(w: torch.Tensor, spec, options: Optional[Dict[str, Any]], orig_dtype: torch.dtype):
    """Round-to-nearest through the format's interface; the format's own ``quantize`` unless the weight
    rotation runs in bf16 (then: rotate in bf16, abs-max scales and rounding in float32)."""
    if not (options or {}).get("bf16_hadamard"):
        return spec.cls.quantize(w, spec.params, orig_dtype=orig_dtype)
    ws = storage_weight(w, spec, options)
    scale = spec.cls.compute_scale(ws, spec.params)
    q = spec.cls.round_storage(ws / spec.cls.expand_scale(scale, ws.shape, spec.params))
    return spec.cls.pack(q, scale, spec.params, orig_dtype)


@register_optimizer("rtn")
def rtn(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Round to nearest (ties to even) with the format's abs-max scales: the baseline."""
    t0 = time.perf_counter()
    qw = quantize_rtn(w, spec, ctx.options, ctx.orig_dtype)
    return OptimizerResult(qw, {"seconds": time.perf_counter() - t0})
