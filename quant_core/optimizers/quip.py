"""QuIP (``--optimizer quip``): incoherence processing, then LDLQ in the rotated space.

Incoherence processing multiplies the weight by orthogonal Hadamard-type matrices so no single weight
or activation channel stands out (heavy tails and outlier channels are spread over a whole group), then
LDLQ -- the same greedy error-feedback rounding as GPTQ (QuIP, Chee et al. 2023, show LDLQ ≡ OPTQ) --
runs on the rotated weight with the rotated Hessian ``T H Tᵀ``. The stored file keeps the gain: the
integers are those of the rotated weight, never re-quantized back to the original space.

Storage (chosen by the plan, see ``cli.py``):

* default: core-loadable ``int8_tensorwise`` + convrot (group 256), per-row scales. The rotation is the
  regular Hadamard that stock ComfyUI applies to the activations, on the input side only (the output
  side cannot be expressed in a core format). Layers whose width is not a multiple of 256 fall back to
  convrot 64/16, then to per-row without rotation (LDLQ alone; noted per layer).
* ``--quip-store-transformed``: our ``int8_quip`` format -- randomized block Hadamard with random signs on
  both sides (signs stored as ``quip_sign_in``/``quip_sign_out``, drawn from ``--quip-seed`` and the layer
  name); only our loader runs it.
* any other format asked for explicitly (``--scaling_mode tensor|block``, ``--quip-requant-scheme``):
  LDLQ in that format, without rotation, and the report says so.

``--quip-actorder``: LDLQ visits columns by decreasing ``diag(H)``. ``--quip-checkpointed``: layers with
``out`` ≥ ``--quip-checkpoint-threshold`` are processed in ``--quip-checkpoint-segments`` row segments, layers
with ``in`` ≥ it factor their Hessian on the CPU (same integers, less GPU memory; ``_checkpoint_plan``).
"""
from __future__ import annotations

import time

import torch

from ..formats import FormatSpec
from ..formats_extra import Int8QuIP, random_signs
from .base import LayerContext, OptimizerResult, register_optimizer
from .gptq import SWEEP_COST, finish_info, quantize_with_objective
from .rtn import storage_weight
from .objective import layer_objective, opt


def _checkpoint_plan(w: torch.Tensor, options):
    """``--quip-checkpointed``: (row segments, Hessian factorization device) for this layer.

    Tall layers (``out`` ≥ threshold) run LDLQ in row segments: the sweep's working rows shrink, the
    integers do not change. Wide layers (``in`` ≥ threshold) factor their ``in × in`` Hessian -- float64,
    the largest working set at DiT widths (~10 GiB for in = 15360, docs/SCALE.md) -- on the CPU; only
    ``H⁻¹``'s float32 factor comes back to the GPU."""
    if not opt(options, "quip_checkpointed", False):
        return 1, None
    threshold = int(opt(options, "quip_checkpoint_threshold", 8192))
    segments = max(1, int(opt(options, "quip_checkpoint_segments", 4))) if w.shape[0] >= threshold else 1
    factor_device = torch.device("cpu") if w.shape[1] >= threshold and w.device.type != "cpu" else None
    return segments, factor_device


@register_optimizer("quip", SWEEP_COST)
def quip(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    t0 = time.perf_counter()
    o = ctx.options.quip
    w = w.float()
    actorder = o.quip_actorder
    segments, factor_device = _checkpoint_plan(w, ctx.options)  # the options, as a Mapping
    if spec.format == Int8QuIP.name:
        seed = o.quip_seed
        sign_out = random_signs(w.shape[0], seed, ctx.base + ":out", device=w.device)
        sign_in = random_signs(w.shape[1], seed, ctx.base + ":in", device=w.device)
        wt = Int8QuIP.transform(w, sign_out, sign_in)
        obj = layer_objective(w, spec, ctx, transform=lambda h: Int8QuIP.transform_hessian(h, sign_in))
        q, scale, info = quantize_with_objective(w, spec, ctx, wt, obj, actorder, segments, label="quip",
                                                 factor_device=factor_device)
        qw = Int8QuIP.pack_transformed(q.to(torch.int8), scale, sign_out, sign_in, spec.params, ctx.orig_dtype)
        info["incoherence"] = "randomized block Hadamard, both sides"
    else:
        ws = storage_weight(w, spec, ctx.decisions)
        obj = layer_objective(w, spec, ctx)
        if getattr(spec.params, "convrot", False):
            info_inc = f"regular Hadamard g={spec.params.convrot_groupsize}, input side (core convrot)"
        else:
            info_inc = None
            obj.notes.append(f"format {spec.describe()} holds no rotation: LDLQ without incoherence processing")
        q, scale, info = quantize_with_objective(w, spec, ctx, ws, obj, actorder, segments, label="quip",
                                                 factor_device=factor_device)
        qw = spec.cls.pack(q, scale, spec.params, ctx.orig_dtype)
        info["incoherence"] = info_inc
    return OptimizerResult(qw, finish_info(info, obj, t0))
