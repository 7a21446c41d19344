"""Static activation scales (``input_scale`` option, CLI ``--input_scale`` / ``--static-activations``).

For every ``int8_tensorwise`` layer without a rotation the file gets ``<layer>.input_scale``: an fp32
scalar, ``max_j absmax_j / 127`` over the calibration tokens' input features (``absmax`` as captured in
the calibration statistics), the key ComfyUI's quantized layers load as a layer's input scale. Our
runtime (``kernels.int8_linear_static_input``) then quantizes activations with it -- one multiply --
instead of the per-token abs-max pass; activations beyond the calibrated range are clipped to ±127.
Rotated (convrot, int8_quip), SmoothQuant and block-wise layers quantize activations after a transform
or per block, so a scale of the raw input would be wrong for them: they keep the per-token pass.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from ..errors import PlanError
from ..safetensors_io import OutputEntry

MIN_SCALE = 1e-12  # a layer whose calibration input was all zeros: any scale quantizes zeros exactly


def eligible(spec) -> bool:
    return spec is not None and spec.format == "int8_tensorwise" and not getattr(spec.params, "convrot", False)


def plan_input_scales(plan, calibration) -> Dict[str, object]:
    """``{"layers": set of bases, "extra": {base: [OutputEntry]}, "notes": [...]}``."""
    if calibration is None:
        raise PlanError("input_scale needs calibration_data: static activation scales come from the "
                        "activations' measured abs-max, which is never invented")
    layers, extra, missing, other = set(), {}, [], 0
    for lp in plan.quantized_layers():
        if not eligible(lp.spec):
            other += lp.spec.format != "fp16"
            continue
        if calibration.resolve(lp.base) is None:
            missing.append(lp.base)
            continue
        layers.add(lp.base)
        extra[lp.base] = [OutputEntry(lp.base + ".input_scale", torch.float32, ())]
    notes = [f"static input scales: {len(layers)} layers"]
    if other:
        notes.append(f"static input scales: {other} rotated, SmoothQuant or block-wise layers keep per-token "
                     "activation scales")
    if missing:
        notes.append(f"static input scales: {len(missing)} layers have no calibration statistics and keep "
                     f"per-token scales (e.g. {missing[0]})")
    return {"layers": layers, "extra": extra, "notes": notes}


def input_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The stored scale: fp32 scalar ``max(absmax) / 127`` (at least ``MIN_SCALE``)."""
    return torch.clamp(absmax.float().max() / 127.0, min=MIN_SCALE).reshape(()).cpu()


def merge_extra(*parts) -> Dict[str, List[OutputEntry]]:
    out: Dict[str, List[OutputEntry]] = {}
    for p in parts:
        for base, entries in (p or {}).items():
            out.setdefault(base, []).extend(entries)
    return out
