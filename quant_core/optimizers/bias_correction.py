"""Bias correction (``--bias-correction``): remove the mean output shift quantization causes.

With the calibration mean ``μ = E[x]``, the quantized layer's expected output differs from the float one
by ``(Ŵ − W)·μ``; subtracting it from the bias makes the mean output exact: ``b ← b − (Ŵ − W)·μ``.
``Ŵ`` is the stored weight dequantized as the loader does (so it covers every format, rotations and
SmoothQuant included). A layer without a bias gets one (float, the weight's original dtype) only when
this correction is asked for; loaders whose model has no bias parameter for it ignore the extra key.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch

from ..errors import PlanError
from ..safetensors_io import FLOAT_DTYPES, OutputEntry


def corrected_bias(bias: Optional[torch.Tensor], w: torch.Tensor, w_hat: torch.Tensor,
                   mean: torch.Tensor) -> torch.Tensor:
    """``b − (Ŵ − W)·μ`` in float32 (``b`` = 0 when the layer has none)."""
    mu = mean.to(w.device, torch.float32)
    shift = (w_hat.to(w.device, torch.float32) - w.float()) @ mu
    b = torch.zeros_like(shift) if bias is None else bias.to(w.device, torch.float32)
    return b - shift


def plan_bias_correction(plan, calibration) -> Dict[str, object]:
    """Which quantized layers get a corrected bias, and the output entries of the biases to create.

    Returns ``{"layers": set of bases, "extra": {base: [OutputEntry]}, "notes": [...]}``."""
    if calibration is None:
        raise PlanError("bias_correction needs calibration_data: the correction uses the real activation "
                        "mean, which is never invented")
    layers: Set[str] = set()
    extra: Dict[str, List[OutputEntry]] = {}
    missing, odd = [], []
    for lp in plan.quantized_layers():
        if lp.spec.format == "fp16":
            continue
        if calibration.resolve(lp.base) is None:
            missing.append(lp.base)
            continue
        bias_key = lp.base + ".bias"
        b_info = plan.infos.get(bias_key)
        if b_info is not None and (tuple(b_info.shape) != (lp.shape[0],) or b_info.dtype_name not in FLOAT_DTYPES
                                   or bias_key in plan.dropped):
            odd.append(bias_key)
            continue
        layers.add(lp.base)
        if b_info is None:
            w_info = plan.infos[lp.weight_key]
            extra[lp.base] = [OutputEntry(bias_key, w_info.dtype, (lp.shape[0],))]
    notes = [f"bias correction: {len(layers)} layers ({len(extra)} new biases)"]
    if missing:
        notes.append(f"bias correction: {len(missing)} layers have no calibration statistics (e.g. {missing[0]})")
    if odd:
        notes.append(f"bias correction: {len(odd)} biases are not float vectors of the layer's width and are "
                     f"left unchanged (e.g. {odd[0]})")
    return {"layers": layers, "extra": extra, "notes": notes}
