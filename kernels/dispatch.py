"""Path choice and the ``convert_to_quant::*`` custom ops.

A *path* is the algorithm for one linear layer:
  * ``w8a8``    -- quantize activations per token (fused convrot), int8 x int8 GEMM, fp32 epilogue;
  * ``w8a16``   -- weight-only: int8 weight tiles converted in the GEMM, activations stay float;
  * ``dequant`` -- dequantize the weight to the activation dtype, then ``F.linear`` (cuBLAS);
  * ``cpu``     -- what a loaded model runs on a CPU: ``w8a8`` through ``torch._int_mm`` for large enough
                   tensor-wise / per-row / convrot layers where the CPU multiplies int8 fast
                   (``reference.cpu_int8_fast``), else ``dequant``; ``dequant`` on other devices.
A *backend* is where it runs: ``triton`` (CUDA sm80+) or ``torch`` (everything else, same numerics).

``auto`` picks the path from ``PATH_TABLE`` (measured with ``benchmarks/kernels.py``; see
docs/KERNELS.md); the function argument ``path=`` or env ``CONVERT_TO_QUANT_KERNEL_PATH`` forces one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference as ref
from .launch import (act_kernel_supports, arch_of, gemm_supports, launch_act_quant, launch_dequant,
                     launch_int8_gemm, launch_rotate, launch_w8a16, launch_w8a8_fused, launch_w8a8_onelaunch,
                     plan_unsafe, resolve_backend, env_get, FUSED_ACT_MAX_M, ONELAUNCH_ENV, ONELAUNCH_MAX_M,
                     ONELAUNCH_MAX_NK, capturing)

PATH_ENV = "CONVERT_TO_QUANT_KERNEL_PATH"
FUSED_ENV = "CONVERT_TO_QUANT_FUSED_ACT"  # "0": W8A8 for few tokens in two launches, as for many
PATHS = ("auto", "w8a8", "w8a16", "dequant", "cpu")

# (arch, weight kind) -> ((largest M, largest N*K or 0 for any, path), ...): the first row that fits
# M (and N*K) wins; anything else uses "w8a8". sm90 rows from an H200 (docs/KERNELS.md, rounds 4-5):
# W8A16 (one launch, no activation pass) is the fastest per call up to M = 16 (7.4 us GPU against
# cuBLAS's 7.6 at K = N = 3072, round 4). From M = 17 W8A8 wins: its GEMM with small pointer-load tiles
# takes 8.6 us at M = 64 where W8A16 takes 12.9-13.7 (it converts every weight tile to bf16),
# and 10.6 + 2.3 (activation pass) at M = 256 against W8A16's 20.4; per synchronised call W8A8 in one
# launch (``launch.ONELAUNCH_MAX_M``) was 34.8 vs 35.9 us at M = 64 and 39.7 vs 43.5 at M = 256.
# float32 activations always take W8A8 (``choose_path``). The Ampere/Ada rows copy Hopper's (not
# measured: no such card was available).
# Block-wise weights keep the rows measured before (round 3): W8A16 up to M = 64, and up to 256 for
# N*K <= 16M (the block-wise W8A8 GEMM was not measured at these M with the small tiles).
_SMALL_M = {"row": ((16, 0, "w8a16"),), "block": ((64, 0, "w8a16"), (256, 16 << 20, "w8a16"))}
PATH_TABLE = {(arch, kind): _SMALL_M[kind] for arch in ("sm90", "sm89", "sm80") for kind in ("row", "block")}


def choose_path(kind: str, m: int, device: torch.device, nk: int = 0, dtype: Optional[torch.dtype] = None) -> str:
    """The path ``auto`` takes for ``m`` tokens on ``device`` ("row": tensor-wise/per-row weights,
    "block": block-wise weights; ``nk``: the weight's N*K, 0 if unknown). float32 activations always
    take W8A8: W8A16's float32 dot runs on the CUDA cores, not the tensor cores (a T5-XXL-shaped encoder,
    which ComfyUI runs in float32, was 15x slower than bf16 with it; docs/KERNELS.md)."""
    if dtype == torch.float32:
        return "w8a8"
    for bound, max_nk, path in PATH_TABLE.get((arch_of(device), kind), ()):
        if m <= bound and (not max_nk or 0 < nk <= max_nk):
            return path
    return "w8a8"


def resolve_path(path: Optional[str], kind: str, m: int, device: torch.device, nk: int = 0,
                 dtype: Optional[torch.dtype] = None) -> str:
    p = (path or env_get(PATH_ENV) or "auto").lower()
    if p not in PATHS:
        raise ValueError(f"kernel path must be one of {', '.join(PATHS)}, got {p!r}")
    return choose_path(kind, m, device, nk, dtype) if p == "auto" else p


def runtime_path(device: torch.device, backend: Optional[str] = None) -> Optional[str]:
    """The ``path`` a loaded model's layers pass (the ComfyUI loader's ops): None (``auto``, the measured
    table) where the Triton kernels run; on the torch backend "cpu" on a CPU (the int8 GEMM
    ``torch._int_mm`` for large layers where the CPU multiplies int8 fast, else dequant:
    ``cpu_int8_chosen``) and "dequant" elsewhere (MPS, GPUs without our kernels: W8A8/W8A16 would emulate
    integer GEMMs in float) -- the dequant path dequantizes weight rows to the activation dtype and runs
    the platform's own GEMM. A path set in env ``CONVERT_TO_QUANT_KERNEL_PATH`` still wins.

    Only the runtime asks for this: ``auto`` itself keeps W8A8 on the torch backend, whose numerics are
    what ``quant_core`` measures as "what the GPU runtime computes" (example.evaluate_file)."""
    if env_get(PATH_ENV):
        return None
    if resolve_backend(device, backend) != "torch":
        return None
    return "cpu" if device.type == "cpu" else "dequant"


def cpu_int8_chosen(x: torch.Tensor, be: str, n: int, k: int) -> bool:
    """Whether the ``"cpu"`` path runs a tensor-wise / per-row / convrot layer as W8A8 through
    ``torch._int_mm`` (``reference.cpu_int8_linear``): on a CPU that multiplies int8 fast, for weights of
    at least ``reference.CPU_INT8_MIN_NK`` entries, for activations that need no gradient (rounding has
    none). Otherwise it runs "dequant"; block-wise weights always do (their int8 GEMM would be one call
    per K block)."""
    return be == "torch" and not x.requires_grad and ref.cpu_int8_suits(x.device, n, k, 0)


# ------------------------------------------------------------------------------------------------
# implementations on 2-D activations (what the custom ops run)
# ------------------------------------------------------------------------------------------------
def quantize_activations_2d(x: torch.Tensor, convrot_groupsize: int, block_k: int, backend: Optional[str] = None,
                            scale_k_major: bool = False, resolved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[1]
    be = backend if resolved else resolve_backend(x.device, backend)
    if be == "triton" and act_kernel_supports(k, convrot_groupsize, block_k):
        return launch_act_quant(x, convrot_groupsize, block_k, scale_k_major)
    plan_unsafe()
    return ref.quantize_activations(x, convrot_groupsize, block_k)


def _dequant_weight(qdata, w_scale, group_size, convrot_groupsize, dtype, backend):
    n, k = qdata.shape
    if backend == "triton":
        if convrot_groupsize and act_kernel_supports(k, convrot_groupsize, 0) and w_scale.numel() == n:
            return launch_rotate(qdata, convrot_groupsize, dtype, rowscale=w_scale.reshape(-1).float())
        if not convrot_groupsize:
            return launch_dequant(qdata, w_scale, group_size, dtype)
    return ref.dequantize_weight(qdata, w_scale, group_size, convrot_groupsize, dtype)


def with_lora(y: torch.Tensor, lora) -> torch.Tensor:
    """Where the kernel epilogue does not add it: y + h · upᵀ (fp32 products, y's dtype)."""
    if lora is None:
        return y
    plan_unsafe()
    h, up = lora
    add = h.reshape(-1, h.shape[-1]).float() @ up.float().t()
    return (y.float() + add.reshape(y.shape)).to(y.dtype)


def _lora_fusable(lora, be: str, p: str, x: torch.Tensor) -> bool:
    return lora is not None and be == "triton" and p in ("w8a8", "w8a16") and x.dtype != torch.float32


def int8_linear_2d(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   convrot_groupsize: int, out_dtype: torch.dtype, path: Optional[str] = None,
                   backend: Optional[str] = None, lora=None) -> torch.Tensor:
    """``lora``: None or (h [M, R], up [N, R]) with h = x · downᵀ, R a multiple of 16 (zero-padded):
    ``+ h · upᵀ`` is added in fp32 in the GEMM's epilogue on the Triton W8A8/W8A16 paths, after it
    elsewhere."""
    m, k = x.shape
    n = qdata.shape[0]
    be = resolve_backend(x.device, backend)
    p = resolve_path(path, "row", m, x.device, n * k, x.dtype)
    if be == "triton" and not gemm_supports(n, k):
        be = "torch"  # the GEMM kernels need N, K multiples of 16
    if lora is not None and not _lora_fusable(lora, be, p, x):
        return with_lora(int8_linear_2d(x, qdata, w_scale, bias, convrot_groupsize, out_dtype, p, be), lora)
    if p == "cpu":
        if cpu_int8_chosen(x, be, n, k):
            plan_unsafe()
            return ref.cpu_int8_linear(x, qdata, w_scale, bias, convrot_groupsize, out_dtype)
        p = "dequant"
    if p == "dequant" or be == "torch":
        plan_unsafe()  # torch work besides kernel launches: no launch plan (launch.LaunchPlan)
    if p == "dequant":
        if be == "torch":  # chunked over weight rows: never a whole float copy of the layer
            return ref.dequant_linear(x, qdata, w_scale, bias, 0, convrot_groupsize, out_dtype)
        w = _dequant_weight(qdata, w_scale, 0, convrot_groupsize, x.dtype, be)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None).to(out_dtype)
    if p == "w8a16":
        if convrot_groupsize:  # rotate the activations (rounded once to their dtype), weights stay rotated
            if be == "triton" and act_kernel_supports(k, convrot_groupsize, 0):
                x = launch_rotate(x, convrot_groupsize, x.dtype)
            else:
                plan_unsafe()
                x = ref.rotate(x, convrot_groupsize).to(x.dtype)
        if be == "triton":
            return launch_w8a16(x, qdata, w_scale, bias, 0, out_dtype, lora=lora)
        return ref.w8a16_mm(x, qdata, w_scale, bias, 0, out_dtype)
    if be == "triton" and not convrot_groupsize and m <= FUSED_ACT_MAX_M and env_get(FUSED_ENV, "1") != "0":
        return launch_w8a8_fused(x, qdata, w_scale, bias, out_dtype, lora=lora)  # one launch, same bits
    if (be == "triton" and not convrot_groupsize and m <= ONELAUNCH_MAX_M and n * k <= ONELAUNCH_MAX_NK
            and env_get(ONELAUNCH_ENV, "1") != "0" and not capturing()):
        return launch_w8a8_onelaunch(x, qdata, w_scale, bias, out_dtype, lora=lora)  # one launch, same bits
    q, s = quantize_activations_2d(x, convrot_groupsize, 0, be, resolved=True)
    if be == "triton":
        return launch_int8_gemm(q, s, qdata, w_scale, bias, out_dtype, lora=lora)
    return ref.scaled_int8_mm(q, s, qdata, w_scale, bias, out_dtype)


