"""``fp16``: plain float16 weights, no quantization metadata.
"""
from __future__ import annotations

import torch

from .base import QuantFormat, QuantizedWeight


class FP16(QuantFormat):
    name = "fp16"
    core_loadable = True
    on_grid = False  # nothing for an optimizer to choose: every optimizer stores the plain conversion
    description = "plain float16 weight (no quantization metadata)"

    @classmethod
    def comfy_quant(cls, params):
        return None

    @classmethod
    def output_spec(cls, base, shape, params, orig_dtype):
        return [(f"{base}.weight", torch.float16, tuple(shape))]

    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        w16 = w.float().clamp(-65504.0, 65504.0).to(torch.float16)
        return QuantizedWeight(cls.name, params, w16.contiguous(), None, orig_dtype or w.dtype)

    @classmethod
    def dequantize(cls, qw):
        return qw.qdata.float()

    @classmethod
    def tensors(cls, base, qw):
        return {f"{base}.weight": qw.qdata}
