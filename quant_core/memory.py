"""Memory policy for converting large models: what lives on the GPU, in which precision, and what
happens when a layer does not fit.

Four decisions, all made from the options and the layer's shape only (never from the memory free at
that moment), so a conversion gives the same bytes every time and on every rank of a multi-GPU run:

* **Streaming mode** (``--streaming-mode``) = a VRAM budget for one layer's working set
  (``STREAMING_BUDGETS``; ``auto`` picks a mode once, from the free VRAM at start). ``place_layer``
  estimates the working set of the layer's optimizer (``estimate_layer_bytes``) and, while it exceeds the
  budget, moves work off the GPU in this order: the Hessian factorization (float64 Cholesky, ``~20·in²``
  bytes) to the CPU, the LDLQ/GPTQ sweep into more row segments, and finally the whole layer to the CPU.
* **bf16 compute** (``--bf16-compute``): the Hadamard rotation of the weight and of the Hessian with
  bf16 operands above ``--bf16-hadamard-threshold`` / ``--bf16-hessian-threshold`` elements. ``auto``
  (CUDA only) takes the cases measured harmless: the Hessian's rotation, and the weight's when lossless
  (a bf16 weight on a GEMM that returns float32); ``on`` also rounds rotated weights to bf16 (-0.2 dB). Everything that
  accumulates error (rounding sweep, factorization, scales) stays float32/float64.
* **OOM guard**: a layer that still raises ``torch.OutOfMemoryError`` is retried with its Hessian on the
  CPU and more row segments, then on the CPU; the layer's report says so. ``--no-memory-limits``
  turns budgets and guard off (an OOM then ends the run with a clear error and no output file).
* **Streaming I/O** (``streaming.py``): a bounded read-ahead thread (``Prefetcher``) and a bounded
  write-behind thread (``WriteBehind``) overlap reading, GPU work and writing; ``--low-memory`` turns
  both off so host memory holds one layer (plus its optimizer state) at a time.

Each optimizer declares its working set and time beside itself (``optimizers.base.OptimizerCost``); the
bf16 helpers live in ``bf16.py``, per-layer seeding in ``seeding.py``, round-to-nearest in
``optimizers/rtn.py`` (names re-exported here for callers of the old module).

``docs/SCALE.md`` has the measured peak RAM / VRAM and speed of every mode.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .bf16 import _cuda_bf16_supported, mm_out_dtype_supported, rotate_bf16, rotate_groups_bf16  # noqa: F401
from .errors import ConvertError, PlanError
from .optimizers import OPTIMIZER_COSTS  # noqa: F401  (every optimizer registered with its cost)
from .optimizers.base import LayerEstimate, optimizer_cost
from .optimizers.rtn import quantize_rtn, storage_weight  # noqa: F401
from .seeding import enable_deterministic_gpu_math, layer_rng, layer_seed  # noqa: F401
from .streaming import Prefetcher, WriteBehind  # noqa: F401

GiB = 1 << 30

STREAMING_MODES = ("off", "minimal", "balanced", "aggressive", "auto")
# VRAM budget for one layer's working set (bytes). The cards each mode is meant for: off 24 GB+,
# minimal 12-16 GB, balanced 8-12 GB, aggressive < 8 GB (the budget leaves room for the CUDA context,
# the caching allocator's slack and the next layer's input).
STREAMING_BUDGETS: Dict[str, Optional[int]] = {
    "off": None, "minimal": 10 * GiB, "balanced": 6 * GiB, "aggressive": 3 * GiB}
# ``auto``: the first mode whose minimum free VRAM is met (free VRAM measured once, at start)
AUTO_MODE_MIN_FREE: Tuple[Tuple[str, int], ...] = (
    ("off", 22 * GiB), ("minimal", 12 * GiB), ("balanced", 8 * GiB), ("aggressive", 0))
MAX_ROW_SEGMENTS = 16
# read-ahead and write-behind each hold at most this much (and always one tensor): a few Flux-sized
# tensors, enough to keep reading, GPU work and writing busy at once
STREAMING_BUFFER_BYTES = 512 << 20

BF16_MODES = ("auto", "on", "off")
DEFAULT_BF16_THRESHOLD = 1_000_000  # elements; default of the two specific thresholds below


# ------------------------------------------------------------------------------------------------
# the policy
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPolicy:
    """Resolved memory settings of one conversion (the same on every rank)."""

    device: torch.device
    mode: str  # off | minimal | balanced | aggressive (auto already resolved)
    requested_mode: str = "off"
    budget_bytes: Optional[int] = None  # per-layer VRAM budget; None = unlimited
    oom_guard: bool = True
    low_memory: bool = False
    bf16: str = "off"  # auto | on | off
    bf16_hadamard_threshold: int = DEFAULT_BF16_THRESHOLD
    bf16_hessian_threshold: int = DEFAULT_BF16_THRESHOLD
    prefetch_bytes: int = 512 << 20  # read-ahead and write-behind bounds (0 with --low-memory)
    free_vram_bytes: Optional[int] = None  # what ``auto`` saw

    def describe(self) -> str:
        parts = [f"streaming mode {self.mode}" + (f" (auto, {self.free_vram_bytes / GiB:.1f} GiB free)"
                                                  if self.requested_mode == "auto" and self.free_vram_bytes
                                                  is not None else "")]
        if self.budget_bytes is not None and self.device.type == "cuda":
            parts.append(f"layer VRAM budget {self.budget_bytes / GiB:.0f} GiB")
        if not self.oom_guard:
            parts.append("no memory limits")
        if self.low_memory:
            parts.append("low-memory streaming")
        if self.bf16 != "off":
            parts.append(f"bf16 compute {self.bf16}")
        return ", ".join(parts)

    def use_bf16(self, kind: str, numel: int, device: Optional[torch.device] = None,
                 exact_input: bool = False) -> bool:
        """bf16 for ``kind`` ("hadamard": the weight's rotation, "hessian": the Hessian's) of ``numel``
        elements? ``on``: above the threshold, on any device. ``auto``: on a bf16 CUDA card, only where it
        was measured harmless (tests/test_memory_modes.py): the Hessian's rotation (GPTQ output SQNR
        43.789 -> 43.792 dB: the 1% damping dwarfs bf16 rounding), and the weight's rotation only when
        lossless -- a bf16 weight (``exact_input``; the Hadamard entries ±2^-k are bf16 too) on a GEMM that
        returns float32 (``torch.mm(out_dtype=)``). Rounding the rotated weight to bf16 costs 0.2-0.3 dB."""
        if self.bf16 == "off":
            return False
        threshold = self.bf16_hadamard_threshold if kind == "hadamard" else self.bf16_hessian_threshold
        if numel < threshold:
            return False
        if self.bf16 == "on":
            return True
        dev = device or self.device
        if dev.type != "cuda" or not _cuda_bf16_supported(dev):
            return False
        return kind == "hessian" or (exact_input and mm_out_dtype_supported(dev))



def resolve_streaming_mode(mode: str, free_vram_bytes: Optional[int]) -> str:
    """``auto`` -> a named mode from the free VRAM (no CUDA: ``off``, the CPU has no VRAM to save)."""
    if mode not in STREAMING_MODES:
        raise PlanError(f"unknown streaming mode {mode!r} ({', '.join(STREAMING_MODES)})")
    if mode != "auto":
        return mode
    if free_vram_bytes is None:
        return "off"
    for name, need in AUTO_MODE_MIN_FREE:
        if free_vram_bytes >= need:
            return name
    return "aggressive"


def free_vram(device: torch.device) -> Optional[int]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def policy_from_options(options: Optional[Dict[str, Any]], device: torch.device, low_memory: bool = False,
                        free_vram_bytes: Optional[int] = None) -> MemoryPolicy:
    """Build the policy from ``ConvertOptions.optimizer_options`` (the CLI's memory flags).
    ``free_vram_bytes`` overrides the measurement (multi-GPU runs pass the minimum over ranks)."""
    o = options or {}
    no_limits = bool(o.get("no_memory_limits"))
    requested = o.get("streaming_mode") or "auto"
    if requested not in STREAMING_MODES:
        raise PlanError(f"unknown --streaming-mode {requested!r} ({', '.join(STREAMING_MODES)})")
    free = free_vram_bytes if free_vram_bytes is not None else (
        free_vram(device) if requested == "auto" and not no_limits else None)
    mode = "off" if no_limits else resolve_streaming_mode(requested, free)
    bf16 = o.get("bf16_compute") or "off"
    if bf16 not in BF16_MODES:
        raise PlanError(f"unknown --bf16-compute {bf16!r} ({', '.join(BF16_MODES)})")
    general = o.get("bf16_threshold")
    general = DEFAULT_BF16_THRESHOLD if general is None else int(general)
    had = o.get("bf16_hadamard_threshold")
    hes = o.get("bf16_hessian_threshold")
    for name, v in (("--bf16-threshold", general), ("--bf16-hadamard-threshold", had),
                    ("--bf16-hessian-threshold", hes)):
        if v is not None and int(v) < 0:
            raise PlanError(f"{name} must be >= 0 elements, got {v}")
    return MemoryPolicy(
        device=device, mode=mode, requested_mode=requested,
        budget_bytes=None if no_limits or device.type != "cuda" else STREAMING_BUDGETS[mode],
        oom_guard=not no_limits, low_memory=bool(low_memory), bf16=bf16,
        bf16_hadamard_threshold=general if had is None else int(had),
        bf16_hessian_threshold=general if hes is None else int(hes),
        prefetch_bytes=0 if low_memory else STREAMING_BUFFER_BYTES, free_vram_bytes=free)


# ------------------------------------------------------------------------------------------------
# per-layer placement
# ------------------------------------------------------------------------------------------------
def estimate_layer_bytes(shape: Sequence[int], optimizer: str, rotated: bool = False) -> LayerEstimate:
    """Working set of one layer [out, in] under ``optimizer``: the estimate it declares beside itself
    (``optimizers.base.OptimizerCost``; round-to-nearest's for other names)."""
    out, inn = int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1
    return optimizer_cost(optimizer).estimate(out, inn, rotated)


@dataclass(frozen=True)
class Placement:
    """Where one layer runs: its device, how many row segments the LDLQ sweep uses, where the Hessian
    is factored (``None``: on ``device``), and why (for the report)."""

    device: torch.device
    row_segments: int = 1
    hessian_device: Optional[torch.device] = None
    reason: str = ""

    def describe(self) -> str:
        s = str(self.device)
        if self.row_segments > 1:
            s += f", {self.row_segments} row segments"
        if self.hessian_device is not None:
            s += f", Hessian factored on {self.hessian_device}"
        return s

    def option_overrides(self) -> Dict[str, Any]:
        o: Dict[str, Any] = {}
        if self.row_segments > 1:
            o["row_segments"] = self.row_segments
        if self.hessian_device is not None:
            o["hessian_device"] = str(self.hessian_device)
        return o


CPU = torch.device("cpu")


def place_layer(shape: Sequence[int], optimizer: str, policy: MemoryPolicy, rotated: bool = False) -> Placement:
    """The cheapest placement whose estimated working set fits the policy's VRAM budget."""
    dev = policy.device
    if dev.type != "cuda" or policy.budget_bytes is None:
        return Placement(dev)
    budget = policy.budget_bytes
    est = estimate_layer_bytes(shape, optimizer, rotated)
    if est.total() <= budget:
        return Placement(dev)
    gib = est.total() / GiB
    if est.factor:
        if est.total(factor_on_device=False) <= budget:
            return Placement(dev, 1, CPU, f"~{gib:.1f} GiB > {budget / GiB:.0f} GiB budget: Hessian factored on the CPU")
        if est.sweep:
            seg = 2
            while seg <= MAX_ROW_SEGMENTS:
                if est.total(seg, factor_on_device=False) <= budget:
                    return Placement(dev, seg, CPU, f"~{gib:.1f} GiB > {budget / GiB:.0f} GiB budget: Hessian "
                                                    f"factored on the CPU, {seg} row segments")
                seg *= 2
    return Placement(CPU, 1, None, f"~{gib:.1f} GiB > {budget / GiB:.0f} GiB budget: layer converted on the CPU")


def fallback_placements(first: Placement, optimizer: str) -> List[Placement]:
    """What the OOM guard tries after ``first`` ran out of memory: for calibrated optimizers 4x the row
    segments with the Hessian factored on the CPU, then (from a GPU) the whole layer on the CPU."""
    out: List[Placement] = []
    on_gpu = first.device.type != "cpu"
    if optimizer_cost(optimizer).row_sweep and (first.row_segments < MAX_ROW_SEGMENTS
                                               or (on_gpu and first.hessian_device is None)):
        seg = min(max(first.row_segments, 1) * 4, MAX_ROW_SEGMENTS)
        out.append(Placement(first.device, seg, CPU if on_gpu else None, "retry after running out of memory"))
    if on_gpu:
        out.append(Placement(CPU, 1, None, "retry on the CPU after running out of GPU memory"))
    return out


# ------------------------------------------------------------------------------------------------
# the OOM guard
# ------------------------------------------------------------------------------------------------
OOM_ERRORS: Tuple[type, ...] = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (
    torch.cuda.OutOfMemoryError,)


def release_cuda_memory():
    for cost in {id(c): c for c in OPTIMIZER_COSTS.values()}.values():
        if cost.release is not None:  # e.g. captured GPTQ sweeps hold static buffers and a pool
            cost.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_guarded(attempt: Callable[[Placement], Any], first: Placement, optimizer: str, policy: MemoryPolicy,
                what: str, log: Callable[[str], None] = lambda m: None) -> Tuple[Any, List[str]]:
    """``attempt(placement)`` with ``first``; on out-of-GPU-memory retry with ``fallback_placements``.
    Returns the result and notes for the layer's report. The exception (and the GPU tensors its
    traceback keeps alive) is dropped before the cache is emptied and the next try starts."""
    notes: List[str] = []
    plans = [first] + fallback_placements(first, optimizer)
    for i, pl in enumerate(plans):
        failed = None
        try:
            return attempt(pl), notes
        except OOM_ERRORS as e:
            failed = str(e).splitlines()[0][:200]
        # outside the except block: the traceback's frames (and their GPU tensors) are gone now
        release_cuda_memory()
        if not policy.oom_guard:
            raise ConvertError(f"{what}: out of memory on {pl.device} ({failed}); --no-memory-limits "
                               "turns the retry off -- drop it, or choose --streaming-mode balanced/aggressive")
        if i + 1 == len(plans):
            raise ConvertError(f"{what}: out of memory on {pl.describe()} and no smaller placement is left "
                               f"({failed})")
        msg = f"out of memory on {pl.describe()}; retried on {plans[i + 1].describe()}"
        if plans[i + 1].device.type == "cpu" and pl.device.type != "cpu":
            msg += " (CPU arithmetic: bytes can differ from a GPU run)"
        notes.append(msg)
        log(f"warning: {what}: {msg}")
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------
# measurement helpers (benchmarks, tests)
# ------------------------------------------------------------------------------------------------
def proc_status_bytes(field: str) -> Optional[int]:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), else ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
