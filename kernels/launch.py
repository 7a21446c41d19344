"""Backend choice, config tuning and launchers for the Triton kernels.

``resolve_backend`` decides torch vs triton for a device; the ``launch_*`` functions run one Triton
kernel on 2-D operands and pick its tile config from a per-architecture candidate list, timing the
candidates once per (kernel, M bucket, N, K, dtypes) on the first call (our own small autotuner:
a candidate that fails to compile on this card is skipped instead of failing the call, and the
choice is cached for the process). ``CONVERT_TO_QUANT_AUTOTUNE=0`` uses the first candidate.

Everything on the per-call path is kept lean (cached device facts, candidate lists built only on a
tuning miss): at a few thousand tokens a linear's GPU time is tens of microseconds, so Python time
per call decides whether eager ComfyUI sees the kernel's speed.
"""
from __future__ import annotations

import copy
import os
import threading
import weakref
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
# How the second Hadamard factor is applied for g = 256/1024 (see triton_kernels._rotate_row).
# None: tuned per shape between 2 (tensor cores on an exact 3-way bf16 split; measured fastest on an
# H200 for rows up to 8192) and 0 (fp32 on the CUDA cores; fastest for 16384-long rows). The
# interpreter, which has no exact bf16 dot, always uses 0. 3: g = 256 with 16-bit activations may also
# take the dense-H kernel (triton_kernels.act_quant_rot_dense_kernel) and 5 the H_4 ⊗ H_64 kernel
# (act_quant_rot_kron_kernel), tuned against the factored one.
# Env CONVERT_TO_QUANT_ROT_IMPL forces one (3 / 5: that kernel where it applies, also in the interpreter).
ROT_IMPL: Optional[int] = (int(os.environ["CONVERT_TO_QUANT_ROT_IMPL"])
                           if os.environ.get("CONVERT_TO_QUANT_ROT_IMPL") else None)


try:  # os.environ.get costs about a microsecond (it encodes key and value); the hot path reads the dict
    _ENV_DATA = os.environ._data
    _encodekey, _decodevalue = os.environ.encodekey, os.environ.decodevalue
except AttributeError:  # pragma: no cover - not CPython's os._Environ
    _ENV_DATA = None
_ENV_KEYS: Dict[str, object] = {}


