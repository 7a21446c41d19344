"""FP8 checkpoints as *input*: the one place that decides what an input tensor means.

ComfyUI's common downloads store linear weights in 8-bit float. Two layouts are understood:

* **scaled fp8** (ComfyUI ``scaled_fp8_ops``): ``<layer>.weight`` in ``float8_e4m3fn`` / ``float8_e5m2``,
  ``<layer>.scale_weight`` a float32 scalar, optionally ``<layer>.scale_input`` (the activation scale
  of the fp8 matmul), and a marker tensor ``scaled_fp8`` (any prefix, e.g.
  ``model.diffusion_model.scaled_fp8``). The weight means ``weight.float() * scale_weight``; ComfyUI's
  scaled Linear applies ``scale_weight`` to whatever weight it loads, so a float weight next to a
  ``scale_weight`` is scaled the same way.
* **core comfy_quant fp8** (ComfyUI ``QUANT_ALGOS``, comfy-kitchen ``TensorCoreFP8Layout``):
  ``<layer>.comfy_quant`` (or ``__metadata__["_quantization_metadata"]``) with format
  ``float8_e4m3fn`` / ``float8_e5m2``, ``<layer>.weight`` of that dtype, ``<layer>.weight_scale`` a
  float32 scalar, optionally ``<layer>.input_scale``. The weight means ``weight.float() * weight_scale``.

A plain fp8 tensor without any scale in a file without the marker (e.g. ``flux1-dev-fp8``) means
``tensor.float()`` (ComfyUI casts it as it is).

``InputView`` wraps a ``SafetensorsReader`` and shows the file as the float model it stands for:
dequantized tensors are listed as ``BF16`` (``DEQUANT_DTYPE``: the dtype ComfyUI computes these models
in, with float32's exponent range so a scaled value never overflows as it could in fp16) and ``get``
returns them in **float32** (``fp8.float() * scale`` computed in float32), so a layer to quantize starts
from, and its SQNR is measured against, exactly what the fp8 file means; a kept tensor is written as
BF16. The scale keys, ``comfy_quant`` tensors, the ``scaled_fp8`` marker and the input's
``_quantization_metadata`` are consumed, never copied. Anything else quantized (our own int8 files,
an unknown comfy_quant format, bitsandbytes/GPTQ-style packed weights, integer ``.weight`` tensors, an
fp8 weight whose layout needs a scale it lacks) is refused with ``UnsupportedInputError`` naming the
tensor. The pipeline (one process and every rank of a multi-GPU run, through ``ConversionJob``), the
CLI's ``--dry-run`` and the node's inspection all read inputs through ``open_input`` / ``InputView``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ConvertError, SafetensorsFormatError, UnsupportedInputError, display_name
from .safetensors_io import DTYPES, FLOAT_DTYPES, SafetensorsReader, TensorIndex, TensorInfo, itemsize

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}  # comfy_quant format -> dtype
DEQUANT_DTYPE = "BF16"
MARKER = "scaled_fp8"
# tensor-name endings of packed / integer-quantized layouts this converter cannot read
# (bitsandbytes nf4/fp4/int8, GPTQ/AWQ, ...)
PACKED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".qweight",
                   ".qzeros", ".g_idx")
INTEGER_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64")


@dataclass(frozen=True)
class Dequant:
    """How one input tensor becomes float: ``raw`` (its key) times ``scale`` (a key, or None for 1)."""
    key: str
    raw_dtype: str
    scale_key: Optional[str]
    out_dtype: str
    layout: str  # "scaled fp8", "comfy_quant float8_e4m3fn", "fp8 (no scale)"

    def describe(self) -> str:
        how = f" x {self.scale_key.rsplit('.', 1)[-1]}" if self.scale_key else ""
        return f"{self.raw_dtype}{how} ({self.layout}) dequantized to {self.out_dtype}"


def _already(path: str, detail: str) -> UnsupportedInputError:
    return UnsupportedInputError(f"{path} is already quantized ({detail}); only float8_e4m3fn / float8_e5m2 "
                                 "layers (ComfyUI scaled fp8 or comfy_quant fp8) are read as input: convert "
                                 "the original float model instead")


def _scalar_scale(reader: SafetensorsReader, key: str, of: str) -> float:
    info = reader.info(key)
    if info.dtype_name not in FLOAT_DTYPES or info.numel != 1:
        raise UnsupportedInputError(f"{reader.path}: {display_name(key)} (the scale of {display_name(of)}) must be "
                                    f"one float number, got {info.dtype_name} {list(info.shape)}; per-channel or "
                                    "block scales are not a layout this converter reads")
    v = float(reader.get(key).double().reshape(()))
    if not (v == v and abs(v) != float("inf")) or v == 0.0:
        raise UnsupportedInputError(f"{reader.path}: {display_name(key)} (the scale of {display_name(of)}) is "
                                    f"{v!r}; a usable scale is a finite non-zero number")
    return v


def analyse(reader: SafetensorsReader) -> Tuple[Dict[str, Dequant], set, List[str]]:
    """``(dequantized tensors by key, consumed keys, notes)`` for ``reader``'s file; raises
    ``UnsupportedInputError`` for anything quantized that is not understood (see the module doc)."""
    path, infos = reader.path, reader.infos
    consumed: set = set()
    deq: Dict[str, Dequant] = {}
    markers = [k for k in infos if k == MARKER or k.endswith("." + MARKER)]
    consumed.update(markers)

    # comfy_quant: our own formats and unknown ones are refused; fp8 ones are read
    cfgs: Dict[str, dict] = {}
    if "_quantization_metadata" in reader.metadata or any(k.endswith(".comfy_quant") for k in infos):
        from .loading import quant_layer_configs
        try:
            cfgs = quant_layer_configs(reader)
        except SafetensorsFormatError as e:
            raise _already(path, f"its comfy_quant metadata cannot be read: {e}") from None
        for base, cfg in cfgs.items():
            fmt = cfg["format"]
            wkey = base + ".weight"
            if fmt not in FP8_FORMATS:
                raise _already(path, f"layer {display_name(base)} has comfy_quant format {fmt!r:.80}")
            if wkey not in infos or infos[wkey].dtype_name != FP8_FORMATS[fmt]:
                got = f"{infos[wkey].dtype_name} {list(infos[wkey].shape)}" if wkey in infos else "no such tensor"
                raise UnsupportedInputError(f"{path}: {display_name(wkey)}: comfy_quant format {fmt} needs a "
                                            f"{FP8_FORMATS[fmt]} weight, got {got}")
            skey = base + ".weight_scale"
            if skey not in infos:
                raise UnsupportedInputError(f"{path}: {display_name(wkey)} is comfy_quant {fmt} but has no "
                                            f"{display_name(skey)}; its scale is needed to read it")
            _scalar_scale(reader, skey, wkey)
            deq[wkey] = Dequant(wkey, FP8_FORMATS[fmt], skey, DEQUANT_DTYPE, f"comfy_quant {fmt}")
            consumed.update(k for k in (base + ".comfy_quant", skey, base + ".input_scale") if k in infos)
        if "_quantization_metadata" in reader.metadata and not cfgs:
            raise _already(path, "its _quantization_metadata lists no layer")

    for key, info in infos.items():
        if key in consumed or key in deq:
            continue
        if key.endswith(PACKED_SUFFIXES) or ".quant_state." in key:
            raise UnsupportedInputError(f"{path}: {display_name(key)} belongs to a packed quantized layout "
                                        "(bitsandbytes / GPTQ / AWQ style); this converter reads float and fp8 "
                                        "models only: convert the original float model")
        if key.endswith(".scale_input"):
            consumed.add(key)
            continue
        if key.endswith(".scale_weight"):
            wkey = key[: -len(".scale_weight")] + ".weight"
            if wkey not in infos:
                raise UnsupportedInputError(f"{path}: {display_name(key)} is a scale_weight without the weight "
                                            f"{display_name(wkey)} it scales")
            continue  # read with its weight
        if not key.endswith(".weight"):
            if info.dtype_name in FP8_DTYPES:  # an fp8 bias/norm: ComfyUI casts it unscaled
                deq[key] = Dequant(key, info.dtype_name, None, DEQUANT_DTYPE, "fp8 (no scale)")
            continue
        base = key[: -len(".weight")]
        skey = base + ".scale_weight"
        if info.dtype_name in INTEGER_DTYPES and len(info.shape) >= 2:
            raise UnsupportedInputError(f"{path}: {display_name(key)} is an integer ({info.dtype_name}) weight "
                                        f"without a comfy_quant config: a packed or integer-quantized layout "
                                        "(int4 / nf4 / GGUF-style) this converter cannot read")
        if skey in infos:
            if info.dtype_name not in FP8_DTYPES + FLOAT_DTYPES:
                raise UnsupportedInputError(f"{path}: {display_name(skey)} scales {display_name(key)}, which is "
                                            f"{info.dtype_name}, not a float weight")
            _scalar_scale(reader, skey, key)
            out = DEQUANT_DTYPE if info.dtype_name in FP8_DTYPES else info.dtype_name
            deq[key] = Dequant(key, info.dtype_name, skey, out, "scaled fp8")
            consumed.add(skey)
        elif info.dtype_name in FP8_DTYPES:
            if (base + ".weight_scale") in infos:
                raise UnsupportedInputError(f"{path}: {display_name(key)} is {info.dtype_name} with a "
                                            f"{display_name(base + '.weight_scale')} but no comfy_quant config: "
                                            "an fp8 layout this converter does not know how to read")
            if markers:
                raise UnsupportedInputError(f"{path}: {display_name(key)} is a {info.dtype_name} weight without "
                                            f"{display_name(skey)}, but the file is ComfyUI scaled fp8 (it has "
                                            f"the {display_name(markers[0])} marker), whose weights need their "
                                            "scale; refusing to guess it")
            deq[key] = Dequant(key, info.dtype_name, None, DEQUANT_DTYPE, "fp8 (no scale)")
    notes = []
    fp8 = [d for d in deq.values() if d.raw_dtype in FP8_DTYPES]
    if deq:
        layouts = sorted({d.layout for d in fp8})
        notes.append(f"input: {len(fp8)} fp8 tensor(s) ({', '.join(layouts) or 'none'}) dequantized (scales "
                     f"applied in float32) to {DEQUANT_DTYPE}: layers to quantize start from, and are measured "
                     f"against, the float32 dequantized weights; kept ones are written as {DEQUANT_DTYPE}; "
                     f"{len(consumed)} scale/marker tensor(s) consumed, not copied")
    return deq, consumed, notes


class InputView(TensorIndex):
    """A ``SafetensorsReader`` seen as the float model the file stands for (see the module doc).
    ``infos`` / ``info`` / ``keys`` / ``get`` / ``metadata`` are the logical ones; a dequantized tensor's
    ``TensorInfo`` has its output dtype and that dtype's size (``begin`` kept, for file order)."""

    def __init__(self, reader: SafetensorsReader):
        self.raw = reader
        self.path = reader.path
        self.dequant, self.consumed, self.notes = analyse(reader)
        self.infos: Dict[str, TensorInfo] = {}
        for k, info in reader.infos.items():
            if k in self.consumed:
                continue
            d = self.dequant.get(k)
            if d is not None:
                info = TensorInfo(k, d.out_dtype, info.shape, info.begin,
                                  info.begin + info.numel * itemsize(DTYPES[d.out_dtype]))
            self.infos[k] = info
        self.metadata = dict(reader.metadata)
        if any(d.layout.startswith("comfy_quant") for d in self.dequant.values()):
            self.metadata.pop("_quantization_metadata", None)  # described the fp8 input, not the output

    def transformed(self, key: str) -> bool:
        """True when ``get(key)`` is not the file's bytes (it cannot be copied as a byte stream)."""
        return key in self.dequant

    def source(self, key: str) -> Optional[str]:
        d = self.dequant.get(key)
        return d.describe() if d is not None else None

    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        d = self.dequant.get(key)
        if d is None:
            return self.raw.get(key, pin=pin)
        w = self.raw.get(d.key).to(torch.float32)
        if d.scale_key is not None:
            w.mul_(self.raw.get(d.scale_key).to(torch.float32).reshape(()))
        if pin:
            out = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
            out.copy_(w)
            return out
        return w

    def iter_chunks(self, key: str, chunk_bytes: int = 64 << 20):
        if key in self.dequant:
            raise ConvertError(f"internal error: {display_name(key)} is dequantized on reading; it cannot be "
                               "copied as bytes")
        return self.raw.iter_chunks(key, chunk_bytes)

    def close(self):
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_input(path: str) -> InputView:
    """Open a model to convert: the file's float view, or ``UnsupportedInputError`` (see the module doc)."""
    reader = SafetensorsReader(path)
    try:
        return InputView(reader)
    except BaseException:
        reader.close()
        raise
