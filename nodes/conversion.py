"""Conversion nodes: Load Weights -> (Merge LoRA)* -> Quantize -> Quality Report / Save.

Each node is a thin adapter over ``quant_core``: Load Weights reads only the header, Merge LoRA checks the
LoRA file and adds it to the handle, Quantize runs ``quant_core.pipeline.ConversionJob`` (streaming, one
layer in memory, ProgressBar per layer, ComfyUI's interrupt checked between tensors), Save publishes
the result atomically inside a folder the user cannot escape. See ``handles`` for what flows between them.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import stat
from typing import Dict, List

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..quant_core.errors import ConvertError
from ..quant_core.formats import FORMATS
from ..quant_core.node_options import quantize_node_options
from ..quant_core.optimizers import OPTIMIZERS
from ..quant_core.paths import OutputLock, publish_file
from ..quant_core.pipeline import ConversionJob, output_path_in_folder
from ..quant_core.plan import PlanOptions, build_plan
from ..quant_core.presets import all_presets, detect_family
from ..quant_core.safetensors_io import SafetensorsReader
from .chart import render_sqnr_chart, sqnr_bars
from .handles import CALIBRATION_FOLDER, QuantizedFile, WeightsSource, new_temp_path

log = logging.getLogger("convert_to_quant")

CATEGORY = "convert_to_quant/convert"
SOURCE_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders", "loras")
SAVE_FOLDERS = ("output", "diffusion_models", "checkpoints", "text_encoders", "loras")
NONE = "None"
PROGRESS_STEPS = 100  # progress-bar steps per layer (the bar moves inside long layers)


# ------------------------------------------------------------------------------------------------
# file lists and header inspection (also used by the web route)
# ------------------------------------------------------------------------------------------------
def weight_choices() -> List[str]:
    out = []
    for folder in SOURCE_FOLDERS:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        out += [f"{folder}/{n}" for n in names if n.lower().endswith(".safetensors")]
    return out


def resolve_choice(choice: str) -> str:
    """Full path of a ``<folder>/<name>`` choice, only through ComfyUI's own file lists."""
    folder, _, name = choice.partition("/")
    if folder not in SOURCE_FOLDERS or not name:
        raise ConvertError(f"{choice!r} is not a <folder>/<file> choice from {', '.join(SOURCE_FOLDERS)}")
    if name not in folder_paths.get_filename_list(folder):
        raise ConvertError(f"{choice!r}: no such file in ComfyUI's {folder} folders")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ConvertError(f"{choice!r}: no such file in ComfyUI's {folder} folders")
    return path


def inspect_weights(path: str) -> Dict[str, object]:
    """Family, suggested preset, layer counts and sizes from the header alone (no tensor is read)."""
    from ..quant_core.errors import UnsupportedInputError
    from ..quant_core.fp8_input import InputView
    with SafetensorsReader(path) as r:
        try:  # an fp8 checkpoint is inspected as the float model it stands for (fp8_input)
            infos, quantized = dict(InputView(r).infos), False
        except UnsupportedInputError:  # a quantized layout the converter refuses
            infos, quantized = dict(r.infos), True
    family = detect_family(infos)
    plan = build_plan(infos, PlanOptions(presets=("auto",)))
    est = plan.estimate()
    return {
        "family": family,
        "suggested_preset": family or "none",
        "tensors": len(infos),
        "linear_layers": len(plan.layers),
        "layers_to_quantize": est["layers_quantized"],
        "parameters": sum(i.numel for i in infos.values()),
        "size_bytes": os.path.getsize(path),
        "estimated_int8_bytes": est["bytes_out"],
        "already_quantized": quantized,
    }


def describe_inspection(info: Dict[str, object]) -> str:
    fam = info["family"] or "unknown"
    s = (f"family: {fam} (preset: {info['suggested_preset']})\n"
         f"{info['linear_layers']} linear layers, {info['layers_to_quantize']} to quantize\n"
         f"{info['parameters'] / 1e6:.1f}M parameters, {info['size_bytes'] / 1e9:.3f} GB "
         f"-> ~{info['estimated_int8_bytes'] / 1e9:.3f} GB int8")
    if info["already_quantized"]:
        s += "\nalready quantized: convert the float original instead"
    return s


