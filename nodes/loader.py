"""Quantized files -> ComfyUI MODEL / CLIP objects whose Linear layers stay int8 (``ops.QuantOps``).

Reads our files and stock-ComfyUI ``int8_tensorwise`` (+convrot) files, and ``int8_blockwise`` files
that stock ComfyUI refuses. The header is validated before any tensor is read (``SafetensorsReader``),
and every layer's ``comfy_quant`` config is checked against ``__metadata__["_quantization_metadata"]``
(ComfyUI lets the header override the tensors; ``quant_layer_configs`` refuses files where they differ).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, Optional, Tuple

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd

from ..quant_core.errors import ConvertError
from ..quant_core.formats import comfy_quant_tensor
from ..quant_core.loading import quant_layer_configs
from ..quant_core.model_quant import plan_for_tensors, quantize_tensors
from ..quant_core.plan import PlanOptions
from ..quant_core.safetensors_io import SafetensorsReader
from .ops import QuantOps, consumed_quant_layers, match_stock_casting, quant_linears
from .patcher import QuantModelPatcher, as_quant_patcher

log = logging.getLogger("convert_to_quant")

DTYPE_CHOICES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_state_dict(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, dict]]:
    """(state dict, {layer: comfy_quant config}); each layer's ``comfy_quant`` tensor is rewritten from
    the checked config so the model sees exactly what the header says."""
    with SafetensorsReader(path) as r:
        cfgs = quant_layer_configs(r)
        sd = {k: r.get(k) for k in r.keys()}
    for base, cfg in cfgs.items():
        if base + ".weight" not in sd:
            raise ConvertError(f"{path}: quantization metadata names layer {base} but the file has no "
                               f"{base}.weight")
        sd[base + ".comfy_quant"] = comfy_quant_tensor(cfg)
    return sd, cfgs


def check_all_consumed(path: str, cfgs: Dict[str, dict], model: torch.nn.Module):
    """Every quantized tensor of the file must have been taken by a layer that understands it; a layer
    type that silently loaded int8 integers as weights would compute garbage."""
    consumed = consumed_quant_layers(model)
    if len(consumed) >= len(cfgs):
        return
    unused = [b for b in cfgs if not any(b == n or b.endswith("." + n) or n.endswith("." + b) for n in consumed)]
    raise ConvertError(f"{path}: {len(cfgs) - len(consumed)} quantized layer(s) did not land on a layer that "
                       f"can use them (wrong architecture, or a layer type our loader cannot run int8): "
                       f"{', '.join(unused[:8])}")


def load_diffusion_model(path: str, dtype: Optional[torch.dtype] = None) -> QuantModelPatcher:
    sd, cfgs = read_state_dict(path)
    options = {"custom_operations": QuantOps}
    if dtype is not None:
        options["dtype"] = dtype
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if patcher is None:
        raise ConvertError(f"{path}: ComfyUI could not detect the model architecture from its weights")
    check_all_consumed(path, cfgs, patcher.model)
    match_stock_casting(patcher.model)
    n = len(quant_linears(patcher.model))
    log.info("convert_to_quant: %s: %d int8 Linear layers", path, n)
    return as_quant_patcher(patcher)


TEXT_ENCODER_ACTIVATIONS = ("bf16", "int8")


def load_text_encoder(path: str, clip_type, dtype: Optional[torch.dtype] = None, embedding_directory=None,
                      activations: str = "bf16"):
    """``activations``: "bf16" (default) runs the int8 layers weight-only (W8A16) with bfloat16
    activations -- a text encoder runs once per prompt, and per-token int8 activations added as much
    error as the weights (docs/NODES.md, "Text encoders"); "int8" uses the kernels' path table (W8A8)."""
    if activations not in TEXT_ENCODER_ACTIVATIONS:
        raise ConvertError(f"activations must be one of {', '.join(TEXT_ENCODER_ACTIVATIONS)}, got {activations!r}")
    sd, cfgs = read_state_dict(path)
    options = {"custom_operations": QuantOps,
               "initial_device": comfy.model_management.text_encoder_offload_device()}
    if dtype is not None:
        options["dtype"] = dtype
    clip = comfy.sd.load_text_encoder_state_dicts(state_dicts=[sd], clip_type=clip_type, model_options=options,
                                                  embedding_directory=embedding_directory)
    if clip is None:
        raise ConvertError(f"{path}: ComfyUI could not detect the text encoder type from its weights")
    check_all_consumed(path, cfgs, clip.cond_stage_model)
    if activations == "bf16":
        for _, m in quant_linears(clip.cond_stage_model):
            m.activation_dtype = torch.bfloat16
    clip.patcher = as_quant_patcher(clip.patcher)
    return clip


def quantize_loaded_model(source: comfy.model_patcher.ModelPatcher, plan_opts: PlanOptions,
                          progress: Optional[Callable[[int, int, str], None]] = None,
                          check_cancel: Optional[Callable[[], None]] = None) -> Tuple[QuantModelPatcher, object]:
    """A new MODEL with the planned Linear layers of ``source``'s diffusion model in int8 (``source`` is not
    modified). Patches already on ``source`` (e.g. a LoRA loaded before) are merged into the weights
    first; its model options (sampler wrappers, transformer options) and object patches carry over."""
    prefix = "diffusion_model."
    if quant_linears(source.model):
        raise ConvertError("this MODEL is already quantized (it has int8 layers)")
    key_patches = source.get_key_patches(prefix)
    if not key_patches:
        raise ConvertError("the MODEL has no diffusion_model weights to quantize")

    weights: Dict[str, torch.Tensor] = {}
    for key, plist in key_patches.items():
        w, convert = plist[0]
        w = convert(w)
        if len(plist) > 1:
            w = source.calculate_weight(plist[1:], w.to(torch.float32, copy=True), key).to(w.dtype)
        weights[key[len(prefix):]] = w

    plan = plan_for_tensors(weights, plan_opts)
    sd = quantize_tensors(weights, plan, progress=progress, check_cancel=check_cancel)
    for lp in plan.quantized_layers():
        cq = sd.get(lp.base + ".comfy_quant")
        if cq is None and lp.spec.format != "fp16":
            raise ConvertError(f"internal error: {lp.base} has no comfy_quant after quantization")
    del weights

    src_model = source.model
    config = copy.copy(src_model.model_config)
    config.custom_operations = QuantOps
    model = config.get_model(sd, "")
    model = model.to(source.offload_device)
    model.load_model_weights(sd, "")
    match_stock_casting(model)
    patcher = QuantModelPatcher(model, load_device=source.load_device, offload_device=source.offload_device)
    patcher.model_options = comfy.model_patcher.create_model_options_clone(source.model_options)
    patcher.object_patches = source.object_patches.copy()
    return patcher, plan
