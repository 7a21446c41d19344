"""torch implementations with the kernels' numerics: the fallback on CPU and on GPUs where the
Triton kernels don't run, and the definition the Triton kernels are tested against.

Every function takes 2-D operands (the public API in ``__init__`` flattens leading dimensions).
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..quant_core.hadamard import regular_hadamard
from .launch import env_get

QMAX = 127.0
SCALE_MIN = 1e-30

# the dequant path (``dequant_linear``) dequantizes at most this many bytes of fp32 weight rows at a time
# (a layer of up to 16M parameters in one chunk: one GEMM call, as the float model makes; on a 2-core Xeon VM
# the Wan-1.3B-width step ran 0.92-0.95x float at 64 MiB against 0.81-0.85x at 8 MiB: docs/KERNELS.md)
DEQUANT_CHUNK_BYTES = 64 << 20
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
    z = torch.mm(x.float().reshape(-1, b), hadamard(b, x.device)).view(-1, a, b)
    return torch.bmm(hadamard(a, x.device).expand(z.shape[0], a, a), z).reshape(x.shape)


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
def dequant_budget_bytes(chunk_bytes: Optional[int] = None) -> int:
    """The dequant path's scratch budget in bytes: ``chunk_bytes``, else env
    ``CONVERT_TO_QUANT_DEQUANT_CHUNK_MB`` (MiB, fractions allowed), else ``DEQUANT_CHUNK_BYTES``."""
    if chunk_bytes is not None:
        return int(chunk_bytes)
    env = env_get(DEQUANT_CHUNK_ENV)
    if not env:
        return DEQUANT_CHUNK_BYTES
    try:
        mib = float(env)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise ValueError(f"{DEQUANT_CHUNK_ENV} must be a positive number of MiB, got {env!r}")
    return int(mib * (1 << 20))


def dequant_row_bytes(k: int, dtype: torch.dtype = torch.float32, convrot_groupsize: int = 0) -> int:
    """Scratch bytes per weight row of the dequant path: the fp32 row, a second fp32 row to un-rotate
    into (convrot), and the row in x's dtype when that is not fp32."""
    return k * (4 + (4 if convrot_groupsize else 0) + (0 if dtype == torch.float32 else dtype.itemsize))