def int8_blockwise_linear_2d(x: torch.Tensor, qdata: torch.Tensor, w_scale: torch.Tensor,
                             bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
                             path: Optional[str] = None, backend: Optional[str] = None, lora=None) -> torch.Tensor:
    m, k = x.shape
    n = qdata.shape[0]
    be = resolve_backend(x.device, backend)
    p = resolve_path(path, "block", m, x.device, n * k, x.dtype)
    if be == "triton" and not gemm_supports(n, k, 0 if p == "w8a16" else group_size):
        be = "torch"
    if p == "cpu":
        p = "dequant"  # block-wise: see cpu_int8_chosen
    if lora is not None and not _lora_fusable(lora, be, p, x):
        return with_lora(int8_blockwise_linear_2d(x, qdata, w_scale, bias, group_size, out_dtype, p, be), lora)
    if p == "dequant" or be == "torch":
        plan_unsafe()
    if p == "dequant":
        if be == "torch":
            return ref.dequant_linear(x, qdata, w_scale, bias, group_size, 0, out_dtype)
        w = _dequant_weight(qdata, w_scale, group_size, 0, x.dtype, be)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None).to(out_dtype)
    if p == "w8a16":
        if be == "triton":
            return launch_w8a16(x, qdata, w_scale, bias, group_size, out_dtype, lora=lora)
        return ref.w8a16_mm(x, qdata, w_scale, bias, group_size, out_dtype)
    if be == "triton" and act_kernel_supports(k, 0, group_size):
        q, s = launch_act_quant(x, 0, group_size, scale_k_major=True)
    else:
        plan_unsafe()
        q, s = ref.quantize_activations(x, 0, group_size)
    if be == "triton":
        return launch_int8_gemm(q, s, qdata, w_scale, bias, out_dtype, group_size, lora=lora)
    return ref.blockwise_int8_mm(q, s, qdata, w_scale, bias, group_size, out_dtype)