def env_get(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, cheaper (the kernels read their variables on every call)."""
    if _ENV_DATA is None:  # pragma: no cover
        return os.environ.get(name, default)
    k = _ENV_KEYS.get(name)
    if k is None:
        k = _ENV_KEYS[name] = _encodekey(name)
    v = _ENV_DATA.get(k)
    return default if v is None else _decodevalue(v)


def interpreter_active() -> bool:
    return env_get("TRITON_INTERPRET", "0") == "1"


_CAP: Dict[int, Tuple[int, int]] = {}
_SMS: Dict[int, int] = {}


def _capability(device: torch.device) -> Tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAP.get(idx)
    if cap is None:
        cap = _CAP[idx] = torch.cuda.get_device_capability(idx)
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return cap


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small "machine" so persistent loops really loop in tests
    _capability(device)
    return _SMS[device.index if device.index is not None else torch.cuda.current_device()]


def triton_usable(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors of this device?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        # int8 tensor-core tl.dot needs sm80+ in Triton
        return not interpreter_active() and _capability(device) >= (8, 0)
    return device.type == "cpu" and interpreter_active()


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """"triton" or "torch". ``backend`` (or env CONVERT_TO_QUANT_KERNEL_BACKEND) may force one;
    "auto" uses Triton on CUDA (sm80+) and torch elsewhere -- also on CPU with the interpreter on,
    which is for tests only and must be asked for explicitly."""
    choice = backend or env_get(BACKEND_ENV) or "auto"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    choice = choice.lower()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_usable(device):
            raise RuntimeError(
                f"the Triton backend cannot run on {device} here (needs CUDA sm80+ with triton, or "
                "TRITON_INTERPRET=1 on CPU); use backend='torch'")
        return "triton"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    raise ValueError(f"kernel backend must be 'auto', 'triton' or 'torch', got {choice!r}")


def arch_of(device: torch.device) -> str:
    """'sm90' (Hopper and newer), 'sm89' (Ada), 'sm80' (Ampere) or 'interp'/'cpu'."""
    if device.type != "cuda":
        return "interp" if interpreter_active() else "cpu"
    major, minor = _capability(device)
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
    tma: int = 0  # 0: pointer loads, 1: host TMA descriptors, 2: device-built TMA descriptors (Hopper)
    magic_cvt: bool = True  # block-wise only: int32->fp32 by an integer add (see triton_kernels)
    ctas_per_sm: int = 1  # persistent grid = SMs x this (small tiles: two CTAs interleave on one SM)
    split_k: int = 1  # W8A16 only: programs per output tile along K (fp32 atomics)
    rot_impl: int = 0  # activation kernel only: convrot implementation (triton_kernels._rotate_row)
    swap: bool = False  # W8A16 only: w8a16_swap_kernel (weight tile as the MMA's register operand)
    gemv: bool = False  # W8A16 only, M <= BM (1, 2, 4): w8a16_gemv_kernel (no tensor cores)
    # persistent W8A8 only: False keeps the tile loop and the K loop apart (Triton's pipeliner then
    # cannot prefetch the next tile during the epilogue, but the epilogue's shared memory reuses the
    # K loop's buffers): the tuner's twins (``_unflattened_twins``)
    flatten: bool = True

    def short(self) -> str:
        s = f"{self.BM}x{self.BN}x{self.BK}/w{self.num_warps}s{self.num_stages}"
        s += ("", "/tmah", "/tma")[self.tma] + (f"/pers{self.ctas_per_sm}" if self.persistent else "")
        return (s + ("" if self.magic_cvt else "/i2f") + (f"/sk{self.split_k}" if self.split_k > 1 else "")
                + (f"/rot{self.rot_impl}" if self.rot_impl else "") + ("/swap" if self.swap else "") + ("/gemv" if self.gemv else "")
                + ("" if self.flatten or not self.persistent else "/nofl"))


C = GemmConfig
# W8A8 with int32 accumulation (tensor-wise / per-row weight scales).
# Triton keeps int32-accumulator wgmma synchronous (a wait after every K step: "accumulator is not
# fp32"), so what pays on Hopper is two warpgroups per CTA (8 warps) or two CTAs per SM, whose MMAs
# fill each other's waits, and TMA loads. Measured on an H200 (docs/KERNELS.md): BK=256 with 2
# stages and 128x128x64 lose everywhere and were dropped.
_W8A8_CONFIGS = {
    "sm90": [
        # the best at every large shape in run 2 (docs/KERNELS.md): two 128x128 CTAs per SM, each one
        # warpgroup, whose synchronous MMAs interleave; 748 us = 1470 TOPS GEMM-only at 8192^3
        C(128, 128, 128, 4, 3, persistent=True, tma=1, ctas_per_sm=2),
        C(128, 128, 128, 4, 3, persistent=True, tma=2, ctas_per_sm=2),
        C(128, 256, 128, 8, 3, persistent=True, tma=2),
        C(256, 128, 128, 8, 3, persistent=True, tma=2),
        C(128, 128, 256, 8, 3, persistent=True, tma=2),
        C(128, 128, 128, 4, 3, tma=2),
        C(64, 128, 128, 4, 3, tma=2),
        C(64, 64, 128, 4, 4, tma=2),
        # few tokens: small pointer-load tiles, many programs (H200, benchmarks/small_m.py: 8.6 us at
        # M = 64, K = N = 3072, against 10.5 for the best TMA tile)
        C(64, 32, 256, 4, 3),
        C(64, 64, 128, 4, 4),
        # host-descriptor twins: the fallback should device-built descriptors not compile here
        C(128, 256, 128, 8, 3, persistent=True, tma=1),
        C(64, 64, 128, 4, 4, tma=1),
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
# block-wise W8A8: an fp32 accumulator and an int32 partial product live at once (128x128 max per
# CTA); the per-K-block scaling runs between synchronous MMAs, so several CTAs per SM pay most.
_BLOCKWISE_CONFIGS = {
    "sm90": [
        C(64, 128, 128, 4, 4, tma=2),
        C(64, 128, 128, 4, 3, tma=2),
        C(128, 128, 128, 8, 3, tma=2, magic_cvt=False),
        C(128, 128, 128, 8, 4, persistent=True, tma=2, magic_cvt=False),
        C(64, 64, 128, 4, 3, tma=2),
        C(64, 128, 128, 4, 4, tma=1),
        C(64, 64, 128, 4, 3, tma=1),
    ],
    "sm89": [C(128, 128, 64, 8, 3), C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4), C(128, 128, 64, 8, 3, magic_cvt=False)],
    "sm80": [C(128, 128, 64, 8, 3), C(128, 128, 128, 8, 3), C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4)],
    "interp": [C(32, 32, 32, 4, 1, GROUP_M=2)],
}


def _w8a16_configs(arch: str, m: int) -> List[GemmConfig]:
    if arch == "interp":
        return [C(16, 32, 32, 4, 1, GROUP_M=2)]
    stages = 4 if arch == "sm90" else 3
    # small M streams the weight: enough bytes in flight (many programs, long K tiles) matter more
    # than tile efficiency (the MMA rows beyond M are wasted anyway)
    if m <= 16:
        cands = [C(16, 32, 256, 4, stages), C(16, 16, 512, 4, 3), C(16, 32, 512, 4, 3), C(16, 64, 128, 4, stages),
                 C(16, 16, 128, 4, 6), C(16, 32, 128, 4, 6)]
    elif m <= 64:
        cands = [C(64, 64, 128, 4, stages), C(64, 32, 256, 4, 3), C(32, 32, 256, 4, stages),
                 C(64, 32, 128, 4, 6), C(32, 64, 128, 4, stages)]
    elif m <= 256:
        cands = [C(64, 64, 128, 4, stages), C(64, 128, 64, 4, stages), C(128, 64, 128, 4, 3),
                 C(64, 64, 256, 4, 3)]
    else:  # large M is W8A8's ground (the path table never picks W8A16 there): two sane tiles suffice
        cands = [C(128, 128, 64, 8, stages), C(64, 128, 64, 4, stages)]
    if arch == "sm90":  # the swapped kernel: BN weight rows are wgmma's M side (64 per warpgroup)
        cands = _W8A16_SWAP_SM90[min(b for b in _W8A16_SWAP_SM90 if b >= min(m, 1024))] + cands
    if m <= 4:  # streaming the weight on CUDA cores: BN rows x BK per step, MS = the token bucket
        ms = m_bucket(m)
        cands = [C(ms, bn, bk, w, 1, gemv=True) for bn, bk, w in _GEMV_TILES if bn * bk * ms <= 16384] + cands
    return cands


# w8a16_gemv_kernel tiles (BN weight rows, BK, warps): a few bytes of weight in flight per thread, enough
# programs for 132 SMs at N = 3072 (BN 8: 384 programs)
_GEMV_TILES = ((8, 512, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (4, 1024, 4))


SWAP_ENV = "CONVERT_TO_QUANT_W8A16_SWAP"  # "0": W8A16 without the swapped kernel (benchmarks compare)
# sm90 candidates of w8a16_swap_kernel by largest M: BM (tokens) is wgmma's N side, BN its M side.
# H200 (benchmarks/per_call.py --tuner-log, docs/KERNELS.md "Round 3"): the swap wins at M = 65-256
# (GPU 24.5 vs 30.6 us at 256, K = N = 3072), ties at 64 (17.5 vs 18.3), loses at M <= 16 (16.3 vs
# 14.1 us at M = 1) and ties or loses at 512-1024; a whole T5-XXL-shaped text-encoder step (512 tokens)
# did not show it helping. So it has candidates for 17-256 tokens only. One warpgroup only: with 8
# warps a 256-token tile gave wrong results and a 128-token one failed the launch plans' replay check
# (triton 3.6).
_W8A16_SWAP_SM90 = {
    16: [],
    64: [C(32, 64, 256, 4, 4, swap=True), C(64, 64, 256, 4, 3, swap=True)],
    256: [C(128, 64, 128, 4, 4, swap=True), C(64, 64, 128, 4, 4, swap=True)],
    1024: [],
}


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


def _unflattened_twins(cands: List[GemmConfig], first: bool = True) -> List[GemmConfig]:
    """Each persistent W8A8 config with its unflattened twin (``GemmConfig.flatten``) before it (``first``)
    or after it, for the tuner.

    Flattened, the tile loop and the K loop are one loop and the pipeliner's buffers stay live through the
    epilogue, so anything the epilogue keeps in shared memory comes on top: a LoRA pair of rank 64 takes the
    128x128x128 two-CTAs-per-SM tile from 106 to 131 KB (sm90 compile, triton 3.9), one CTA per SM.
    Unflattened, the epilogue reuses the K loop's buffers (98 KB with or without LoRA). Measured on an H200
    (``benchmarks/lora_epilogue.py``, docs/KERNELS.md round 6): with a rank-64 LoRA the tuner took the twin
    at every shape (Wan 720p ffn_down 736 us vs 811 for the best flattened config). Without LoRA, the GEMM tuned
    with the twins took -1.4% to +5.4% of the time of the flattened-only pick at five 4608-7200-token Flux /
    Wan shapes (tuning noise, both ways), while at 32,760 tokens the tuner picked a twin for both Wan FFN GEMMs (ffn_down
    3.11 vs 3.29 ms for the best flattened config; ``benchmarks/kernels.py``, round 6 run 3). So plain GEMMs
    get the twins too, second: the untuned order (``CONVERT_TO_QUANT_AUTOTUNE=0`` takes the first) stays."""
    out = []
    for cfg in cands:
        twin = [replace(cfg, flatten=False)] if cfg.persistent and cfg.flatten else []
        out += twin + [cfg] if first else [cfg] + twin
    return out


def _largest_pow2_divisor(group: int, cap: int, floor: int = 32) -> int:
    bk = cap
    while bk > floor and group % bk:
        bk //= 2
    return bk


# ------------------------------------------------------------------------------------------------
# launching: Triton's generic launcher, or its compiled handle called directly
# ------------------------------------------------------------------------------------------------
# ``kernel[grid](...)`` re-binds every argument on each call (signature binding, one specialization
# per argument, a cache key string): tens of microseconds for our 15-25 argument kernels, which is
# the whole GPU time of a small linear. After the first launch of a specialization we keep Triton's
# compiled kernel and call its C launcher directly. The key covers everything Triton specializes
# on: the kernel, its constexprs and launch options, the device, each tensor's dtype and 16-byte
# alignment, each integer's width and (unless not specialized) whether it is 1 or a multiple of 16,
# and a host TMA descriptor's dtype/block/shape/stride divisibility. Anything else -- an unexpected
# argument type, launch hooks (profilers), the interpreter -- takes Triton's own path.
# ``LAUNCH_STATS`` counts which path launches took (benchmarks print it).
FAST_LAUNCH_ENV = "CONVERT_TO_QUANT_FAST_LAUNCH"
_FAST: Dict[tuple, tuple] = {}
LAUNCH_STATS = {"direct": 0, "triton": 0, "plan": 0}
_DNS: Dict[int, frozenset] = {}
_I32 = 1 << 31

try:  # the hooks a profiler (proton) installs: with one set, launches go through Triton's path
    from triton import knobs as _knobs
    _RUNTIME_KNOBS = _knobs.runtime
except Exception:  # pragma: no cover - older triton
    _RUNTIME_KNOBS = None

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - CPU-only torch builds
    _raw_stream = None


def _idle(hook) -> bool:
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def no_launch_hooks() -> bool:
    """No launch hook installed (triton >= 3.4 keeps an empty ``HookChain`` there, older ones None)."""
    return _RUNTIME_KNOBS is None or (_idle(_RUNTIME_KNOBS.launch_enter_hook)
                                      and _idle(_RUNTIME_KNOBS.launch_exit_hook))


def fast_launch_enabled() -> bool:
    return (HAS_TRITON and _raw_stream is not None and not interpreter_active()
            and env_get(FAST_LAUNCH_ENV, "1") != "0")


def _not_specialized(kernel) -> frozenset:
    dns = _DNS.get(id(kernel))
    if dns is None:
        dns = _DNS[id(kernel)] = frozenset(i for i, p in enumerate(getattr(kernel, "params", ()))
                                           if getattr(p, "do_not_specialize", False))
    return dns


def _spec(args: tuple, dns: frozenset) -> Optional[Tuple[tuple, list]]:
    """(what Triton would specialize on, the arguments as the C launcher takes them: tensors as their
    data pointers -- the launcher would otherwise call ``data_ptr()`` on each), or None."""
    spec, cargs = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            p = a.data_ptr()
            spec.append((a.dtype, p & 15 == 0))
            cargs.append(p)
        elif type(a) is int:
            wide = not -_I32 <= a < _I32
            spec.append(wide if i in dns else (wide, a == 1, a & 15 == 0))
            cargs.append(a)
        elif TensorDescriptor is not None and isinstance(a, TensorDescriptor):
            spec.append((a.base.dtype, a.base.data_ptr() & 15 == 0, tuple(a.block_shape),
                         tuple(v & 15 == 0 for v in a.shape), tuple(v & 15 == 0 for v in a.strides)))
            cargs.append(a)
        else:
            return None
    return tuple(spec), cargs


def launch_kernel(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int = 3) -> None:
    """``kernel[grid](*args, **consts, num_warps=..., num_stages=...)``, with the compiled kernel's
    launcher called directly after the first launch of each specialization (see above). ``args`` are
    the runtime arguments, in signature order, all before the constexprs given in ``consts``."""
    rec = _RECORDING.rec
    if fast_launch_enabled():
        sc = _spec(args, _not_specialized(kernel))
        spec = sc[0] if sc is not None else None
        dev = torch.cuda.current_device()
        key = (id(kernel), tuple(consts.values()), num_warps, num_stages, dev, spec)
        ent = _FAST.get(key) if spec is not None else None
        if ent is not None and no_launch_hooks():
            run, fn, meta, tail = ent
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _raw_stream(dev),
                fn, meta, None, None, None, *sc[1], *tail)
            LAUNCH_STATS["direct"] += 1
            if rec is not None:
                rec.append((ent, grid, _describe(args)))
            return
        LAUNCH_STATS["triton"] += 1
        ck = kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        ent = None
        if spec is not None and hasattr(ck, "function") and hasattr(ck, "packed_metadata"):
            names = list(kernel.arg_names)
            # the compiled launcher takes every parameter in signature order, constexprs included
            if len(names) == len(args) + len(consts) and set(names[len(args):]) == set(consts):
                ent = _FAST[key] = (ck.run, ck.function, ck.packed_metadata,
                                    tuple(consts[n] for n in names[len(args):]))
        if rec is not None:
            rec.append((ent, grid, _describe(args)))
        return
    if rec is not None:
        rec.append((None, grid, ()))
    kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------------------------
# launch plans: one linear's launches for one input shape, replayed with fresh pointers
# ------------------------------------------------------------------------------------------------
# Even with direct launches, a call pays for the path choice, the tuner lookup, argument
# specialization and a key per launch: tens of microseconds on a slow host, the whole GPU time of a
# small linear. A ``LaunchPlan`` records what one call launched (compiled handle, grid, arguments)
# and replays it: per call it allocates the output and the temporaries, substitutes their pointers and
# the activations' into the recorded argument lists and calls the C launchers. Recording is only
# trusted for calls that did nothing but launch kernels (the launchers call ``plan_unsafe()`` before
# any other device work), and a new plan must reproduce the recorded call's output bit for bit before
# it is used (``kernels.PreparedLinear``).
PLANS_ENV = "CONVERT_TO_QUANT_LAUNCH_PLANS"


class _Recording(threading.local):
    rec: Optional[list] = None
    unsafe: bool = False


_RECORDING = _Recording()


def plan_unsafe() -> None:
    """Called by a launcher that does device work other than kernel launches (a copy, a zero-fill):
    a call recorded with it cannot be replayed as a plan."""
    if _RECORDING.rec is not None:
        _RECORDING.unsafe = True


def plans_enabled() -> bool:
    return fast_launch_enabled() and env_get(PLANS_ENV, "1") != "0"


# The environment variables that change what a call launches (part of a plan's key).
_PLAN_ENVS = ("CONVERT_TO_QUANT_KERNEL_PATH", BACKEND_ENV, FAST_LAUNCH_ENV, PLANS_ENV, AUTOTUNE_ENV,
              "TRITON_INTERPRET", "CONVERT_TO_QUANT_ROT_IMPL", "CONVERT_TO_QUANT_FUSED_ACT",
              "CONVERT_TO_QUANT_W8A16_SWAP", "CONVERT_TO_QUANT_ONE_LAUNCH")


def env_state() -> tuple:
    """The raw values of the environment variables a launch plan depends on."""
    if _ENV_DATA is None:  # pragma: no cover
        return tuple(os.environ.get(n) for n in _PLAN_ENVS)
    g = _ENV_DATA.get
    keys = _ENV_KEYS.get(_PLAN_ENVS)
    if keys is None:
        keys = _ENV_KEYS[_PLAN_ENVS] = tuple(_encodekey(n) for n in _PLAN_ENVS)
    return tuple(g(k) for k in keys)


def _describe(args: tuple) -> list:
    """The recorded form of launch arguments, holding no strong reference to any tensor (so that the
    temporaries of the call are freed when it returns, which is how ``LaunchPlan`` tells them apart)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(("t", weakref.ref(a), a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype))
        elif type(a) is int:
            out.append(("i", a))
        elif TensorDescriptor is not None and isinstance(a, TensorDescriptor):
            shell = copy.copy(a)
            shell.base = None
            b = a.base
            out.append(("d", weakref.ref(b), b.data_ptr(), tuple(b.shape), tuple(b.stride()), b.dtype, shell))
        else:
            out.append(("?", a))
    return out


# argument slots filled per call: the activations, the output, the bias, the LoRA pair; temporaries follow
_X, _OUT, _BIAS, _LH, _LU = 0, 1, 2, 3, 4
_NSLOTS = 5


def _direct_launcher(run) -> Optional[tuple]:
    """For triton 3.6's ``CudaLauncher``: (its C ``launch`` function, cooperative-grid flag, PDL flag,
    global-scratch bytes per program, scratch alignment), so that a plan calls the C function itself
    and skips the Python wrapper's per-launch closures and allocator lookups; None for anything else
    (other triton versions, wrapped launchers for host TMA descriptors, profiling or sanitizer
    builds), which keep calling ``run``. The positional layout of ``launch`` is 3.6's; a plan using it
    is still checked bit for bit against the recorded call before it is trusted."""
    try:
        if (not _DIRECT_OK or type(run).__name__ != "CudaLauncher" or hasattr(run, "kernel_signature")
                or getattr(run, "gsan_enabled", False) or run.profile_scratch_size != 0
                or getattr(run.launch, "__name__", "") != "launch"):
            return None
        return (run.launch, run.launch_cooperative_grid, run.launch_pdl, run.global_scratch_size * run.num_ctas,
                run.global_scratch_align)
    except AttributeError:
        return None


_DIRECT_OK = HAS_TRITON and triton.__version__.split(".")[:2] == ["3", "6"]
try:
    from triton.runtime import _allocation as _triton_alloc
except Exception:  # pragma: no cover - other triton layouts
    _triton_alloc = None
    _DIRECT_OK = False


def _nbytes(shape, stride, dtype) -> int:
    if any(v == 0 for v in shape):
        return 0
    return (sum((v - 1) * st for v, st in zip(shape, stride)) + 1) * dtype.itemsize


class LaunchPlan:
    """Replays recorded launches. Tensor arguments are the activations, the output or the bias
    (substituted per call), a tensor that outlived the recorded call (a weight, a scale, a cached
    Hadamard matrix: passed as its pointer, kept alive by the plan), or a temporary of the call (freed
    when it returned: per call, carved from this thread's workspace for the stream when they are small
    and no graph is being captured, else allocated with its recorded layout)."""

    __slots__ = ("launches", "temps", "out_shape", "out_dtype", "device", "keep", "ws_offsets", "ws_bytes",
                 "ws_cache", "zsubs", "z_bytes")

    def __init__(self, launches: list, out: torch.Tensor, slots: Dict[int, int]):
        self.out_shape, self.out_dtype, self.device = tuple(out.shape), out.dtype, out.device
        temps: Dict[int, int] = {}  # id(weakref) -> temp index
        zsubs = []  # (launch, argument, byte offset) into the stream's zeroed workspace
        self.z_bytes = 0
        layouts = []
        self.keep = []
        plan = []

        def temp_slot(ref, shape, stride, dtype) -> int:
            if id(ref) not in temps:
                temps[id(ref)] = len(layouts)
                layouts.append((shape, stride, dtype))
            elif layouts[temps[id(ref)]] != (shape, stride, dtype):
                raise ValueError("one temporary with two layouts")
            return _NSLOTS + temps[id(ref)]

        for (run, fn, meta, tail), grid, desc in launches:
            template, subs, descs = [], [], []
            for i, d in enumerate(desc):
                kind = d[0]
                if kind == "i":
                    template.append(d[1])
                elif kind == "t":
                    _, ref, p, shape, stride, dtype = d
                    obj = ref()
                    zoff = _zeroed_offset(p) if obj is not None and p not in slots else None
                    if p in slots and obj is not None:
                        subs.append((i, slots[p]))
                        template.append(0)
                    elif zoff is not None:  # counters: this stream's zeroed workspace at replay
                        zsubs.append((len(plan), i, zoff))
                        self.z_bytes = max(self.z_bytes, zoff + _nbytes(shape, stride, dtype))
                        template.append(0)
                    elif obj is not None:
                        self.keep.append(obj)
                        template.append(p)
                    else:
                        subs.append((i, temp_slot(ref, shape, stride, dtype)))
                        template.append(0)
                elif kind == "d":
                    _, ref, p, shape, stride, dtype, shell = d
                    obj = ref()
                    if obj is not None and p not in slots:  # over a weight: the same descriptor each call
                        full = copy.copy(shell)
                        full.base = obj
                        self.keep.append(full)
                        template.append(full)
                    elif obj is None:
                        descs.append((i, temp_slot(ref, shape, stride, dtype) - _NSLOTS, shell))
                        template.append(None)
                    else:
                        raise ValueError("a host descriptor over the activations or the output")
                else:
                    raise ValueError("an argument of unknown kind")
            gx = grid[0]
            gy = grid[1] if len(grid) > 1 else 1
            gz = grid[2] if len(grid) > 2 else 1
            direct = None if descs or any(a is not None and type(a) is not int for a in template) else _direct_launcher(run)
            if direct is None and getattr(run, "global_scratch_size", 0):
                direct = False  # Triton's launcher, which needs an allocator set in this thread
            plan.append((run, fn, meta, gx, gy, gz, template, tuple(subs), tuple(descs), tail, direct))
        self.zsubs = tuple(zsubs)
        self.launches = tuple(plan)
        self.temps = tuple(layouts)
        # the temporaries' places in a workspace (256-byte aligned), when they are small enough
        offsets, total = [], 0
        for shape, stride, dt in layouts:
            offsets.append(total)
            total += -(-max(_nbytes(shape, stride, dt), 1) // _WS_ALIGN) * _WS_ALIGN
        usable = bool(layouts) and total <= WORKSPACE_MAX_BYTES and _capturing is not None
        self.ws_offsets = tuple(offsets) if usable else None
        self.ws_bytes = total
        self.ws_cache = None  # (workspace buffer, its temporaries' pointers, their views)

    def _temps_in(self, buf: torch.Tensor) -> tuple:
        views = []
        for (shape, stride, dt), off in zip(self.temps, self.ws_offsets):
            n = _nbytes(shape, stride, dt)
            views.append(buf[off:off + n].view(dt).as_strided(shape, stride))
        cache = (buf, tuple(v.data_ptr() for v in views), views)
        self.ws_cache = cache
        return cache

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor], lora=None,
                 out_shape: Optional[tuple] = None) -> torch.Tensor:
        """Replay into a new output of ``out_shape`` (default the recorded [M, N]; a caller passes the
        same number of elements in its own leading dims)."""
        dev = self.device
        out = torch.empty(out_shape or self.out_shape, dtype=self.out_dtype, device=dev)
        vals = [x.data_ptr(), out.data_ptr(), bias.data_ptr() if bias is not None else 0,
                lora[0].data_ptr() if lora is not None else 0, lora[1].data_ptr() if lora is not None else 0]
        stream = _raw_stream(dev.index)
        tmp = ()
        if self.temps:
            if self.ws_offsets is not None and not _capturing():
                buf = workspace(dev.index, stream, self.ws_bytes)
                cache = self.ws_cache
                if cache is None or cache[0] is not buf:
                    cache = self._temps_in(buf)
                vals.extend(cache[1])
                tmp = cache[2]
            else:
                tmp = [torch.empty_strided(shape, stride, dtype=dt, device=dev) for shape, stride, dt in self.temps]
                vals.extend(t.data_ptr() for t in tmp)
        zptr = zeroed_workspace(dev.index, stream, self.z_bytes).data_ptr() if self.zsubs else 0
        for li, (run, fn, meta, gx, gy, gz, template, subs, descs, tail, direct) in enumerate(self.launches):
            cargs = list(template)
            for i, s in subs:
                cargs[i] = vals[s]
            for zl, i, off in self.zsubs:
                if zl == li:
                    cargs[i] = zptr + off
            for i, t, shell in descs:
                d = copy.copy(shell)
                d.base = tmp[t]
                cargs[i] = d
            if direct:
                c_launch, coop, pdl, scratch, align = direct
                gs = None
                if scratch:
                    alloc = _triton_alloc._allocator.get()
                    if alloc is _triton_alloc._NULL_ALLOCATOR:
                        alloc = _torch_scratch
                    gs = alloc(gx * gy * gz * scratch, align, stream)
                c_launch(gx, gy, gz, stream, fn, coop, pdl, gs, None, meta, None, None, None, *cargs, *tail)
            else:
                if direct is False:
                    _ensure_allocator()
                run(gx, gy, gz, stream, fn, meta, None, None, None, *cargs, *tail)
        LAUNCH_STATS["plan"] += 1
        return out


