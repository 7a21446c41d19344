"""Backend choice, config tuning and launchers for the Triton kernels.

``resolve_backend`` decides torch vs triton for a device; the ``launch_*`` functions run one Triton
kernel on 2-D operands and pick its tile config from a per-architecture candidate list, timing the
candidates once per (kernel, M bucket, N, K, dtypes) on the first call (our own small autotuner:
a candidate that fails to compile on this card is skipped instead of failing the call, and the
choice is cached for the process). ``CONVERT_TO_QUANT_AUTOTUNE=0`` uses the first candidate.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

try:  # triton is optional: without it (or on CPU) everything runs through reference.py
    import triton
    from . import triton_kernels as tk
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tk = None
    HAS_TRITON = False

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - older triton
    TensorDescriptor = None

from ..quant_core.hadamard import regular_hadamard

BACKEND_ENV = "CONVERT_TO_QUANT_KERNEL_BACKEND"
AUTOTUNE_ENV = "CONVERT_TO_QUANT_AUTOTUNE"
MAX_ROW_P = 32768  # the activation kernel keeps a (padded) row in registers; longer rows use torch


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of this device?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        if interpreter_active():
            return False
        # int8 tensor-core tl.dot needs sm80+ in Triton
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and interpreter_active()


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """"triton" or "torch". ``backend`` (or env CONVERT_TO_QUANT_KERNEL_BACKEND) may force one;
    "auto" uses Triton on CUDA (sm80+) and torch elsewhere -- also on CPU with the interpreter on,
    which is for tests only and must be asked for explicitly."""
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel backend must be 'auto', 'triton' or 'torch', got {choice!r}")
    if choice == "torch":
        return "torch"
    usable = triton_usable(device)
    if choice == "triton":
        if not usable:
            raise RuntimeError(
                f"the Triton backend cannot run on {device} here (needs CUDA sm80+ with triton, or "
                "TRITON_INTERPRET=1 on CPU); use backend='torch'")
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"


def arch_of(device: torch.device) -> str:
    """'sm90' (Hopper and newer), 'sm89' (Ada), 'sm80' (Ampere) or 'interp'/'cpu'."""
    if device.type != "cuda":
        return "interp" if interpreter_active() else "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if (major, minor) >= (8, 9):
        return "sm89"
    return "sm80"


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    persistent: bool = False
    tma: bool = False
    magic_cvt: bool = True  # block-wise only: int32->fp32 by an integer add (see triton_kernels)
    ctas_per_sm: int = 1  # persistent grid = SMs x this (small tiles: two CTAs interleave on one SM)
    split_k: int = 1  # W8A16 only: programs per output tile along K (fp32 atomics)

    def short(self) -> str:
        s = f"{self.BM}x{self.BN}x{self.BK}/w{self.num_warps}s{self.num_stages}"
        s += ("/tma" if self.tma else "") + (f"/pers{self.ctas_per_sm}" if self.persistent else "")
        return s + ("" if self.magic_cvt else "/i2f") + (f"/sk{self.split_k}" if self.split_k > 1 else "")


C = GemmConfig
# W8A8 with int32 accumulation (tensor-wise / per-row weight scales)
_W8A8_CONFIGS = {
    # Triton keeps int32-accumulator wgmma synchronous (a wait after every K step), so large BK
    # (fewer waits) and two warpgroups per CTA (one computes while the other waits) matter most.
    "sm90": [
        C(128, 256, 128, 8, 3, persistent=True, tma=True),
        C(256, 128, 128, 8, 3, persistent=True, tma=True),
        C(128, 256, 256, 8, 2, persistent=True, tma=True),
        C(256, 128, 256, 8, 2, persistent=True, tma=True),
        C(128, 128, 256, 8, 3, persistent=True, tma=True),
        C(128, 256, 128, 8, 3, tma=True),
        C(128, 128, 128, 4, 4, tma=True),
        C(64, 128, 256, 4, 2, persistent=True, tma=True, ctas_per_sm=2),
        C(64, 64, 128, 4, 4, tma=True),
    ],
    "sm89": [
        C(128, 128, 64, 4, 4), C(128, 256, 64, 8, 3), C(256, 128, 64, 8, 3),
        C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4), C(64, 64, 128, 4, 3),
    ],
    "sm80": [
        C(128, 256, 64, 8, 3), C(256, 128, 64, 8, 3), C(128, 128, 64, 4, 4),
        C(128, 128, 128, 8, 3), C(64, 128, 64, 4, 4), C(64, 64, 128, 4, 3),
    ],
    "interp": [C(32, 32, 32, 4, 1, GROUP_M=2)],
}
# block-wise W8A8 (fp32 accumulator + an int32 partial product live at once: 128x128 tiles max)
_BLOCKWISE_CONFIGS = {
    "sm90": [
        C(128, 128, 128, 8, 4, persistent=True, tma=True),
        C(128, 128, 128, 8, 4, persistent=True, tma=True, magic_cvt=False),
        C(128, 128, 128, 8, 3, tma=True),
        C(64, 128, 128, 4, 4, persistent=True, tma=True, ctas_per_sm=2),
        C(128, 64, 128, 4, 4, persistent=True, tma=True, ctas_per_sm=2),
        C(64, 128, 128, 4, 4, tma=True),
    ],
    "sm89": [C(128, 128, 64, 8, 3), C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4), C(128, 128, 64, 8, 3, magic_cvt=False)],
    "sm80": [C(128, 128, 64, 8, 3), C(128, 128, 128, 8, 3), C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4)],
    "interp": [C(32, 32, 32, 4, 1, GROUP_M=2)],
}


def _w8a16_configs(arch: str, m: int) -> List[GemmConfig]:
    if arch == "interp":
        return [C(16, 32, 32, 4, 1, GROUP_M=2)]
    stages = 4 if arch == "sm90" else 3
    # small M streams the weight: enough programs in flight matter more than tile efficiency
    if m <= 16:
        return [C(16, 64, 128, 4, stages, split_k=4), C(16, 32, 128, 4, stages, split_k=2),
                C(16, 64, 128, 4, stages), C(16, 128, 128, 4, stages, split_k=8), C(16, 32, 256, 4, 3)]
    if m <= 64:
        return [C(32, 64, 128, 4, stages, split_k=2), C(64, 64, 128, 4, stages), C(64, 128, 64, 4, stages),
                C(32, 128, 128, 4, stages, split_k=4)]
    # large M is W8A8's ground (the path table never picks W8A16 there): two sane tiles suffice
    return [C(128, 128, 64, 8, stages), C(64, 128, 64, 4, stages)]


def m_bucket(m: int) -> int:
    """Tuning is shared by all M in one bucket (powers of two up to 16384)."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


