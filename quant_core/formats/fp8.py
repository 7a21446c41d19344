"""``float8_e4m3fn``: 8-bit float (E4M3) weights with one float32 scale per tensor -- the ``comfy_quant``
format ComfyUI core writes and loads (``QUANT_ALGOS["float8_e4m3fn"]``, comfy-kitchen's
``TensorCoreFP8Layout``), so stock ComfyUI loads it.

Keys: ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` float32 ``[]`` (``abs-max / 448``, never 0),
``comfy_quant`` ``{"format": "float8_e4m3fn"}``. The weight means ``weight.float() * weight_scale``
(comfy-kitchen's ``dequantize_per_tensor_fp8`` with a float32 output computes exactly that).

Per-tensor only: comfy-kitchen's ``TensorCoreFP8Layout`` hands its scale to ``torch._scaled_mm`` as the
weight's per-tensor ``scale_b``; a per-row ``[out, 1]`` scale makes that call fail and the layout falls
back to dequantizing the weight on every call (with a warning), so we never write one.

The grid: every E4M3 value up to ±448 (``grid_round``: nearest, ties to even, as the float8 cast), so
round-to-nearest and GPTQ choose fp8 values the same way they choose int8 integers.

Runtime (``linear``): on CUDA sm89+ with ``torch._scaled_mm`` the activations are cast to fp8 with a
per-tensor dynamic scale and multiplied in fp8 (W8A8, as comfy-kitchen does); elsewhere the weight is
dequantized and ``F.linear`` runs in the activations' dtype (W8A16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import SCALE_MIN, QuantFormat, QuantizedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """abs-max / 448 (float32), never 0, never so large that 448 · scale overflows float32."""
    s = (absmax.float() / FP8_MAX).clamp(min=SCALE_MIN)
    over = torch.isinf(s * FP8_MAX) & torch.isfinite(s)
    if bool(over.any()):
        s = torch.where(over, torch.nextafter(s, torch.zeros_like(s)), s)
    return s


class Float8E4M3(QuantFormat):
    name = "float8_e4m3fn"
    core_loadable = True
    storage_dtype = FP8_DTYPE
    description = ("float8 E4M3 weights with one float32 scale per tensor (ComfyUI core's fp8 format); "
                   "fp8 GEMM with per-tensor activation scales on sm89+ GPUs, dequantized elsewhere")

    @dataclass(frozen=True)
    class Params:
        pass

    @classmethod
    def describe(cls, params) -> str:
        return "float8_e4m3fn/tensor"

    @classmethod
    def scale_shape(cls, shape, params):
        return ()

    @classmethod
    def params_from_config(cls, cfg, tensors):
        return cls.Params()

    @classmethod
    def compute_scale(cls, ws, params):
        return fp8_scale(ws.abs().amax())

    @classmethod
    def expand_scale(cls, scale, shape, params):
        return scale.float().reshape(1, 1).expand(shape)

    @staticmethod
    def grid_round(x: torch.Tensor) -> torch.Tensor:
        """The nearest E4M3 value (ties to even) of ``x`` (in units of the scale), as float32."""
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()

    @classmethod
    def round_storage(cls, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

    @classmethod
    def pack(cls, q, scale, params, orig_dtype) -> QuantizedWeight:
        q = q if q.dtype == FP8_DTYPE else cls.round_storage(q.float())  # values already on the grid: exact
        return QuantizedWeight(cls.name, params, q.contiguous(), scale.float().reshape(()).contiguous(), orig_dtype)

    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        orig_dtype = orig_dtype or w.dtype
        ws = w.float()
        scale = cls.compute_scale(ws, params)
        return cls.pack(cls.round_storage(ws / scale), scale, params, orig_dtype)

    @classmethod
    def dequantize_storage(cls, qw):
        return qw.qdata.float() * qw.scale.float()

    @staticmethod
    def linear(x, qw, bias, path=None, backend=None):
        return fp8_linear(x, qw, bias, path=path)


def scaled_mm_usable(device: torch.device) -> bool:
    """``torch._scaled_mm`` with float8_e4m3fn operands runs on CUDA compute capability 8.9 and newer."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        return torch.cuda.get_device_capability(device) >= (8, 9)
    except Exception:  # pragma: no cover - no driver
        return False


def fp8_linear(x: torch.Tensor, qw, bias=None, path=None) -> torch.Tensor:
    """``y = x · dequant(W)ᵀ + bias`` in x's dtype: fp8 x fp8 on sm89+ (``path`` "w8a16"/"dequant": the
    dequantized weight instead), else the dequantized weight."""
    w8 = qw.qdata.to(x.device)
    scale = qw.scale.to(device=x.device, dtype=torch.float32)
    b = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
    k, n = x.shape[-1], w8.shape[0]
    if (path not in ("w8a16", "dequant") and k % 16 == 0 and n % 16 == 0 and scaled_mm_usable(x.device)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        x2 = x.reshape(-1, k)
        sa = fp8_scale(x2.abs().amax())
        xq = (x2.float() / sa).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out_dtype = x.dtype if x.dtype != torch.float32 else torch.bfloat16
        y = torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=scale, bias=None, out_dtype=out_dtype)
        y = y.to(x.dtype)
        if b is not None:
            y = y + b
        return y.reshape(x.shape[:-1] + (n,))
    w = (w8.float() * scale).to(x.dtype)
    return F.linear(x, w, b)
