"""The format interface (``QuantFormat``; see the package docstring), the stored weight
(``QuantizedWeight``), the int8 rounding and abs-max scale helpers, the registry and the ``comfy_quant``
JSON codec."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from ..errors import PlanError, SafetensorsFormatError, display_name

QMAX = 127  # symmetric int8 range [-127, 127]; -128 is never produced
SCALE_MIN = 1e-30  # an all-zero row/tile gets this scale (its integers are all 0)

# (key suffix, dtype, shape) of one tensor a format writes for a layer
TensorSpec = Tuple[str, torch.dtype, Tuple[int, ...]]


@dataclass
class QuantizedWeight:
    """A quantized linear weight as stored: integers, scale and any extra per-format tensors."""

    format: str
    params: Any
    qdata: torch.Tensor  # int8 [out, in] (float16 for the fp16 format)
    scale: Optional[torch.Tensor]  # float32, shape given by the format
    orig_dtype: torch.dtype = torch.bfloat16
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)  # suffix -> tensor

    @property
    def format_cls(self) -> Type["QuantFormat"]:
        return get_format(self.format)

    def dequantize(self) -> torch.Tensor:
        return self.format_cls.dequantize(self)


def round_to_int8(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties to even (``torch.round``), clamp to [-127, 127]. Never truncates."""
    return torch.round(x).clamp_(-QMAX, QMAX).to(torch.int8)


def _round_temp_to_int8(x: torch.Tensor) -> torch.Tensor:
    """``round_to_int8`` for a temporary the caller no longer needs (rounds in place: less memory)."""
    return x.round_().clamp_(-QMAX, QMAX).to(torch.int8)


def _absmax_scale(absmax: torch.Tensor) -> torch.Tensor:
    """abs-max / 127, never 0, and never so large that 127 · scale overflows float32: an abs-max of
    3.4028e38 (float32's largest value) would otherwise dequantize to Inf after the rounding of the
    division."""
    s = (absmax.float() / QMAX).clamp(min=SCALE_MIN)
    over = torch.isinf(s * QMAX) & torch.isfinite(s)
    if bool(over.any()):
        s = torch.where(over, torch.nextafter(s, torch.zeros_like(s)), s)
    return s


def check_scaling(fmt: str, scaling) -> None:
    """The rule of every row-or-tensor scaled format's ``Params``."""
    if scaling not in ("row", "tensor"):
        raise PlanError(f"{fmt} scaling must be 'row' or 'tensor', got {scaling!r}")


def row_or_tensor_scale_shape(shape, scaling: str) -> Tuple[int, ...]:
    return (shape[0], 1) if scaling == "row" else ()


def row_or_tensor_scale(ws: torch.Tensor, scaling: str) -> torch.Tensor:
    """Abs-max scale per output row (``[out, 1]``) or for the whole tensor (0-dim)."""
    if scaling == "row":
        return _absmax_scale(ws.abs().amax(dim=1, keepdim=True))
    return _absmax_scale(ws.abs().amax())


def expand_row_or_tensor_scale(scale: torch.Tensor, shape, scaling: str) -> torch.Tensor:
    """The per-element scale matrix of a row or tensor scale (a broadcast view, no copy)."""
    return scale.float().reshape(-1 if scaling == "row" else 1, 1).expand(shape)


