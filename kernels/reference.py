"""torch implementations with the kernels' numerics: the fallback on CPU and on GPUs where the
Triton kernels don't run, and the definition the Triton kernels are tested against.

Every function takes 2-D operands (the public API in ``__init__`` flattens leading dimensions).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..quant_core.hadamard import regular_hadamard

QMAX = 127.0
SCALE_MIN = 1e-30

# the dequant path (``dequant_linear``) dequantizes at most this many bytes of fp32 weight rows at a time
DEQUANT_CHUNK_BYTES = 16 << 20  # in L3 while the GEMM reads it; >= 300 rows up to K = 13824
DEQUANT_CHUNK_ENV = "CONVERT_TO_QUANT_DEQUANT_CHUNK_MB"  # overrides it, in MiB (fractions allowed)

_HADAMARD: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def hadamard(group_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized regular Hadamard matrix, built once per (size, device, dtype) and then reused
    (every convrot linear needs it; a 1024² matrix is 4 MB to build and copy per call otherwise)."""
    key = (group_size, torch.device(device), dtype)
    h = _HADAMARD.get(key)
    if h is None:
        h = _HADAMARD[key] = regular_hadamard(group_size, device=device, dtype=dtype)
    return h


def rotate(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x · blockdiag(H_g)ᵀ along the last dim, computed in float32 (exact products, fp32 sums)."""
    k = x.shape[-1]
    h = hadamard(group_size, x.device)
    xf = x.float().reshape(-1, k // group_size, group_size)
    return torch.matmul(xf, h).reshape(x.shape)  # H is symmetric, so H == Hᵀ


def rotate_fast(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rotate`` (fp32 result) for the dequant path: for g >= 256 through H_g = H_a ⊗ H_b (a, b = 16,
    16 or 16, 64: the regular Hadamard is a Kronecker power of H_4), i.e. ``H_a · X · H_b`` per group
    viewed as an a×b matrix -- 2(a + b) instead of 2g flops per element (4-7× faster on CPU). Differs
    from ``rotate`` only by fp32 rounding (~1e-7 relative); smaller groups use ``rotate``."""
    if group_size < 256:
        return rotate(x, group_size)
    a = 16
    b = group_size // a
    xf = x.float().reshape(-1, a, b)
    y = torch.matmul(hadamard(a, x.device), torch.matmul(xf, hadamard(b, x.device)))
    return y.reshape(x.shape)


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


# ------------------------------------------------------------------------------------------------
# the dequant path without Triton: dequantize rows of the weight to x's dtype, F.linear, chunk by chunk
# ------------------------------------------------------------------------------------------------
def dequant_chunk_rows(n: int, k: int, chunk_bytes: Optional[int] = None) -> int:
    """Weight rows per dequantization chunk: as many as fit ``chunk_bytes`` of fp32 (default
    ``DEQUANT_CHUNK_BYTES``, or env ``CONVERT_TO_QUANT_DEQUANT_CHUNK_MB`` in MiB), at least one."""
    if chunk_bytes is None:
        env = os.environ.get(DEQUANT_CHUNK_ENV)
        if env:
            try:
                mib = float(env)
            except ValueError:
                mib = float("nan")
            if not mib > 0 or mib == float("inf"):
                raise ValueError(f"{DEQUANT_CHUNK_ENV} must be a positive number of MiB, got {env!r}")
            chunk_bytes = int(mib * (1 << 20))
        else:
            chunk_bytes = DEQUANT_CHUNK_BYTES
    return max(1, min(n, int(chunk_bytes) // (4 * max(k, 1))))


def dequantize_rows_into(out: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, row0: int,
                         group_size: int = 0, convrot_groupsize: int = 0,
                         work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` [rows, K] := rows ``row0 : row0 + rows`` of the dequantized weight, ``q.float() · scale``
    (then un-rotated for convrot) rounded once to ``out.dtype`` -- ``dequantize_weight``'s numerics.

    ``q`` holds those rows (int8); ``w_scale`` is the whole weight's fp32 scale (scalar, [N] per row, or
    [ceil(N/g), K/g] tiles with ``group_size``). Computed as an exact int8 -> fp32 copy and an in-place
    fp32 multiply (``work``: an fp32 buffer of at least ``rows`` rows, used when ``out`` is not fp32): two
    vectorized passes, several times faster on CPU than one mixed-dtype ``torch.mul``."""
    rows, k = q.shape
    if out.dtype == torch.float32 and not convrot_groupsize:
        w = out
    else:
        w = work[:rows] if work is not None else torch.empty((rows, k), dtype=torch.float32, device=q.device)
    w.copy_(q)
    if group_size:
        g = group_size
        t0 = row0 // g
        sc = w_scale[t0:(row0 + rows - 1) // g + 1].repeat_interleave(g, 0)  # [rows(+), K/g]: 1/g of a chunk
        w.view(rows, k // g, g).mul_(sc[row0 - t0 * g:row0 - t0 * g + rows].unsqueeze(2))
    else:
        w.mul_(w_scale.reshape(1, 1) if w_scale.numel() == 1 else w_scale.reshape(-1, 1)[row0:row0 + rows])
    if convrot_groupsize:
        w = rotate_fast(w, convrot_groupsize)
    if w is not out:
        out.copy_(w)
    return out


def dequant_linear(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   group_size: int, convrot_groupsize: int, out_dtype: torch.dtype,
                   chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """``x · dequant(W)ᵀ + bias`` in x's dtype (``F.linear`` on the dequantized weight), the weight
    dequantized a chunk of rows at a time (``dequant_chunk_rows``): the memory beyond the output is one
    chunk, never a whole float copy of a large layer, and nothing is kept between calls.

    Convrot (``W = W_stored · blockdiag(H)``): with fewer tokens than output features it is cheaper to
    rotate the activations once (``x · blockdiag(H)ᵀ`` in fp32, rounded once to x's dtype) and use the
    stored weight as it is -- the same product up to rounding; otherwise each chunk is un-rotated."""
    m, k = x.shape
    n = qw.shape[0]
    dt = x.dtype
    if bias is not None and bias.dtype != dt:
        bias = bias.to(dt)
    if convrot_groupsize and m < n:
        x = rotate_fast(x, convrot_groupsize).to(dt)
        convrot_groupsize = 0
    rows = dequant_chunk_rows(n, k, chunk_bytes)
    buf = torch.empty((rows, k), dtype=dt, device=x.device)
    work = None if dt == torch.float32 and not convrot_groupsize else \
        torch.empty((rows, k), dtype=torch.float32, device=x.device)
    if rows >= n:
        y = F.linear(x, dequantize_rows_into(buf, qw, w_scale, 0, group_size, convrot_groupsize, work), bias)
    else:
        y = torch.empty((m, n), dtype=dt, device=x.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            w = dequantize_rows_into(buf[:r1 - r0], qw[r0:r1], w_scale, r0, group_size, convrot_groupsize, work)
            if bias is None:
                torch.mm(x, w.t(), out=y[:, r0:r1])
            else:
                torch.addmm(bias[r0:r1], x, w.t(), out=y[:, r0:r1])
    return y if y.dtype == out_dtype else y.to(out_dtype)