# ------------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------------
class QuantLoadWeights:
    """Pick a safetensors file to convert. Reads only its header: returns a lightweight handle."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights": (weight_choices(), {
            "tooltip": "file from diffusion_models / checkpoints / text_encoders / loras"})}}

    RETURN_TYPES = ("QUANT_WEIGHTS", "STRING")
    RETURN_NAMES = ("weights", "info")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Choose a model file to quantize; shows its detected family, layer count and size."

    @classmethod
    def IS_CHANGED(cls, weights: str):
        # a file replaced under the same name must be re-read (ComfyUI caches by inputs otherwise)
        try:
            st = os.stat(resolve_choice(weights))
        except (ConvertError, OSError):
            return float("nan")  # never equal: re-run and report the problem
        return f"{st.st_mtime_ns}-{st.st_size}"

    def load(self, weights: str):
        path = resolve_choice(weights)
        info = inspect_weights(path)
        if info["already_quantized"]:
            raise ConvertError(f"{weights} is already quantized (it has comfy_quant metadata); "
                               "load the float original instead")
        text = describe_inspection(info)
        src = WeightsSource(path=path, label=weights, family=info["family"])
        return {"ui": {"text": [text], "weights_info": [info]}, "result": (src, text)}


class QuantMergeLoRA:
    """Add up to three LoRAs (with strengths) to merge during Quantize. Chain for more."""

    @classmethod
    def INPUT_TYPES(cls):
        loras = folder_paths.get_filename_list("loras")
        opt = [NONE] + loras
        strength = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})
        return {"required": {"weights": ("QUANT_WEIGHTS",), "lora_1": (loras,), "strength_1": strength},
                "optional": {"lora_2": (opt, {"default": NONE}), "strength_2": strength,
                             "lora_3": (opt, {"default": NONE}), "strength_3": strength}}

    RETURN_TYPES = ("QUANT_WEIGHTS",)
    RETURN_NAMES = ("weights",)
    FUNCTION = "merge"
    CATEGORY = CATEGORY
    DESCRIPTION = ("LoRAs are merged into the float weights while Quantize streams the model "
                   "(ComfyUI's LoRA math), then the merged weights are quantized.")

    def merge(self, weights: WeightsSource, lora_1: str, strength_1: float, lora_2: str = NONE,
              strength_2: float = 1.0, lora_3: str = NONE, strength_3: float = 1.0):
        from ..quant_core.lora import load_lora_file
        out = weights
        for name, strength in ((lora_1, strength_1), (lora_2, strength_2), (lora_3, strength_3)):
            if not name or name == NONE:
                continue
            path = folder_paths.get_full_path("loras", name)
            if path is None:
                raise ConvertError(f"LoRA {name!r} not found in ComfyUI's loras folders")
            load_lora_file(path, strength)  # parse now, so a broken LoRA is reported at this node
            out = out.with_lora(f"loras/{name}", path, strength)
        return (out,)


def _preset_choices() -> List[str]:
    return ["auto", "none"] + sorted(all_presets())


NO_CALIBRATION_FILE = "none"


def _calibration_files() -> List[str]:
    try:
        names = folder_paths.get_filename_list(CALIBRATION_FOLDER)
    except KeyError:  # the folder is registered when the pack loads; a bare import has none
        names = []
    return [NO_CALIBRATION_FILE] + [n for n in names if n.lower().endswith(".safetensors")]


def _calibration_path(calibration, calibration_file: str):
    """The statistics file Quantize uses: the connected CALIBRATION input, else the picked file."""
    if calibration is not None:
        return calibration.path
    if not calibration_file or calibration_file == NO_CALIBRATION_FILE:
        return None
    path = folder_paths.get_full_path(CALIBRATION_FOLDER, calibration_file)
    if path is None:
        raise ConvertError(f"calibration file {calibration_file!r} is not in models/{CALIBRATION_FOLDER}; "
                           "refresh the node list")
    return path


class QuantQuantize:
    """Stream the model through LoRA merging and quantization into a temporary file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights": ("QUANT_WEIGHTS",),
                "format": (sorted(FORMATS), {"default": "int8_tensorwise"}),
                "scaling": (["axis", "tensor"], {"default": "axis",
                            "tooltip": "int8_tensorwise scale: per output row (axis) or one per tensor"}),
                "block_size": ("INT", {"default": 128, "min": 16, "max": 1024, "step": 16,
                                       "tooltip": "tile size of int8_blockwise"}),
                "convrot": ("BOOLEAN", {"default": False,
                            "tooltip": "regular-Hadamard rotation (core-loadable int8_tensorwise + convrot)"}),
                "convrot_group_size": (["16", "64", "256", "1024"], {"default": "256"}),
                "preset": (_preset_choices(), {"default": "auto",
                           "tooltip": "layers to keep in high precision; auto detects the family"}),
                "optimizer": (sorted(OPTIMIZERS), {"default": "rtn"}),
                "num_iter": ("INT", {"default": 1000, "min": 1, "max": 100000}),
                "lr": ("FLOAT", {"default": 8.0773e-3, "min": 1e-8, "max": 10.0, "step": 1e-4}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
            },
            "optional": {
                "layer_config": ("STRING", {"multiline": True, "default": "",
                                 "tooltip": 'JSON {regex: {format, scaling_mode, block_size, convrot, '
                                            'convrot_groupsize, skip}}'}),
                "exclude_layers": ("STRING", {"default": "", "tooltip": "regex of layers to keep"}),
                "optimizer_options": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "JSON of further optimizer knobs (CLI names)"}),
                "quality_threshold": ("FLOAT", {"default": 30.0, "min": 0.0, "max": 200.0}),
                "calibration": ("QUANT_CALIBRATION",),
                "calibration_file": (_calibration_files(), {
                    "default": "none",
                    "tooltip": "a calibration file of models/calibration (saved by Capture Calibration, the "
                               "API or the CLI); used when the calibration input is not connected"}),
            },
        }

    RETURN_TYPES = ("QUANT_RESULT", "STRING")
    RETURN_NAMES = ("quantized", "summary")
    FUNCTION = "quantize"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Quantizes one layer at a time into a temporary file (peak RAM ~ one layer), merging "
                   "LoRAs on the way. Cancel stops within a layer and leaves no file.")

    def quantize(self, weights: WeightsSource, format: str, scaling: str, block_size: int, convrot: bool,
                 convrot_group_size: str, preset: str, optimizer: str, num_iter: int, lr: float, device: str,
                 layer_config: str = "", exclude_layers: str = "", optimizer_options: str = "",
                 quality_threshold: float = 30.0, calibration=None, calibration_file: str = "none"):
        opts = quantize_node_options(
            format, scaling, block_size, convrot, convrot_group_size, preset, optimizer, num_iter, lr, device,
            layer_config, exclude_layers, optimizer_options, quality_threshold,
            _calibration_path(calibration, calibration_file), [(p, s) for _, p, s in weights.loras])
        opts.extra_metadata = {"convert_to_quant.source": os.path.basename(weights.path)}
        plan_opts, calibration_path = opts.plan, opts.calibration_data
        tmp = new_temp_path(folder_paths.get_output_directory())
        messages: List[str] = []
        # ComfyUI runs nodes under torch.inference_mode(); the learned-rounding optimizers need autograd
        with torch.inference_mode(False), torch.enable_grad():
            job = ConversionJob(weights.path, tmp, opts, log=messages.append)
            try:
                total = max(len(job.plan.quantized_layers()), 1)
                # steps inside a layer too: a learned-rounding layer can run for minutes
                bar = comfy.utils.ProgressBar(total * PROGRESS_STEPS)
                result = job.run(
                    progress=lambda done, n, name: bar.update_absolute(done * PROGRESS_STEPS, total * PROGRESS_STEPS),
                    layer_progress=lambda done, n, name: bar.update_absolute(int(done * PROGRESS_STEPS),
                                                                             total * PROGRESS_STEPS),
                    check_cancel=comfy.model_management.throw_exception_if_processing_interrupted)
            except BaseException:
                for p in (tmp, tmp + ".partial"):
                    if os.path.exists(p):
                        os.unlink(p)
                raise
            finally:
                job.close()
        for m in messages:
            log.info("convert_to_quant: %s", m)
        # the file is a temporary one until Save publishes it (Save writes the saved name into its report)
        result.report.summary.pop("output", None)
        settings = {"format": plan_opts.spec.describe(), "preset": preset, "optimizer": optimizer,
                    "source": weights.describe()}
        lora_lines = result.lora_report.lines() if result.lora_report is not None else []
        notes = []
        if calibration_path is None and optimizer != "rtn":
            notes.append(f"note: {optimizer} ran without calibration data, so it minimized a weight-only "
                         "objective; connect Capture Calibration to its calibration input (or pick a "
                         "calibration_file) for activation-aware rounding")
            log.warning("convert_to_quant: %s", notes[-1])
        settings["notes"] = notes
        qf = QuantizedFile(tmp, weights, result.report, settings, lora_lines)
        summary = "\n".join(result.report.summary_lines() + notes + lora_lines)
        return (qf, summary)


