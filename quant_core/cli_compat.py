"""Command lines of the upstream tool, ``convert-to-quant`` 1.3.4 on PyPI, on this command line.

Every INT8 command line of that tool either runs here with the same meaning (the aliases below, mapped
onto our own flags before anything else reads them) or is refused with one line saying what to use
instead. Its flags that we do not have are registered hidden (``--help`` does not list them) so that
they are refused by name with a reason, not as "unrecognized". The table is in docs/API.md
("Upstream command lines").

What maps (upstream -> here):

* ``--int8``: INT8 output, our default format. Upstream's ``--int8`` means tensor-wise scaling unless
  ``--scaling_mode`` says otherwise, so with ``--int8`` the default scaling mode is ``tensor``.
* ``--scaling_mode row`` -> ``axis`` (one scale per output row); ``block2d`` -> ``block`` (with
  ``--int8``). Without ``--int8`` upstream's ``row``/``block2d`` are FP8 modes: refused (FP8).
* ``--group_size``/``--group-size`` -> ``--block_size``; ``--manual_seed -1`` -> no seed (random);
  ``-fpmm``, ``-lm``, ``-esloss``, ``-eslr``, ``-esstall`` -> their long flags;
  ``--help-learned`` and the other ``--help-*`` sections -> ``--help`` (one list, grouped).
"""
from __future__ import annotations

import argparse
from typing import List

from .errors import PlanError

FP8_HERE = "FP8 output here is --fp8 (ComfyUI core's float8_e4m3fn, one scale per tensor)"

