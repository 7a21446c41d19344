"""Runtime nodes: load quantized models, quantize a loaded MODEL on the fly, capture calibration.

The MODEL / CLIP these nodes return keep int8 Linear weights (``ops.QuantOps``) and run our kernels; LoRAs
loaded afterwards with ComfyUI's stock LoraLoader / LoraLoaderModelOnly become low-rank side paths
(``patcher.QuantModelPatcher``).
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Dict, List

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from ..quant_core.errors import ConvertError, OutputPathError
from ..quant_core.formats import spec_from_choice
from ..quant_core.plan import PlanOptions
from ..quant_core.presets import all_presets
from ..quant_core.pipeline import output_path_in_folder
from .attention import ATTENTION_CHOICES, ATTENTION_TOOLTIP, with_attention
from .conversion import model_folder
from .handles import CALIBRATION_FOLDER, CalibrationStats, temp_dir
from .loader import (DTYPE_CHOICES, TEXT_ENCODER_ACTIVATIONS, load_diffusion_model, load_text_encoder,
                     quantize_loaded_model)

log = logging.getLogger("convert_to_quant")

CATEGORY = "convert_to_quant/loaders"


def _safetensors(folder: str) -> List[str]:
    return [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]


class QuantDiffusionModelLoader:
    """Load an int8 diffusion model (ours, core int8_tensorwise/convrot, or int8_blockwise)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (_safetensors("diffusion_models"),),
                             "compute_dtype": (list(DTYPE_CHOICES), {"default": "default"})},
                "optional": {"attention": (list(ATTENTION_CHOICES), {"default": "default",
                                                                     "tooltip": ATTENTION_TOOLTIP})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a quantized diffusion model keeping its Linear layers int8 on the device "
                   "(INT8 Triton kernels on CUDA, torch elsewhere). Stock LoRA loaders work on it.")

    def load(self, unet_name: str, compute_dtype: str = "default", attention: str = "default"):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return (with_attention(load_diffusion_model(path, DTYPE_CHOICES[compute_dtype]), attention),)


