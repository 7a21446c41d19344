"""Round to nearest (``--optimizer rtn``, ``--simple``): the format's abs-max scales, ties to even."""
from __future__ import annotations

import time

import torch

from ..bf16 import rotate_groups_bf16
from ..formats import FormatSpec
from .base import LayerContext, OptimizerResult, register_optimizer
from .options import LayerDecisions


def _bf16_hadamard(decisions) -> bool:
    """The layer's ``bf16_hadamard`` decision, from ``LayerDecisions`` or a Mapping (options bound to
    the layer's decisions, or an older caller's dict)."""
    if decisions is None:
        return False
    if isinstance(decisions, LayerDecisions):
        return decisions.bf16_hadamard
    return bool(decisions.get("bf16_hadamard"))


def storage_weight(w: torch.Tensor, spec, decisions=None) -> torch.Tensor:
    """``spec``'s storage-space weight (the convrot rotation), with bf16 operands when the pipeline
    decided ``bf16_hadamard`` for this layer (``LayerContext.decisions``)."""
    p = spec.params
    if _bf16_hadamard(decisions) and getattr(p, "convrot", False):
        return rotate_groups_bf16(w, p.convrot_groupsize)
    return spec.cls.to_storage(w, p)


def quantize_rtn(w: torch.Tensor, spec, decisions, orig_dtype: torch.dtype):
    """Round-to-nearest through the format's interface; the format's own ``quantize`` unless the weight
    rotation runs in bf16 (then: rotate in bf16, abs-max scales and rounding in float32)."""
    if not _bf16_hadamard(decisions):
        return spec.cls.quantize(w, spec.params, orig_dtype=orig_dtype)
    ws = storage_weight(w, spec, decisions)
    scale = spec.cls.compute_scale(ws, spec.params)
    q = spec.cls.round_storage(ws / spec.cls.expand_scale(scale, ws.shape, spec.params))
    return spec.cls.pack(q, scale, spec.params, orig_dtype)


@register_optimizer("rtn")
def rtn(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """Round to nearest (ties to even) with the format's abs-max scales: the baseline."""
    t0 = time.perf_counter()
    qw = quantize_rtn(w, spec, ctx.decisions, ctx.orig_dtype)
    return OptimizerResult(qw, {"seconds": time.perf_counter() - t0})
