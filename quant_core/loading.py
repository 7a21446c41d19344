"""Reading quantized files back the way a loader does (plain torch; the ComfyUI loader builds on this).

``read_quantized_layers`` groups a file's tensors per layer using the per-layer ``comfy_quant``
tensors, checks they agree with ``__metadata__["_quantization_metadata"]`` (ComfyUI lets the header
override the tensors, so a disagreement would load differently in ComfyUI than here), and rebuilds each
layer's ``QuantizedWeight``.
"""
from __future__ import annotations

import json
from typing import Dict, Tuple

import torch

from .errors import ConvertError, SafetensorsFormatError, display_name
from .formats import QuantizedWeight, parse_comfy_quant, quantized_weight_from_tensors
from .safetensors_io import SafetensorsReader


def quant_layer_configs(reader: SafetensorsReader) -> Dict[str, dict]:
    """``{base: comfy_quant JSON}`` from the per-layer tensors, checked against the header metadata."""
    cfgs: Dict[str, dict] = {}
    for key in reader.keys():
        if key.endswith(".comfy_quant"):
            base = key[: -len(".comfy_quant")]
            cfgs[base] = parse_comfy_quant(reader.get(key), where=f"{reader.path}: {display_name(key)}")
    raw = reader.metadata.get("_quantization_metadata")
    if raw is not None:
        try:
            meta = json.loads(raw)
            layers = meta["layers"]
            if not isinstance(layers, dict):
                raise TypeError("layers is not an object")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise SafetensorsFormatError(f"{reader.path}: __metadata__['_quantization_metadata'] is not "
                                         f"valid ({e})") from None
        for base, cfg in layers.items():
            if not isinstance(cfg, dict) or not isinstance(cfg.get("format"), str):
                raise SafetensorsFormatError(f"{reader.path}: _quantization_metadata layer {base!r} must be an "
                                             f"object with a 'format' string, got {cfg!r:.200}")
            if base not in cfgs:
                # ComfyUI would synthesize the tensor from the header; accept the header's word
                cfgs[base] = cfg
            elif cfgs[base] != cfg:
                raise SafetensorsFormatError(
                    f"{reader.path}: layer {display_name(base)}: comfy_quant tensor {cfgs[base]} disagrees with "
                    f"_quantization_metadata {cfg}")
    return cfgs


def read_layer(reader: SafetensorsReader, base: str, cfg: dict, orig_dtype: torch.dtype = torch.bfloat16
               ) -> Tuple[QuantizedWeight, Dict[str, torch.Tensor]]:
    """One quantized layer as a loader rebuilds it: (QuantizedWeight, its stored tensors by suffix).
    A comfy_quant config that does not fit the tensors is a format error naming the file and layer."""
    prefix = base + "."
    parts = {k[len(prefix):]: reader.get(k) for k in reader.keys()
             if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] != "bias"}
    try:
        return quantized_weight_from_tensors(base, cfg, parts, orig_dtype), parts
    except SafetensorsFormatError as e:
        raise SafetensorsFormatError(f"{reader.path}: {e}") from None
    except (ConvertError, TypeError, ValueError) as e:  # unknown format, group_size "abc", ...
        raise SafetensorsFormatError(f"{reader.path}: layer {display_name(base)}: comfy_quant {cfg!r:.200} is not "
                                     f"usable ({e})") from None


def read_quantized_layers(reader: SafetensorsReader, orig_dtype: torch.dtype = torch.bfloat16
                          ) -> Tuple[Dict[str, QuantizedWeight], Dict[str, torch.Tensor]]:
    """(quantized layers by base, every other tensor by key)."""
    cfgs = quant_layer_configs(reader)
    layers: Dict[str, QuantizedWeight] = {}
    used = set()
    for base, cfg in cfgs.items():
        layers[base], parts = read_layer(reader, base, cfg, orig_dtype)
        used.update(base + "." + p for p in parts)
    others = {k: reader.get(k) for k in reader.keys() if k not in used}
    return layers, others


def load_quantized_file(path: str, orig_dtype: torch.dtype = torch.float32
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, QuantizedWeight]]:
    """(state dict with every quantized weight dequantized to float32, the quantized layers)."""
    with SafetensorsReader(path) as r:
        layers, others = read_quantized_layers(r, orig_dtype)
    sd = dict(others)
    for base, qw in layers.items():
        sd[base + ".weight"] = qw.dequantize()
    return sd, layers


class QuantLinear(torch.nn.Module):
    """A Linear computing with a stored QuantizedWeight through our kernels (per-token int8
    activations for int8 formats, i.e. W8A8 as the runtime does)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor = None, path: str = None):
        super().__init__()
        self.qw = qw
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.path = path
        self.in_features = qw.qdata.shape[1]
        self.out_features = qw.qdata.shape[0]

    def forward(self, x):
        from ..kernels import quantized_linear
        return quantized_linear(x, self.qw, self.bias, path=self.path)


def quantize_model_linears(model: torch.nn.Module, layers: Dict[str, QuantizedWeight], path: str = None) -> int:
    """Replace ``model``'s nn.Linear modules named in ``layers`` by ``QuantLinear``; returns the count."""
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name in layers:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantLinear(layers[name], mod.bias, path=path))
            n += 1
    return n
