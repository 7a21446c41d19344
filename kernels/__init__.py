"""INT8 kernels: Triton on CUDA (sm80+, tuned for Hopper), torch fallbacks with the same numerics
elsewhere. This module is the stable API used by the ComfyUI loader and ``quant_core``; see
docs/KERNELS.md for numerics, paths and measurements.

    quantize_activations(x, convrot_groupsize=0, block_k=0) -> (q_int8, scale_fp32)
    int8_linear(x, qdata, weight_scale, bias=None, *, convrot_groupsize=0, out_dtype=None, path=None)
    int8_blockwise_linear(x, qdata, weight_scale, bias=None, *, group_size=128, out_dtype=None, path=None)
    quantized_linear(x, qw, bias=None, path=None)       # dispatches on qw.format (registry below)
    register_linear(format_name, fn)                     # fn(x, qw, bias, path=None, backend=None)
    dequantize(qw, dtype=None)
    int8_attention(q, k, v, *, sm_scale=None, backend=None, pv=None)  # INT8 attention, kernels/attention.py

``path``: None/"auto" (measured table), "w8a8", "w8a16", "dequant" or "cpu"; env CONVERT_TO_QUANT_KERNEL_PATH
sets the default. ``runtime_path(device)`` is the path a loaded model's layers use ("cpu" on a CPU: the
int8 GEMM ``torch._int_mm`` for large layers where the CPU multiplies int8 fast, else dequant; "dequant"
on other devices without Triton: MPS, ...; see docs/KERNELS.md, "CPU / non-Triton fallback"). ``backend`` (keyword, all functions): None/"auto", "triton" or "torch"; env
CONVERT_TO_QUANT_KERNEL_BACKEND. All functions accept activations of any leading shape [..., K].
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..quant_core.errors import ConvertError
from . import attention, dispatch, launch, reference
from .attention import int8_attention
from .dispatch import PATH_ENV, PATH_TABLE, PATHS, choose_path, runtime_path
from .launch import BACKEND_ENV, HAS_TRITON, TUNER, resolve_backend, triton_usable

__all__ = [
    "quantize_activations", "int8_linear", "int8_blockwise_linear", "quantized_linear", "register_linear",
    "registered_formats", "dequantize", "choose_path", "runtime_path", "resolve_backend", "triton_usable", "KernelInputError",
    "KernelFormatError", "PreparedLinear", "prepare_linear", "PATHS", "PATH_TABLE", "PATH_ENV", "BACKEND_ENV", "HAS_TRITON",
    "int8_attention",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelInputError(ConvertError, ValueError):
    """Operands that don't fit a kernel (shape, dtype, device)."""


class KernelFormatError(ConvertError, NotImplementedError):
    """A QuantizedWeight whose format has no registered linear implementation."""


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 and (x2.shape[0] <= 1 or x2.stride(0) >= k) else x2.contiguous()