class record_launches:
    """``with record_launches() as rec: y = f(x)`` records each launch made in the block;
    ``rec.plan(x, y, bias)`` then gives the ``LaunchPlan`` that replays them, or None where the call
    cannot be replayed (a launch through Triton's own path, device work other than launches,
    arguments the plan cannot substitute). Call ``plan`` after the block, when the call's
    temporaries have been freed."""

    def __enter__(self):
        self.launches = []
        self.ok = False
        _RECORDING.rec, _RECORDING.unsafe = self.launches, False
        return self

    def __exit__(self, *exc):
        self.ok = (exc[0] is None and not _RECORDING.unsafe and bool(self.launches)
                   and all(ent is not None for ent, _, _ in self.launches))
        _RECORDING.rec, _RECORDING.unsafe = None, False
        return False

    def plan(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor], lora=None
             ) -> Optional[LaunchPlan]:
        if not self.ok or out.device.type != "cuda":
            return None
        slots = {x.data_ptr(): _X, out.data_ptr(): _OUT}
        for t, slot in ((bias, _BIAS),) + (((lora[0], _LH), (lora[1], _LU)) if lora is not None else ()):
            if t is None:
                continue
            if t.data_ptr() in slots:
                return None
            slots[t.data_ptr()] = slot
        try:
            return LaunchPlan(self.launches, out, slots)
        except ValueError:
            return None


