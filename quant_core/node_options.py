"""What the Quantize node's widgets mean, as ``ConvertOptions``: the node (``nodes/conversion.py``) calls
``quantize_node_options`` and adds only what is ComfyUI's (the temporary file, progress, the source name
in the metadata). Kept here, free of ComfyUI, so that a test converts the same choice through the CLI and
through the node's options and compares the files byte for byte (``tests/test_choice.py``)."""
from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

from .errors import PlanError
from .formats import spec_from_choice
from .optimizers import check_optimizer_options
from .pipeline import ConvertOptions
from .plan import PlanOptions, parse_layer_config


def node_plan_options(fmt: str, scaling: str, block_size: int, convrot: bool, convrot_group_size: int,
                      preset: str, layer_config: str, exclude_layers: str, optimizer: str) -> PlanOptions:
    spec = spec_from_choice(fmt, scaling, block_size, convrot, int(convrot_group_size), optimizer=optimizer)
    rules = ()
    if layer_config and layer_config.strip():
        try:
            data = json.loads(layer_config)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"layer_config is not valid JSON: {e}") from None
        rules = parse_layer_config(data, spec, where="layer_config")
    presets = () if preset == "none" else (preset,)
    return PlanOptions(spec=spec, presets=presets, layer_config=rules,
                       exclude_layers=exclude_layers.strip() or None if exclude_layers else None)


def quantize_node_options(format: str, scaling: str, block_size: int, convrot: bool, convrot_group_size,
                          preset: str, optimizer: str, num_iter: int, lr: float, device: str,
                          layer_config: str = "", exclude_layers: str = "", optimizer_options: str = "",
                          quality_threshold: float = 30.0, calibration_path: Optional[str] = None,
                          loras: Sequence[Tuple[str, float]] = ()) -> ConvertOptions:
    """The Quantize node's widgets (and its calibration file / LoRAs) -> ``ConvertOptions``."""
    plan_opts = node_plan_options(format, scaling, block_size, convrot, int(convrot_group_size), preset,
                                  layer_config, exclude_layers, optimizer)
    if plan_opts.spec.format == "int8_smoothquant" and calibration_path is None:
        raise PlanError("format int8_smoothquant needs calibration statistics: connect Capture Calibration "
                        "to Quantize's calibration input or pick a calibration_file")
    knobs = {"num_iter": num_iter, "lr": lr}
    if optimizer_options and optimizer_options.strip():
        try:
            extra = json.loads(optimizer_options)
        except (json.JSONDecodeError, RecursionError) as e:
            raise PlanError(f"optimizer_options is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise PlanError("optimizer_options must be a JSON object")
        check_optimizer_options(extra, "optimizer_options")
        knobs.update(extra)
    return ConvertOptions(
        plan=plan_opts, optimizer=optimizer, optimizer_options=knobs, calibration_data=calibration_path,
        loras=[p for p, _ in loras], lora_strengths=[s for _, s in loras],
        device=device, quality_threshold=quality_threshold)