def dequant_chunk_rows(n: int, k: int, chunk_bytes: Optional[int] = None, row_bytes: Optional[int] = None) -> int:
    """Weight rows per dequantization chunk: as many as fit the budget (``dequant_budget_bytes``) with
    ``row_bytes`` of scratch per row (default one fp32 row, 4·K), at least one."""
    return max(1, min(n, dequant_budget_bytes(chunk_bytes) // (row_bytes or 4 * max(k, 1))))


class _Scratch(threading.local):
    def __init__(self):
        self.bufs: Dict[str, torch.Tensor] = {}  # role -> flat CPU buffer
        self.views: Dict[tuple, tuple] = {}  # (n, k, dtype, convrot, budget) -> (rows, work, tmp, out) on bufs


_SCRATCH = _Scratch()


def scratch_bytes() -> int:
    """Bytes of the dequant path's scratch buffers that this thread holds."""
    return sum(t.numel() * t.element_size() for t in _SCRATCH.bufs.values())


def release_scratch() -> None:
    """Free this thread's dequant scratch (the next call allocates it again)."""
    _SCRATCH.views = {}
    _SCRATCH.bufs = {}


def _scratch(parts: Dict[str, Tuple[int, torch.dtype]], budget: int) -> Dict[str, torch.Tensor]:
    """Flat CPU buffers ``role -> numel, dtype``, reused from this thread's earlier calls. What the thread
    holds never exceeds ``max(budget, this call's need)`` bytes: a set that does not fit (or is too
    small) is freed before the new one is made, so two generations are never alive together."""
    st = _SCRATCH
    bufs = st.bufs
    need = sum(n * d.itemsize for n, d in parts.values())
    ok = all((t := bufs.get(r)) is not None and t.dtype == d and t.numel() >= n for r, (n, d) in parts.items())
    if not ok or sum(t.numel() * t.element_size() for t in bufs.values()) > max(budget, need):
        st.views = {}  # the cached views hold the old storage: drop them with it
        st.bufs = bufs = {}
        with torch.inference_mode(False):  # normal tensors: written in and out of inference mode alike
            for r, (n, d) in parts.items():
                bufs[r] = torch.empty(n, dtype=d)
    return {r: bufs[r] if bufs[r].numel() == n else bufs[r][:n] for r, (n, _) in parts.items()}


def _dequant_buffers(n: int, k: int, dt: torch.dtype, g: int, budget: int, device: torch.device, reuse: bool):
    """(rows per chunk, fp32 work [rows, K], fp32 tmp [rows, K] or None (convrot only), out [rows, K]: the
    buffer the weight ends in, in ``dt``). ``reuse``: this thread's scratch (views cached per shape)."""
    key = (n, k, dt, g, budget)
    if reuse:
        v = _SCRATCH.views.get(key)
        if v is not None:
            return v
    rows = max(1, min(n, budget // dequant_row_bytes(k, dt, g)))
    parts = {"work": (rows * k, torch.float32)}
    if g:
        parts["tmp"] = (rows * k, torch.float32)
    if dt != torch.float32:
        parts["low"] = (rows * k, dt)
    if reuse:
        bufs = _scratch(parts, budget)
    else:
        bufs = {r: torch.empty(c, dtype=d, device=device) for r, (c, d) in parts.items()}
    work = bufs["work"].view(rows, k)
    tmp = bufs["tmp"].view(rows, k) if g else None
    if dt != torch.float32:
        out = bufs["low"].view(rows, k)
    else:  # the buffer the fp32 weight ends in (convrot g < 256: the product's output)
        out = tmp if g and g < 256 else work
    v = (rows, work, tmp, out)
    if reuse:
        _SCRATCH.views[key] = v
    return v


def _tile_scale_(w: torch.Tensor, w_scale: torch.Tensor, row0: int, g: int) -> None:
    """``w`` [rows, K] (rows ``row0:row0 + rows`` of a block-wise weight) *= its g×g tile scales
    (``w_scale`` [ceil(N/g), K/g]) as broadcast multiplies on views: the partial tile at the start, all
    whole tiles in one op, the partial tile at the end; the scale is never expanded."""
    rows, k = w.shape
    kb = k // g
    r1 = row0 + rows
    a = min(r1, -(-row0 // g) * g)  # end of the leading partial tile
    b = max(a, (r1 // g) * g)  # start of the trailing partial tile
    if a > row0:
        w[:a - row0].view(a - row0, kb, g).mul_(w_scale[row0 // g].view(1, kb, 1))
    if b > a:
        t0, t1 = a // g, b // g
        w[a - row0:b - row0].view(t1 - t0, g, kb, g).mul_(w_scale[t0:t1].view(t1 - t0, 1, kb, 1))
    if r1 > b:
        w[b - row0:].view(r1 - b, kb, g).mul_(w_scale[b // g].view(1, kb, 1))


def _unrotate_into(dst: torch.Tensor, src: torch.Tensor, g: int, tmp: Optional[torch.Tensor]) -> None:
    """``dst`` := ``src · blockdiag(H_g)`` (fp32 [rows, K]). g >= 256 goes through H_16 ⊗ H_g/16 as
    ``rotate_fast`` does (the same two products, written into the buffers): ``tmp`` is a third buffer of
    src's shape and ``dst`` may be ``src``; g < 256 is one product, ``dst`` distinct from ``src``."""
    if g >= 256:
        a, b = 16, g // 16
        torch.mm(src.view(-1, b), hadamard(b, src.device), out=tmp.view(-1, b))
        t3 = tmp.view(-1, a, b)  # bmm on the expanded H_a: ~8% faster than matmul's broadcast here
        torch.bmm(hadamard(a, src.device).expand(t3.shape[0], a, a), t3, out=dst.view(-1, a, b))
    else:
        torch.mm(src.view(-1, g), hadamard(g, src.device), out=dst.view(-1, g))


def dequantize_rows_into(out: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, row0: int,
                         group_size: int = 0, convrot_groupsize: int = 0,
                         work: Optional[torch.Tensor] = None, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` [rows, K] (contiguous) := rows ``row0 : row0 + rows`` of the dequantized weight,
    ``q.float() · scale`` (then un-rotated for convrot) rounded once to ``out.dtype`` --
    ``dequantize_weight``'s numerics.

    ``q`` holds those rows (int8); ``w_scale`` is the whole weight's fp32 scale (scalar, [N] or [N, 1] per
    row, or [ceil(N/g), K/g] tiles with ``group_size``). Computed as an exact int8 -> fp32 copy and an
    in-place fp32 multiply (two vectorized passes, several times faster on CPU than one mixed-dtype
    ``torch.mul``). ``work`` / ``tmp``: fp32 buffers of at least ``rows`` rows (``work`` when ``out`` is not
    fp32 or for convrot, ``tmp`` for convrot); allocated here when not given."""
    rows, k = q.shape
    if out.dtype == torch.float32 and not convrot_groupsize:
        w = out
    else:
        w = work[:rows] if work is not None else torch.empty((rows, k), dtype=torch.float32, device=q.device)
    w.copy_(q)
    if group_size:
        _tile_scale_(w, w_scale, row0, group_size)
    else:
        s = w_scale if w_scale.dim() == 2 else w_scale.reshape(-1, 1)
        w.mul_(s if s.shape[0] == 1 or s.shape[0] == rows else s[row0:row0 + rows])
    if convrot_groupsize:
        g = convrot_groupsize
        dst = out if out.dtype == torch.float32 else w  # where the fp32 result lands
        t = None
        if g >= 256 or dst.data_ptr() == w.data_ptr():  # a second buffer: the product can't overwrite its input
            t = tmp[:rows] if tmp is not None else torch.empty_like(w)
        if g < 256 and t is not None:
            dst = t
        _unrotate_into(dst, w, g, t)
        w = dst
    if w.data_ptr() != out.data_ptr():
        out.copy_(w)
    return out


def dequantize_cols_into(w: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, col0: int, group_size: int = 0,
                         convrot_groupsize: int = 0, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Columns ``col0 : col0 + c`` of the dequantized weight as fp32 [N, c], ``w`` [N, c] contiguous fp32 being
    the buffer (``tmp`` the same shape, for convrot): ``q[:, cols].float() · scale``, then un-rotated per
    convrot group -- ``dequantize_weight``'s numerics (fp32). ``col0`` and ``c`` are multiples of the
    block-wise group and of the convrot group. Returns the buffer the result is in (``w`` or ``tmp``)."""
    n, c = w.shape
    w.copy_(q[:, col0:col0 + c])
    if group_size:
        _tile_scale_(w, w_scale[:, col0 // group_size:(col0 + c) // group_size], 0, group_size)
    else:
        w.mul_(w_scale if w_scale.dim() == 2 else w_scale.reshape(-1, 1))
    g = convrot_groupsize
    if not g:
        return w
    if g >= 256:
        _unrotate_into(w, w, g, tmp)
        return w
    _unrotate_into(tmp, w, g, None)
    return tmp


# A wide-input layer (K > K_CHUNK_MIN_RATIO · N, fp32) is chunked along K instead of along weight rows:
# row chunks each multiply all of x (M × K), K chunks each add into y (M × N).
# `benchmarks/cpu_fallback_layers.py --threads 2` (2-core CPU, 546 tokens, 8 MiB budget, float / int8,
# rows vs K chunks; docs/KERNELS.md): 8960 -> 1536 0.83 vs 0.96, 6144 -> 1536 0.83 vs 0.94,
# 3072 -> 1536 0.89 vs 0.94; 4096 -> 4096 1.02 vs 0.93 and 1536 -> 8960 1.02 vs 0.92 (rows win).
K_CHUNK_MIN_RATIO = 1.5

# --------------------------------------------------------------------------------------------------
# CPU int8 GEMM (the ``"cpu"`` runtime path): torch._int_mm where this CPU multiplies int8 fast
# --------------------------------------------------------------------------------------------------
CPU_INT8_ENV = "CONVERT_TO_QUANT_CPU_INT8"  # "1": use it from CPU_INT8_MIN_NK; "0": never; unset: probe the CPU
# With CONVERT_TO_QUANT_CPU_INT8=1, layers of at least this many weights take the int8 GEMM on the "cpu" path
# (the value the probe found on a 2-core Xeon with VNNI: float / int8 per layer 0.60x at 256², 0.87x at 512²,
# 1.20x at 512x1024; docs/KERNELS.md "CPU int8 GEMM"). Unset, the probe picks the size per machine.
CPU_INT8_MIN_NK = 1 << 19
# the probe's square layers N = K (65K ... 1M weights) and token count; a size counts as won where the whole
# int8 call (activation pass, _int_mm, epilogue) takes at most CPU_INT8_WIN of the dequant path's time
CPU_INT8_LADDER = (256, 384, 512, 724, 1024)
CPU_INT8_PROBE_M = 256
CPU_INT8_WIN = 1.0  # no slower in the probe: the real step gains more than the lone call (tiny Wan in ComfyUI)
CPU_INT8_MIN_ENV = "CONVERT_TO_QUANT_CPU_INT8_MIN"  # a weight count: the size from which the int8 GEMM runs
_CPU_INT8_PROBE: Dict[str, object] = {}


def _probe_int8_sizes(reps: int = 7) -> float:
    """The smallest ladder size (in weights) from which the int8 GEMM beats the dequant path at every larger
    ladder size on this CPU; ``inf`` where it loses at 1024² (no fast int8 GEMM here). Each size times
    both calls ``reps`` times, alternating, and keeps each one's best (a busy neighbour slows a call, it
    never speeds one up). About 30-80 ms on a 2-core VM."""
    import time
    g = torch.Generator().manual_seed(0)
    wins = []
    ratios = _CPU_INT8_PROBE.setdefault("ratios", {})  # int8 / dequant time per ladder size, for reports
    with torch.no_grad():
        for n in CPU_INT8_LADDER:
            x = torch.randn(CPU_INT8_PROBE_M, n, generator=g)
            q = torch.randint(-127, 128, (n, n), generator=g).to(torch.int8)
            s = torch.rand(n, generator=g).add_(0.5).mul_(1e-2)
            buf = torch.empty(n, n)
            s_col = s.reshape(-1, 1)

            def f_int():
                return cpu_int8_linear(x, q, s, None, 0, torch.float32)

            def f_deq():  # the dequant path's one-chunk call: copy, scale, F.linear
                return F.linear(x, buf.copy_(q).mul_(s_col))

            best = [float("inf"), float("inf")]
            for _ in range(3):  # first calls of a shape build its kernels; then warm the caches
                f_int(), f_deq()
            for _ in range(reps):
                for i, fn in enumerate((f_int, f_deq)):
                    t = time.perf_counter()
                    fn()
                    best[i] = min(best[i], time.perf_counter() - t)
            wins.append(best[0] <= CPU_INT8_WIN * best[1])
            ratios[n] = best[0] / best[1]
    min_nk = float("inf")
    for n, won in reversed(list(zip(CPU_INT8_LADDER, wins))):
        if not won:
            break
        min_nk = float(n * n)
    return min_nk


def cpu_int8_min_nk() -> float:
    """How many weights a tensor-wise / per-row / convrot layer needs before the ``"cpu"`` path runs it as an
    int8 GEMM (``cpu_int8_linear``) rather than the dequant path; ``inf``: never. Env
    ``CONVERT_TO_QUANT_CPU_INT8``: ``0`` never, ``1`` from ``CPU_INT8_MIN_NK`` (reproducible across
    machines); unset, a one-off probe decides per process (``_probe_int8_sizes``): CPUs differ by more than
    any fixed size allows (on a 2-core Xeon with VNNI the int8 call lost below ~0.5M weights, on one with
    AMX it won from 65K). Env ``CONVERT_TO_QUANT_CPU_INT8_MIN`` (a weight count) sets the size instead of
    the probe or the default (``CONVERT_TO_QUANT_CPU_INT8=0`` still wins)."""
    v = env_get(CPU_INT8_ENV)
    if v is not None and v != "":
        if v not in ("0", "1"):
            raise ValueError(f"{CPU_INT8_ENV} must be 0 or 1, got {v!r}")
        if v == "0":
            return float("inf")
    m = env_get(CPU_INT8_MIN_ENV)
    if m is not None and m != "":
        if not (m.isascii() and m.isdigit()) or len(m) > 19:
            raise ValueError(f"{CPU_INT8_MIN_ENV} must be a weight count (0 to 19 digits), got {m!r}")
        return float(int(m))
    if v == "1":
        return float(CPU_INT8_MIN_NK)
    hit = _CPU_INT8_PROBE.get("min_nk")
    if hit is None:
        try:
            hit = _probe_int8_sizes()
        except RuntimeError:  # no int8 GEMM in this build
            hit = float("inf")
        _CPU_INT8_PROBE["min_nk"] = hit
    return hit


def cpu_int8_fast() -> bool:
    """Whether this CPU runs the int8 GEMM at all (``cpu_int8_min_nk`` is finite)."""
    return cpu_int8_min_nk() != float("inf")


def cpu_int8_suits(device: torch.device, n: int, k: int, group_size: int) -> bool:
    """Whether an [N, K] weight on ``device`` takes the int8 GEMM on the ``"cpu"`` path: tensor-wise /
    per-row / convrot (no block-wise ``group_size``), at least ``cpu_int8_min_nk()`` weights."""
    return device.type == "cpu" and not group_size and n * k >= cpu_int8_min_nk()


def cpu_int8_linear(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    convrot_groupsize: int, out_dtype: torch.dtype) -> torch.Tensor:
    """W8A8 on a CPU through ``torch._int_mm``: ``x`` [..., K] -> [..., N] in ``out_dtype``. The numerics of
    ``quantize_activations`` + ``scaled_int8_mm`` (the torch backend's "w8a8", which the GPU kernels
    match) with the element-wise passes done in place; convrot rotates the activations with
    ``rotate_fast`` (fp32, ~1e-7 from ``rotate``). ``w_scale``: one value, or one per weight row."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, k)
    y = rotate_fast(y, convrot_groupsize) if convrot_groupsize else y.float()
    amax = y.abs().amax(dim=1)
    s = (amax / torch.full_like(amax, QMAX)).clamp_(min=SCALE_MIN)
    # quantize_activations' clamp to ±QMAX is a no-op here: |y| <= amax, so |y · fl(1/s)| <= 127·(1 + 3 ulp),
    # which rounds to 127 (s = SCALE_MIN only where amax < 127·SCALE_MIN); an inf gives inf·0 = NaN either way
    q = torch.mul(y, torch.reciprocal(s)[:, None]).round_().to(torch.int8)
    out = torch.mul(torch._int_mm(q, qdata.t()), s[:, None])  # int32 · fp32: the fp32 product of the float
    out.mul_(w_scale.reshape(1, -1))
    if bias is not None:
        out.add_(bias if bias.dtype == torch.float32 else bias.float())
    out = out.reshape(lead + (qdata.shape[0],))
    return out if out_dtype == torch.float32 else out.to(out_dtype)


class DequantLinear:
    """The torch dequant path for one weight, its operands shaped once: ``PreparedLinear`` keeps one per
    layer on the torch backend, ``dequant_linear`` makes one per call.

    ``self(x, bias, out_dtype)`` = ``x · dequant(W)ᵀ + bias`` in x's dtype (x 2-D [M, K], bias [N] or
    None), then cast to ``out_dtype``. The weight is dequantized ``dequant_chunk_rows`` rows at a time
    into scratch buffers: on CPU (outside autograd) a per-thread set reused across calls, elsewhere
    allocated per call; either way at most the budget (``dequant_budget_bytes``, or one row's scratch
    if a row is larger), never a float copy of a whole large layer. A layer that fits one chunk is one
    int8 -> fp32 copy, one in-place scale multiply (convrot: an un-rotation), and ``F.linear``.

    Convrot (``W = W_stored · blockdiag(H)``): the rotation goes on the smaller operand -- the
    activations (``x · blockdiag(H)ᵀ`` in fp32, rounded once to x's dtype, and the stored weight as it
    is) when M < N, else the weight rows."""

    __slots__ = ("qdata", "n", "k", "group", "convrot", "scale", "hot", "int8", "wrow")

    def __init__(self, qdata: torch.Tensor, w_scale: torch.Tensor, group_size: int = 0, convrot_groupsize: int = 0):
        self.qdata = qdata
        self.n, self.k = qdata.shape
        self.group, self.convrot = int(group_size), int(convrot_groupsize)
        ws = w_scale if w_scale.dtype == torch.float32 else w_scale.float()
        self.scale = ws.contiguous() if group_size else ws.reshape(-1, 1)  # [T, K/g] tiles, [1, 1] or [N, 1]
        # (dtype, budget env value, scratch key) of the last one-chunk CPU call without rotation: a call
        # like it goes straight to the copy, the scale and F.linear (Python right after a large GEMM runs
        # cold: each check here cost several microseconds in the tiny Wan step)
        self.hot: Optional[tuple] = None
        # the "cpu" path's choice for this layer: the int8 GEMM (``cpu_int8_linear``) for large enough
        # tensor-wise / per-row / convrot weights on a CPU that multiplies int8 fast, else the dequant path
        self.int8 = cpu_int8_suits(qdata.device, self.n, self.k, self.group)
        self.wrow = ws.reshape(-1)

    def w8a8(self, x: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """``cpu_int8_linear`` with this layer's weight (valid where ``self.int8``)."""
        return cpu_int8_linear(x, self.qdata, self.wrow, bias, self.convrot, out_dtype)

    def cpu(self, x: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """The ``"cpu"`` path: the int8 GEMM where ``self.int8`` and x needs no gradient (rounding has
        none), else the dequant path."""
        if self.int8 and not x.requires_grad:
            return self.w8a8(x, bias, out_dtype)
        return self(x, bias, out_dtype)

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                 chunk_bytes: Optional[int] = None) -> torch.Tensor:
        """``x`` [..., K] (any leading dims; ``F.linear`` takes them as they are) -> [..., N]."""
        hot = self.hot
        if (hot is not None and chunk_bytes is None and x.dtype is hot[0] and not x.requires_grad and x.is_cpu
                and (bias is None or bias.dtype is hot[0]) and env_get(DEQUANT_CHUNK_ENV) == hot[1]):
            v = _SCRATCH.views.get(hot[2])  # gone when another layer needed a larger scratch
            if v is not None:
                y = F.linear(x, dequantize_rows_into(v[3], self.qdata, self.scale, 0, self.group, 0, v[1], v[2]), bias)
                return y if out_dtype is hot[0] else y.to(out_dtype)
        n, k = self.n, self.k
        dt = x.dtype
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        g = self.convrot
        if g and x.numel() < n * k:  # M < N: rotate M·K activation values instead of N·K weight values
            x = rotate_fast(x, g)
            if dt != torch.float32:
                x = x.to(dt)
            g = 0
        budget = dequant_budget_bytes(chunk_bytes)
        reuse = x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())  # autograd keeps the weight
        rows, work, tmp, out = _dequant_buffers(n, k, dt, g, budget, x.device, reuse)
        if reuse and rows >= n and not self.convrot and chunk_bytes is None:
            self.hot = (dt, env_get(DEQUANT_CHUNK_ENV), (n, k, dt, g, budget))
        if rows >= n:
            y = F.linear(x, dequantize_rows_into(out, self.qdata, self.scale, 0, self.group, g, work, tmp), bias)
        elif dt == torch.float32 and k > K_CHUNK_MIN_RATIO * n and self._k_chunked_cols(rows, g) > 0:
            y = self._k_chunked(x, bias, self._k_chunked_cols(rows, g), g, work, tmp)
        else:
            lead = x.shape[:-1]
            x = x.reshape(-1, k)
            y = torch.empty((x.shape[0], n), dtype=dt, device=x.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                w = dequantize_rows_into(out[:r1 - r0], self.qdata[r0:r1], self.scale, r0, self.group, g, work, tmp)
                if bias is None:
                    torch.mm(x, w.t(), out=y[:, r0:r1])
                else:
                    torch.addmm(bias[r0:r1], x, w.t(), out=y[:, r0:r1])
            y = y.reshape(lead + (n,))
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _k_chunked_cols(self, rows: int, g: int) -> int:
        """Columns per K chunk within the scratch of ``rows`` full rows (a multiple of the block-wise and
        convrot groups); 0 if not even one group fits."""
        align = max(self.group, g, 1)
        return min(self.k, (rows * self.k) // self.n // align * align)

    def _k_chunked(self, x: torch.Tensor, bias: Optional[torch.Tensor], cols: int, g: int,
                   work: torch.Tensor, tmp: Optional[torch.Tensor]) -> torch.Tensor:
        """fp32 ``x · dequant(W)ᵀ + bias`` as a sum over K chunks of ``cols`` columns, each dequantized into
        the same scratch (work / tmp viewed as [N, cols]) and added into y by ``addmm``: x is read once."""
        n, k = self.n, self.k
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        y = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
        wf, tf = work.reshape(-1), (tmp.reshape(-1) if tmp is not None else None)
        for c0 in range(0, k, cols):
            c = min(cols, k - c0)
            w = dequantize_cols_into(wf[:n * c].view(n, c), self.qdata, self.scale, c0, self.group, g,
                                     tf[:n * c].view(n, c) if tf is not None else None)
            xs = x2[:, c0:c0 + c]
            if c0:
                y.addmm_(xs, w.t())
            elif bias is None:
                torch.mm(xs, w.t(), out=y)
            else:
                torch.addmm(bias, xs, w.t(), out=y)
        return y.reshape(lead + (n,))


def dequant_linear(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   group_size: int, convrot_groupsize: int, out_dtype: torch.dtype,
                   chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """``x · dequant(W)ᵀ + bias`` in x's dtype (``F.linear`` on the dequantized weight), chunked over
    weight rows: ``DequantLinear`` (its docstring has the memory bound and the convrot choice)."""
    return DequantLinear(qw, w_scale, group_size, convrot_groupsize)(x, bias, out_dtype, chunk_bytes)