# ------------------------------------------------------------------------------------------------
# the tuner
# ------------------------------------------------------------------------------------------------
class _Tuner:
    def __init__(self):
        self.choice: Dict[tuple, GemmConfig] = {}
        self.log: List[str] = []  # human-readable tuning results (printed by benchmarks/kernels.py)
        self.lock = threading.Lock()

    def pick(self, key: tuple, candidates: Callable[[], List[GemmConfig]],
             launch: Callable[[GemmConfig], None]) -> GemmConfig:
        """The config for ``key`` (tuning on a miss, by running ``launch``; the caller launches)."""
        cfg = self.choice.get(key)  # lock-free hit (dict reads are atomic under the GIL)
        if cfg is not None:
            return cfg
        with self.lock:
            cfg = self.choice.get(key)
            if cfg is None:
                cfg = self.choice[key] = self._tune(key, candidates(), launch)
        return cfg

    def run(self, key: tuple, candidates: Callable[[], List[GemmConfig]], launch: Callable[[GemmConfig], None],
            configs: Optional[List[GemmConfig]] = None) -> None:
        """A launcher's last step: ``launch`` with ``configs[0]`` when the caller gave configs (tests,
        experiments: no tuning), else with the config tuned for ``key``."""
        launch(configs[0] if configs is not None else self.pick(key, candidates, launch))

    def _tune(self, key, candidates, launch) -> GemmConfig:
        tune = (len(candidates) > 1 and os.environ.get(AUTOTUNE_ENV, "1") != "0"
                and not interpreter_active() and torch.cuda.is_available())
        if not tune:  # the first candidate this card can run (e.g. enough shared memory)
            for cfg in candidates[:-1]:
                try:
                    launch(cfg)
                    return cfg
                except Exception:
                    continue
            return candidates[-1]
        from triton.testing import do_bench
        measured = []
        errors = []
        for cfg in candidates:
            try:
                launch(cfg)  # compiles; raises if this config can't run here (shared memory, ...)
                torch.cuda.synchronize()
                t = do_bench(lambda: launch(cfg), warmup=5, rep=25, return_mode="median")
                measured.append((t, _host_ms(launch, cfg), cfg))
            except Exception as e:  # a config this card/compiler refuses: skip it
                msg = str(e).splitlines()[0][:100] if str(e) else ""
                errors.append(f"{cfg.short()}: {type(e).__name__}: {msg}")
        if not measured:
            raise RuntimeError(f"no kernel config runs for {key}: " + "; ".join(errors))
        # Score: GPU time plus the host time a config costs beyond the cheapest one's. A lone call
        # (a text encoder, a small latent, anything between synchronisations) pays host and GPU time
        # one after the other; host TMA descriptors, built per launch, cost tens of microseconds on a
        # slow host, as much as a small GEMM's whole GPU time (docs/KERNELS.md, "Per call").
        host_min = min(h for _, h, _ in measured)
        results = sorted(((t + h - host_min, t, cfg) for t, h, cfg in measured), key=lambda r: r[0])
        best = results[0][2]
        self.log.append(f"{key}: best {best.short()} {results[0][1] * 1e3:.1f}us "
                        f"(+host {(results[0][0] - results[0][1]) * 1e3:.1f}); "
                        + ", ".join(f"{c.short()}={t * 1e3:.1f}+{(s - t) * 1e3:.1f}" for s, t, c in results[1:])
                        + (f"; failed: {'; '.join(errors)}" if errors else ""))
        return best


