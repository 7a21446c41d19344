"""Quantizing tensors that are already in memory (a loaded model), with the same plan as files.

``convert_file`` streams a safetensors file; ComfyUI's on-the-fly quantize node starts from a model that
is already loaded. ``plan_for_tensors`` builds the usual ``ConversionPlan`` from names, dtypes and
shapes alone (presets, skip lists and fallbacks apply exactly as for a file), and
``quantize_tensors`` turns each planned layer into the tensors the file format would store, one layer
at a time, passing every other tensor through by reference (no copy).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch

from .checkpoint import checkpoint_scope
from .errors import BadWeightsError, ConvertError, display_name
from .optimizers import LayerContext, OptimizerOptions, get_optimizer, quantize_layer
from .plan import ConversionPlan, PlanOptions, build_plan
from .safetensors_io import DTYPE_NAMES, TensorInfo, itemsize


def tensor_infos(tensors: Mapping[str, torch.Tensor]) -> Dict[str, TensorInfo]:
    """Header-like ``TensorInfo`` for in-memory tensors (offsets as if they were laid out in order)."""
    infos: Dict[str, TensorInfo] = {}
    pos = 0
    for key, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ConvertError(f"{display_name(key)}: dtype {t.dtype} cannot be planned")
        n = t.numel() * itemsize(t.dtype)
        infos[key] = TensorInfo(key, DTYPE_NAMES[t.dtype], tuple(t.shape), pos, pos + n)
        pos += n
    return infos


def plan_for_tensors(tensors: Mapping[str, torch.Tensor], opts: PlanOptions) -> ConversionPlan:
    return build_plan(tensor_infos(tensors), opts)


def quantize_tensors(tensors: Mapping[str, torch.Tensor], plan: ConversionPlan, optimizer: str = "rtn",
                     optimizer_options: Optional[dict] = None, device: Optional[torch.device] = None,
                     progress: Optional[Callable[[int, int, str], None]] = None,
                     check_cancel: Optional[Callable[[], None]] = None) -> Dict[str, torch.Tensor]:
    """Output state dict: planned layers as their format's tensors (on the CPU), dropped tensors left
    out, everything else the input tensor object itself. Non-finite weights raise ``BadWeightsError``."""
    opt_fn = get_optimizer(optimizer)
    options = OptimizerOptions.from_dict(optimizer_options)  # checked once, before the first layer
    dropped = set(plan.dropped)
    out: Dict[str, torch.Tensor] = {}
    layers = plan.quantized_layers()
    done = 0
    for key, t in tensors.items():
        if key in dropped:
            continue
        lp = plan.layer_for_key(key)
        if lp is None or lp.spec is None:
            out[key] = t
            continue
        if check_cancel is not None:
            check_cancel()
        dev = device or t.device
        w = t.detach().to(device=dev, dtype=torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise BadWeightsError(f"{display_name(key)}: weight has NaN/Inf values; refusing to quantize it")
        ctx = LayerContext(base=lp.base, device=dev, options=options, orig_dtype=t.dtype)
        with checkpoint_scope(check_cancel):  # also inside the optimizer's loops (rate-limited)
            qw = quantize_layer(opt_fn, w, lp.spec, ctx, options["manual_seed"]).qw
        del w
        for k, v in lp.spec.cls.tensors(lp.base, qw).items():
            out[k] = v.detach().cpu()
        done += 1
        if progress is not None:
            progress(done, len(layers), lp.base)
    return out

