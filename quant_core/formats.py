"""The on-disk formats: one class per format, one registry (``FORMATS``).

Every format follows FORMATS.md (the contract with ComfyUI / comfy-kitchen). A format class is a
namespace of classmethods around a frozen ``Params`` dataclass, like comfy-kitchen's layouts:

* ``check_fits(shape, params)`` -> ``None`` or the reason this layer cannot use the format;
* ``to_storage(w, params)`` / ``from_storage(w, params)``: the space the integers live in (the
  convrot rotation; identity otherwise);
* ``compute_scale(w_storage, params)``: the round-to-nearest scale from the weight's abs-max;
* ``expand_scale(scale, shape, params)``: the per-element scale matrix ``S`` with
  ``W_storage ≈ q * S`` -- what optimizers need to choose integers themselves;
* ``pack(q, scale, params, orig_dtype)``: a ``QuantizedWeight`` from integers and scales;
* ``quantize(w, params)``: round-to-nearest (ties to even, as ``torch.round``), clamp to ±127;
* ``dequantize(qw)``: float32 in the original space, exactly as a loader computes it;
* ``output_spec(base, shape, params, orig_dtype)`` and ``tensors(base, qw)``: the keys written;
* ``comfy_quant(params)`` / ``params_from_config(cfg, tensors)``: the per-layer JSON and back.

Optimizers only ever talk to formats through this interface, so adding a format never touches them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from .errors import PlanError, SafetensorsFormatError, display_name
from .hadamard import CONVROT_GROUP_SIZES, is_power_of_4, rotate_groups_exact

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
    def output_spec(cls, base: str, shape, params, orig_dtype: torch.dtype) -> List[TensorSpec]:
        raise NotImplementedError

    @classmethod
    def comfy_quant(cls, params) -> Optional[dict]:
        return None

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


# ----------------------------------------------------------------------------------------------
# int8_tensorwise: tensor scale, per-row ("axis") scale, and per-row + convrot
# ----------------------------------------------------------------------------------------------
class Int8Tensorwise(QuantFormat):
    name = "int8_tensorwise"
    core_loadable = True
    description = ("int8 weights, float32 scale per tensor or per output row, optional regular-"
                   "Hadamard rotation (convrot); W8A8 with per-token activation scales at runtime")

    @dataclass(frozen=True)
    class Params:
        scaling: str = "row"  # "row" ([out,1] scale) or "tensor" (0-dim scale)
        convrot: bool = False
        convrot_groupsize: int = 256

        def __post_init__(self):
            if self.scaling not in ("row", "tensor"):
                raise PlanError(f"int8_tensorwise scaling must be 'row' or 'tensor', got {self.scaling!r}")
            if self.convrot:
                if self.scaling != "row":
                    raise PlanError("convrot needs per-row scaling (--scaling_mode axis); "
                                    "tensor scaling with convrot is not a core format")
                # only the sizes stock ComfyUI loads (a power of 4 as large as 65536 would build a 34 GB matrix)
                if isinstance(self.convrot_groupsize, bool) or self.convrot_groupsize not in CONVROT_GROUP_SIZES:
                    raise PlanError("convrot group size must be one of "
                                    f"{', '.join(map(str, CONVROT_GROUP_SIZES))}, got {self.convrot_groupsize!r}")

    @classmethod
    def check_fits(cls, shape, params) -> Optional[str]:
        reason = super().check_fits(shape, params)
        if reason is None and params.convrot and shape[1] % params.convrot_groupsize:
            reason = (f"in_features {shape[1]} is not divisible by convrot group "
                      f"{params.convrot_groupsize}")
        return reason

    @classmethod
    def output_spec(cls, base, shape, params, orig_dtype):
        scale_shape = (shape[0], 1) if params.scaling == "row" else ()
        return [(f"{base}.weight", torch.int8, tuple(shape)),
                (f"{base}.weight_scale", torch.float32, scale_shape),
                (f"{base}.comfy_quant", torch.uint8, (len(comfy_quant_bytes(cls.comfy_quant(params))),))]

    @classmethod
    def comfy_quant(cls, params):
        cfg = {"format": cls.name}
        if params.convrot:
            cfg["convrot"] = True
            cfg["convrot_groupsize"] = params.convrot_groupsize
        return cfg

    @classmethod
    def params_from_config(cls, cfg, tensors):
        scale = tensors.get("weight_scale")
        scaling = "tensor" if scale is not None and scale.numel() == 1 and scale.dim() == 0 else "row"
        return cls.Params(scaling=scaling, convrot=bool(cfg.get("convrot", False)),
                          convrot_groupsize=int(cfg.get("convrot_groupsize", 256)))

    @classmethod
    def to_storage(cls, w, params):
        return rotate_groups_exact(w, params.convrot_groupsize) if params.convrot else w

    @classmethod
    def from_storage(cls, w, params):
        return rotate_groups_exact(w, params.convrot_groupsize) if params.convrot else w

    @classmethod
    def compute_scale(cls, ws, params):
        return row_or_tensor_scale(ws, params.scaling)

    @classmethod
    def expand_scale(cls, scale, shape, params):
        return expand_row_or_tensor_scale(scale, shape, params.scaling)


# ----------------------------------------------------------------------------------------------
# int8_blockwise: one scale per 128x128 tile (our loader only)
# ----------------------------------------------------------------------------------------------
class Int8Blockwise(QuantFormat):
    name = "int8_blockwise"
    core_loadable = False
    description = ("int8 weights, float32 scale per group_size x group_size tile; W8A8 with per-token "
                   "per-K-block activation scales in our kernels (stock ComfyUI refuses it)")

    @dataclass(frozen=True)
    class Params:
        group_size: int = 128

        def __post_init__(self):
            if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size % 16 \
                    or self.group_size > 4096:
                raise PlanError("int8_blockwise group_size must be a multiple of 16 between 16 and 4096, "
                                f"got {self.group_size}")

    @classmethod
    def check_fits(cls, shape, params):
        reason = super().check_fits(shape, params)
        if reason is None and shape[1] % params.group_size:
            reason = f"in_features {shape[1]} is not divisible by block size {params.group_size}"
        return reason

    @classmethod
    def scale_shape(cls, shape, params):
        g = params.group_size
        return (math.ceil(shape[0] / g), math.ceil(shape[1] / g))

    @classmethod
    def output_spec(cls, base, shape, params, orig_dtype):
        return [(f"{base}.weight", torch.int8, tuple(shape)),
                (f"{base}.weight_scale", torch.float32, cls.scale_shape(shape, params)),
                (f"{base}.comfy_quant", torch.uint8, (len(comfy_quant_bytes(cls.comfy_quant(params))),))]

    @classmethod
    def comfy_quant(cls, params):
        return {"format": cls.name, "group_size": params.group_size}

    @classmethod
    def params_from_config(cls, cfg, tensors):
        return cls.Params(group_size=int(cfg.get("group_size", 128)))

    @staticmethod
    def _tile_view(x: torch.Tensor, g: int) -> torch.Tensor:
        """[out, in] -> [ceil(out/g), g, in/g, g] (rows zero-padded only when out is ragged)."""
        out, inn = x.shape
        pad = (-out) % g
        if pad:
            x = torch.cat([x, x.new_zeros(pad, inn)], 0)
        return x.reshape(-1, g, inn // g, g)

    @classmethod
    def compute_scale(cls, ws, params):
        tiles = cls._tile_view(ws, params.group_size)
        return _absmax_scale(tiles.abs().amax(dim=(1, 3)))

    @classmethod
    def expand_scale(cls, scale, shape, params):
        g = params.group_size
        s = scale.float().repeat_interleave(g, 0).repeat_interleave(g, 1)
        return s[: shape[0], : shape[1]]

    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        # same numbers as the generic path, without materializing the per-element scale matrix
        orig_dtype = orig_dtype or w.dtype
        g = params.group_size
        ws = w.float()
        tiles = cls._tile_view(ws, g)
        scale = _absmax_scale(tiles.abs().amax(dim=(1, 3)))
        q = _round_temp_to_int8(tiles / scale[:, None, :, None]).reshape(-1, ws.shape[1])[: ws.shape[0]]
        return cls.pack(q, scale, params, orig_dtype)

    @classmethod
    def dequantize_storage(cls, qw):
        g = qw.params.group_size
        tiles = cls._tile_view(qw.qdata, g).float()
        return tiles.mul_(qw.scale.float()[:, None, :, None]).reshape(-1, qw.qdata.shape[1])[: qw.qdata.shape[0]]


# ----------------------------------------------------------------------------------------------
# fp16: plain float16, no comfy_quant keys
# ----------------------------------------------------------------------------------------------
class FP16(QuantFormat):
    name = "fp16"
    core_loadable = True
    description = "plain float16 weight (no quantization metadata)"

    @classmethod
    def output_spec(cls, base, shape, params, orig_dtype):
        return [(f"{base}.weight", torch.float16, tuple(shape))]

    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        w16 = w.float().clamp(-65504.0, 65504.0).to(torch.float16)
        return QuantizedWeight(cls.name, params, w16.contiguous(), None, orig_dtype or w.dtype)

    @classmethod
    def dequantize(cls, qw):
        return qw.qdata.float()

    @classmethod
    def tensors(cls, base, qw):
        return {f"{base}.weight": qw.qdata}


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
FORMATS: Dict[str, Type[QuantFormat]] = {}


def register_format(cls: Type[QuantFormat]) -> Type[QuantFormat]:
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise ValueError(f"format {cls.name!r} registered twice")
    FORMATS[cls.name] = cls
    return cls


for _cls in (Int8Tensorwise, Int8Blockwise, FP16):
    register_format(_cls)


def get_format(name: str) -> Type[QuantFormat]:
    try:
        return FORMATS[name]
    except KeyError:
        raise PlanError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None


@dataclass(frozen=True)
class FormatSpec:
    """A format plus its parameters: what the plan assigns to a layer."""

    format: str
    params: Any

    @property
    def cls(self) -> Type[QuantFormat]:
        return get_format(self.format)

    def describe(self) -> str:
        if self.format == Int8Tensorwise.name:
            p = self.params
            s = f"int8_tensorwise/{p.scaling}"
            return s + (f"+convrot{p.convrot_groupsize}" if p.convrot else "")
        if self.format == Int8Blockwise.name:
            return f"int8_blockwise/{self.params.group_size}"
        return self.format

    def replace(self, **changes) -> "FormatSpec":
        return FormatSpec(self.format, dataclasses.replace(self.params, **changes))


def make_spec(format: str = "int8_tensorwise", scaling_mode: str = "axis", block_size: int = 128,
              convrot: bool = False, convrot_groupsize: int = 256) -> FormatSpec:
    """Build a FormatSpec from the CLI's vocabulary.

    ``format``: int8 | int8_tensorwise | int8_blockwise | fp16 (or any registered name);
    ``scaling_mode``: tensor | axis | block (block selects int8_blockwise).
    """
    fmt = {"int8": Int8Tensorwise.name}.get(format, format)
    if fmt == Int8Tensorwise.name and scaling_mode == "block":
        fmt = Int8Blockwise.name
    if fmt == Int8Tensorwise.name:
        if scaling_mode not in ("tensor", "axis", "row"):
            raise PlanError(f"unknown scaling mode {scaling_mode!r} (tensor, axis, block)")
        return FormatSpec(fmt, Int8Tensorwise.Params(
            scaling="tensor" if scaling_mode == "tensor" else "row",
            convrot=convrot, convrot_groupsize=convrot_groupsize))
    if convrot:
        raise PlanError(f"--convrot is only available with int8_tensorwise per-row scaling, not {fmt}")
    if fmt == Int8Blockwise.name:
        return FormatSpec(fmt, Int8Blockwise.Params(group_size=block_size))
    cls = get_format(fmt)
    return FormatSpec(fmt, cls.Params())


def fallback_chain(spec: FormatSpec) -> List[FormatSpec]:
    """Formats to try, in order, when a layer's shape does not fit ``spec``.

    convrot g -> convrot with the next smaller power-of-4 group -> per-row int8 -> fp16;
    blockwise -> per-row int8 -> fp16.
    """
    chain = [spec]
    if spec.format == Int8Tensorwise.name and spec.params.convrot:
        g = spec.params.convrot_groupsize // 4
        while g >= 16:
            chain.append(spec.replace(convrot_groupsize=g))
            g //= 4
        chain.append(spec.replace(convrot=False))
    elif spec.format != Int8Tensorwise.name and spec.format != FP16.name:
        chain.append(FormatSpec(Int8Tensorwise.name, Int8Tensorwise.Params()))
    if spec.format != FP16.name:
        chain.append(FormatSpec(FP16.name, FP16.Params()))
    return chain


def resolve_fit(spec: FormatSpec, shape) -> Tuple[Optional[FormatSpec], Optional[str]]:
    """First format of the fallback chain that fits ``shape``; with the reason the asked one did not."""
    first_reason = spec.cls.check_fits(tuple(shape), spec.params)
    if first_reason is None:
        return spec, None
    for cand in fallback_chain(spec)[1:]:
        if cand.cls.check_fits(tuple(shape), cand.params) is None:
            return cand, first_reason
    return None, first_reason


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
    if q.dtype != torch.int8 or q.dim() != 2:
        raise SafetensorsFormatError(f"{display_name(base + '.weight')}: expected a 2-D int8 tensor, got {q.dtype} {list(q.shape)}")
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


# formats that carry extra runtime tensors (SmoothQuant factors, QuIP sign vectors): registered here so
# that importing the registry always knows every format
from . import formats_extra  # noqa: E402,F401
