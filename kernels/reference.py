"""torch implementations with the kernels' numerics: the fallback on CPU and on GPUs where the
Triton kernels don't run, and the definition the Triton kernels are tested against.

Every function takes 2-D operands (the public API in ``__init__`` flattens leading dimensions).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..quant_core.hadamard import regular_hadamard

QMAX = 127.0
SCALE_MIN = 1e-30


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x · blockdiag(H_g)ᵀ along the last dim, computed in float32 (exact products, fp32 sums)."""
    k = x.shape[-1]
    h = regular_hadamard(group_size, device=x.device, dtype=torch.float32)
    xf = x.float().reshape(-1, k // group_size, group_size)
    return torch.matmul(xf, h).reshape(x.shape)  # H is symmetric, so H == Hᵀ


def _round_int8(v: torch.Tensor) -> torch.Tensor:
    # clamp first, then round half to even (torch.round); identical to the kernels' magic-number rounding
    return torch.round(v.clamp(-QMAX, QMAX)).to(torch.int8)


def quantize_activations(x: torch.Tensor, convrot_groupsize: int = 0, block_k: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of a 2-D ``x`` [M, K] (optionally rotated first).

    scale = max(absmax / 127, 1e-30) in fp32, q = round_half_even(clamp(y * (1 / scale), ±127)) with the
    reciprocal and the product each rounded once (a multiply per element in the kernel, not a divide).
    ``block_k`` > 0: one scale per token per ``block_k`` columns, scale shape [M, K / block_k].
    """
    y = rotate(x, convrot_groupsize) if convrot_groupsize else x.float()
    m, k = y.shape
    # divide by a tensor, not the Python scalar 127: for "tensor / scalar" CUDA torch multiplies by
    # the scalar's reciprocal, which is not the IEEE quotient the kernels compute
    if block_k:
        yb = y.reshape(m, k // block_k, block_k)
        amax = yb.abs().amax(dim=2)
        s = (amax / torch.full_like(amax, QMAX)).clamp(min=SCALE_MIN)
        q = _round_int8(yb * torch.reciprocal(s)[:, :, None]).reshape(m, k)
        return q, s
    amax = y.abs().amax(dim=1)
    s = (amax / torch.full_like(amax, QMAX)).clamp(min=SCALE_MIN)
    return _round_int8(y * torch.reciprocal(s)[:, None]), s


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 A[M,K] · B[N,K]ᵀ."""
    if a.device.type == "cuda" and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b_t.shape[0] % 8 == 0:
        try:
            return torch._int_mm(a, b_t.t())
        except RuntimeError:
            pass
    if a.device.type == "cpu":
        return torch._int_mm(a, b_t.t())
    # float64 holds every partial sum exactly (|sum| < K·127² << 2^53)
    return torch.matmul(a.double(), b_t.double().t()).to(torch.int32)


def scaled_int8_mm(qa: torch.Tensor, a_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """(int32(qa·qwᵀ) → fp32) · a_scale[m] · w_scale[n or scalar] (+ bias), fp32, then cast."""
    out = int_mm(qa, qw).float() * a_scale.reshape(-1, 1)
    out = out * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float().reshape(1, -1)
    return out.to(out_dtype)


def blockwise_int8_mm(qa: torch.Tensor, a_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Σ_kb f32(int32 partial product of K block kb) · a_scale[m,kb] · w_scale[n//g, kb] (+ bias).

    ``a_scale`` [M, K/g], ``w_scale`` [ceil(N/g), K/g]; fp32 accumulation over K blocks.
    """
    m, k = qa.shape
    n = qw.shape[0]
    g = group_size
    nkb = k // g
    ws_rows = w_scale.float().repeat_interleave(g, dim=0)[:n]  # [N, K/g]
    acc = torch.zeros(m, n, dtype=torch.float32, device=qa.device)
    for kb in range(nkb):
        part = int_mm(qa[:, kb * g:(kb + 1) * g].contiguous(), qw[:, kb * g:(kb + 1) * g].contiguous())
        acc += part.float() * (a_scale[:, kb].float().reshape(-1, 1) * ws_rows[:, kb].reshape(1, -1))
    if bias is not None:
        acc = acc + bias.float().reshape(1, -1)
    return acc.to(out_dtype)


def expand_weight_scale(qw: torch.Tensor, w_scale: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """The fp32 per-element scale of a weight (scalar, [N,1] or block-wise tiles)."""
    n, k = qw.shape
    if group_size:
        g = group_size
        return w_scale.float().repeat_interleave(g, 0).repeat_interleave(g, 1)[:n, :k]
    return w_scale.float().reshape(-1, 1).expand(n, k) if w_scale.numel() > 1 else w_scale.float().reshape(1, 1)


def dequantize_weight(qw: torch.Tensor, w_scale: torch.Tensor, group_size: int = 0, convrot_groupsize: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q.float() · scale (then un-rotate for convrot: H is its own inverse), cast once to ``dtype``."""
    w = qw.float() * expand_weight_scale(qw, w_scale, group_size)
    if convrot_groupsize:
        w = rotate(w, convrot_groupsize)
    return w.to(dtype)


def w8a16_mm(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
             group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Weight-only: x (exactly converted to fp32) · (q · scale)ᵀ in fp32, + bias, cast."""
    if group_size:
        out = torch.matmul(x.float(), (qw.float() * expand_weight_scale(qw, w_scale, group_size)).t())
    else:
        out = torch.matmul(x.float(), qw.float().t()) * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float().reshape(1, -1)
    return out.to(out_dtype)