class QuantFormat:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str]
    core_loadable: ClassVar[bool] = False  # does stock ComfyUI (comfy-kitchen) load it?
    on_grid: ClassVar[bool] = True  # values on a grid with scales (what optimizers choose); fp16: none
    storage_dtype: ClassVar[torch.dtype] = torch.int8  # dtype of the stored ``weight``
    # the nearest grid value of x (float32, in units of the scale); None: integers in [-127, 127]
    grid_round: ClassVar[Optional[Any]] = None
    description: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Params:
        pass

    # --- planning ---------------------------------------------------------------------------
    @classmethod
    def check_fits(cls, shape: Tuple[int, ...], params) -> Optional[str]:
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            return f"{cls.name} needs a non-empty 2-D weight, got shape {list(shape)}"
        return None

    @classmethod
    def scale_shape(cls, shape, params) -> Tuple[int, ...]:
        """Shape of ``weight_scale`` for a weight of ``shape``."""
        raise NotImplementedError

    @classmethod
    def extra_specs(cls, shape, params) -> List[TensorSpec]:
        """``(suffix, dtype, shape)`` of the per-format tensors written between ``weight_scale`` and
        ``comfy_quant`` (SmoothQuant's factors, QuIP's signs)."""
        return []

    @classmethod
    def output_spec(cls, base: str, shape, params, orig_dtype: torch.dtype) -> List[TensorSpec]:
        """The keys written for one layer: ``weight``, ``weight_scale``, the format's extra tensors, and
        the ``comfy_quant`` JSON."""
        return ([(f"{base}.weight", cls.storage_dtype, tuple(shape)),
                 (f"{base}.weight_scale", torch.float32, tuple(cls.scale_shape(shape, params)))]
                + [(f"{base}.{suffix}", dt, tuple(s)) for suffix, dt, s in cls.extra_specs(shape, params)]
                + [(f"{base}.comfy_quant", torch.uint8, (len(comfy_quant_bytes(cls.comfy_quant(params))),))])

    @classmethod
    def comfy_quant(cls, params) -> Optional[dict]:
        return {"format": cls.name}

    @classmethod
    def describe(cls, params) -> str:
        """Short name of format + parameters for plans and reports."""
        return cls.name

    @classmethod
    def rotated(cls, params) -> bool:
        """Do the stored values live in a rotated (Hadamard) space? (memory estimates, bf16 rotations,
        the overflow message)"""
        return False

    @classmethod
    def smaller_variants(cls, params) -> list:
        """Parameters of this format, in order, to try when a layer's shape does not fit ``params``
        (``formats.spec.fallback_chain``); none by default."""
        return []

    # --- runtime ----------------------------------------------------------------------------
    # ``linear(x, qw, bias, path=None, backend=None) -> y``: how a loader runs a layer of this format,
    # beside the format (``kernels.quantized_linear`` calls it for formats without a kernel of their own)
    linear: ClassVar[Optional[Any]] = None

    @classmethod
    def params_from_config(cls, cfg: dict, tensors: Dict[str, torch.Tensor]):
        return cls.Params()

    # --- numerics ---------------------------------------------------------------------------
    @classmethod
    def to_storage(cls, w: torch.Tensor, params) -> torch.Tensor:
        return w

    @classmethod
    def from_storage(cls, w: torch.Tensor, params) -> torch.Tensor:
        return w

    @classmethod
    def compute_scale(cls, w_storage: torch.Tensor, params) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def expand_scale(cls, scale: torch.Tensor, shape, params) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def pack(cls, q: torch.Tensor, scale: torch.Tensor, params, orig_dtype) -> QuantizedWeight:
        return QuantizedWeight(cls.name, params, q.to(torch.int8).contiguous(),
                               scale.float().contiguous(), orig_dtype)

    @classmethod
    def round_storage(cls, x: torch.Tensor) -> torch.Tensor:
        """Values on the format's grid, nearest (ties to even), from storage-space ``x / S``, in the
        stored dtype."""
        return round_to_int8(x)

    @classmethod
    def grid_values(cls, x: torch.Tensor) -> torch.Tensor:
        """The nearest grid values of ``x`` as float32 (int8: ``round`` then clamp to ±127)."""
        if cls.grid_round is None:
            return torch.round(x).clamp_(-QMAX, QMAX)
        return cls.grid_round(x)

    @classmethod
    def quantize(cls, w: torch.Tensor, params, orig_dtype: Optional[torch.dtype] = None) -> QuantizedWeight:
        """Round-to-nearest quantization of a float weight (any dtype; computed in float32)."""
        orig_dtype = orig_dtype or w.dtype
        ws = cls.to_storage(w.float(), params)
        scale = cls.compute_scale(ws, params)
        q = _round_temp_to_int8(ws / cls.expand_scale(scale, ws.shape, params))
        return cls.pack(q, scale, params, orig_dtype)

    @classmethod
    def dequantize_storage(cls, qw: QuantizedWeight) -> torch.Tensor:
        return qw.qdata.float() * cls.expand_scale(qw.scale.float(), qw.qdata.shape, qw.params)

    @classmethod
    def dequantize(cls, qw: QuantizedWeight) -> torch.Tensor:
        """float32 weight in the original space, computed the way the loader computes it."""
        return cls.from_storage(cls.dequantize_storage(qw), qw.params)

    @classmethod
    def tensors(cls, base: str, qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
        out = {f"{base}.weight": qw.qdata, f"{base}.weight_scale": qw.scale}
        for suffix, t in qw.extra.items():
            out[f"{base}.{suffix}"] = t
        cfg = cls.comfy_quant(qw.params)
        if cfg is not None:
            out[f"{base}.comfy_quant"] = comfy_quant_tensor(cfg)
        return out


class RowOrTensorScaled(QuantFormat):
    """Formats with one float32 scale per output row (``[out, 1]``) or per tensor (``[]``), chosen by
    ``params.scaling`` (checked by ``check_scaling`` in their ``Params``)."""

    @classmethod
    def scale_shape(cls, shape, params):
        return row_or_tensor_scale_shape(shape, params.scaling)

    @classmethod
    def compute_scale(cls, ws, params):
        return row_or_tensor_scale(ws, params.scaling)

    @classmethod
    def expand_scale(cls, scale, shape, params):
        return expand_row_or_tensor_scale(scale, shape, params.scaling)


# ----------------------------------------------------------------------------------------------
# registry (filled by ``formats/__init__.py``, one explicit list)
# ----------------------------------------------------------------------------------------------
FORMATS: Dict[str, Type[QuantFormat]] = {}


def register_format(cls: Type[QuantFormat]) -> Type[QuantFormat]:
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise ValueError(f"format {cls.name!r} registered twice")
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str) -> Type[QuantFormat]:
    try:
        return FORMATS[name]
    except KeyError:
        raise PlanError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None