def _host_ms(launch: Callable[[GemmConfig], None], cfg: GemmConfig, calls: int = 12) -> float:
    """Host milliseconds to issue one launch of ``cfg`` (the lower quartile of ``calls``, queue drained
    first: a shared host's noise only ever adds time, and a median of 8 moved by 10-20 us between
    configs that cost the same; H200 run, docs/KERNELS.md "Round 4")."""
    import time
    ts = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        launch(cfg)
        ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 4] * 1e3


TUNER = _Tuner()


# ------------------------------------------------------------------------------------------------
# activation quantization / rotation
# ------------------------------------------------------------------------------------------------
_HAD_CACHE: Dict[tuple, torch.Tensor] = {}
_FACTORS = {16: (1, 16), 64: (1, 64), 256: (16, 16), 1024: (16, 64)}
DENSE_ROT_G = 256  # the group size the dense-H activation kernel also runs (tuned against the factored one)


def _hadamard(size: int, device, dtype) -> torch.Tensor:
    key = (size, device, dtype)
    h = _HAD_CACHE.get(key)
    if h is None:
        h = _HAD_CACHE[key] = regular_hadamard(size, device=device, dtype=dtype).contiguous()
    return h


def _row_p(k: int, g1: int, g2: int) -> int:
    return max(1 << (k - 1).bit_length(), 16 * g2, 16 * g1, 16)


def act_kernel_supports(k: int, convrot_groupsize: int, block_k: int) -> bool:
    if convrot_groupsize and convrot_groupsize not in _FACTORS:
        return False
    if block_k and (block_k & (block_k - 1) or k % block_k):
        return False  # the kernel reshapes the row into power-of-two blocks
    if block_k and convrot_groupsize:
        # no format uses both, and Triton 3.6 mis-orders the block reshape of a rotated row on
        # sm90 (seen on an H200: scales of the wrong columns); the torch path computes it
        return False
    g1, g2 = _FACTORS.get(convrot_groupsize, (1, 0))
    return _row_p(k, g1, g2) <= MAX_ROW_P


_ACT_META: Dict[tuple, tuple] = {}