def _json_number(v):
    """A number the browser's JSON.parse accepts: non-finite (an exact layer's SQNR +inf) -> None."""
    return v if v is None or math.isfinite(v) else None


def report_payload(report) -> Dict[str, object]:
    """Compact JSON for the web widget: summary + one row per layer."""
    rows = []
    for name, l in report.layers.items():
        rows.append([name, l.format, "x".join(str(s) for s in l.shape), _json_number(l.sqnr_db),
                     _json_number(l.mse), _json_number(l.max_abs_err),
                     l.quantized, l.fallback or ("" if l.quantized else l.reason)])
    return {"summary": report.summary, "threshold_db": report.threshold_db,
            "columns": ["layer", "format", "shape", "sqnr_db", "mse", "max_abs_err", "quantized", "note"],
            "rows": rows}


class QuantQualityReport:
    """Per-layer quality of the stored weights: summary text, JSON, and an SQNR bar chart IMAGE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"quantized": ("QUANT_RESULT",)}}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("summary", "report_json", "sqnr_chart")
    FUNCTION = "report"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def report(self, quantized: QuantizedFile):
        rep = quantized.report
        summary = "\n".join(rep.summary_lines() + list(quantized.settings.get("notes", []))
                            + [f"warning: {w}" for w in rep.warnings[:20]])
        chart = render_sqnr_chart(sqnr_bars(rep), rep.threshold_db)
        text = json.dumps(rep.to_dict(), allow_nan=False)
        return {"ui": {"text": [summary], "quant_report": [report_payload(rep)]},
                "result": (summary, text, chart)}


def save_folder(folder: str) -> str:
    if folder == "output":
        return folder_paths.get_output_directory()
    if folder not in SAVE_FOLDERS:
        raise ConvertError(f"unknown save folder {folder!r}; choose one of {', '.join(SAVE_FOLDERS)}")
    return model_folder(folder)


def model_folder(folder: str) -> str:
    """The folder of ComfyUI model type ``folder`` that new files go to (created when missing)."""
    paths = folder_paths.get_folder_paths(folder)
    if not paths:
        raise ConvertError(f"ComfyUI has no {folder} folder configured")
    # ComfyUI lists legacy names first (models/unet for diffusion_models): prefer the folder named like
    # the choice, then any that exists
    named = [p for p in paths if os.path.basename(os.path.normpath(p)) == folder and os.path.isdir(p)]
    existing = [p for p in paths if os.path.isdir(p)]
    target = (named or existing or paths)[0]
    os.makedirs(target, exist_ok=True)
    return target


class QuantSave:
    """Publish the quantized file under a name inside an output or models folder (atomic)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "quantized": ("QUANT_RESULT",),
            "folder": (list(SAVE_FOLDERS), {"default": "diffusion_models"}),
            "filename": ("STRING", {"default": "quantized/model_int8.safetensors",
                                    "tooltip": "relative to the folder; sub-folders allowed, '..' is not"}),
            "overwrite": ("BOOLEAN", {"default": False}),
            "save_report": ("BOOLEAN", {"default": True,
                                        "tooltip": "also write <name>_quality.json / .md next to it"}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def save(self, quantized: QuantizedFile, folder: str, filename: str, overwrite: bool, save_report: bool):
        base = save_folder(folder)
        path = output_path_in_folder(base, filename)
        if not quantized.exists():
            raise ConvertError("the quantized temporary file is gone (output directory cleaned?); "
                               "run Quantize again")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # one writer per name: a second Save (or a CLI run) to the same file fails while this one holds
        # the lock, and the model and its report are written by the same Save
        with OutputLock(path) as lock:
            publish_file(quantized.tmp_path, path, overwrite=overwrite, lock=lock)
            written = [path]
            rel = os.path.relpath(path, base)
            if save_report:
                stem = os.path.splitext(path)[0] + "_quality"
                rep = copy.copy(quantized.report)  # the node's report stays as it is (Save may run again)
                rep.summary = {**rep.summary, "output": f"{folder}/{rel}"}
                written += rep.write(stem + ".json", mode=stat.S_IMODE(os.stat(path).st_mode))
        text = f"saved {folder}/{rel} ({os.path.getsize(path) / 1e9:.3f} GB)"
        if save_report:
            text += "\nreport: " + ", ".join(f"{folder}/{os.path.relpath(p, base)}" for p in written[1:])
        log.info("convert_to_quant: %s", text)
        return {"ui": {"text": [text]}, "result": (path,)}


NODES = {
    "QuantLoadWeights": (QuantLoadWeights, "Load Weights (convert_to_quant)"),
    "QuantMergeLoRA": (QuantMergeLoRA, "Merge LoRA (convert_to_quant)"),
    "QuantQuantize": (QuantQuantize, "Quantize (convert_to_quant)"),
    "QuantQualityReport": (QuantQualityReport, "Quality Report (convert_to_quant)"),
    "QuantSave": (QuantSave, "Save Quantized Model (convert_to_quant)"),
}
