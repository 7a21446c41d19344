"""A ModelPatcher for models with int8 Linear layers (``ops.QuantOps``).

Stock ComfyUI applies a LoRA by computing ``W + ΔW`` in float and writing it back into the layer. For an
int8 layer that would mean dequantize -> patch -> re-quantize, losing precision and (in lowvram mode)
paying it on every step. ``QuantModelPatcher`` instead hands the patches of an int8 layer to the layer,
which keeps them as a low-rank side path (see ``ops.QuantLinearMixin.attach_patches``); the integers are
never modified, so unpatching is just dropping the side paths. Float layers of the same model (kept
layers: norms' neighbours, embeddings, ...) are patched exactly as stock ComfyUI does.

Every other ModelPatcher behaviour (memory accounting, partial load/unload, clones made by LoraLoader,
TorchCompileModel wrappers) is inherited unchanged.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_patcher
import comfy.utils

from .ops import QuantLinearMixin

log = logging.getLogger("convert_to_quant")


class QuantModelPatcher(comfy.model_patcher.ModelPatcher):
    def _quant_layer_for(self, key: str):
        op_name, _, attr = key.rpartition(".")
        if not op_name:
            return None, attr
        try:
            mod = comfy.utils.get_attr(self.model, op_name)
        except AttributeError:
            return None, attr
        if isinstance(mod, QuantLinearMixin) and mod.is_quantized:
            return mod, attr
        return None, attr

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        mod, attr = self._quant_layer_for(key)
        if mod is None:
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)
        if attr != "weight":
            # weight_scale / comfy_quant are not weights a patch can meaningfully change
            log.warning("convert_to_quant: ignoring a patch for %s (quantization metadata)", key)
            return
        device = device_to if device_to is not None else mod.weight.device
        how = mod.attach_patches(self.patches[key], key, device, self._side_path_dtype())
        if how == "dense":
            log.info("convert_to_quant: %s: patch is not a plain LoRA, applied as a dense delta", key)

    def _side_path_dtype(self) -> torch.dtype:
        """Storage dtype of LoRA side paths: the model's compute dtype (they are cast to the activation
        dtype in forward anyway)."""
        dt = getattr(self.model, "manual_cast_dtype", None)
        if dt is None and hasattr(self.model, "get_dtype"):
            dt = self.model.get_dtype()
        if dt not in (torch.float16, torch.bfloat16, torch.float32):
            dt = next((p.dtype for p in self.model.parameters() if p.dtype.is_floating_point), torch.float32)
        return dt

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m in self.model.modules():
                if isinstance(m, QuantLinearMixin):
                    m.clear_patches()
        return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

    def load(self, *args, force_patch_weights=False, **kwargs):
        # always route patches through patch_weight_to_device: for int8 layers that attaches side paths
        # (instead of stock lowvram's LowVramPatch, which would need a float weight on every step)
        return super().load(*args, force_patch_weights=True, **kwargs)


def as_quant_patcher(patcher: comfy.model_patcher.ModelPatcher) -> QuantModelPatcher:
    """A QuantModelPatcher around the same model (for patchers made by ComfyUI's loaders)."""
    if isinstance(patcher, QuantModelPatcher):
        return patcher
    n = QuantModelPatcher(patcher.model, load_device=patcher.load_device, offload_device=patcher.offload_device,
                          size=patcher.size, weight_inplace_update=patcher.weight_inplace_update)
    n.is_clip = patcher.is_clip
    n.hook_mode = patcher.hook_mode
    return n