def dequantize_2d(qdata: torch.Tensor, w_scale: torch.Tensor, group_size: int, convrot_groupsize: int,
                  dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
    return _dequant_weight(qdata, w_scale, group_size, convrot_groupsize, dtype,
                           resolve_backend(qdata.device, backend))


# ------------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile (no graph breaks), with fake implementations for tracing
# ------------------------------------------------------------------------------------------------
def _opt(s: str) -> Optional[str]:
    return s or None


@torch.library.custom_op("convert_to_quant::quantize_activations", mutates_args=())
def quantize_activations_op(x: torch.Tensor, convrot_groupsize: int, block_k: int,
                            backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    q, s = quantize_activations_2d(x, convrot_groupsize, block_k, _opt(backend))
    return q, s.contiguous()


@quantize_activations_op.register_fake
def _(x, convrot_groupsize, block_k, backend):
    m, k = x.shape
    s_shape = (m, k // block_k) if block_k else (m,)
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty(s_shape, dtype=torch.float32)


def _lora_pair(h, up):
    return None if h is None else (h, up)


@torch.library.custom_op("convert_to_quant::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   convrot_groupsize: int, out_dtype: torch.dtype, path: str, backend: str,
                   lora_h: Optional[torch.Tensor] = None, lora_up: Optional[torch.Tensor] = None) -> torch.Tensor:
    return int8_linear_2d(x, qdata, weight_scale, bias, convrot_groupsize, out_dtype, _opt(path), _opt(backend),
                          _lora_pair(lora_h, lora_up))


@int8_linear_op.register_fake
def _(x, qdata, weight_scale, bias, convrot_groupsize, out_dtype, path, backend, lora_h=None, lora_up=None):
    return x.new_empty((x.shape[0], qdata.shape[0]), dtype=out_dtype)


@torch.library.custom_op("convert_to_quant::int8_blockwise_linear", mutates_args=())
def int8_blockwise_linear_op(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor,
                             bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype, path: str,
                             backend: str, lora_h: Optional[torch.Tensor] = None,
                             lora_up: Optional[torch.Tensor] = None) -> torch.Tensor:
    return int8_blockwise_linear_2d(x, qdata, weight_scale, bias, group_size, out_dtype, _opt(path), _opt(backend),
                                    _lora_pair(lora_h, lora_up))


@int8_blockwise_linear_op.register_fake
def _(x, qdata, weight_scale, bias, group_size, out_dtype, path, backend, lora_h=None, lora_up=None):
    return x.new_empty((x.shape[0], qdata.shape[0]), dtype=out_dtype)


@torch.library.custom_op("convert_to_quant::dequantize", mutates_args=())
def dequantize_op(qdata: torch.Tensor, weight_scale: torch.Tensor, group_size: int, convrot_groupsize: int,
                  dtype: torch.dtype, backend: str) -> torch.Tensor:
    return dequantize_2d(qdata, weight_scale, group_size, convrot_groupsize, dtype, _opt(backend))


@dequantize_op.register_fake
def _(qdata, weight_scale, group_size, convrot_groupsize, dtype, backend):
    return qdata.new_empty(qdata.shape, dtype=dtype)