def _check_common(x: torch.Tensor, qdata: torch.Tensor, bias: Optional[torch.Tensor], what: str) -> Tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise KernelInputError(f"{what}: activations must be a float32/float16/bfloat16 tensor, "
                               f"got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise KernelInputError(f"{what}: activations need at least one dimension")
    if qdata.dtype != torch.int8 or qdata.dim() != 2:
        raise KernelInputError(f"{what}: weight must be a 2-D int8 tensor, got {qdata.dtype} {list(qdata.shape)}")
    n, k = qdata.shape
    if x.shape[-1] != k:
        raise KernelInputError(f"{what}: activations have {x.shape[-1]} features but the weight expects {k} "
                               f"(weight shape {list(qdata.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise KernelInputError(f"{what}: bias must have shape [{n}], got {list(bias.shape)}")
    return n, k


def _out_dtype(x: torch.Tensor, out_dtype: Optional[torch.dtype], what: str) -> torch.dtype:
    out_dtype = out_dtype or x.dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise KernelInputError(f"{what}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return out_dtype


def _same_device(t: Optional[torch.Tensor], device: torch.device, dtype=None) -> Optional[torch.Tensor]:
    """``t`` on ``device`` (and ``dtype``), contiguous; no-op calls skipped (they cost microseconds)."""
    if t is None:
        return None
    if t.device != device or (dtype is not None and t.dtype != dtype):
        t = t.to(device=device, dtype=dtype or t.dtype)
    return t if t.is_contiguous() else t.contiguous()


def quantize_activations(x: torch.Tensor, convrot_groupsize: int = 0, block_k: int = 0, *,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization, optionally after the convrot group Hadamard, in one pass.

    Returns ``q`` int8 of x's shape and fp32 ``scale``: shape [..., 1] per token (``x ≈ q * scale``)
    or [..., K / block_k] with ``block_k`` (one scale per token per block of K). Rounding is to nearest,
    ties to even; scale = max(absmax / 127, 1e-30).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES or x.dim() < 1:
        raise KernelInputError("quantize_activations: x must be a float32/float16/bfloat16 tensor")
    k = x.shape[-1]
    if convrot_groupsize:
        if convrot_groupsize not in (16, 64, 256, 1024):
            raise KernelInputError(f"quantize_activations: convrot group size must be 16, 64, 256 or 1024, "
                                   f"got {convrot_groupsize}")
        if k % convrot_groupsize:
            raise KernelInputError(f"quantize_activations: {k} features not divisible by convrot group "
                                   f"{convrot_groupsize}")
    if block_k and (block_k < 1 or k % block_k):
        raise KernelInputError(f"quantize_activations: {k} features not divisible by block_k {block_k}")
    x2 = _as_rows(x, k)
    if _compiling():
        q, s = torch.ops.convert_to_quant.quantize_activations(x2, convrot_groupsize, block_k, backend or "")
    else:
        q, s = dispatch.quantize_activations_2d(x2, convrot_groupsize, block_k, backend)
    lead = tuple(x.shape[:-1])
    return q.reshape(x.shape), s.reshape(lead + ((k // block_k,) if block_k else (1,)))


def _check_lora(lora, x: torch.Tensor, n: int, what: str):
    """``lora`` = (h [..., R] = x · downᵀ, up [N, R]) -> (h as [M, R] rows, up) on x's device, or None."""
    if lora is None:
        return None
    h, up = lora
    r = h.shape[-1] if isinstance(h, torch.Tensor) and h.dim() >= 1 else -1
    if (not isinstance(up, torch.Tensor) or r < 16 or r % 16 or tuple(h.shape[:-1]) != tuple(x.shape[:-1])
            or tuple(up.shape) != (n, r)):
        raise KernelInputError(f"{what}: lora must be (h [..., R], up [{n}, R]) with h's leading dims those of "
                               f"x and R a multiple of 16, got h {list(getattr(h, 'shape', []))}, "
                               f"up {list(getattr(up, 'shape', []))}")
    if h.dtype != up.dtype or h.dtype not in _FLOAT_DTYPES:
        raise KernelInputError(f"{what}: lora h and up must share a float dtype, got {h.dtype} and {up.dtype}")
    h2 = _same_device(h.reshape(-1, r), x.device)
    return h2, _same_device(up, x.device)


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, convrot_groupsize: int = 0,
                out_dtype: Optional[torch.dtype] = None, path: Optional[str] = None,
                backend: Optional[str] = None, lora=None) -> torch.Tensor:
    """``y = x · Wᵀ + bias`` for an ``int8_tensorwise`` weight: ``qdata`` int8 [N, K], ``weight_scale``
    fp32 0-dim/[1] (tensor) or [N, 1]/[N] (per row). ``convrot_groupsize`` > 0: the stored weight is
    ``W · blockdiag(H)ᵀ`` and the activations are rotated the same way before quantization.
    ``out_dtype`` defaults to x's dtype. ``lora`` = (h, up): adds ``h · upᵀ`` (a low-rank side path,
    h = x · downᵀ), in the GEMM's epilogue where the kernel runs (docs/KERNELS.md, "LoRA epilogue")."""
    what = "int8_linear"
    n, k = _check_common(x, qdata, bias, what)
    if weight_scale.numel() not in (1, n):
        raise KernelInputError(f"{what}: weight_scale must be a scalar or have {n} entries (per row), "
                               f"got shape {list(weight_scale.shape)}")
    if convrot_groupsize:
        if convrot_groupsize not in (16, 64, 256, 1024) or k % convrot_groupsize:
            raise KernelInputError(f"{what}: convrot group size {convrot_groupsize} must be 16/64/256/1024 "
                                   f"and divide in_features {k}")
    out_dtype = _out_dtype(x, out_dtype, what)
    dev = x.device
    qdata = _same_device(qdata, dev)
    ws = _same_device(weight_scale, dev, torch.float32)
    ws = ws if ws.dim() == 1 else ws.reshape(-1)
    bias = _same_device(bias, dev)
    lora = _check_lora(lora, x, n, what)
    x2 = _as_rows(x, k)
    if _compiling():
        y = torch.ops.convert_to_quant.int8_linear(x2, qdata, ws, bias, convrot_groupsize, out_dtype,
                                                   path or "", backend or "", *(lora or (None, None)))
    else:
        y = dispatch.int8_linear_2d(x2, qdata, ws, bias, convrot_groupsize, out_dtype, path, backend, lora)
    return y.reshape(tuple(x.shape[:-1]) + (n,))


STATIC_INPUT_ENV = "CONVERT_TO_QUANT_STATIC_INPUT"


def static_input_enabled() -> bool:
    """Whether layers with a stored ``input_scale`` (``--input_scale``) run with it: only when env
    ``CONVERT_TO_QUANT_STATIC_INPUT=1``. By default they take the per-token path like every other layer:
    on an H200 the static path (torch ops) measured 0.21-0.29x bf16 per call against 0.73-1.26x per token,
    and on MiniLM its W8A8 cosine was 0.983 against 0.998 (docs/FORMATS.md, "Static input scales"). The
    stored scales are for runtimes that want them (ComfyUI core's int8 layouts read the key)."""
    return launch.env_get(STATIC_INPUT_ENV, "0") == "1"


def int8_linear_static_input(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor,
                             input_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``int8_linear`` with a static activation scale (a file's ``<layer>.input_scale``, fp32 scalar):
    ``x`` is quantized as ``clamp(round(x / input_scale), -127, 127)`` -- one multiply, no per-token
    abs-max pass -- then multiplied with the int8 weight. On CUDA with ``torch._int_mm`` shapes the
    product is int8 x int8 -> int32; elsewhere the same integers are multiplied in float32."""
    what = "int8_linear_static_input"
    n, k = _check_common(x, qdata, bias, what)
    if weight_scale.numel() not in (1, n):
        raise KernelInputError(f"{what}: weight_scale must be a scalar or have {n} entries (per row), "
                               f"got shape {list(weight_scale.shape)}")
    if not isinstance(input_scale, torch.Tensor) or input_scale.numel() != 1:
        raise KernelInputError(f"{what}: input_scale must be a one-element tensor")
    out_dtype = _out_dtype(x, out_dtype, what)
    dev = x.device
    s_in = _same_device(input_scale, dev, torch.float32).reshape(())
    ws = _same_device(weight_scale, dev, torch.float32).reshape(-1)
    qdata = _same_device(qdata, dev)
    x2 = _as_rows(x, k).float()
    q = torch.clamp(torch.round(x2 / s_in), -127, 127)
    m = x2.shape[0]
    if dev.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        acc = torch._int_mm(q.to(torch.int8), qdata.t()).float()
    else:
        acc = q @ qdata.float().t()
    y = acc * (ws * s_in)
    # the int8 cast turns a NaN into some integer: carry a non-finite row's NaN/inf over (0 where finite)
    y = y + x2.abs().amax(dim=1, keepdim=True) * 0.0
    if bias is not None:
        y = y + _same_device(bias, dev, torch.float32)
    return y.to(out_dtype).reshape(tuple(x.shape[:-1]) + (n,))


def int8_blockwise_linear(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, group_size: int = 128,
                          out_dtype: Optional[torch.dtype] = None, path: Optional[str] = None,
                          backend: Optional[str] = None, lora=None) -> torch.Tensor:
    """``y = x · Wᵀ + bias`` for an ``int8_blockwise`` weight: ``qdata`` int8 [N, K], ``weight_scale``
    fp32 [ceil(N/g), K/g] (one scale per g×g tile). W8A8 quantizes activations per token per g-block
    of K and applies both scales per K block inside the GEMM (fp32 accumulation)."""
    what = "int8_blockwise_linear"
    n, k = _check_common(x, qdata, bias, what)
    g = int(group_size)
    if g < 16 or g % 16 or k % g:
        raise KernelInputError(f"{what}: group_size {g} must be a multiple of 16 dividing in_features {k}")
    want = (-(-n // g), k // g)
    if weight_scale.dim() != 2 or tuple(weight_scale.shape) != want:
        raise KernelInputError(f"{what}: weight_scale must have shape {list(want)} for weight {[n, k]} and "
                               f"group {g}, got {list(weight_scale.shape)}")
    out_dtype = _out_dtype(x, out_dtype, what)
    dev = x.device
    qdata = _same_device(qdata, dev)
    ws = _same_device(weight_scale, dev, torch.float32)
    bias = _same_device(bias, dev)
    lora = _check_lora(lora, x, n, what)
    x2 = _as_rows(x, k)
    if _compiling():
        y = torch.ops.convert_to_quant.int8_blockwise_linear(x2, qdata, ws, bias, g, out_dtype, path or "",
                                                             backend or "", *(lora or (None, None)))
    else:
        y = dispatch.int8_blockwise_linear_2d(x2, qdata, ws, bias, g, out_dtype, path, backend, lora)
    return y.reshape(tuple(x.shape[:-1]) + (n,))


# ------------------------------------------------------------------------------------------------
# QuantizedWeight dispatch
# ------------------------------------------------------------------------------------------------
LinearFn = Callable[..., torch.Tensor]
_LINEAR_REGISTRY: Dict[str, LinearFn] = {}


def register_linear(format_name: str, fn: LinearFn, *, replace: bool = False) -> LinearFn:
    """Register ``fn(x, qw, bias, path=None, backend=None) -> y`` as the linear for ``format_name``
    (a ``quant_core.formats`` format). Returns ``fn`` so it can be used as a decorator helper."""
    if not replace and format_name in _LINEAR_REGISTRY and _LINEAR_REGISTRY[format_name] is not fn:
        raise ValueError(f"a linear kernel for format {format_name!r} is already registered")
    _LINEAR_REGISTRY[format_name] = fn
    return fn


def registered_formats() -> Tuple[str, ...]:
    return tuple(sorted(_LINEAR_REGISTRY))


def quantized_linear(x: torch.Tensor, qw, bias: Optional[torch.Tensor] = None, path: Optional[str] = None, *,
                     backend: Optional[str] = None, lora=None) -> torch.Tensor:
    """``y = x · dequant(qw)ᵀ + bias (+ h · upᵀ for lora = (h, up))`` with the fastest kernel for
    ``qw.format``; output in x's dtype."""
    fn = _LINEAR_REGISTRY.get(qw.format)
    if fn is None:  # a format that carries its runtime linear beside it (quant_core/formats/<name>.py)
        try:
            fn = qw.format_cls.linear
        except (AttributeError, ConvertError):  # not a registered format
            fn = None
    if fn is None:
        raise KernelFormatError(f"no linear kernel for weight format {qw.format!r}; registered formats: "
                                f"{', '.join(registered_formats())}")
    if lora is None:
        return fn(x, qw, bias, path=path, backend=backend)
    if fn in (_tensorwise_linear, _blockwise_linear):
        return fn(x, qw, bias, path=path, backend=backend, lora=lora)
    return dispatch.with_lora(fn(x, qw, bias, path=path, backend=backend), lora)


def _tensorwise_linear(x, qw, bias, path=None, backend=None, lora=None):
    p = qw.params
    if qw.extra.get("input_scale") is not None and not p.convrot and static_input_enabled():
        y = int8_linear_static_input(x, qw.qdata, qw.scale, qw.extra["input_scale"], bias)
        return dispatch.with_lora(y, _check_lora(lora, x, qw.qdata.shape[0], "int8_linear_static_input"))
    return int8_linear(x, qw.qdata, qw.scale, bias, convrot_groupsize=p.convrot_groupsize if p.convrot else 0,
                       path=path, backend=backend, lora=lora)


def _blockwise_linear(x, qw, bias, path=None, backend=None, lora=None):
    return int8_blockwise_linear(x, qw.qdata, qw.scale, bias, group_size=qw.params.group_size, path=path,
                                 backend=backend, lora=lora)


def _fp16_linear(x, qw, bias, path=None, backend=None):
    w = qw.qdata.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, bias.to(device=x.device, dtype=x.dtype) if bias is not None else None)


register_linear("int8_tensorwise", _tensorwise_linear)
register_linear("int8_blockwise", _blockwise_linear)
register_linear("fp16", _fp16_linear)


def _fast_key(x: torch.Tensor, bias: Optional[torch.Tensor], path, out_dtype, lora) -> tuple:
    """What ``PreparedLinear``'s checks and plan key look at, read without building device objects."""
    return (x.shape, x.stride(), x.dtype, x.data_ptr() & 15, x.is_cuda, x.get_device(), launch.current_device(),
            None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.data_ptr() & 15, bias.is_cuda,
                                       bias.get_device()),
            path, out_dtype, launch.env_state(),
            None if lora is None else tuple((t.shape, t.stride(), t.dtype, t.data_ptr() & 15, t.is_cuda, t.get_device())
                                            for t in lora))


class PreparedLinear:
    """A quantized weight checked once and placed on one device, called per token batch with only the
    activations checked: the runtime ops of our loaders call this once per linear per step, where
    ``quantized_linear``'s per-call operand checks and conversions are measurable against a
    tens-of-microseconds GEMM. Anything unusual about ``x`` (another device, dtype, width, tracing
    under torch.compile) takes ``quantized_linear``, which checks and handles it."""

    __slots__ = ("qw", "device", "n", "k", "qdata", "scale", "convrot", "group", "kind", "plans", "fallback", "fast",
                 "cpu_fallback")

    def __init__(self, qw, device: torch.device):
        self.qw, self.device = qw, device
        self.plans: Optional[dict] = None
        self.fast: Optional[dict] = None  # _fast_key(...) -> (LaunchPlan, output shape)
        self.fallback: Optional[reference.DequantLinear] = None
        self.cpu_fallback: Optional[reference.DequantLinear] = None  # the fallback, on CPU (the lean check)
        self.kind = qw.format if qw.format in ("int8_tensorwise", "int8_blockwise") else None
        if qw.extra.get("input_scale") is not None and static_input_enabled():  # quantized_linear runs it
            self.kind = None
        self.n = self.k = -1
        if self.kind is None:
            return
        n, k = qw.qdata.shape
        if qw.qdata.dtype != torch.int8:
            raise KernelInputError(f"{qw.format} weight must be int8, got {qw.qdata.dtype}")
        self.n, self.k = n, k
        self.qdata = _same_device(qw.qdata, device)
        self.device = self.qdata.device  # "cuda" -> "cuda:0": compared with x.device on every call
        if self.kind == "int8_tensorwise":
            if qw.scale.numel() not in (1, n):
                raise KernelInputError(f"int8_linear: weight_scale must be a scalar or have {n} entries (per row), "
                                       f"got shape {list(qw.scale.shape)}")
            self.scale = _same_device(qw.scale, device, torch.float32).reshape(-1)
            self.convrot = qw.params.convrot_groupsize if qw.params.convrot else 0
            self.group = 0
        else:
            self.scale = _same_device(qw.scale, device, torch.float32)
            self.convrot, self.group = 0, int(qw.params.group_size)
        if self.device.type == "cuda":
            self.plans, self.fast = {}, {}
        else:  # the torch dequant path with the scale views made once (CPU, MPS, ...)
            self.fallback = reference.DequantLinear(self.qdata, self.scale, self.group, self.convrot)
            if self.device.type == "cpu":
                self.cpu_fallback = self.fallback

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, path: Optional[str] = None,
                 out_dtype: Optional[torch.dtype] = None, lora=None) -> torch.Tensor:
        """``x · Wᵀ + bias`` in ``out_dtype`` (default x's dtype); ``lora`` = (h, up) as for ``int8_linear``."""
        fb = self.cpu_fallback
        if (fb is not None and (path == "cpu" or path == "dequant") and lora is None and out_dtype is None
                and type(x) is torch.Tensor and x.is_cpu and x.dtype in _FLOAT_DTYPES and x.ndim
                and x.shape[-1] == self.k
                and (bias is None or (type(bias) is torch.Tensor and bias.is_cpu and bias.shape == (self.n,)))
                and not launch.env_get(launch.BACKEND_ENV)):
            # what the ComfyUI loader's layers call on a CPU: the checks below in their cheapest form (a
            # FakeTensor under torch.compile is not ``torch.Tensor`` and takes the general path)
            return fb.cpu(x, bias, x.dtype) if path == "cpu" else fb(x, bias, x.dtype)
        fast = self.fast
        if fast and type(x) is torch.Tensor and not _compiling():
            # a call exactly like one already planned (same shapes, strides, dtypes, alignment, devices,
            # arguments and kernel environment): the checks below passed for it, so replay at once
            try:
                hit = fast.get(_fast_key(x, bias, path, out_dtype, lora))
            except (AttributeError, TypeError):  # not tensors where tensors go: the checks below say so
                hit = None
            if hit is not None and launch.no_launch_hooks():
                return hit[0](x, bias, lora, hit[1])
        if (self.kind is None or type(x) is not torch.Tensor or x.dtype not in _FLOAT_DTYPES
                or x.device != self.device or x.dim() < 1 or x.shape[-1] != self.k
                or (bias is not None and (bias.device != self.device or bias.shape != (self.n,)))
                or (out_dtype is not None and out_dtype not in _FLOAT_DTYPES) or _compiling()
                or (lora is not None and not self._lora_ok(x, lora))):
            if self.kind is not None and ((out_dtype is not None and out_dtype != x.dtype) or lora is not None):
                fn = int8_blockwise_linear if self.group else int8_linear
                extra = {"group_size": self.group} if self.group else {"convrot_groupsize": self.convrot}
                return fn(x, self.qw.qdata, self.qw.scale, bias, out_dtype=out_dtype, path=path, lora=lora, **extra)
            y = quantized_linear(x, self.qw, bias, path)
            return y.to(out_dtype) if out_dtype is not None else y
        out_dtype_in = out_dtype
        out_dtype = out_dtype or x.dtype
        fb = self.fallback
        if fb is not None and lora is None and resolve_backend(self.device) == "torch":
            p = dispatch.resolve_path(path, "block" if self.group else "row", x.numel() // max(self.k, 1),
                                      self.device, self.n * self.k, x.dtype)
            if p == "cpu":
                return fb.cpu(x, bias, out_dtype)
            if p == "dequant":
                return fb(x, bias, out_dtype)  # x with its leading dims: F.linear takes them as the float model does
        x2 = _as_rows(x, self.k)
        lora_in = lora
        if lora is not None:
            lora = (lora[0].reshape(-1, lora[0].shape[-1]), lora[1])
        plans = self.plans
        if plans is None:
            return self._run(x2, bias, path, out_dtype, lora).reshape(x.shape[:-1] + (self.n,))
        # launch plans (launch.LaunchPlan): the second call of a shape records its launches, and from
        # the third on they are replayed; the key holds everything the launches depend on
        key = (x2.shape[0], x2.dtype, x2.stride(0), x2.data_ptr() & 15,
               None if bias is None else (bias.dtype, bias.data_ptr() & 15), path, out_dtype, launch.env_state(),
               torch.cuda.current_device(),
               None if lora is None else (lora[0].shape[1], lora[0].data_ptr() & 15, lora[1].data_ptr() & 15))
        plan = plans.get(key)
        if plan.__class__ is launch.LaunchPlan and launch.no_launch_hooks():
            shape = x.shape[:-1] + (self.n,)
            if x2.data_ptr() == x.data_ptr() and type(bias) in (type(None), torch.Tensor) and (
                    lora is None or (type(lora[0]) is torch.Tensor and type(lora[1]) is torch.Tensor)):
                if len(self.fast) >= 512:
                    self.fast.clear()
                self.fast[_fast_key(x, bias, path, out_dtype_in, lora_in)] = (plan, shape)
            return plan(x2, bias, lora, shape)
        if plan is None:
            if len(plans) >= 512:  # many shapes (e.g. varying prompt lengths): start over
                plans.clear()
            plans[key] = False  # seen once: the first call compiles and tunes
        elif plan is False and launch.plans_enabled() and not torch.cuda.is_current_stream_capturing():
            with launch.record_launches() as rec:
                y = self._run(x2, bias, path, out_dtype, lora)
            plans[key] = self._checked_plan(rec, x2, y, bias, lora)
            return y.reshape(x.shape[:-1] + (self.n,))
        return self._run(x2, bias, path, out_dtype, lora).reshape(x.shape[:-1] + (self.n,))

    def _lora_ok(self, x: torch.Tensor, lora) -> bool:
        h, up = lora
        return (type(h) is torch.Tensor and type(up) is torch.Tensor and h.dtype == up.dtype == x.dtype
                and h.device == up.device == self.device and up.dim() == 2 and h.dim() == x.dim()
                and h.shape[:-1] == x.shape[:-1] and up.shape == (self.n, h.shape[-1]) and h.shape[-1] % 16 == 0
                and h.shape[-1] >= 16 and h.stride(-1) == 1 and up.is_contiguous()
                and (h.dim() == 1 or h.is_contiguous()))

    def _run(self, x2: torch.Tensor, bias: Optional[torch.Tensor], path: Optional[str],
             out_dtype: torch.dtype, lora=None) -> torch.Tensor:
        if self.group:
            return dispatch.int8_blockwise_linear_2d(x2, self.qdata, self.scale, bias, self.group, out_dtype, path,
                                                     None, lora)
        return dispatch.int8_linear_2d(x2, self.qdata, self.scale, bias, self.convrot, out_dtype, path, None, lora)

    @staticmethod
    def _checked_plan(rec, x2: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor], lora=None):
        """The recorded call's plan if replaying it gives the same bits (else ``True``: never plan this
        key; the call keeps the normal path)."""
        plan = rec.plan(x2, y, bias, lora)
        if plan is None:
            return True
        try:
            again = plan(x2, bias, lora)
        except TypeError:  # a launcher that does not take the recorded arguments: never plan this key
            return True
        return plan if torch.equal(again, y) else True


def prepare_linear(qw, device: Optional[torch.device] = None) -> PreparedLinear:
    """``PreparedLinear`` for ``qw`` on ``device`` (default: where its integers are)."""
    return PreparedLinear(qw, torch.device(device) if device is not None else qw.qdata.device)


def dequantize(qw, dtype: Optional[torch.dtype] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """The weight in its original space as ``dtype`` (default ``qw.orig_dtype``), computed as
    ``q.float() * scale`` (then un-rotated for convrot) and rounded once; Triton on CUDA."""
    dtype = dtype or qw.orig_dtype
    if qw.format == "int8_tensorwise":
        g = qw.params.convrot_groupsize if qw.params.convrot else 0
        args = (qw.qdata, qw.scale.float().reshape(-1), 0, g)
    elif qw.format == "int8_blockwise":
        args = (qw.qdata, qw.scale.float(), qw.params.group_size, 0)
    else:
        return qw.dequantize().to(dtype)
    if _compiling():
        return torch.ops.convert_to_quant.dequantize(*args, dtype, backend or "")
    return dispatch.dequantize_2d(*args, dtype, backend)
