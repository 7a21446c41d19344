"""INT8 attention (the SageAttention recipe, written from its description): non-causal softmax attention
with Q·Kᵀ on the int8 tensor cores.

Numerics (the Triton kernels and the torch reference compute exactly this; docs/KERNELS.md, "INT8
attention"):

1. **Smooth K**: ``k̃ = k - mean_L(k)`` per (batch, head, channel), in fp32. Softmax is invariant to it:
   the subtracted term adds ``q_i · mean`` to every score of row i.
2. **Quantize** Q and k̃ to int8, symmetric, one fp32 scale per ``Q_GRAN`` rows of Q and per ``K_GRAN``
   rows of K (per batch and head): ``s = max(absmax / 127, 1e-30)``, ``int = round_half_even(clamp(x ·
   (1 / s), ±127))`` (reciprocal and product each rounded once, as ``reference.quantize_activations``).
   Q's stored scale carries the softmax scale and log2(e): ``sq = s · (sm_scale · log2 e)``.
3. **Scores** ``S = (int8 Q · int8 K̃ᵀ)`` exactly (int32), then ``(S · sk) · sq`` in fp32: the log2-domain
   logits.
4. **Softmax** in fp32 with ``exp2`` (flash-style online max/sum in the kernel; one pass in the reference).
5. **P·V** (``pv``): "v" -- P rounded to V's dtype (bf16/fp16), times V, fp32 accumulation, divided by
   the fp32 row sum. "fp8" (FP8 tensor cores; the default on sm90; the SageAttention2 recipe) -- V quantized to
   float8_e4m3fn per (batch, head, channel): ``sv = max(absmax_L(v) / 448, 1e-30)``, ``v8 = e4m3(clamp(v ·
   (1 / sv), ±448))`` round-to-nearest-even; P (≤ 1) as ``e4m3(P · 448)``; each K tile's product summed in
   fp32 by the MMA from zero and added to the fp32 accumulator (two-level accumulation), at the end
   ``· (sv · (1 / 448))`` per channel, divided by the row sum.

Entry points: ``int8_attention(q, k, v)`` on (B, H, L, D) views (any strides with a unit last stride;
output (B, Lq, H, D) contiguous), ``unsupported_reason`` (why a call would not take this path; the
ComfyUI override falls back to the original attention function for those), ``reference_int8_attention``
and ``quantize_qk``. Backends: Triton on CUDA sm80+ for fp16/bf16 (and on CPU under TRITON_INTERPRET=1
when asked for), the torch reference elsewhere (memory bounded: chunks of query rows).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .launch import HAS_TRITON, TUNER, arch_of, interpreter_active, launch_kernel, resolve_backend, triton_usable

if HAS_TRITON:
    import triton
    import triton.language as tl
    from .triton_kernels import _absmax, _act_scale, _round_clamp_int8

LOG2E = math.log2(math.e)  # in double; sm_scale * LOG2E is rounded once to fp32 (``_scale_const``)
QMAX = 127.0
SCALE_MIN = 1e-30
HEAD_DIMS = (64, 128)  # head dims the kernels take (Wan, Flux, HunyuanVideo: 128; SD3: 64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # float32 on CUDA falls back: it is a precision request
# rows of Q / K sharing one scale (per batch and head); powers of two dividing QUANT_ROWS. Per token for
# both: in the kernel a per-row Q scale is loaded once per program and a per-column K scale is one vector
# per K tile -- the same multiplies as per-block scales -- and it is the most accurate choice (cosine vs
# exact attention on N(0, 3²) Q/K, D 128, 2048 tokens: 0.99955 per token, 0.99908 with SageAttention's
# 128-row Q / 64-row K blocks; docs/KERNELS.md "INT8 attention").
Q_GRAN = 1
K_GRAN = 1
QUANT_ROWS = 64  # rows per program of the quantization kernel (a multiple of both granularities)
ATTENTION_BACKEND_ENV = "CONVERT_TO_QUANT_ATTENTION_BACKEND"  # "auto" / "triton" / "torch"
REF_CHUNK_BYTES = 64 << 20  # the torch reference materialises at most this many bytes of fp32 scores
PV_ENV = "CONVERT_TO_QUANT_ATTENTION_PV"  # "auto" / "v" / "fp8": how P·V is computed (module doc, step 5)
PV_MODES = ("v", "fp8")
FP8_MAX = 448.0
FP8_PAD = 16  # V^T rows (tokens) padded to a multiple of this (16-byte aligned fp8 rows)


class AttentionInputError(ValueError):
    """Operands the INT8 attention cannot take (use ``unsupported_reason`` to check first)."""


def unsupported_reason(q, k, v, mask=None) -> Optional[str]:
    """None if ``int8_attention`` computes this call (on some backend), else why not. q, k, v are
    (B, H, L, D); K and V share B, H, their length and D with each other; Q shares B, H and D."""
    if mask is not None:
        return "an attention mask"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if type(t) is not torch.Tensor:
            return f"{name} is not a plain tensor ({type(t).__name__})"
        if t.dim() != 4:
            return f"{name} is {t.dim()}-D (want batch, heads, tokens, head dim)"
        if t.dtype not in FLOAT_DTYPES:
            return f"dtype {t.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if not (q.device == k.device == v.device):
        return "operands on different devices"
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        return f"shapes q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} (no broadcasting or GQA)"
    if d not in HEAD_DIMS:
        return f"head dim {d} (supported: {', '.join(map(str, HEAD_DIMS))})"
    if lq == 0 or k.shape[2] == 0 or b == 0 or h == 0:
        return "an empty operand"
    if q.requires_grad or k.requires_grad or v.requires_grad:
        return "autograd (inference only)"
    return None


# ------------------------------------------------------------------------------------------------
# torch reference
# ------------------------------------------------------------------------------------------------
def _scale_const(sm_scale: float) -> torch.Tensor:
    return torch.tensor(sm_scale * LOG2E, dtype=torch.float32)


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """Per (batch, head, channel) mean of K over its tokens, fp32 [B, H, D] (one torch reduction, shared by
    both backends so their smoothed K agree bit for bit)."""
    return k.mean(dim=2, dtype=torch.float32).contiguous()


def _quant_groups(x: torch.Tensor, gran: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [B, H, L, D] -> (int8 [B, H, L, D], scale fp32 [B, H, ceil(L / gran)])."""
    b, h, n, d = x.shape
    ng = -(-n // gran)
    pad = ng * gran - n
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    xg = xp.reshape(b, h, ng, gran * d)
    amax = xg.abs().amax(dim=3)
    s = (amax / torch.full_like(amax, QMAX)).clamp(min=SCALE_MIN)
    qi = torch.round((xg * torch.reciprocal(s)[..., None]).clamp(-QMAX, QMAX)).to(torch.int8)
    return qi.reshape(b, h, ng * gran, d)[:, :, :n], s


def quantize_qk_reference(q: torch.Tensor, k: torch.Tensor, sm_scale: float, mean: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8, q scales · sm_scale · log2 e, k̃ int8, k scales); int8 tensors contiguous [B, H, L, D],
    scales fp32 [B, H, ceil(L / gran)]."""
    mean = k_mean(k) if mean is None else mean
    qi, qs = _quant_groups(q.float(), Q_GRAN)
    ki, ks = _quant_groups(k.float() - mean[:, :, None, :], K_GRAN)
    qs = qs * _scale_const(sm_scale).to(qs.device)
    return qi.contiguous(), qs, ki.contiguous(), ks


def _row_scales(s: torch.Tensor, gran: int, n: int) -> torch.Tensor:
    return s.repeat_interleave(gran, dim=2)[:, :, :n] if gran > 1 else s[:, :, :n]


def _new_out(b, h, lq, d, v, heads_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(result tensor, its (B, H, Lq, D) view): (B, Lq, H, D) contiguous if ``heads_last`` (ComfyUI's
    (B, Lq, H·D) is then a free view), else (B, H, Lq, D) contiguous."""
    if heads_last:
        out = torch.empty((b, lq, h, d), dtype=v.dtype, device=v.device)
        return out, out.permute(0, 2, 1, 3)
    out = torch.empty((b, h, lq, d), dtype=v.dtype, device=v.device)
    return out, out


def _v_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel absmax of V (fp32 [B, H, D]) -> the fp8 scales (one torch expression for both backends)."""
    return (amax / torch.full_like(amax, FP8_MAX)).clamp(min=SCALE_MIN).contiguous()


def quantize_v_fp8_reference(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(V^T float8_e4m3fn [B, H, D, Lpad], scales fp32 [B, H, D]): step 5's "fp8" quantization of V, one
    scale per (batch, head, channel); tokens padded with zeros to a multiple of ``FP8_PAD``."""
    b, h, n, d = v.shape
    sv = _v_scales(v.abs().amax(dim=2).float())
    v8 = (v.float() * torch.reciprocal(sv)[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    npad = -(-n // FP8_PAD) * FP8_PAD
    vt = torch.zeros((b, h, d, npad), dtype=torch.float8_e4m3fn, device=v.device)
    vt[..., :n] = v8.transpose(-1, -2)
    return vt, sv.contiguous()


def attention_from_quantized(qi, qs, ki, ks, v: torch.Tensor, heads_last: bool = True, v8=None) -> torch.Tensor:
    """Steps 3-5 of the module doc in torch from quantized Q/K: output in v's dtype, (B, Lq, H, D)
    contiguous (``heads_last``) or (B, H, Lq, D); ``v8`` = ``quantize_v_fp8_reference(v)`` for P·V in fp8
    (else P rounded to V's dtype). Scores
    are computed exactly (int8 products summed in fp32 are exact for D < 1040; float64 on CUDA, where TF32
    may be on) in chunks of query rows of at most ``REF_CHUNK_BYTES``."""
    b, h, lq, d = qi.shape
    lk = ki.shape[2]
    out, o4 = _new_out(b, h, lq, d, v, heads_last)
    acc = torch.float64 if qi.device.type != "cpu" else torch.float32
    sq = _row_scales(qs, Q_GRAN, lq)
    sk = _row_scales(ks, K_GRAN, lk)
    kf = ki.to(acc).transpose(-1, -2)
    if v8 is not None:
        vf = v8[0][..., :lk].float().transpose(-1, -2)  # exact fp8 values
        vscale = (v8[1] * (1.0 / FP8_MAX))[:, :, None, :]
    else:
        vf = v.float()
    rows = max(1, min(lq, REF_CHUNK_BYTES // max(1, 4 * b * h * lk)))
    for r0 in range(0, lq, rows):
        r1 = min(lq, r0 + rows)
        s = torch.matmul(qi[:, :, r0:r1].to(acc), kf).float()  # exact int32 values
        s = (s * sk[:, :, None, :]) * sq[:, :, r0:r1, None]
        m = s.amax(dim=-1, keepdim=True)
        p = torch.exp2(s - m)
        l_ = p.sum(dim=-1, keepdim=True)
        if v8 is not None:
            o = (torch.matmul((p * FP8_MAX).to(torch.float8_e4m3fn).float(), vf) * vscale) / l_
        else:
            o = torch.matmul(p.to(v.dtype).float(), vf) / l_
        o4[:, :, r0:r1] = o.to(v.dtype)
    return out


def reference_int8_attention(q, k, v, sm_scale: Optional[float] = None, pv: str = "v") -> torch.Tensor:
    """The torch implementation of the module doc's numerics: (B, H, L, D) in, (B, Lq, H, D) out."""
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    qi, qs, ki, ks = quantize_qk_reference(q, k, sm_scale)
    return attention_from_quantized(qi, qs, ki, ks, v, v8=quantize_v_fp8_reference(v) if pv == "fp8" else None)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    @triton.jit
    def _quant_rows(src, dst, sc, mean, r0, n, s_l, mult, D: tl.constexpr, ROWS: tl.constexpr,
                    GRAN: tl.constexpr, HAS_MEAN: tl.constexpr):
        """Rows [r0, r0 + ROWS) of one (batch, head) of ``src`` (row stride ``s_l``, unit column stride)
        -> int8 rows of ``dst`` (contiguous, D per row) and one scale per GRAN rows in ``sc`` (x mult)."""
        offs_r = r0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, D)
        mask = offs_r[:, None] < n
        x = tl.load(src + offs_r[:, None].to(tl.int64) * s_l + offs_d[None, :], mask=mask, other=0).to(tl.float32)
        if HAS_MEAN:
            x = tl.where(mask, x - tl.load(mean + offs_d)[None, :], 0.0)
        xg = tl.reshape(x, (ROWS // GRAN, GRAN * D))
        s = _act_scale(_absmax(xg, 1))
        inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        qv = tl.reshape(_round_clamp_int8(xg * inv[:, None]), (ROWS, D))
        tl.store(dst + offs_r[:, None] * D + offs_d[None, :], qv, mask=mask)
        g = r0 // GRAN + tl.arange(0, ROWS // GRAN)
        tl.store(sc + g, s * mult, mask=g < (n + GRAN - 1) // GRAN)

    @triton.jit
    def attn_qk_quant_kernel(q, k, mean, qo, ko, qs, ks, H, LQ, LK, NQP, s_qb, s_qh, s_ql, s_kb, s_kh, s_kl,
                             q_mult, D: tl.constexpr, ROWS: tl.constexpr, QG: tl.constexpr, KG: tl.constexpr):
        """One launch quantizes Q (programs [0, NQP)) and smoothed K (the rest) of every (batch, head)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        if pid < NQP:
            _quant_rows(q + b * s_qb + h * s_qh, qo + bh * LQ * D, qs + bh * ((LQ + QG - 1) // QG), mean,
                        pid * ROWS, LQ, s_ql, q_mult, D, ROWS, QG, False)
        else:
            _quant_rows(k + b * s_kb + h * s_kh, ko + bh * LK * D, ks + bh * ((LK + KG - 1) // KG), mean + bh * D,
                        (pid - NQP) * ROWS, LK, s_kl, 1.0, D, ROWS, KG, True)

    @triton.jit
    def _e4m3_rne(x):
        """fp32 -> the nearest float8_e4m3fn value (ties to even), as fp32; |x| <= 448 expected (callers
        clamp). Bit arithmetic, so the interpreter (whose fp8 cast rounds wrongly at exponent boundaries)
        and the GPU give torch's bits."""
        xb = x.to(tl.int32, bitcast=True)
        ab = xb & 0x7FFFFFFF
        normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) & 0x7FF00000).to(tl.float32, bitcast=True)
        t = tl.abs(x) * 512.0  # below 2^-6: subnormals, a fixed step of 2^-9
        sub = ((t + 12582912.0) - 12582912.0) * (1.0 / 512.0)
        r = tl.minimum(tl.where(ab >= (121 << 23), normal, sub), 448.0, propagate_nan=tl.PropagateNan.ALL)
        # the sign as a bit: a value that rounds to zero keeps it (-0.0), as torch's conversion does
        return (r.to(tl.int32, bitcast=True) | (xb & -2147483648)).to(tl.float32, bitcast=True)

    @triton.jit
    def _v_tile(v, H, LK, s_vb, s_vh, s_vl, D: tl.constexpr, ROWS: tl.constexpr):
        """(batch·head, token offsets, channel offsets, fp32 tile) of this program's ROWS tokens of V
        (program ids: token block, batch·head); tokens past LK read as 0."""
        bh = tl.program_id(1).to(tl.int64)
        offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_d = tl.arange(0, D)
        x = tl.load(v + (bh // H) * s_vb + (bh % H) * s_vh + offs_r[:, None].to(tl.int64) * s_vl + offs_d[None, :],
                    mask=offs_r[:, None] < LK, other=0).to(tl.float32)
        return bh, offs_r, offs_d, x

    @triton.jit
    def attn_v_amax_kernel(v, amax, H, LK, s_vb, s_vh, s_vl, D: tl.constexpr, ROWS: tl.constexpr):
        """Per (batch·head, channel) max |v| over ROWS tokens, folded into ``amax`` (int32 bit patterns of
        the fp32 maxima, zeroed before) by atomic max."""
        bh, offs_r, offs_d, x = _v_tile(v, H, LK, s_vb, s_vh, s_vl, D, ROWS)
        m = _absmax(x, 0)  # NaN kept: its bits order above inf's, so the atomic max keeps it too
        tl.atomic_max(amax + bh * D + offs_d, m.to(tl.int32, bitcast=True), sem="relaxed")

    @triton.jit
    def attn_v_fp8_kernel(v, vo, sv, LKP, H, LK, s_vb, s_vh, s_vl, D: tl.constexpr, ROWS: tl.constexpr):
        """V [B, H, LK, D] (unit last stride) -> V^T float8_e4m3fn [B·H, D, LKP] with the per-channel
        scales ``sv`` [B·H, D]: e4m3(clamp(v · (1 / sv), ±448)), round to nearest even; tokens LK..LKP
        (the padding) are written as zeros."""
        bh, offs_r, offs_d, x = _v_tile(v, H, LK, s_vb, s_vh, s_vl, D, ROWS)
        inv = tl.math.div_rn(tl.full((D,), 1.0, tl.float32), tl.load(sv + bh * D + offs_d))
        y = _e4m3_rne(tl.clamp(x * inv[None, :], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)).to(tl.float8e4nv)
        yt = tl.trans(y)
        tl.store(vo + bh * D * LKP + offs_d[:, None] * LKP + offs_r[None, :], yt, mask=offs_r[None, :] < LKP)

    @triton.jit
    def _attn_block(acc, m_i, l_i, q, sq, k_base, ks_base, v_base, start, LK, s_vl, offs_n0, offs_d,
                    D: tl.constexpr, KG: tl.constexpr, MASKED: tl.constexpr, PV_F32: tl.constexpr,
                    PV_FP8: tl.constexpr):
        offs_n = start + offs_n0
        if MASKED:
            valid = offs_n < LK
            kt = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0)
            sk = tl.load(ks_base + offs_n // KG, mask=valid, other=0.0)
            if PV_FP8:  # V^T [D, LKP]: s_vl is LKP; masked bytes read as 0 (an fp8 zero), never garbage/NaN
                vt = tl.load((v_base + offs_d[:, None] * s_vl + offs_n[None, :]).to(tl.pointer_type(tl.uint8)),
                             mask=valid[None, :], other=0).to(tl.float8e4nv, bitcast=True)
            else:
                vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vl + offs_d[None, :], mask=valid[:, None],
                             other=0)
        else:
            kt = tl.load(k_base + offs_n[:, None] * D + offs_d[None, :])
            sk = tl.load(ks_base + offs_n // KG)
            if PV_FP8:
                vt = tl.load(v_base + offs_d[:, None] * s_vl + offs_n[None, :])
            else:
                vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vl + offs_d[None, :])
        s = tl.dot(q, tl.trans(kt), out_dtype=tl.int32).to(tl.float32)
        s = (s * sk[None, :]) * sq[:, None]
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_FP8:  # this tile's product from zero, then added in fp32 (fp8 MMAs accumulate coarsely)
            if PV_F32:
                acc += tl.dot(_e4m3_rne(p * 448.0), tl.trans(vt.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(vt))
        elif PV_F32:  # the interpreter: its bf16 dot is wrong; P rounded to V's dtype, then exact fp32 products
            acc = tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc)
        return acc, m_new, l_i

    @triton.jit(do_not_specialize=["LQ", "LK"])
    def int8_attn_fwd_kernel(qi, ki, v, o, qs, ks, sv, H, LQ, LK, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
                             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, QG: tl.constexpr,
                             KG: tl.constexpr, PV_F32: tl.constexpr, PV_FP8: tl.constexpr):
        """One program: BM query rows of one (batch, head) against all keys (flash-style online softmax).
        PV_FP8: ``v`` is V^T float8 [B·H, D, s_vl] (s_vb = D·s_vl, s_vh = 0: b·s_vb + h·s_vh is not used)
        and ``sv`` its per-channel scales [B·H, D]."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        offs_n0 = tl.arange(0, BN)
        mask_m = offs_m < LQ
        q = tl.load(qi + bh * LQ * D + offs_m[:, None] * D + offs_d[None, :], mask=mask_m[:, None], other=0)
        sq = tl.load(qs + bh * ((LQ + QG - 1) // QG) + offs_m // QG, mask=mask_m, other=0.0)
        k_base = ki + bh * LK * D
        ks_base = ks + bh * ((LK + KG - 1) // KG)
        if PV_FP8:
            v_base = v + bh * D * s_vl
        else:
            v_base = v + b * s_vb + h * s_vh
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        n_full = (LK // BN) * BN
        for start in range(0, n_full, BN):
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, sq, k_base, ks_base, v_base, start, LK, s_vl,
                                        offs_n0, offs_d, D, KG, False, PV_F32, PV_FP8)
        if n_full < LK:
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, sq, k_base, ks_base, v_base, n_full, LK, s_vl,
                                        offs_n0, offs_d, D, KG, True, PV_F32, PV_FP8)
        if PV_FP8:
            acc = acc * (tl.load(sv + bh * D + offs_d) * (1.0 / 448.0))[None, :]
        acc = acc / l_i[:, None]
        o_ptrs = o + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ol + offs_d[None, :]
        tl.store(o_ptrs, acc.to(o.dtype.element_ty), mask=mask_m[:, None])


@dataclass(frozen=True)
class AttnConfig:
    BM: int
    BN: int
    num_warps: int
    num_stages: int

    def short(self) -> str:
        return f"{self.BM}x{self.BN}/w{self.num_warps}s{self.num_stages}"


A = AttnConfig
# per architecture, first = the untuned default (CONVERT_TO_QUANT_AUTOTUNE=0). Hopper: two warpgroups on a
# 128-row Q tile (the int8 wgmma is synchronous in Triton's pipeliner, so the second warpgroup's softmax
# fills the first one's MMA waits), 3-4 stages of K/V loads in flight. Not measured yet on every card.
_CONFIGS = {
    # 64x128/w4s3 is the tuner's pick with FP8 P·V on an H200 (14.11 ms vs 14.83 for 128x128/w8s4 at 14k
    # tokens); its neighbours 64x64/w4s3 and 64x128/w4s4 were tried in round 6 (15.10, 17.49 ms) and dropped
    "sm90": [A(128, 128, 8, 3), A(128, 64, 8, 4), A(128, 128, 8, 4), A(128, 64, 4, 3), A(64, 128, 4, 3),
             A(128, 128, 4, 3)],
    "sm89": [A(128, 64, 4, 3), A(128, 64, 8, 3), A(64, 64, 4, 3), A(128, 128, 8, 2)],
    "sm80": [A(128, 64, 4, 3), A(128, 128, 8, 3), A(64, 64, 4, 3), A(128, 64, 8, 3)],
    "interp": [A(16, 16, 4, 1)],
}
CONFIGS_ENV = "CONVERT_TO_QUANT_ATTENTION_CONFIG"  # e.g. "128x64/w8s4": force one config (benchmarks)


def _parse_config(s: str) -> AttnConfig:
    try:
        tile, rest = s.split("/w")
        bm, bn = tile.split("x")
        w, st = rest.split("s")
        return AttnConfig(int(bm), int(bn), int(w), int(st))
    except ValueError:
        raise AttentionInputError(f"{CONFIGS_ENV} must look like 128x64/w8s4, got {s!r}") from None


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_kernel_operands(q, k, v):
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise AttentionInputError(f"int8_attention: unsupported call: {reason}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise AttentionInputError(f"int8_attention: {name} needs a unit stride along the head dim, "
                                      f"got strides {list(t.stride())}")


def quantize_qk_triton(q, k, sm_scale: float, mean: Optional[torch.Tensor] = None):
    """``quantize_qk_reference`` in one Triton launch (plus the torch mean of K)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dev = q.device
    mean = k_mean(k) if mean is None else mean
    qi = torch.empty((b, h, lq, d), dtype=torch.int8, device=dev)
    ki = torch.empty((b, h, lk, d), dtype=torch.int8, device=dev)
    qs = torch.empty((b, h, -(-lq // Q_GRAN)), dtype=torch.float32, device=dev)
    ks = torch.empty((b, h, -(-lk // K_GRAN)), dtype=torch.float32, device=dev)
    rows = QUANT_ROWS
    assert rows % Q_GRAN == 0 and rows % K_GRAN == 0
    nqp, nkp = -(-lq // rows), -(-lk // rows)
    mult = float(_scale_const(sm_scale))  # the fp32 value, passed as an fp32 kernel argument
    launch_kernel(attn_qk_quant_kernel, (nqp + nkp, b * h),
                  (q, k, mean, qi, ki, qs, ks, h, lq, lk, nqp, q.stride(0), q.stride(1), q.stride(2),
                   k.stride(0), k.stride(1), k.stride(2), mult),
                  dict(D=d, ROWS=rows, QG=Q_GRAN, KG=K_GRAN), 1 if interpreter_active() else 4, 1)
    return qi, qs, ki, ks


def _attn_configs(dev) -> List[AttnConfig]:
    forced = os.environ.get(CONFIGS_ENV)
    if forced:
        return [_parse_config(forced)]
    arch = arch_of(dev)
    return list(_CONFIGS.get(arch, _CONFIGS["sm80"]))


def quantize_v_fp8_triton(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``quantize_v_fp8_reference`` with the conversion in one Triton launch (the per-channel absmax is one
    torch reduction, as in the reference, so both give the same bits)."""
    b, h, n, d = v.shape
    npad = -(-n // FP8_PAD) * FP8_PAD
    rows = QUANT_ROWS
    grid = (-(-n // rows), b * h)
    vargs = (h, n, v.stride(0), v.stride(1), v.stride(2))
    warps = 1 if interpreter_active() else 4
    # the absmax: one pass of atomic maxima on the bit patterns (non-negative floats order as integers;
    # NaN and inf propagate as in torch's amax), exact whatever the order
    amax = torch.zeros((b, h, d), dtype=torch.int32, device=v.device)
    launch_kernel(attn_v_amax_kernel, grid, (v, amax) + vargs, dict(D=d, ROWS=rows), warps, 1)
    sv = _v_scales(amax.view(torch.float32))
    vt = torch.empty((b, h, d, npad), dtype=torch.float8_e4m3fn, device=v.device)
    launch_kernel(attn_v_fp8_kernel, (-(-npad // rows), b * h), (v, vt, sv, npad) + vargs,
                  dict(D=d, ROWS=rows), warps, 1)
    return vt, sv


def attention_from_quantized_triton(qi, qs, ki, ks, v, heads_last: bool = True,
                                    configs: Optional[List[AttnConfig]] = None, v8=None):
    """``attention_from_quantized`` in one Triton launch (tile config tuned per shape bucket); ``v8`` =
    ``quantize_v_fp8_*(v)`` for P·V in fp8."""
    b, h, lq, d = qi.shape
    lk = ki.shape[2]
    dev = qi.device
    out, o = _new_out(b, h, lq, d, v, heads_last)
    if v8 is not None:
        vt, sv = v8
        vargs = (vt, o, qs, ks, sv, h, lq, lk, d * vt.shape[-1], 0, vt.shape[-1])
    else:
        vargs = (v, o, qs, ks, qs, h, lq, lk, v.stride(0), v.stride(1), v.stride(2))

    def launch(cfg: AttnConfig) -> None:
        launch_kernel(int8_attn_fwd_kernel, (triton.cdiv(lq, cfg.BM), b * h),
                      (qi, ki) + vargs + (o.stride(0), o.stride(1), o.stride(2)),
                      dict(D=d, BM=cfg.BM, BN=cfg.BN, QG=Q_GRAN, KG=K_GRAN, PV_F32=dev.type == "cpu",
                           PV_FP8=v8 is not None), cfg.num_warps, cfg.num_stages)

    cands = configs if configs is not None else _attn_configs(dev)
    if len(cands) == 1:
        launch(cands[0])
        return out
    key = ("int8_attention", d, _bucket(lq), _bucket(lk), _bucket(b * h), v.dtype, dev, v8 is not None)
    launch(TUNER.pick(key, lambda: cands, launch))
    return out


# ------------------------------------------------------------------------------------------------
# public entry point and the custom op
# ------------------------------------------------------------------------------------------------
def attention_backend(device: torch.device, dtype: torch.dtype, backend: Optional[str] = None) -> Optional[str]:
    """"triton", "torch", or None (no INT8 attention here: the caller keeps its own attention).
    auto: Triton on CUDA sm80+ for fp16/bf16; the torch reference on CPU; None on other devices (the
    reference would be slower than their own attention) and for float32 on CUDA."""
    choice = (backend or os.environ.get(ATTENTION_BACKEND_ENV) or "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise AttentionInputError(f"attention backend must be 'auto', 'triton' or 'torch', got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_usable(device):
            raise AttentionInputError(f"the Triton attention kernel cannot run on {device} here (needs CUDA "
                                      "sm80+ with triton, or TRITON_INTERPRET=1 on CPU); use backend='torch'")
        if dtype not in KERNEL_DTYPES:
            raise AttentionInputError(f"the Triton attention kernel takes float16/bfloat16, got {dtype}")
        return "triton"
    if device.type == "cpu":
        return "torch"
    if device.type == "cuda" and dtype in KERNEL_DTYPES and resolve_backend(device) == "triton":
        return "triton"
    return None


def pv_mode(device: torch.device, backend: str, pv: Optional[str] = None) -> str:
    """How P·V is computed (module doc, step 5): ``pv`` or env ``CONVERT_TO_QUANT_ATTENTION_PV``, else auto:
    "fp8" for the Triton kernel on Hopper (sm90, where it was measured: docs/KERNELS.md), "v" (V's dtype)
    elsewhere -- Ada (sm89) has FP8 tensor cores too but no such card was available to check the kernel on,
    and the torch reference, where fp8 would only add rounding."""
    choice = (pv or os.environ.get(PV_ENV) or "auto").lower()
    if choice not in ("auto",) + PV_MODES:
        raise AttentionInputError(f"attention P·V mode must be 'auto', 'v' or 'fp8', got {choice!r}")
    if choice == "fp8" and backend == "triton" and device.type == "cuda" and arch_of(device) not in ("sm89", "sm90"):
        raise AttentionInputError(f"attention P·V mode 'fp8' needs FP8 tensor cores (sm89+); {device} is "
                                  f"{arch_of(device)}: use 'v' or 'auto'")
    if choice != "auto":
        return choice
    if backend == "triton" and device.type == "cuda" and arch_of(device) == "sm90":
        return "fp8"
    return "v"


def _run(q, k, v, sm_scale: float, backend: str, heads_last: bool, pv: Optional[str] = None) -> torch.Tensor:
    fp8 = pv_mode(q.device, backend, pv) == "fp8"
    if backend == "triton":
        return attention_from_quantized_triton(*quantize_qk_triton(q, k, sm_scale), v, heads_last,
                                               v8=quantize_v_fp8_triton(v) if fp8 else None)
    return attention_from_quantized(*quantize_qk_reference(q, k, sm_scale), v, heads_last,
                                    v8=quantize_v_fp8_reference(v) if fp8 else None)


@torch.library.custom_op("convert_to_quant::int8_attention", mutates_args=())
def int8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, backend: str,
                      heads_last: bool, pv: str = "") -> torch.Tensor:
    be = attention_backend(q.device, q.dtype, backend or None) or "torch"  # never wrong: torch if nothing else
    return _run(q, k, v, sm_scale, be, heads_last, pv or None)


@int8_attention_op.register_fake
def _(q, k, v, sm_scale, backend, heads_last, pv=""):
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d) if heads_last else (b, h, lq, d), dtype=v.dtype)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: Optional[float] = None,
                   backend: Optional[str] = None, heads_last: bool = True, pv: Optional[str] = None) -> torch.Tensor:
    """Softmax(q·kᵀ·sm_scale)·v with the int8 numerics of the module doc. q (B, H, Lq, D), k/v (B, H, Lk, D)
    (views with a unit last stride; K/V may be longer or shorter than Q). Returns, in v's dtype, a contiguous
    (B, Lq, H, D) (``heads_last``) or (B, H, Lq, D). ``sm_scale`` defaults to D^-0.5; ``pv`` "v" / "fp8" /
    None (``pv_mode``'s auto choice). Raises ``AttentionInputError`` for operands it cannot take
    (``unsupported_reason``) and for a backend or P·V mode that cannot run here."""
    _check_kernel_operands(q, k, v)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if pv is not None:
        pv_mode(q.device, "torch", pv)  # validate now
    if torch.compiler.is_compiling():  # the op decides the backend when it runs (no device queries traced)
        return torch.ops.convert_to_quant.int8_attention(q, k, v, sm_scale, backend or "", heads_last, pv or "")
    return _run(q, k, v, sm_scale, attention_backend(q.device, q.dtype, backend) or "torch", heads_last, pv)


# ------------------------------------------------------------------------------------------------
# ComfyUI's attention override (no ComfyUI import here; nodes/attention.py installs it)
# ------------------------------------------------------------------------------------------------
def _comfy_signature(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                     **kwargs):
    return q, k, v, heads, mask, skip_reshape, skip_output_reshape, kwargs


# keyword arguments ComfyUI passes that do not change the result (anything else: the original function)
_HARMLESS_KWARGS = frozenset(("transformer_options", "_inside_attn_wrapper", "attn_precision"))


class Int8AttentionOverride:
    """``transformer_options["optimized_attention_override"]`` for ComfyUI: ComfyUI's attention functions
    (``comfy.ldm.modules.attention``, decorated with ``wrap_attn``) call ``override(func, *args, **kwargs)``
    with their own arguments ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, transformer_options=...)``: q/k/v (B, L, H·D), or (B, H, L, D) with
    ``skip_reshape``; output (B, Lq, H·D), or (B, H, Lq, D) with ``skip_output_reshape``.

    Per call: INT8 attention where ``unsupported_reason`` is None and a backend runs here
    (``attention_backend``), else ``previous(func, ...)`` (an override that was installed before) or the
    original ``func``, unchanged -- masks, other head dims, float32 on CUDA, devices without the kernel.
    ``attn_precision`` (an fp32-upcast request) is honoured by construction: scores are exact integers
    times fp32 scales, softmax is fp32. ``stats`` counts calls per path (eager calls only)."""

    def __init__(self, previous=None, backend: Optional[str] = None, pv: Optional[str] = None):
        self.previous = previous
        self.backend = backend
        self.pv = pv
        self.stats = {}

    def __deepcopy__(self, memo):
        # ModelPatcher.clone deep-copies model_options: clones (LoRA loaders, ...) share this override (it
        # holds no per-model state; ``stats`` then counts the calls of every clone)
        return self

    def _count(self, key: str):
        if not torch.compiler.is_compiling():
            self.stats[key] = self.stats.get(key, 0) + 1

    def _fallback(self, func, args, kwargs, reason: str):
        self._count("fallback: " + reason)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        try:
            q, k, v, heads, mask, skip_reshape, skip_out, extra = _comfy_signature(*args, **kwargs)
        except TypeError:
            return self._fallback(func, args, kwargs, "unrecognised arguments")
        unknown = sorted(set(extra) - _HARMLESS_KWARGS)
        if unknown:
            return self._fallback(func, args, kwargs, "argument " + unknown[0])
        if mask is not None:
            return self._fallback(func, args, kwargs, "an attention mask")
        if not all(type(t) is torch.Tensor for t in (q, k, v)):
            return self._fallback(func, args, kwargs, "non-tensor operands")
        if skip_reshape:
            if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
                return self._fallback(func, args, kwargs, "skip_reshape operands not 4-D")
            q4, k4, v4 = q, k, v
        else:
            if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or not isinstance(heads, int) or heads < 1:
                return self._fallback(func, args, kwargs, "operands not (batch, tokens, heads*dim)")
            hd = q.shape[-1]
            if hd % heads or k.shape[-1] != hd or v.shape[-1] != hd:
                return self._fallback(func, args, kwargs, "width not heads x head dim for q, k and v")
            d = hd // heads
            q4, k4, v4 = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
        reason = unsupported_reason(q4, k4, v4)
        if reason is not None:
            return self._fallback(func, args, kwargs, reason)
        dev, dt = q4.device, q4.dtype
        if torch.compiler.is_compiling():
            usable = dev.type == "cpu" or (dev.type == "cuda" and dt in KERNEL_DTYPES)
            be = self.backend or ""
        else:
            be = attention_backend(dev, dt, self.backend)
            usable = be is not None
        if not usable:
            return self._fallback(func, args, kwargs, f"no INT8 attention for {dt} on {dev.type}")
        q4, k4, v4 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q4, k4, v4))
        sm_scale = q4.shape[-1] ** -0.5
        if torch.compiler.is_compiling():
            out = torch.ops.convert_to_quant.int8_attention(q4, k4, v4, sm_scale, be, not skip_out, self.pv or "")
        else:
            self._count("int8 " + be)
            out = _run(q4, k4, v4, sm_scale, be, not skip_out, self.pv)
        if skip_out:
            return out  # (B, H, Lq, D)
        b, lq, h, d = out.shape
        return out.view(b, lq, h * d)