class QuantCLIPLoader:
    """Load an int8 text encoder the same way (CLIP / T5 / LLM encoders ComfyUI knows)."""

    @classmethod
    def INPUT_TYPES(cls):
        import nodes as comfy_nodes  # ComfyUI's nodes.py (pulls in the samplers): only when the UI asks
        types = comfy_nodes.CLIPLoader.INPUT_TYPES()["required"]["type"]
        return {"required": {"clip_name": (_safetensors("text_encoders"),), "type": types,
                             "compute_dtype": (list(DTYPE_CHOICES), {"default": "default"})},
                "optional": {"activations": (list(TEXT_ENCODER_ACTIVATIONS), {
                    "default": "bf16",
                    "tooltip": "bf16: int8 weights, bfloat16 activations (W8A16; the most accurate, the "
                               "default). int8: int8 activations too (W8A8; faster on long prompts, "
                               "more error)"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, clip_name: str, type: str = "stable_diffusion", compute_dtype: str = "default",
             activations: str = "bf16"):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        clip_type = getattr(comfy.sd.CLIPType, type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
        clip = load_text_encoder(path, clip_type, DTYPE_CHOICES[compute_dtype],
                                 embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                 activations=activations)
        return (clip,)


class QuantizeModelOnTheFly:
    """MODEL in, INT8 MODEL out (round-to-nearest, optionally convrot): no file round trip."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "format": (["int8_tensorwise", "int8_blockwise"], {"default": "int8_tensorwise"}),
            "convrot": ("BOOLEAN", {"default": False, "tooltip": "regular-Hadamard rotation (per-row scales)"}),
            "convrot_group_size": (["16", "64", "256", "1024"], {"default": "256"}),
            "block_size": ("INT", {"default": 128, "min": 16, "max": 1024, "step": 16}),
            "preset": (["auto", "none"] + sorted(all_presets()), {"default": "auto"}),
        }, "optional": {"attention": (list(ATTENTION_CHOICES), {"default": "default", "tooltip": ATTENTION_TOOLTIP})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "quantize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Quantizes the diffusion model's Linear layers in memory (LoRAs already applied to the "
                   "MODEL are merged first). Needs RAM for the float model plus the int8 copy.")

    def quantize(self, model, format: str, convrot: bool, convrot_group_size: str, block_size: int, preset: str,
                 attention: str = "default"):
        spec = spec_from_choice(format, None, block_size, convrot, int(convrot_group_size))
        opts = PlanOptions(spec=spec, presets=() if preset == "none" else (preset,))
        bar = comfy.utils.ProgressBar(1)
        patcher, plan = quantize_loaded_model(
            model, opts, progress=lambda done, n, name: bar.update_absolute(done, n),
            check_cancel=comfy.model_management.throw_exception_if_processing_interrupted)
        log.info("convert_to_quant: quantized %d layers on the fly (%s)", len(plan.quantized_layers()),
                 spec.describe())
        return (with_attention(patcher, attention),)


def _to_cpu(v):
    if torch.is_tensor(v):
        return v.detach().to("cpu")
    if isinstance(v, (list, tuple)):
        return type(v)(_to_cpu(x) for x in v)
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v


def _to_device(v, device):
    if torch.is_tensor(v):
        return v.to(device, copy=True)  # a normal tensor even if recorded under inference mode
    if isinstance(v, (list, tuple)):
        return type(v)(_to_device(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to_device(x, device) for k, x in v.items()}
    return v


# model call arguments that cannot be replayed outside the sampler (they hold live objects)
_NOT_REPLAYED = ("transformer_options", "control")


class QuantCalibrationCapture:
    """Sample with the user's conditioning, recording the diffusion model's real inputs at every step,
    then replay them through the model with hooks on every Linear to capture calibration statistics
    (Hessian, abs-max, mean of each layer's input) for Quantize's calibrated optimizers."""

    @classmethod
    def INPUT_TYPES(cls):
        import nodes as comfy_nodes
        ks = comfy_nodes.KSampler.INPUT_TYPES()["required"]
        return {"required": {
            "model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",), "seed": ks["seed"],
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000}),
            "cfg": ks["cfg"], "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"],
            "max_tokens_per_call": ("INT", {"default": 4096, "min": 16, "max": 1 << 20,
                                            "tooltip": "tokens per call used for the Hessian (bounds compute)"}),
            "budget_mb": ("INT", {"default": 4096, "min": 16, "max": 1 << 20,
                                  "tooltip": "memory for statistics accumulators; more layers -> more passes"}),
        }, "optional": {
            "name": ("STRING", {"default": "",
                                "tooltip": "keep the statistics as models/calibration/<name>.safetensors (Quantize's "
                                           "calibration_file, the CLI's --calibration-data); empty: a temporary "
                                           "file for this run only. Sub-folders allowed, '..' is not"}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing file of that name"}),
        }}

    RETURN_TYPES = ("QUANT_CALIBRATION", "LATENT", "STRING")
    RETURN_NAMES = ("calibration", "latent", "summary")
    FUNCTION = "capture"
    CATEGORY = "convert_to_quant/convert"

    def capture(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                max_tokens_per_call, budget_mb, name: str = "", overwrite: bool = False):
        named = None
        if name and name.strip():
            # refused before sampling: a bad name or an existing file costs nothing (the writer checks
            # again under the file's lock)
            folder = model_folder(CALIBRATION_FOLDER)
            named = output_path_in_folder(folder, name.strip())
            if os.path.isdir(named):
                raise OutputPathError(f"{named} is a directory")
            if os.path.exists(named) and not overwrite:
                raise OutputPathError(f"calibration file {CALIBRATION_FOLDER}/{os.path.relpath(named, folder)} "
                                      "already exists; turn on overwrite to replace it, or choose another name")
        recorded: List[Dict] = []

        def record(apply_model, args):
            c = {k: _to_cpu(v) for k, v in args["c"].items() if k not in _NOT_REPLAYED}
            recorded.append({"x": _to_cpu(args["input"]), "t": _to_cpu(args["timestep"]), "c": c})
            return apply_model(args["input"], args["timestep"], **args["c"])

        m = model.clone()
        if "model_function_wrapper" in m.model_options:
            raise ConvertError("the MODEL already has a model function wrapper; capture calibration before "
                               "nodes that install one")
        m.set_model_unet_function_wrapper(record)
        import nodes as comfy_nodes
        (latent,) = comfy_nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                                latent_image)
        if not recorded:
            raise ConvertError("the sampler never called the model; nothing to calibrate")

        comfy.model_management.load_models_gpu([model])
        base = model.model
        device = comfy.model_management.get_torch_device()

        def forward(_, batch):
            comfy.model_management.throw_exception_if_processing_interrupted()
            c = _to_device(batch["c"], device)
            base.apply_model(_to_device(batch["x"], device), _to_device(batch["t"], device), **c)

        from ..quant_core.calibration import capture_calibration
        if named is not None:
            os.makedirs(os.path.dirname(named), exist_ok=True)
            path = named
        else:
            path = os.path.join(temp_dir(folder_paths.get_output_directory()),
                                f"{os.getpid()}-{uuid.uuid4().hex}.calibration.safetensors")
        lines: List[str] = []
        try:
            # ComfyUI runs nodes under inference_mode; the collector tracks tensor versions, which
            # inference tensors do not have
            with torch.inference_mode(False):
                # one writer (StreamingWriter: the file's lock, <name>.partial, atomic rename): a failed or
                # cancelled capture leaves an existing named file as it was
                summary = capture_calibration(base.diffusion_model, recorded, path, forward=forward,
                                              budget_bytes=int(budget_mb) << 20,
                                              max_tokens_per_call=max_tokens_per_call,
                                              metadata={"source": "ComfyUI sampling", "steps": str(steps),
                                                        "seed": str(seed), "sampler": f"{sampler_name}/{scheduler}",
                                                        "prompts": str(len(recorded))},
                                              overwrite=bool(overwrite), log=lines.append)
        except BaseException:
            if named is None and os.path.exists(path):
                os.unlink(path)
            raise
        text = (f"{summary['layers']} layers ({summary['groups']} input groups) from {len(recorded)} model calls; "
                f"{summary['passes']} pass(es), {summary['total_statistics_bytes'] / 1e6:.1f} MB")
        if named is not None:
            text += f"\nsaved {CALIBRATION_FOLDER}/{os.path.relpath(named, model_folder(CALIBRATION_FOLDER))}"
        stats = CalibrationStats(path=path, layers=int(summary["layers"]), samples=len(recorded), notes=lines,
                                 keep=named is not None)
        return {"ui": {"text": [text]}, "result": (stats, latent, text)}


NODES = {
    "QuantDiffusionModelLoader": (QuantDiffusionModelLoader, "Load Quantized Diffusion Model (convert_to_quant)"),
    "QuantCLIPLoader": (QuantCLIPLoader, "Load Quantized Text Encoder (convert_to_quant)"),
    "QuantizeModelOnTheFly": (QuantizeModelOnTheFly, "Quantize Model On The Fly (convert_to_quant)"),
    "QuantCalibrationCapture": (QuantCalibrationCapture, "Capture Calibration (convert_to_quant)"),
}
