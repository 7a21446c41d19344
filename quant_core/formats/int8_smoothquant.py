"""Formats whose runtime needs an extra per-layer tensor carry their own format name, so stock ComfyUI
refuses them with "Unsupported quantization format" instead of computing a wrong result (FORMATS.md).

``int8_smoothquant`` (SmoothQuant, ``--smoothquant``)
    ``W ≈ (q · S) · diag(1/f)``: the stored integers are those of the smoothed weight ``W · diag(f)``;
    the runtime divides the activations by ``f`` (``x' = x / f``), which moves activation outliers into
    the weight, then runs the int8 W8A8 GEMM. Keys: ``weight`` int8 ``[out, in]``, ``weight_scale``
    float32 ``[out, 1]`` (per row) or ``[]`` (tensor), ``smooth_scale`` float32 ``[in]`` (``f > 0``),
    ``comfy_quant`` ``{"format": "int8_smoothquant"}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PlanError, SafetensorsFormatError
from .base import QuantizedWeight, RowOrTensorScaled, check_scaling


class Int8SmoothQuant(RowOrTensorScaled):
    name = "int8_smoothquant"
    core_loadable = False
    description = ("SmoothQuant: int8 weights of W·diag(f) with per-row or tensor scale, plus the "
                   "per-input-channel factors f the runtime divides activations by (our loader only)")

    @dataclass(frozen=True)
    class Params:
        scaling: str = "row"

        def __post_init__(self):
            check_scaling("int8_smoothquant", self.scaling)

    @staticmethod
    def linear(x, qw, bias, path=None, backend=None):
        return smoothquant_linear(x, qw, bias, path=path, backend=backend)

    @classmethod
    def extra_specs(cls, shape, params):
        return [("smooth_scale", torch.float32, (shape[1],))]

    @classmethod
    def params_from_config(cls, cfg, tensors):
        scale = tensors.get("weight_scale")
        q = tensors.get("weight")
        f = tensors.get("smooth_scale")
        if f is None:
            raise SafetensorsFormatError("int8_smoothquant layer without its smooth_scale tensor")
        if q is not None and (f.dim() != 1 or f.shape[0] != q.shape[1]):
            raise SafetensorsFormatError(f"smooth_scale has shape {list(f.shape)}, expected [{q.shape[1]}]")
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
            raise SafetensorsFormatError("smooth_scale must be finite and positive")
        scaling = "tensor" if scale is not None and scale.dim() == 0 else "row"
        return cls.Params(scaling=scaling)


    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        raise PlanError("int8_smoothquant needs smoothing factors from calibration data; "
                        "use optimizers.smoothquant.quantize_smoothed")

    @classmethod
    def pack_smoothed(cls, q, scale, factors, params, orig_dtype) -> QuantizedWeight:
        qw = QuantizedWeight(cls.name, params, q.to(torch.int8).contiguous(), scale.float().contiguous(),
                             orig_dtype, {"smooth_scale": factors.float().contiguous()})
        return qw

    @classmethod
    def dequantize(cls, qw):
        f = qw.extra["smooth_scale"].float().to(qw.qdata.device)
        return cls.dequantize_storage(qw) / f.reshape(1, -1)


def smoothquant_linear(x, qw, bias, path=None, backend=None):
    """x / f, then the int8_tensorwise W8A8 linear on the smoothed weight."""
    from ... import kernels
    f = qw.extra["smooth_scale"].to(device=x.device, dtype=torch.float32)
    xs = (x.float() / f).to(x.dtype)
    return kernels.int8_linear(xs, qw.qdata, qw.scale, bias, path=path, backend=backend)