def _fits_gemm(cfg: GemmConfig, m: int, n: int, k: int) -> bool:
    if cfg.BK > max(k, 16):
        return False
    if m_bucket(m) < cfg.BM // 2 and cfg.BM > 64:
        return False  # tiles mostly empty
    if n < cfg.BN // 2 and cfg.BN > 64:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# the tuner
# ------------------------------------------------------------------------------------------------
class _Tuner:
    def __init__(self):
        self.choice: Dict[tuple, GemmConfig] = {}
        self.log: List[str] = []  # human-readable tuning results (printed by benchmarks/kernels.py)
        self.lock = threading.Lock()

    def run(self, key: tuple, candidates: List[GemmConfig], launch: Callable[[GemmConfig], None]) -> None:
        cfg = self.choice.get(key)
        if cfg is not None:
            launch(cfg)
            return
        with self.lock:
            cfg = self.choice.get(key)
            if cfg is None:
                cfg = self._tune(key, candidates, launch)
                self.choice[key] = cfg
        launch(cfg)

    def _tune(self, key, candidates, launch) -> GemmConfig:
        tune = (len(candidates) > 1 and os.environ.get(AUTOTUNE_ENV, "1") != "0"
                and not interpreter_active() and torch.cuda.is_available())
        if not tune:
            return candidates[0]
        from triton.testing import do_bench
        results = []
        errors = []
        for cfg in candidates:
            try:
                launch(cfg)  # compiles; raises if this config can't run here (shared memory, ...)
                torch.cuda.synchronize()
                t = do_bench(lambda: launch(cfg), warmup=5, rep=25, return_mode="median")
                results.append((t, cfg))
            except Exception as e:  # a config this card/compiler refuses: skip it
                errors.append(f"{cfg.short()}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        if not results:
            raise RuntimeError(f"no kernel config runs for {key}: " + "; ".join(errors))
        results.sort(key=lambda r: r[0])
        best = results[0][1]
        self.log.append(f"{key}: best {best.short()} {results[0][0]*1e3:.1f}us; "
                        + ", ".join(f"{c.short()}={t*1e3:.1f}" for t, c in results[1:])
                        + (f"; failed: {'; '.join(errors)}" if errors else ""))
        return best


TUNER = _Tuner()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_SM_CACHE: Dict[int, int] = {}


def _sm_count(index: int) -> int:
    if index not in _SM_CACHE:
        _SM_CACHE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_CACHE[index]


# ------------------------------------------------------------------------------------------------
# activation quantization / rotation
# ------------------------------------------------------------------------------------------------
_HAD_CACHE: Dict[tuple, torch.Tensor] = {}
_FACTORS = {16: (1, 16), 64: (1, 64), 256: (16, 16), 1024: (16, 64)}


def _hadamard(size: int, device, dtype) -> torch.Tensor:
    key = (size, str(device), dtype)
    h = _HAD_CACHE.get(key)
    if h is None:
        h = regular_hadamard(size, device=device, dtype=dtype).contiguous()
        _HAD_CACHE[key] = h
    return h


def _row_p(k: int, g1: int, g2: int) -> int:
    return max(1 << (k - 1).bit_length(), 16 * g2, 16 * g1, 16)


def act_kernel_supports(k: int, convrot_groupsize: int, block_k: int) -> bool:
    if convrot_groupsize and convrot_groupsize not in _FACTORS:
        return False
    if block_k and (block_k & (block_k - 1) or k % block_k):
        return False  # the kernel reshapes the row into power-of-two blocks
    g1, g2 = _FACTORS.get(convrot_groupsize, (1, 0))
    return _row_p(k, g1, g2) <= MAX_ROW_P


def _act_launch(x: torch.Tensor, out: torch.Tensor, scale: Optional[torch.Tensor], stride_sm: int, stride_sb: int,
                convrot_groupsize: int, block_k: int, mode: int, rowscale: Optional[torch.Tensor]) -> None:
    m, k = x.shape
    g1, g2 = _FACTORS.get(convrot_groupsize, (1, 0))
    p = _row_p(k, g1, g2)
    interp = interpreter_active()
    if x.dtype in (torch.bfloat16, torch.float16) and not interp:
        stage1 = tk.tl.bfloat16 if x.dtype == torch.bfloat16 else tk.tl.float16
        h_dtype, ieee = x.dtype, False
    elif x.dtype == torch.int8 and not interp:
        stage1, h_dtype, ieee = tk.tl.bfloat16, torch.bfloat16, False  # |q| <= 127 is exact in bf16
    else:  # fp32 input, or the interpreter (whose bf16 dot is not exact): fp32 "ieee" dot
        stage1, h_dtype, ieee = tk.tl.float32, torch.float32, True
    h2 = _hadamard(g2, x.device, h_dtype) if g2 else x
    h1 = _hadamard(g1, x.device, torch.float32) if g1 > 1 else x
    num_warps = 4 if p <= 2048 else (8 if p <= 8192 else 16)
    if interp:
        num_warps = 1
    dummy = out
    tk.act_quant_kernel[(m,)](
        x, out, scale if scale is not None else dummy, h1, h2, rowscale if rowscale is not None else dummy,
        k, x.stride(0), out.stride(0), stride_sm, stride_sb,
        P=p, G1=g1, G2=g2, BLOCK_Q=block_k, MODE=mode, STAGE1_DTYPE=stage1, STAGE1_IEEE=ieee,
        HAS_ROWSCALE=rowscale is not None, num_warps=num_warps)


def launch_act_quant(x: torch.Tensor, convrot_groupsize: int = 0, block_k: int = 0,
                     scale_k_major: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and fp32 scales of 2-D ``x`` (last dim contiguous). ``block_k``: scales [M, K/block_k];
    ``scale_k_major`` stores them K-block-major (a transposed view), the layout the block-wise GEMM reads."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if block_k:
        nb = k // block_k
        if scale_k_major:
            s_store = torch.empty((nb, m), dtype=torch.float32, device=x.device)
            scale, ssm, ssb = s_store.t(), 1, m
        else:
            scale = torch.empty((m, nb), dtype=torch.float32, device=x.device)
            ssm, ssb = nb, 1
    else:
        scale = torch.empty((m,), dtype=torch.float32, device=x.device)
        ssm, ssb = 1, 0
    if m:
        _act_launch(x, q, scale, ssm, ssb, convrot_groupsize, block_k, 0, None)
    return q, scale


def launch_rotate(x: torch.Tensor, group_size: int, out_dtype: torch.dtype,
                  rowscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x · blockdiag(H)ᵀ (times an optional fp32 per-row scale), in ``out_dtype``."""
    m, k = x.shape
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    if m:
        _act_launch(x, out, None, 0, 0, group_size, 0, 1, rowscale)
    return out


# ------------------------------------------------------------------------------------------------
# GEMMs
# ------------------------------------------------------------------------------------------------
def gemm_supports(n: int, k: int) -> bool:
    return n % 16 == 0 and k % 16 == 0 and n > 0 and k > 0


def _tma_ok(*tensors) -> bool:
    return TensorDescriptor is not None and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


def launch_int8_gemm(qa: torch.Tensor, a_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype, group_size: int = 0,
                     configs: Optional[List[GemmConfig]] = None) -> torch.Tensor:
    """C = scaled int8 GEMM. ``group_size`` 0: a_scale [M], w_scale scalar or [N,1] (int32 accumulation).
    ``group_size`` g: block-wise, a_scale [M, K/g] (any strides), w_scale [ceil(N/g), K/g]."""
    m, k = qa.shape
    n = qw.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0:
        return c
    arch = arch_of(qa.device)
    blockwise = group_size > 0
    table = _BLOCKWISE_CONFIGS if blockwise else _W8A8_CONFIGS
    cands = configs or [cfg for cfg in table.get(arch, table["sm80"]) if _fits_gemm(cfg, m, n, k)] \
        or table.get(arch, table["sm80"])[-1:]
    if blockwise:
        # BK must divide the scale block; shrink it (never grow) when the group is smaller
        cands = [replace(cfg, BK=_largest_pow2_divisor(group_size, cfg.BK)) for cfg in cands]
    if not _tma_ok(qa, qw):
        cands = [replace(cfg, tma=False) for cfg in cands]
    ws = w_scale.reshape(-1) if not blockwise else w_scale
    if blockwise:
        s_am, s_ak = a_scale.stride(0), a_scale.stride(1)
        s_wn, s_wk = ws.stride(0), ws.stride(1)
        ws_per_row = False
    else:
        s_am, s_ak = a_scale.stride(0), 0
        ws_per_row = ws.numel() > 1
        s_wn, s_wk = (ws.stride(0) if ws_per_row else 0), 0
    nsm = _num_sms(qa.device)

    def launch(cfg: GemmConfig) -> None:
        tiles = triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN)
        grid = min(tiles, nsm * cfg.ctas_per_sm) if cfg.persistent else tiles
        if cfg.tma:
            a_arg = TensorDescriptor(qa, [m, k], [qa.stride(0), 1], [cfg.BM, cfg.BK])
            b_arg = TensorDescriptor(qw, [n, k], [qw.stride(0), 1], [cfg.BN, cfg.BK])
        else:
            a_arg, b_arg = qa, qw
        tk.int8_gemm_kernel[(grid,)](
            a_arg, b_arg, c, a_scale, ws, bias if bias is not None else ws,
            m, n, k, grid, qa.stride(0), qw.stride(0), c.stride(0), s_am, s_ak, s_wn, s_wk,
            WS_PER_ROW=ws_per_row, HAS_BIAS=bias is not None, BLOCKWISE=blockwise,
            GROUP_K=max(group_size, 1), GROUP_N=max(group_size, 1),
            WS_TILE_SCALAR=blockwise and group_size % cfg.BN == 0, MAGIC_CVT=cfg.magic_cvt,
            USE_TMA=cfg.tma, FLATTEN=cfg.persistent, EVEN_K=k % cfg.BK == 0,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = ("blockwise" if blockwise else "w8a8", arch, m_bucket(m), n, k, group_size, out_dtype,
           bias is not None, ws_per_row, str(qa.device))
    TUNER.run(key, cands, launch)
    return c


def _largest_pow2_divisor(group: int, cap: int) -> int:
    bk = cap
    while bk > 16 and group % bk:
        bk //= 2
    return bk


def launch_w8a16(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 group_size: int, out_dtype: torch.dtype, configs: Optional[List[GemmConfig]] = None) -> torch.Tensor:
    m, k = x.shape
    n = qw.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return c
    arch = arch_of(x.device)
    cands = configs or _w8a16_configs(arch, m)
    if group_size:
        cands = [replace(cfg, BK=_largest_pow2_divisor(group_size, cfg.BK)) for cfg in cands]
        ws, mode = w_scale, 2
        s_wn, s_wk = ws.stride(0), ws.stride(1)
    else:
        ws = w_scale.reshape(-1)
        mode = 1 if ws.numel() > 1 else 0
        s_wn, s_wk = (ws.stride(0) if mode == 1 else 0), 0
    ieee = x.dtype == torch.float32 or interpreter_active()

    def launch(cfg: GemmConfig) -> None:
        out = c
        if cfg.split_k > 1:
            out = c if out_dtype == torch.float32 else torch.empty((m, n), dtype=torch.float32, device=x.device)
            out.zero_()
        grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN), cfg.split_k)
        tk.w8a16_gemm_kernel[grid](
            x, qw, out, ws, bias if bias is not None else ws, m, n, k,
            x.stride(0), qw.stride(0), out.stride(0), s_wn, s_wk,
            WS_MODE=mode, GROUP=max(group_size, 1), HAS_BIAS=bias is not None, DOT_IEEE=ieee,
            EVEN_K=k % (cfg.BK * cfg.split_k) == 0, SPLIT_K=cfg.split_k,
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if out is not c:
            c.copy_(out)

    key = ("w8a16", arch, m_bucket(m), n, k, group_size, x.dtype, out_dtype, bias is not None, mode,
           str(x.device))
    TUNER.run(key, cands, launch)
    return c


def launch_dequant(qw: torch.Tensor, w_scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    n, k = qw.shape
    out = torch.empty((n, k), dtype=dtype, device=qw.device)
    if group_size:
        ws, mode = w_scale, 2
        s_n, s_k = ws.stride(0), ws.stride(1)
    else:
        ws = w_scale.reshape(-1)
        mode = 1 if ws.numel() > 1 else 0
        s_n, s_k = (ws.stride(0) if mode == 1 else 0), 0
    bn, bk = (16, 32) if interpreter_active() else (32, 256)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    tk.dequant_kernel[grid](qw, ws, out, n, k, qw.stride(0), out.stride(0), s_n, s_k,
                            WS_MODE=mode, GROUP=max(group_size, 1), BN=bn, BK=bk,
                            num_warps=1 if interpreter_active() else 4)
    return out