# ----------------------------------------------------------------------------------------------
# comfy_quant JSON <-> tensor
# ----------------------------------------------------------------------------------------------
def comfy_quant_bytes(cfg: dict) -> bytes:
    return json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode("utf-8")


def comfy_quant_tensor(cfg: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(comfy_quant_bytes(cfg)), dtype=torch.uint8).clone()


def parse_comfy_quant(t: torch.Tensor, where: str = "") -> dict:
    """Decode a ``<base>.comfy_quant`` uint8 tensor; a clear error if it is not a JSON object."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise SafetensorsFormatError(f"{where}: comfy_quant must be a 1-D uint8 tensor, "
                                     f"got {t.dtype} {list(t.shape)}")
    try:
        cfg = json.loads(bytes(t.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsFormatError(f"{where}: comfy_quant is not valid UTF-8 JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("format"), str):
        raise SafetensorsFormatError(f"{where}: comfy_quant JSON must be an object with a 'format' string")
    return cfg


def quantized_weight_from_tensors(base: str, cfg: dict, tensors: Dict[str, torch.Tensor],
                                  orig_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Rebuild a QuantizedWeight from a layer's stored tensors (suffix -> tensor, without base)."""
    cls = get_format(cfg["format"])
    if "weight" not in tensors or "weight_scale" not in tensors:
        raise SafetensorsFormatError(f"{display_name(base)}: quantized layer needs weight and weight_scale tensors")
    params = cls.params_from_config(cfg, tensors)
    q, scale = tensors["weight"], tensors["weight_scale"]
    if q.dtype != cls.storage_dtype or q.dim() != 2:
        want = str(cls.storage_dtype).replace("torch.", "")
        raise SafetensorsFormatError(f"{display_name(base + '.weight')}: expected a 2-D {want} tensor, got {q.dtype} {list(q.shape)}")
    expected = {spec[0][len(base) + 1:]: spec for spec in cls.output_spec(base, tuple(q.shape), params, orig_dtype)}
    want = expected.get("weight_scale")
    if want is not None and tuple(scale.shape) != tuple(want[2]):
        raise SafetensorsFormatError(f"{display_name(base + '.weight_scale')}: shape {list(scale.shape)} does not fit "
                                     f"{cfg['format']} weight {list(q.shape)} (expected {list(want[2])})")
    reason = cls.check_fits(tuple(q.shape), params)
    if reason:
        raise SafetensorsFormatError(f"{display_name(base)}: {reason}")
    extra = {k: v for k, v in tensors.items() if k not in ("weight", "weight_scale", "comfy_quant", "bias")}
    return QuantizedWeight(cls.name, params, q, scale.float(), orig_dtype, extra)
