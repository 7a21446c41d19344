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
* **Streaming I/O**: a bounded read-ahead thread (``Prefetcher``) and a bounded write-behind thread
  (``WriteBehind``) overlap reading, GPU work and writing; ``--low-memory`` turns both off so host
  memory holds one layer (plus its optimizer state) at a time.

``docs/SCALE.md`` has the measured peak RAM / VRAM and speed of every mode.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import math
import os
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .errors import ConvertError, PlanError

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
CALIBRATED_OPTIMIZERS = ("gptq", "quip")
LEARNED_ROUNDING_OPTIMIZERS = ("original", "adamw", "radam")


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


def _cuda_bf16_supported(dev: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8)
    except Exception:  # pragma: no cover - no driver
        return False


_MM_OUT_DTYPE: Dict[str, bool] = {}


def mm_out_dtype_supported(dev: torch.device) -> bool:
    """Does ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` run on ``dev`` (CUDA in recent torch)?"""
    key = str(dev)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=dev)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except Exception:
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


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
@dataclass(frozen=True)
class LayerEstimate:
    """Bytes a layer's optimizer holds on its device at the same time (float32 unless noted)."""

    weight: int  # weight, its storage-space copy, scales, temporaries, integers, quality check
    sweep: int  # GPTQ/LDLQ per-segment working rows (divided by the number of row segments)
    hessian: int  # H (objective + data copy + the sweep's clone)
    factor: int  # float64 Cholesky of H and H⁻¹ (movable to the CPU)

    def total(self, segments: int = 1, factor_on_device: bool = True) -> int:
        return (self.weight + -(-self.sweep // max(segments, 1)) + self.hessian
                + (self.factor if factor_on_device else self.hessian // 3))


def estimate_layer_bytes(shape: Sequence[int], optimizer: str, rotated: bool = False) -> LayerEstimate:
    """Working set of one layer [out, in]. The factors were read off the optimizers' code (every live
    full-size temporary) and are checked against measured peak VRAM by ``benchmarks/scale.py``."""
    out, inn = int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1
    n = out * inn
    rot = 4 * n if rotated else 0
    if optimizer in CALIBRATED_OPTIMIZERS:
        # w, ws, q_all, scale search (2 full temporaries), q_rtn; sweep: wt, st, qt per segment, and
        # on a GPU the captured block sweep's static buffers (6 x 128 columns, gptq.GRAPH_CACHE_BYTES)
        return LayerEstimate(weight=24 * n + rot + 3072 * out, sweep=12 * n,
                             hessian=12 * inn * inn + (4 * inn * inn if rotated else 0), factor=20 * inn * inn)
    if optimizer in LEARNED_ROUNDING_OPTIMIZERS:
        # w, floors, h, grad, two Adam moments, scale matrix, hard rounding, D and D·H
        return LayerEstimate(weight=40 * n + rot, sweep=0, hessian=12 * inn * inn, factor=0)
    # round-to-nearest: w (float32), ws / w/scale temporary, int8, dequantized copy for the report
    return LayerEstimate(weight=13 * n + rot, sweep=0, hessian=0, factor=0)


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
    if optimizer in CALIBRATED_OPTIMIZERS and (first.row_segments < MAX_ROW_SEGMENTS
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
    from .optimizers.gptq import clear_graphs  # captured GPTQ sweeps hold static buffers and a pool
    clear_graphs()
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
# determinism: per-layer random numbers, deterministic GPU math
# ------------------------------------------------------------------------------------------------
def layer_seed(base: str, seed: Optional[int] = None) -> int:
    """A seed that depends only on the layer's name and ``--manual_seed``: a layer draws the same random
    numbers (randomized SVD of the weight-only objective, ...) whatever ran before it, so the order of
    layers -- and how they are spread over ranks -- never changes the output."""
    return (zlib.crc32(base.encode("utf-8", "surrogatepass")) + 0x9E3779B97F4A7C15 * int(seed or 0)) % (1 << 63)


@contextlib.contextmanager
def layer_rng(base: str, device: torch.device, seed: Optional[int] = None):
    """Seed the CPU generator and ``device``'s CUDA generator for one layer, restoring both after."""
    s = layer_seed(base, seed)
    cuda_devs = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devs):
        torch.default_generator.manual_seed(s)
        for d in cuda_devs:
            torch.cuda.default_generators[d].manual_seed(s)
        yield


def enable_deterministic_gpu_math():
    """Bit-reproducible float32 GEMMs on CUDA: no TF32, a fixed cuBLAS workspace (must be set before
    cuBLAS starts). Reductions in torch are already deterministic for a given shape and device."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------------
# bf16 compute
# ------------------------------------------------------------------------------------------------
def rotate_bf16(x: torch.Tensor, rotate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``rotate(x)`` computed in bf16 (float32 accumulation inside the GEMM, bf16 result), as float32."""
    return rotate(x.to(torch.bfloat16)).float()


def rotate_groups_bf16(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``hadamard.rotate_groups`` with bf16 operands and a float32 result where the GEMM can return one
    (CUDA: exact products, float32 sums -- lossless for a bf16 weight); elsewhere the result is rounded
    to bf16."""
    from .hadamard import regular_hadamard, rotate_groups
    n = x.shape[-1]
    if n % group_size:
        return rotate_groups(x, group_size)  # raises the format's error
    h = regular_hadamard(group_size, device=x.device, dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16).reshape(-1, group_size)
    if x.device.type == "cuda" and mm_out_dtype_supported(x.device):
        out = torch.mm(xb, h.T, out_dtype=torch.float32)
    else:
        out = torch.mm(xb, h.T).float()
    return out.reshape(x.shape)


def storage_weight(w: torch.Tensor, spec, options: Optional[Dict[str, Any]]) -> torch.Tensor:
    """``spec``'s storage-space weight (the convrot rotation), with bf16 operands when the pipeline set
    ``bf16_hadamard`` for this layer."""
    p = spec.params
    if (options or {}).get("bf16_hadamard") and getattr(p, "convrot", False):
        return rotate_groups_bf16(w, p.convrot_groupsize)
    return spec.cls.to_storage(w, p)


def quantize_rtn(w: torch.Tensor, spec, options: Optional[Dict[str, Any]], orig_dtype: torch.dtype):
    """Round-to-nearest through the format's interface; the format's own ``quantize`` unless the weight
    rotation runs in bf16 (then: rotate in bf16, abs-max scales and rounding in float32)."""
    if not (options or {}).get("bf16_hadamard"):
        return spec.cls.quantize(w, spec.params, orig_dtype=orig_dtype)
    from .formats import round_to_int8
    ws = storage_weight(w, spec, options)
    scale = spec.cls.compute_scale(ws, spec.params)
    q = round_to_int8(ws / spec.cls.expand_scale(scale, ws.shape, spec.params))
    return spec.cls.pack(q, scale, spec.params, orig_dtype)


# ------------------------------------------------------------------------------------------------
# streaming I/O: bounded read-ahead and write-behind threads
# ------------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class Prefetcher:
    """Yield ``(key, read(key))`` in order while a background thread reads ahead, holding at most
    ``max_bytes`` of tensors not yet taken (always at least one) and, with ``max_items``, at most that
    many tensors. ``pread`` releases the GIL, so reading overlaps the caller's GPU work.
    ``max_bytes=0``: no thread, read on demand.

    ``keys`` may be any iterable, also one that decides the next key only when asked (the multi-rank
    work queue claims a layer there): the thread asks for the next key only once it may read it."""

    _END = object()

    def __init__(self, read: Callable[[str], torch.Tensor], keys: Iterable[str], sizes: Dict[str, int],
                 max_bytes: int, max_items: Optional[int] = None):
        self.read, self.sizes, self.max_bytes = read, sizes, max_bytes
        self.keys = keys if not isinstance(keys, (list, tuple)) else list(keys)
        self.max_items = max_items if max_items is not None else 1 << 62
        self._cv = threading.Condition()
        self._ready: "collections.deque" = collections.deque()
        self._held = 0
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        small = isinstance(self.keys, list) and len(self.keys) <= 1
        if max_bytes > 0 and not small:
            self._thread = threading.Thread(target=self._loop, name="ctq-prefetch", daemon=True)
            self._thread.start()

    def _room(self) -> bool:
        return len(self._ready) < self.max_items and not (self._held > 0 and self._held >= self.max_bytes)

    def _loop(self):
        try:
            it = iter(self.keys)
            while True:
                with self._cv:  # wait for room before asking for the next key (it may claim work)
                    while not self._stop and self._ready and not self._room():
                        self._cv.wait()
                    if self._stop:
                        return
                k = next(it, self._END)
                if k is self._END:
                    break
                size = self.sizes.get(k, 0)
                with self._cv:
                    while not self._stop and self._held > 0 and self._held + size > self.max_bytes:
                        self._cv.wait()
                    if self._stop:
                        return
                t = self.read(k)
                with self._cv:
                    self._ready.append((k, t, None))
                    self._held += size
                    self._cv.notify_all()
            with self._cv:
                self._ready.append((self._END, None, None))
                self._cv.notify_all()
        except BaseException as e:  # handed to the consumer
            with self._cv:
                self._ready.append((None, None, e))
                self._cv.notify_all()

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        if self._thread is None:
            for k in self.keys:
                yield k, self.read(k)
            return
        while True:
            with self._cv:
                while not self._ready:
                    self._cv.wait(0.5)
                key, t, err = self._ready.popleft()
                if err is not None:
                    raise err
                if key is self._END:
                    return
                self._held -= self.sizes.get(key, 0)
                self._cv.notify_all()
            yield key, t

    def close(self):
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._ready.clear()
                self._cv.notify_all()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class WriteBehind:
    """Write ``{key: tensor}`` batches with ``writer.write`` on a background thread (``pwrite`` and the
    SHA-256 release the GIL), holding at most ``max_bytes`` not yet written (always at least one batch).
    A write error is raised in the caller at the next ``put``/``flush``. Thread-safe ``put``.
    ``max_bytes=0``: write synchronously."""

    def __init__(self, writer, max_bytes: int):
        self.writer, self.max_bytes = writer, max_bytes
        self._cv = threading.Condition()
        self._queue: "collections.deque" = collections.deque()
        self._held = 0
        self._busy = False
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.bytes_written = 0
        if max_bytes > 0:
            self._thread = threading.Thread(target=self._loop, name="ctq-write", daemon=True)
            self._thread.start()

    @staticmethod
    def _size(tensors: Dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def put(self, tensors: Dict[str, torch.Tensor]):
        if not tensors:
            return
        size = self._size(tensors)
        if self._thread is None:
            for k, v in tensors.items():
                self.writer.write(k, v)
            self.bytes_written += size
            return
        with self._cv:
            while (self._error is None and not self._stop and self._held > 0
                   and self._held + size > self.max_bytes):
                self._cv.wait(0.5)
            self._raise_error()
            if self._stop:
                raise ConvertError("internal error: write after the writer was closed")
            self._queue.append((tensors, size))
            self._held += size
            self._cv.notify_all()

    def _raise_error(self):
        if self._error is not None:
            err, self._error = self._error, None
            self._stop = True
            raise err

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                if self._stop:  # aborted: drop what is left
                    self._queue.clear()
                    return
                tensors, size = self._queue.popleft()
                self._busy = True
            try:
                for k, v in tensors.items():
                    self.writer.write(k, v)
            except BaseException as e:
                with self._cv:
                    self._error = e
                    self._queue.clear()
                    self._held = 0
                    self._busy = False
                    self._cv.notify_all()
                return
            with self._cv:
                self._held -= size
                self.bytes_written += size
                self._busy = False
                self._cv.notify_all()

    def flush(self):
        """Wait until everything put so far is written; raise a write error."""
        if self._thread is None:
            return
        with self._cv:
            while (self._queue or self._busy) and self._error is None:
                self._cv.wait(0.5)
            self._raise_error()

    def close(self, abort: bool = False):
        if self._thread is None:
            return
        if not abort:
            try:
                self.flush()
            except BaseException:
                self.close(abort=True)
                raise
        with self._cv:
            if abort:
                self._queue.clear()
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        self._thread = None
        if not abort:
            with self._cv:
                self._raise_error()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(abort=exc_type is not None)
        return False


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