# upstream flags without an equivalent here: (option strings, takes a value, what to use instead)
_REFUSED = [
    (("--nvfp4",), False, "NVFP4 output is not supported here (INT8 and FP16 are); use --int8 or --fp16"),
    (("--mxfp8",), False, "MXFP8 output is not supported here (INT8 and FP16 are); use --int8 or --fp16"),
    (("--make-hybrid-mxfp8", "--make_hybrid_mxfp8"), False, "MXFP8 files are not supported here"),
    (("--tensor-scales", "--tensor_scales"), True, "MXFP8 files are not supported here"),
    (("--convert-fp8-scaled", "--convert_fp8_scaled"), False,
     "converting fp8_scaled files is not a mode here; an fp8 input is dequantized and re-quantized by a "
     "plain run (-i FILE)"),
    (("--hp-filter", "--hp_filter"), True, "belongs to --convert-fp8-scaled, which is not a mode here"),
    (("--full-precision-mm", "--full_precision_mm"), False,
     "belongs to --convert-fp8-scaled, which is not a mode here; for a new file use --full_precision_matrix_mult"),
    (("--convert-int8-scaled", "--convert_int8_scaled"), False,
     "legacy .scale_weight INT8 files are not read here; convert the original float model instead"),
    (("--legacy_input_add", "--legacy-input-add"), False, f"legacy fp8_scaled files are not written here; {FP8_HERE}"),
    (("--cleanup-fp8-scaled", "--cleanup_fp8_scaled"), False, f"legacy fp8_scaled files are not written here; {FP8_HERE}"),
    (("--scaled-fp8-marker", "--scaled_fp8_marker"), True, f"legacy fp8_scaled files are not written here; {FP8_HERE}"),
    (("--actcal",), False, "simulated activation calibration is not a mode here; capture real statistics "
     "(--calibration-data FILE) and store them with --input_scale"),
    (("--actcal-samples", "--actcal_samples"), True, "belongs to --actcal, which is not a mode here (see --input_scale)"),
    (("--actcal-percentile", "--actcal_percentile"), True, "belongs to --actcal, which is not a mode here (see --input_scale)"),
    (("--actcal-lora", "--actcal_lora"), True, "belongs to --actcal, which is not a mode here; for a "
     "LoRA-weighted objective use --calibration-lora FILE"),
    (("--actcal-seed", "--actcal_seed"), True, "belongs to --actcal, which is not a mode here (see --input_scale)"),
    (("--actcal-device", "--actcal_device"), True, "belongs to --actcal, which is not a mode here (see --input_scale)"),
    (("--input-scales", "--input_scales"), True, "input scales are not read from a JSON file here; store "
     "measured ones with --input_scale --calibration-data FILE"),
    (("--edit-quant", "--edit_quant"), False, "editing comfy_quant metadata is not a mode here; re-convert "
     "with the options you want (--layer-config FILE for per-layer ones)"),
    (("--remove-keys", "--remove_keys"), True, "belongs to --edit-quant, which is not a mode here"),
    (("--add-keys", "--add_keys"), True, "belongs to --edit-quant, which is not a mode here"),
    (("--quant-filter", "--quant_filter"), True, "belongs to --edit-quant, which is not a mode here"),
    (("--extract-lora", "--extract_lora"), False, "error-correction LoRA extraction is not available here; "
     "for a LoRA-aware conversion use --calibration-lora FILE"),
    (("--lora-rank", "--lora_rank"), True, "belongs to --extract-lora, which is not available here"),
    (("--lora-target", "--lora_target"), True, "belongs to --extract-lora, which is not available here"),
    (("--lora-depth", "--lora_depth"), True, "belongs to --extract-lora, which is not available here"),
    (("--lora-ar-threshold", "--lora_ar_threshold"), True, "belongs to --extract-lora, which is not available here"),
    (("--lora-output", "--lora_output"), True, "belongs to --extract-lora, which is not available here"),
    (("--heur",), False, "the size/aspect-ratio heuristic is not available here; keep layers with "
     "--exclude-layers REGEX (layers whose shape does not fit the format fall back by themselves)"),
    (("--custom-heur", "--custom_heur"), False, "the size/aspect-ratio heuristic is not available here"),
    (("--full_matrix", "--full-matrix"), False, "learned rounding here uses a low-rank SVD sized by "
     "--top_p/--min_k/--max_k; set --max_k to the layer size for a full one"),
    (("--calib_cpu", "--calib-cpu"), False, "there is no calibration cache here (statistics come from "
     "--calibration-data FILE); drop the flag"),
    (("--dynamic-convrot", "--dynamic_convrot"), False, "per-layer convrot group sizes are not chosen "
     "automatically here; use --convrot --convrot-group-size N (or per layer with --layer-config)"),
    (("--custom-simple", "--custom_simple"), False, "per-group optimizers are not available; give the "
     "layers a format with --custom-layers and choose the optimizer for the run (--simple)"),
    (("--custom-full-precision-mm", "--custom-fpmm"), False, "use --layer-config FILE for per-layer "
     "settings, or --full_precision_matrix_mult for all layers"),
    (("--custom-convrot",), False, "use --layer-config FILE with {\"convrot\": true} for the custom layers"),
    (("--custom-convrot-group-size",), True, "use --layer-config FILE with {\"convrot_groupsize\": N}"),
    (("--fallback-block-size", "--fallback_block_size"), True, "upstream's --fallback quantizes excluded "
     "layers; here use --custom-layers REGEX --custom-type int8 --custom-block-size N"),
    (("--fallback-simple", "--fallback_simple"), False, "upstream's --fallback quantizes excluded layers; "
     "here use --custom-layers REGEX --custom-type int8"),
    (("--output-dtype", "--output_dtype"), True, "unquantized tensors keep their dtype here and quantized "
     "layers record the input's dtype; convert the input to the dtype you want first"),
    (("--preserve-layers", "--preserve_layers"), True, "unquantized tensors always keep their source dtype "
     "here; drop the flag"),
    (("--use_speed", "--use-speed"), False, "it is a Prodigy setting and Prodigy is not available here; "
     "use --optimizer adamw, or gptq with --calibration-data"),
    (("--lr_adaptive_mode", "--lr-adaptive-mode"), True, "not available here; the adaptive schedule is "
     "tuned with --lr_factor/--lr_cooldown"),
    (("--lr-threshold-mode", "--lr_threshold_mode"), True, "not available here; --lr_threshold is relative "
     "to the best loss"),
    (("--lr-shape-influence", "--lr_shape_influence"), True, "not available here; the plateau schedule "
     "uses --lr_patience/--lr_factor as given"),
    (("--scale-refinement", "--scale_refinement"), True, "scale refinement is an NVFP4 setting; not "
     "available here"),
    (("--scale-optimization", "--scale_optimization"), True, "not available here; GPTQ/learned rounding "
     "choose integers for the abs-max scale (docs/OPTIMIZERS.md)"),
    (("--verbose-pinned", "--verbose_pinned"), False, "there are no pinned-memory transfers here; use "
     "--verbose DEBUG"),
    (("--no-normalize-scales", "--no_normalize_scales"), False, "scales are stored as computed here; drop "
     "the flag"),
]

# upstream model filters that have no preset here
_UPSTREAM_FILTERS = ("gemma4", "qwen_vlm", "qwen35", "generic_text", "anima", "lens", "krea2", "ideogram4",
                     "minimaxh3", "ltxv2", "boogu")

_HELP_SECTIONS = ("--help-learned", "-hl", "--help-experimental", "-he", "--help-filters", "-hf",
                  "--help-advanced", "-ha", "--help-modes", "-hm", "--help-lora", "-hlr")