def _kron_split(k: int, p: int, rows: int) -> Tuple[int, int]:
    """Columns (p1, p2) of two power-of-two sets of 256-groups covering a row of ``k`` with less padding
    than one set of ``p`` columns, for blocks of ``rows`` rows of ``act_quant_rot_kron_kernel`` (each
    set's dots need >= 16 groups per block, the block <= 64 groups), or (p, 0)."""
    gpr = -(-k // DENSE_ROT_G)
    s1 = 1 << (gpr.bit_length() - 1)
    least = max(1, 16 // rows)
    if s1 >= gpr or s1 < least:
        return p, 0
    s2 = max(1 << (gpr - s1 - 1).bit_length(), least)
    if (s1 + s2) * DENSE_ROT_G >= p or rows * (s1 + s2) > 64:
        return p, 0
    return s1 * DENSE_ROT_G, s2 * DENSE_ROT_G


def _act_launch(x: torch.Tensor, out: torch.Tensor, scale: Optional[torch.Tensor], convrot_groupsize: int,
                block_k: int, k_major: bool, mode: int, rowscale: Optional[torch.Tensor]) -> None:
    m, k = x.shape
    mkey = (k, convrot_groupsize, block_k, x.dtype, x.device)
    meta = _ACT_META.get(mkey)
    if meta is None:
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
        h2 = _hadamard(g2, x.device, h_dtype) if g2 else None
        h1 = _hadamard(g1, x.device, torch.float32) if g1 > 1 else None
        # warps per row program (three around the size heuristic) and, for two-factor Hadamards,
        # the rotation implementation: tuned per shape
        base = 4 if p <= 2048 else (8 if p <= 8192 else 16)
        warps = [1] if interp else [base, base // 2, base * 2]
        if interp or g1 == 1:
            impls = [0]
        else:
            impls = [ROT_IMPL] if ROT_IMPL in (0, 1, 2) else [2, 0]
        cands = [C(0, 0, 0, w, 1, rot_impl=i) for i in impls for w in warps]
        # g = 256, 16-bit activations: also the dense-H kernel (rot_impl 3; BM = rows per block). Its dot
        # needs >= 16 rows of groups per block; at most 16384 values per block (registers)
        dense, hd = [], None
        if convrot_groupsize == DENSE_ROT_G and ((not interp and x.dtype in (torch.bfloat16, torch.float16))
                                                 or ROT_IMPL in (3, 5)):
            hd_dense = _hadamard(DENSE_ROT_G, x.device, h_dtype)
            rows = [r for r in (1, 2, 4, 8, 16) if r * p >= 16 * DENSE_ROT_G and r * p <= 16384][:2]
            dense = [C(r, 0, 0, w, 1, rot_impl=3) for r in rows for w in ([1] if interp else [4, 8, 16])]
            # and H_4 ⊗ H_64 (rot_impl 5; BM = rows per block, ctas_per_sm = programs per SM): its dots need
            # >= 16 groups per block, its four quarters hold rows x p values
            hk = _hadamard(64, x.device, h_dtype)
            krows = [r for r in (1, 2, 4, 8, 16) if 16 * DENSE_ROT_G <= r * p <= 16384][:2]
            kron = [C(r, 0, 0, w, 1, ctas_per_sm=c, rot_impl=5) for r in krows
                    for w in ([1] if interp else [4, 8]) for c in ([1, 2] if interp else [2, 4])]
            # rows as two power-of-two sets of groups where that pads less (BN, BK: their columns)
            ksplit = [(r,) + _kron_split(k, p, r) for r in (1, 2, 4, 8, 16)]
            kron += [C(r, p1, p2, w, 1, ctas_per_sm=c, rot_impl=5) for r, p1, p2 in ksplit if p2
                     for w in ([1] if interp else [4, 8]) for c in ([2] if interp else [2, 4])][:2 if interp else 8]
            dense = dense if ROT_IMPL == 3 else (kron if ROT_IMPL == 5 else dense + kron)
            hd = (hd_dense, hk)
        meta = _ACT_META[mkey] = (p, g1, g2, stage1, ieee, h1, h2, cands, dense, hd)
    p, g1, g2, stage1, ieee, h1, h2, cands, dense, hd = meta
    if dense and mode == 0 and rowscale is None and not block_k:
        cands = dense if ROT_IMPL in (3, 5) else cands + dense

    def launch(cfg: GemmConfig) -> None:
        if cfg.rot_impl == 5:
            nprog = min(-(-m // cfg.BM), cfg.ctas_per_sm * _num_sms(x.device))
            launch_kernel(tk.act_quant_rot_kron_kernel, (nprog,), (x, out, scale, hd[1], k, x.stride(0), m),
                          dict(P=cfg.BN or p, P2=cfg.BK or 256, SEG2=cfg.BK > 0, ROWS=cfg.BM, DOT_DTYPE=stage1,
                               IEEE=ieee), cfg.num_warps, 1)
            return
        if cfg.rot_impl == 3:
            nprog = min(-(-m // cfg.BM), _num_sms(x.device))
            launch_kernel(tk.act_quant_rot_dense_kernel, (nprog,), (x, out, scale, hd[0], k, x.stride(0), m),
                          dict(P=p, G=DENSE_ROT_G, ROWS=cfg.BM, DOT_DTYPE=stage1, IEEE=ieee),
                          cfg.num_warps, cfg.num_stages)
            return
        launch_kernel(
            tk.act_quant_kernel, (m,),
            (x, out, out if scale is None else scale, out if h1 is None else h1, out if h2 is None else h2,
             out if rowscale is None else rowscale, k, x.stride(0), m),
            dict(P=p, G1=g1, G2=g2, BLOCK_Q=block_k, SCALE_K_MAJOR=k_major, MODE=mode, STAGE1_DTYPE=stage1,
                 STAGE1_IEEE=ieee, ROT_IMPL=cfg.rot_impl, HAS_ROWSCALE=rowscale is not None),
            cfg.num_warps)

    key = ("act", mkey, mode, k_major, ROT_IMPL, m_bucket(m), rowscale is not None, out.dtype)
    launch(TUNER.pick(key, lambda: cands, launch))


def launch_act_quant(x: torch.Tensor, convrot_groupsize: int = 0, block_k: int = 0,
                     scale_k_major: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and fp32 scales of 2-D ``x`` (last dim contiguous). ``block_k``: scales [M, K/block_k];
    ``scale_k_major`` stores them K-block-major (a transposed view), the layout the block-wise GEMM reads."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if block_k:
        nb = k // block_k
        if scale_k_major:
            scale = torch.empty((nb, m), dtype=torch.float32, device=x.device).t()
        else:
            scale = torch.empty((m, nb), dtype=torch.float32, device=x.device)
    else:
        scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _act_launch(x, q, scale, convrot_groupsize, block_k, scale_k_major, 0, None)
    return q, scale


def launch_rotate(x: torch.Tensor, group_size: int, out_dtype: torch.dtype,
                  rowscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x · blockdiag(H)ᵀ (times an optional fp32 per-row scale), in ``out_dtype``."""
    m, k = x.shape
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    if m:
        _act_launch(x, out, None, group_size, 0, False, 1, rowscale)
    return out


# ------------------------------------------------------------------------------------------------
# reusable device memory for small per-call buffers
# ------------------------------------------------------------------------------------------------
# A small call's temporaries (the quantized activations and their scales, Triton's global scratch for
# device-built TMA descriptors) cost a caching-allocator round trip each: several microseconds of host
# time per buffer on a slow host, as much as a launch. Outside CUDA-graph capture they come from one
# buffer per (thread, device, stream) instead, grown when too small: kernels on one stream run in
# order, so the next call's use of the buffer starts after this call's kernels end, and another thread
# or stream has its own buffer. During capture every call allocates, as before (a graph keeps its own
# memory). Only buffers of at most WORKSPACE_MAX_BYTES are served this way; larger ones (long
# sequences, where the GPU time hides the allocation) use the caching allocator.
WORKSPACE_MAX_BYTES = 16 << 20
_WS_ALIGN = 256
_WS_MAX_KEYS = 8  # workspaces one thread keeps (streams x devices x kinds)


class _Workspaces(threading.local):
    def __init__(self):
        self.bufs: Dict[tuple, torch.Tensor] = {}


_WS = _Workspaces()
try:
    _capturing = torch._C._cuda_isCurrentStreamCapturing
    _cur_device = torch._C._cuda_getDevice
except AttributeError:  # pragma: no cover - CPU-only torch builds
    _capturing = _cur_device = None


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where CUDA is not in use)."""
    try:
        return _capturing is not None and torch.cuda.is_initialized() and bool(_capturing())
    except RuntimeError:  # pragma: no cover
        return False


def current_device() -> int:
    """The current CUDA device's index (``torch.cuda.current_device`` without its Python layers)."""
    return _cur_device() if _cur_device is not None else torch.cuda.current_device()


def workspace(device_index: int, stream: int, nbytes: int, kind: int = 0) -> torch.Tensor:
    """This thread's reusable uint8 buffer ``kind`` (0: launch plans' temporaries, 1: Triton's global
    scratch) for ``stream`` on the device, at least ``nbytes`` long (callers check ``nbytes <=
    WORKSPACE_MAX_BYTES`` and that no graph is being captured)."""
    key = (device_index, stream, kind)
    buf = _WS.bufs.get(key)
    if buf is None and len(_WS.bufs) >= _WS_MAX_KEYS:
        # a thread that cycles through many streams: start over (each buffer was allocated on, and is
        # only used on, its own stream, so the caching allocator reuses it in that stream's order)
        _WS.bufs.clear()
    if buf is None or buf.numel() < nbytes:
        size = max(nbytes, 2 * buf.numel() if buf is not None else 0, 1 << 16)
        size = min(-(-size // _WS_ALIGN) * _WS_ALIGN, max(WORKSPACE_MAX_BYTES, nbytes))
        _WS.bufs[key] = None  # free the old one first (stream-ordered: safe to reuse at once)
        buf = _WS.bufs[key] = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", device_index))
    return buf


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's global-scratch allocator (device-built TMA descriptors: a few hundred bytes per CTA)."""
    if size <= WORKSPACE_MAX_BYTES and alignment <= _WS_ALIGN and stream is not None and not _capturing():
        return workspace(_cur_device(), stream, size, 1)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-built TMA descriptors need Triton's scratch allocator. It is a context variable (per
    thread): install a torch-backed one where none is set, never replacing someone else's."""
    try:
        from triton.runtime import _allocation as alloc
        if alloc._allocator.get() is not alloc._NULL_ALLOCATOR:
            return
    except Exception:  # pragma: no cover - a triton without that module layout
        pass
    triton.set_allocator(_torch_scratch)


# ------------------------------------------------------------------------------------------------
# GEMMs
# ------------------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # host side: triton.cdiv is a constexpr_function, microseconds per call


def gemm_supports(n: int, k: int, group_size: int = 0) -> bool:
    """Shapes the Triton GEMMs take: N, K multiples of 16; block-wise groups multiples of 32
    (an int8 tensor-core dot needs K >= 32 per step)."""
    return n % 16 == 0 and k % 16 == 0 and n > 0 and k > 0 and group_size % 32 == 0


def lora_rank_padded(r: int) -> int:
    """The rank the kernels' LoRA epilogue takes: a power of two, at least 16 (a tensor-core dot)."""
    return max(16, 1 << max(r - 1, 0).bit_length())


def _lora_args(lora, fallback: torch.Tensor):
    """(h, up, LORA_R, LORA_IEEE) for the GEMM epilogue; ``lora`` = (h [M, R], up [N, R]), R padded."""
    if lora is None:
        return fallback, fallback, 0, False
    h, up = lora
    return h, up, h.shape[1], h.dtype == torch.float32 or interpreter_active()


def launch_int8_gemm(qa: torch.Tensor, a_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], out_dtype: torch.dtype, group_size: int = 0,
                     configs: Optional[List[GemmConfig]] = None, lora=None) -> torch.Tensor:
    """C = scaled int8 GEMM of row-contiguous ``qa`` [M,K] and ``qw`` [N,K].

    ``group_size`` 0: a_scale [M], w_scale scalar or [N] (int32 accumulation). ``group_size`` g:
    block-wise, a_scale [M, K/g] (best K-block-major, i.e. a transposed [K/g, M] buffer, as
    ``launch_act_quant(..., scale_k_major=True)`` makes), w_scale [ceil(N/g), K/g].
    ``configs`` bypasses the tuner (tests, experiments).
    """
    m, k = qa.shape
    n = qw.shape[0]
    dev = qa.device
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0:
        return c
    blockwise = group_size > 0
    if blockwise:
        if a_scale.stride(0) != 1 or a_scale.stride(1) != m:
            plan_unsafe()
            a_scale = a_scale.t().contiguous().t()
        ws_per_row = False
    else:
        ws_per_row = w_scale.numel() > 1
    use_tma_ok = dev.type == "cuda" and qa.data_ptr() % 16 == 0 and qw.data_ptr() % 16 == 0
    lh, lu, lora_r, lora_ieee = _lora_args(lora, w_scale)

    def launch(cfg: GemmConfig) -> None:
        grid = _cdiv(m, cfg.BM) * _cdiv(n, cfg.BN)
        if cfg.persistent:
            grid = min(grid, _num_sms(dev) * cfg.ctas_per_sm)
        tma = cfg.tma if use_tma_ok else 0
        if tma == 1:
            if TensorDescriptor is None:
                raise RuntimeError("host TMA descriptors need triton.tools.tensor_descriptor")
            a_arg = TensorDescriptor(qa, [m, k], [k, 1], [cfg.BM, cfg.BK])
            b_arg = TensorDescriptor(qw, [n, k], [k, 1], [cfg.BN, cfg.BK])
        else:
            a_arg, b_arg = qa, qw
            if tma == 2:
                _ensure_allocator()
        launch_kernel(
            tk.int8_gemm_kernel, (grid,),
            (a_arg, b_arg, c, a_scale, w_scale, w_scale if bias is None else bias, lh, lu, m, n, k, grid),
            dict(LORA_R=lora_r, LORA_IEEE=lora_ieee, WS_PER_ROW=ws_per_row, HAS_BIAS=bias is not None, BLOCKWISE=blockwise,
                 GROUP_K=max(group_size, 1), GROUP_N=max(group_size, 1),
                 WS_TILE_SCALAR=blockwise and group_size % cfg.BN == 0, MAGIC_CVT=cfg.magic_cvt,
                 USE_TMA=tma, FLATTEN=cfg.persistent and cfg.flatten, EVEN_K=k % cfg.BK == 0,
                 BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M),
            cfg.num_warps, cfg.num_stages)

    key = (group_size, m_bucket(m), n, k, out_dtype, bias is not None, ws_per_row, dev, lora_r)

    def candidates() -> List[GemmConfig]:
        arch = arch_of(dev)
        table = _BLOCKWISE_CONFIGS if blockwise else _W8A8_CONFIGS
        allc = table.get(arch, table["sm80"])
        cands = [cfg for cfg in allc if _fits_gemm(cfg, m, n, k)] or allc[-1:]
        if blockwise:  # BK must divide the scale block: shrink it (never grow) for smaller groups
            cands = [replace(cfg, BK=_largest_pow2_divisor(group_size, cfg.BK)) for cfg in cands]
        return _unflattened_twins(cands, first=lora_r > 0)

    TUNER.run(key, candidates, launch, configs)
    return c


def launch_w8a16(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 group_size: int, out_dtype: torch.dtype, configs: Optional[List[GemmConfig]] = None,
                 lora=None) -> torch.Tensor:
    """C = x [M,K] (rows with unit last stride) · dequant(qw [N,K] row-contiguous)ᵀ (+ bias).
    w_scale: scalar or [N] (``group_size`` 0), or [ceil(N/g), K/g] contiguous."""
    m, k = x.shape
    n = qw.shape[0]
    dev = x.device
    c = torch.empty((m, n), dtype=out_dtype, device=dev)
    if m == 0:
        return c
    mode = 2 if group_size else (1 if w_scale.numel() > 1 else 0)
    ieee = x.dtype == torch.float32 or dev.type == "cpu"  # the interpreter's bf16 dot is not exact
    lh, lu, lora_r, lora_ieee = _lora_args(lora, w_scale)

    def launch(cfg: GemmConfig) -> None:
        out = c
        if cfg.split_k > 1:
            plan_unsafe()
            out = c if out_dtype == torch.float32 else torch.empty((m, n), dtype=torch.float32, device=dev)
            out.zero_()
        if cfg.gemv:
            launch_kernel(
                tk.w8a16_gemv_kernel, (_cdiv(n, cfg.BN),),
                (x, qw, c, w_scale, w_scale if bias is None else bias, lh, lu, m, n, k, x.stride(0)),
                dict(LORA_R=lora_r, WS_MODE=mode, GROUP=max(group_size, 1), HAS_BIAS=bias is not None,
                     EVEN_K=k % cfg.BK == 0, MS=cfg.BM, BN=cfg.BN, BK=cfg.BK),
                cfg.num_warps, cfg.num_stages)
            return
        if cfg.swap:
            launch_kernel(
                tk.w8a16_swap_kernel, (_cdiv(m, cfg.BM) * _cdiv(n, cfg.BN),),
                (x, qw, c, w_scale, w_scale if bias is None else bias, lh, lu, m, n, k, x.stride(0)),
                dict(LORA_R=lora_r, LORA_IEEE=lora_ieee, WS_MODE=mode, GROUP=max(group_size, 1),
                     HAS_BIAS=bias is not None, DOT_IEEE=ieee, EVEN_K=k % cfg.BK == 0,
                     BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M),
                cfg.num_warps, cfg.num_stages)
            return
        grid = (_cdiv(m, cfg.BM) * _cdiv(n, cfg.BN), cfg.split_k)
        launch_kernel(
            tk.w8a16_gemm_kernel, grid,
            (x, qw, out, w_scale, w_scale if bias is None else bias, lh, lu, m, n, k, x.stride(0)),
            dict(LORA_R=lora_r, LORA_IEEE=lora_ieee, WS_MODE=mode, GROUP=max(group_size, 1), HAS_BIAS=bias is not None, DOT_IEEE=ieee,
                 EVEN_K=k % (cfg.BK * cfg.split_k) == 0, SPLIT_K=cfg.split_k,
                 BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M),
            cfg.num_warps, cfg.num_stages)
        if out is not c:
            c.copy_(out)

    swap = env_get(SWAP_ENV) != "0"
    key = ("w8a16", group_size, m_bucket(m), n, k, x.dtype, out_dtype, bias is not None, mode, dev, lora_r, swap)

    def candidates() -> List[GemmConfig]:
        cands = [cfg for cfg in _w8a16_configs(arch_of(dev), m) if swap or not cfg.swap]
        if group_size:
            cands = [replace(cfg, BK=_largest_pow2_divisor(group_size, cfg.BK, 16)) for cfg in cands]
        return list(dict.fromkeys(cands))

    TUNER.run(key, candidates, launch, configs)
    return c


# W8A8 with the activation quantization inside the GEMM (one launch): for few tokens, where the second
# launch of the two-kernel W8A8 costs more host time than the GEMM takes. H200, per synchronised call at
# K = N = 3072 (docs/KERNELS.md, "Per call"): 36.9 vs 61.6 us at M = 1, 36.4 vs 61.8 at M = 16, but
# 65.8 vs 64.1 at M = 64, where reading the rows twice per column tile (GPU 20.8 vs 12.9 us) eats the
# saved launch. The path table still prefers W8A16 there; this serves W8A8 where it is chosen or
# forced (float32 activations always take W8A8).
FUSED_ACT_MAX_M = 16


def _fused_act_configs(arch: str, m: int) -> List[GemmConfig]:
    if arch == "interp":
        return [C(16, 32, 32, 4, 1, GROUP_M=2)]
    stages = 4 if arch == "sm90" else 3
    if m <= 16:
        return [C(16, 64, 128, 4, stages), C(16, 32, 256, 4, 3), C(16, 128, 128, 4, stages), C(16, 64, 256, 4, 3)]
    if m <= 64:
        return [C(64, 64, 128, 4, stages), C(32, 64, 128, 4, stages), C(64, 128, 128, 4, 3), C(32, 128, 128, 4, 3)]
    return [C(64, 128, 128, 4, stages), C(128, 128, 128, 8, 3), C(64, 64, 128, 4, stages), C(128, 64, 128, 4, 3)]


def _w8a8_call(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype, lora):
    """(M, K, N, device, the output, per-row weight scales?, the LoRA epilogue's arguments) of a W8A8 call."""
    m, k = x.shape
    n = qw.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    return m, k, n, x.device, c, w_scale.numel() > 1, _lora_args(lora, w_scale)


def launch_w8a8_fused(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                      out_dtype: torch.dtype, configs: Optional[List[GemmConfig]] = None, lora=None) -> torch.Tensor:
    """W8A8 (per-token int8 activations, tensor-wise / per-row weight scales) in one launch:
    ``launch_act_quant`` + ``launch_int8_gemm`` bit for bit. x [M, K] rows with a unit last stride."""
    m, k, n, dev, c, ws_per_row, (lh, lu, lora_r, lora_ieee) = _w8a8_call(x, qw, w_scale, out_dtype, lora)
    if m == 0:
        return c

    def launch(cfg: GemmConfig) -> None:
        grid = _cdiv(m, cfg.BM) * _cdiv(n, cfg.BN)
        launch_kernel(
            tk.w8a8_fused_act_kernel, (grid,),
            (x, qw, c, w_scale, w_scale if bias is None else bias, lh, lu, m, n, k, x.stride(0)),
            dict(LORA_R=lora_r, LORA_IEEE=lora_ieee, WS_PER_ROW=ws_per_row, HAS_BIAS=bias is not None,
                 EVEN_K=k % cfg.BK == 0, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M),
            cfg.num_warps, cfg.num_stages)

    key = ("w8a8_fused", m_bucket(m), n, k, x.dtype, out_dtype, bias is not None, ws_per_row, dev, lora_r)
    TUNER.run(key, lambda: _fused_act_configs(arch_of(dev), m), launch, configs)
    return c


_ZEROED: Dict[tuple, torch.Tensor] = {}


def zeroed_workspace(device_index: int, stream: int, nbytes: int) -> torch.Tensor:
    """An int32 buffer of at least ``nbytes`` that is all zeros when a kernel on ``stream`` starts: the
    kernels given it (the one-launch W8A8's tickets and ready counters) leave it zeroed when they end,
    and kernels on one stream run one after another. One per (device, stream), shared by threads; during
    CUDA-graph capture a fresh one per call (the graph's own memory, zeroed when captured)."""
    dev = torch.device("cuda", device_index)
    words = -(-nbytes // 4)
    if _capturing is not None and _capturing():
        return torch.zeros(words, dtype=torch.int32, device=dev)
    key = (device_index, stream)
    buf = _ZEROED.get(key)
    if buf is None or buf.numel() < words:
        if buf is None and len(_ZEROED) >= 64:
            _ZEROED.clear()
        _ZEROED[key] = None
        buf = _ZEROED[key] = torch.zeros(max(words, 1 << 14), dtype=torch.int32, device=dev)
    return buf


def _zeroed_offset(ptr: int) -> Optional[int]:
    """The byte offset of ``ptr`` in one of the zeroed workspaces, or None."""
    for buf in list(_ZEROED.values()):
        if buf is not None and buf.data_ptr() <= ptr < buf.data_ptr() + buf.numel() * 4:
            return ptr - buf.data_ptr()
    return None


# W8A8 in one launch for M <= ONELAUNCH_MAX_M (``w8a8_onelaunch_kernel``): the programs quantize the
# activation rows themselves, then multiply with small pointer-load tiles. H200 (benchmarks/small_m.py,
# docs/KERNELS.md "Round 5"): at K = N = 3072 the W8A8 GEMM alone with 64x32x256 tiles takes 8.6 us at
# M = 64 against cuBLAS bf16's 8.3 (the TMA tiles of ``_W8A8_CONFIGS``: 10.5), where W8A16 takes 13.0.
ONELAUNCH_MAX_M = 256
ONELAUNCH_MAX_NK = 16 << 20
ONELAUNCH_ENV = "CONVERT_TO_QUANT_ONE_LAUNCH"  # "0": W8A8 in two launches at every M


def onelaunch_configs(arch: str, m: int) -> List[GemmConfig]:
    """Tuner candidates (the M > 256 ones serve ``benchmarks/small_m.py``; dispatch stops at 256)."""
    if arch == "interp":
        return [C(16, 32, 32, 4, 1, GROUP_M=2)]
    stages = 4 if arch == "sm90" else 3
    if m <= 64:
        return [C(64, 32, 256, 4, 3), C(64, 64, 128, 4, stages), C(64, 64, 256, 4, 3), C(32, 32, 256, 4, 3)]
    if m <= 256:
        return [C(64, 64, 128, 4, stages), C(64, 64, 256, 4, 3), C(64, 32, 256, 4, 3), C(128, 64, 128, 4, stages),
                C(128, 128, 128, 8, 3)]
    return [C(128, 128, 128, 8, 3), C(128, 64, 128, 4, stages), C(64, 128, 128, 4, stages), C(128, 128, 64, 4, stages),
            C(64, 64, 128, 4, stages)]


def _pow2_at_least(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def launch_w8a8_onelaunch(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                          out_dtype: torch.dtype, configs: Optional[List[GemmConfig]] = None, lora=None) -> torch.Tensor:
    """W8A8 (per-token int8 activations, tensor-wise / per-row weight scales) in one launch:
    ``launch_act_quant`` + ``launch_int8_gemm`` bit for bit. x [M, K] rows with a unit last stride."""
    m, k, n, dev, c, ws_per_row, (lh, lu, lora_r, lora_ieee) = _w8a8_call(x, qw, w_scale, out_dtype, lora)
    if m == 0:
        return c
    q = torch.empty((m, k), dtype=torch.int8, device=dev)
    qs = torch.empty((m,), dtype=torch.float32, device=dev)
    interp = interpreter_active()

    def launch(cfg: GemmConfig) -> None:
        mt = _cdiv(m, cfg.BM)
        total = mt * _cdiv(n, cfg.BN)
        qr = min(cfg.BM, 8, _pow2_at_least(_cdiv(m, total)))
        kc = min(_pow2_at_least(k), max(512, 8192 // qr))
        producers = 1 if interp else min(total, _cdiv(m, qr))
        mt2 = _pow2_at_least(mt)
        nbytes = 4 * (2 + mt2)
        if dev.type == "cuda":
            if _capturing():
                plan_unsafe()  # the graph's own zeroed counters: not something a plan can replay
            sync = zeroed_workspace(dev.index, _raw_stream(dev.index), nbytes)
        else:
            sync = torch.zeros(2 + mt2, dtype=torch.int32, device=dev)
        launch_kernel(
            tk.w8a8_onelaunch_kernel, (total,),
            (x, qw, c, w_scale, w_scale if bias is None else bias, lh, lu, q, qs, sync, m, n, k, x.stride(0),
             producers),
            dict(LORA_R=lora_r, LORA_IEEE=lora_ieee, WS_PER_ROW=ws_per_row, HAS_BIAS=bias is not None,
                 EVEN_K=k % cfg.BK == 0, FENCE=not interp, QR=qr, KC=kc, MT=mt2,
                 BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M),
            cfg.num_warps, cfg.num_stages)

    key = ("w8a8_1l", m_bucket(m), n, k, x.dtype, out_dtype, bias is not None, ws_per_row, dev, lora_r)
    TUNER.run(key, lambda: onelaunch_configs(arch_of(dev), m), launch, configs)
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
    grid = (_cdiv(n, bn), _cdiv(k, bk))
    launch_kernel(tk.dequant_kernel, grid, (qw, ws, out, n, k, qw.stride(0), out.stride(0), s_n, s_k),
                  dict(WS_MODE=mode, GROUP=max(group_size, 1), BN=bn, BK=bk),
                  1 if interpreter_active() else 4)
    return out