SCALING_CHOICES = ["tensor", "axis", "row", "block", "block2d", "block3d"]  # shown: tensor, axis, row, block
FORMAT_CHOICES_UPSTREAM = ["fp8", "mxfp8", "nvfp4"]


class _Refuse(argparse.Action):
    def __init__(self, option_strings, dest, message="", **kw):
        self.message = message
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        raise PlanError(f"{option_string} (a convert-to-quant 1.3.4 flag): {self.message}")


# upstream's other spellings of our flags (dest -> option strings), accepted but not listed in --help
ALIASES = {"block_size": ("--group_size", "--group-size"), "full_precision_matrix_mult": ("-fpmm",),
           "low_memory": ("-lm",), "early_stop_loss": ("-esloss",), "early_stop_lr": ("-eslr",),
           "early_stop_stall": ("-esstall",)}


def add_upstream_flags(parser: argparse.ArgumentParser, taken=()):
    """Register upstream's other spellings of our flags and its flags we do not have, all hidden: the
    former act as ours, each of the latter is refused by name with its reason."""
    hidden = parser.add_argument_group()  # an untitled group prints nothing when all are SUPPRESSed
    for action in list(parser._actions):
        for alias in ALIASES.get(action.dest, ()):
            kw = dict(dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                kw["action"] = "store_true"
            else:
                kw.update(type=action.type, choices=action.choices, metavar=action.metavar)
            hidden.add_argument(alias, **kw)
    for names, takes_value, message in _REFUSED:
        hidden.add_argument(*names, action=_Refuse, nargs="?" if takes_value else 0, message=message,
                            dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for name in _UPSTREAM_FILTERS:
        if name in taken:
            continue
        hidden.add_argument("--" + name, action=_Refuse, nargs=0, dest=argparse.SUPPRESS,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            message="that model filter has no preset here (see --list-presets); keep its "
                                    "layers in high precision with --exclude-layers REGEX")
    hidden.add_argument(*_HELP_SECTIONS, action="help", help=argparse.SUPPRESS)


def normalize(args) -> List[str]:
    """Map upstream spellings onto ours in ``args`` (after parsing, before anything reads them); refuse
    those whose meaning differs. Returns notes for the console."""
    notes: List[str] = []
    int8 = getattr(args, "int8", False)
    mode = args.scaling_mode
    if int8 and args.fp16:
        raise PlanError("--int8 and --fp16 choose different output formats; give one of them")
    if mode in ("row", "block2d") and not int8:
        raise PlanError(f"--scaling_mode {mode} without --int8 is convert-to-quant's FP8 "
                        f"{'per-row' if mode == 'row' else 'block'} scaling, which is not written here; {FP8_HERE}. For INT8 give "
                        f"--int8 --scaling_mode {mode} (= --scaling_mode {'axis' if mode == 'row' else 'block'})")
    if mode == "block3d" or args.custom_scaling_mode == "block3d":
        raise PlanError("scaling mode block3d (convert-to-quant's legacy FP8 3-D groups) is not supported; "
                        "use --scaling_mode block")
    if mode is None:
        mode = "tensor" if int8 else "axis"
    args.scaling_mode = {"row": "axis", "block2d": "block"}.get(mode, mode)
    if args.custom_scaling_mode is not None:
        args.custom_scaling_mode = {"row": "axis", "block2d": "block"}.get(args.custom_scaling_mode,
                                                                            args.custom_scaling_mode)
    for flag, value in (("--custom-type", args.custom_type), ("--fallback", args.fallback)):
        if value == "fp8":
            raise PlanError(f"{flag} fp8: per-layer FP8 is not supported; {FP8_HERE} for the whole model, or use "
                            f"{flag} int8 or fp16")
        if value in FORMAT_CHOICES_UPSTREAM:
            raise PlanError(f"{flag} {value}: {value.upper()} is not supported here; use {flag} int8 or fp16")
    if int8 and args.fallback:
        raise PlanError("--fallback means something else here than in convert-to-quant: here it is the "
                        "format for layers whose shape does not fit; to quantize excluded layers as upstream "
                        "does, use --custom-layers REGEX --custom-type int8")
    if args.optimizer == "prodigy":
        raise PlanError("--optimizer prodigy (convert-to-quant's default) is not available here; use "
                        "--optimizer adamw (learned rounding), gptq with --calibration-data, or --simple")
    if int8 and not args.simple and args.optimizer is None:
        notes.append("note: convert-to-quant's default optimizer (Prodigy learned rounding) is not available "
                     "here; using " + ("gptq (with --calibration-data)" if args.calibration_data else
                                       "round-to-nearest (no --calibration-data)") + ", see docs/OPTIMIZERS.md")
    return notes
