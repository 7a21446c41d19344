"""The conversion pipeline: one safetensors file in, one quantized safetensors file (and report) out.

``convert_file`` streams: it validates the input header, builds the plan, computes the whole output
header from the plan, then reads, (merges LoRAs into,) quantizes and writes one tensor at a time, so peak
memory is about one layer. The output appears atomically at the end or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint import checkpoint_scope
from .errors import (BadWeightsError, CalibrationError, ConvertError, OutputPathError, PlanError,
                     UnsupportedInputError, display_name)
from .formats import quantized_weight_from_tensors
from .fp8_input import InputView
from .metrics import LayerQuality, QualityReport, error_stats
from .memory import place_layer, policy_from_options, run_guarded
from .seeding import enable_deterministic_gpu_math
from .streaming import Prefetcher, WriteBehind
from .optimizers import LayerContext, LayerDecisions, OptimizerOptions, get_optimizer, quantize_layer
from .optimizers.gptq import IndefiniteHessianError
from .paths import check_run_files
from .plan import ConversionPlan, PlanOptions, build_plan
from .paths import OutputLock, lock_path, note_published, partial_path, pause_point
from .safetensors_io import OutputEntry, SafetensorsReader, StreamingWriter

FORMAT_VERSION = "1.0"
STREAM_CHUNK_BYTES = 64 << 20  # pass-through tensors larger than this are copied in chunks of this size
ProgressFn = Callable[[int, int, str], None]


@dataclass
class ConvertOptions:
    plan: PlanOptions = field(default_factory=PlanOptions)
    optimizer: str = "rtn"
    optimizer_options: Dict[str, Any] = field(default_factory=dict)
    # a calibration file (``calibration.load_calibration``) or in-memory ``CalibrationData``; either
    # must have been captured on this model (``calibration.check_matches_model``)
    calibration_data: Optional[Any] = None
    loras: List[str] = field(default_factory=list)
    lora_strengths: List[float] = field(default_factory=list)
    lora_dampen: bool = False
    lora_strict: bool = False  # LoRA keys that match no layer are an error (else listed in the report)
    device: str = "auto"
    low_memory: bool = False
    report_path: Optional[str] = None
    quality_threshold: Optional[float] = 30.0
    nan_policy: str = "error"  # "error": refuse NaN/Inf weights; "keep": keep such layers unquantized
    overwrite: bool = False
    verify: bool = False
    schedule: str = "dynamic"  # multi-rank runs: "dynamic" work queue or "static" assignment (distributed.py)
    extra_metadata: Dict[str, str] = field(default_factory=dict)
    # further files the run reads, as (what, path) -- the CLI's --layer-config: no output may replace them
    also_reads: List[Tuple[str, str]] = field(default_factory=list)


@dataclass
class ConversionResult:
    output_path: str
    plan: ConversionPlan
    report: QualityReport
    seconds: float
    report_paths: List[str] = field(default_factory=list)
    lora_report: Any = None


def check_optimizer_fits_plan(optimizer: str, plan) -> None:
    """An optimizer that only chooses between integers (learned rounding: floor / ceil) cannot write a
    format on another grid (float8): refused before anything is read, naming both."""
    from .optimizers.base import optimizer_cost
    if not optimizer_cost(optimizer).integer_grid_only:
        return
    other = sorted({lp.spec.format for lp in plan.quantized_layers() if lp.spec.cls.grid_round is not None})
    if other:
        raise PlanError(f"optimizer {optimizer} rounds to integers (floor or ceiling); it cannot write "
                        f"{', '.join(other)}: use rtn or gptq for that format")


def plan_options_for(opts: "ConvertOptions") -> PlanOptions:
    """``opts.plan`` with the options' ``smoothquant`` applied to its format choices (the API's way of
    asking for SmoothQuant; the CLI and the nodes already chose ``int8_smoothquant`` through
    ``formats.spec_from_choice``): the plan is built once, with the final formats."""
    oo = opts.optimizer_options or {}
    if not oo.get("smoothquant"):
        return opts.plan
    from .formats import with_smoothquant
    p = opts.plan
    return dataclasses.replace(p, spec=with_smoothquant(p.spec),
                               custom_spec=with_smoothquant(p.custom_spec) if p.custom_spec is not None else None)


def check_options(opts: "ConvertOptions") -> None:
    """Options whose bad values would only show once the model is written (the report's JSON refuses
    a NaN threshold): checked before any work."""
    t = opts.quality_threshold
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
        raise PlanError(f"quality threshold must be a finite number of dB (or None), got {t!r}")


DEVICE_NAME = re.compile(r"(cpu|cuda)(?::(\d{1,6}))?")


def resolve_device(name) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` -- the devices conversions
    run on. Anything else (a name torch does not know, ``meta``, ``xpu``, ``cuda:abc``) and a GPU this
    machine does not have are a ``PlanError``."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip().lower()
    m = DEVICE_NAME.fullmatch(text)
    if m is None or (m[1] == "cpu" and m[2] not in (None, "0")):
        raise PlanError(f"device {str(name)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if m[1] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PlanError(f"device {str(name)!r} asked for, but no CUDA GPU is available")
    n = torch.cuda.device_count()
    if m[2] is not None and int(m[2]) >= n:
        raise PlanError(f"device {str(name)!r} asked for, but this machine has {n} CUDA GPU"
                        f"{'' if n == 1 else 's'} (cuda:0{'' if n == 1 else f' .. cuda:{n - 1}'})")
    return torch.device("cuda" if m[2] is None else f"cuda:{int(m[2])}")


def default_output_path(input_path: str, kind: str = "int8") -> str:
    """``<input stem>_<kind>.safetensors``; ``kind`` names the output format (int8, fp16)."""
    stem, _ = os.path.splitext(input_path)
    return f"{stem}_{kind}.safetensors"


def run_inputs(input_path: str, opts: "ConvertOptions") -> List[Tuple[str, Optional[str]]]:
    """Every file a conversion with ``opts`` reads, as ``(what, path)``: no output of the run may be one
    of them (``paths.check_run_files``)."""
    oo = opts.optimizer_options or {}
    return ([("input", input_path)] + [("LoRA", p) for p in opts.loras]
            + [("calibration data", _calibration_path(opts.calibration_data)),
               ("calibration LoRA", oo.get("calibration_lora"))]
            + list(opts.also_reads))


def _calibration_path(data) -> Optional[str]:
    """The file behind ``ConvertOptions.calibration_data`` (a path, or file-backed ``CalibrationData``)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return os.fspath(data) if data else None
    return getattr(data, "path", None)


def validate_paths(input_path: str, output_path: str, overwrite: bool = False,
                   options: Optional["ConvertOptions"] = None) -> str:
    """Refuse an output without a .safetensors suffix, in a missing or unwritable folder, or that is a
    folder; then check the output, its temporary file and the report files (``options.report_path``)
    against every file the run reads (``run_inputs``) and, without ``overwrite``, against existing
    files (``paths.check_run_files``). Returns the absolute output path."""
    opts = options or ConvertOptions()
    for p, what in ((input_path, "input"), (output_path, "output")):
        if "\x00" in os.fspath(p):
            raise OutputPathError(f"{what} path contains a NUL byte")
    out = os.path.abspath(output_path)
    if not out.lower().endswith(".safetensors"):
        raise OutputPathError(f"output {output_path} must end in .safetensors")
    # the writer deletes a stale <out>.partial before it starts: that name must not be an input either
    writes = [("output", out, True), ("output's temporary file", partial_path(out), False),
              ("output's lock file", lock_path(out), False)]
    if opts.report_path:
        writes += [("quality report file", p, True) for p in validate_report_path(opts.report_path)]
    check_run_files(run_inputs(input_path, opts), writes, overwrite)
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise OutputPathError(f"output folder {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {d} is not writable")
    if os.path.isdir(out):
        raise OutputPathError(f"output {out} is a directory")
    # the writer deletes a stale <out>.partial before it starts and removes its <out>.lock when it is
    # done: neither name may be the input (an input called model.safetensors.partial, or a symlink to
    # it) nor a folder
    for side, what in ((partial_path(out), "temporary file"), (lock_path(out), "lock file")):
        entry = os.path.join(os.path.realpath(os.path.dirname(side)), os.path.basename(side))
        if entry == os.path.realpath(input_path) or (
                os.path.exists(side) and os.path.exists(input_path) and os.path.samefile(side, input_path)):
            raise OutputPathError(f"output {output_path} would use {side} as its {what}, which is the "
                                  "input; choose another output name")
        if os.path.isdir(side) and not os.path.islink(side):
            raise OutputPathError(f"{side} (the {what} for the output) is a directory; remove it or "
                                  "choose another output name")
    return out


def output_path_in_folder(folder: str, name: str, suffix: str = ".safetensors") -> str:
    """Join a file name typed into a UI (a ComfyUI Save node) to ``folder``, refusing every name that
    would land outside it: absolute paths (also ``C:``/``\\``), ``..`` parts, NUL bytes, and symlinks
    inside ``folder`` that lead out. Subfolders are allowed; ``suffix`` is appended when missing."""
    if not isinstance(name, str) or not name.strip():
        raise OutputPathError("output file name is empty")
    if "\x00" in name:
        raise OutputPathError(f"output file name {name!r} contains a NUL byte")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise OutputPathError(f"output file name {name!r} is an absolute path; give a name inside {folder}")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise OutputPathError(f"output file name {name!r} contains '..'; it must stay inside {folder}")
    path = os.path.join(folder, *[p for p in parts if p not in ("", ".")])
    if not path.lower().endswith(suffix):
        path += suffix
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise OutputPathError(f"output file name {name!r} leads outside {folder} through a symbolic link")
    return path


def validate_report_path(report_path: str) -> List[str]:
    """The report's JSON and Markdown files, refused when one is a folder or sits in a non-folder (what
    they may not replace is ``paths.check_run_files``'s business)."""
    from .metrics import report_file_paths
    if "\x00" in os.fspath(report_path):
        raise OutputPathError("report path contains a NUL byte")
    files = report_file_paths(report_path)
    for p in files:
        if os.path.isdir(p):
            raise OutputPathError(f"quality report file {p} is a directory")
        d = os.path.dirname(os.path.abspath(p))
        if os.path.exists(d) and not os.path.isdir(d):
            raise OutputPathError(f"quality report folder {d} is not a folder")
    return files


def quantization_metadata(plan: ConversionPlan) -> Dict[str, dict]:
    layers = {}
    for lp in plan.quantized_layers():
        cfg = lp.spec.cls.comfy_quant(lp.spec.params)
        if cfg is not None:
            layers[lp.base] = cfg
    return layers


def _nonfinite(t: torch.Tensor) -> Optional[str]:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        return f"{n_nan} NaN and {n_inf} Inf values"
    return None


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation above ``threshold`` with its own mmap, returned to the OS on
    free. Without this, glibc raises its mmap threshold after the first large free and later layer-sized
    buffers land in the heap, which fragments and keeps RSS at ~2x what one layer needs (measured in
    benchmarks/memory.py: 439 -> 204 MB above baseline for 4096x4096 block-wise layers)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1
        libc.mallopt(M_TRIM_THRESHOLD, threshold)
        return ok
    except (OSError, AttributeError):
        return False


class ConversionJob:
    """Everything decided before the first tensor is written: reader, plan, LoRA merger, calibration,
    output header. ``process(key)`` turns one input tensor into its output tensors; ``run()`` streams
    the whole file through one writer. Multi-process runners call ``process`` on their share of keys."""

    def __init__(self, input_path: str, output_path: Optional[str] = None,
                 options: Optional[ConvertOptions] = None, log: Callable[[str], None] = lambda m: None):
        self.t0 = time.perf_counter()
        self.opts = opts = options or ConvertOptions()
        self.log = log
        self.input_path = input_path
        self.prefetched: Dict[str, torch.Tensor] = {}  # key -> tensor already read (run's read-ahead)
        self.summary_extra: Dict[str, object] = {}  # extra report-summary entries (multi-rank timing)
        self.output_lock: Optional[OutputLock] = None  # held from open_writer until the report is written
        if opts.low_memory:
            limit_heap_growth()
        self.reader = SafetensorsReader(input_path)
        try:
            self._prepare(output_path or default_output_path(
                input_path, "fp16" if opts.plan.spec.format == "fp16" else "int8"))
        except BaseException:
            if getattr(self, "_own_calibration", False):
                self.calibration.close()
            self.reader.close()
            raise

    def _prepare(self, output_path: str):
        opts, reader, log = self.opts, self.reader, self.log
        # typed, checked once (unknown keys / wrong types name the key); per-layer decisions go apart
        self.options = OptimizerOptions.from_dict(opts.optimizer_options)
        check_options(opts)
        self.output_path = validate_paths(reader.path, output_path, opts.overwrite, opts)
        # the file as the float model it stands for: fp8 layers dequantized, their scale keys consumed,
        # anything else quantized refused (fp8_input: the one place that decides what an input means)
        self.reader = reader = InputView(reader)
        self.plan = plan = build_plan(reader.infos, plan_options_for(opts))
        plan.notes[:0] = reader.notes
        for note in plan.notes:
            log(note)
        self.optimizer = get_optimizer(opts.optimizer)
        check_optimizer_fits_plan(opts.optimizer, plan)
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda":
            enable_deterministic_gpu_math()
        self.memory = policy_from_options(opts.optimizer_options, self.device, opts.low_memory)
        if self.memory.device.type == "cuda" or self.memory.bf16 == "on":
            log(f"memory: {self.memory.describe()}")

        self.merger, self.lora_report = None, None
        if opts.loras:
            from .lora import LoraMerger
            self.merger = LoraMerger.from_files(opts.loras, opts.lora_strengths or [1.0] * len(opts.loras),
                                                dampen=opts.lora_dampen, strict=opts.lora_strict)
            self.lora_report = self.merger.bind(
                {k: (i.dtype, i.shape) for k, i in reader.infos.items()},
                kept={lp.weight_key for lp in plan.layers.values() if lp.spec is None})
            for line in self.lora_report.lines():
                log(line)

        self.calibration = None
        self._own_calibration = False
        if opts.calibration_data is not None and not isinstance(opts.calibration_data, (str, os.PathLike)):
            self.calibration = opts.calibration_data  # the caller's CalibrationData: the caller closes it
        elif opts.calibration_data:
            from .calibration import load_calibration
            self.calibration = load_calibration(os.fspath(opts.calibration_data))
            self._own_calibration = True
        if self.calibration is not None:
            from .calibration import check_matches_model
            check_matches_model(self.calibration, {k: i.shape for k, i in reader.infos.items()}, reader.path)

        if opts.nan_policy == "keep":
            _keep_nonfinite_layers(reader, plan, self.merger, log)
        elif opts.nan_policy != "error":
            raise ConvertError(f"unknown NaN policy {opts.nan_policy!r} (error, keep)")

        self._prepare_calibrated_steps(plan, log)
        from .optimizers.input_scale import merge_extra
        self.entries = plan.output_entries(extra=merge_extra(
            self.bias_correction["extra"] if self.bias_correction else None,
            self.input_scales["extra"] if self.input_scales else None))
        self.metadata = dict(reader.metadata)
        qmeta = quantization_metadata(plan)
        if qmeta:
            self.metadata["_quantization_metadata"] = json.dumps(
                {"format_version": FORMAT_VERSION, "layers": qmeta}, sort_keys=True, separators=(",", ":"))
        self.metadata.update(opts.extra_metadata)

        self.report = QualityReport(opts.quality_threshold)
        self.report.notes.extend(plan.notes)
        if self.calibration is None and opts.optimizer != "rtn":
            self.report.notes.append(f"optimizer {opts.optimizer}: no calibration data, weight-only objective")
        dropped = set(plan.dropped)
        self.order = [k for k in sorted(reader.keys(), key=lambda k: reader.info(k).begin) if k not in dropped]
        # large tensors copied unchanged (not a layer to quantize, no LoRA delta, no corrected bias) are
        # streamed input -> output in chunks by ``run`` instead of being read whole
        corrected = {b + ".bias" for b in self.bias_correction["layers"]} if self.bias_correction else set()
        self.streamed = {k for k in self.order
                         if reader.info(k).nbytes > STREAM_CHUNK_BYTES and k not in corrected
                         and not reader.transformed(k)
                         and (plan.layer_for_key(k) is None or plan.layer_for_key(k).spec is None)
                         and (self.merger is None or not self.merger.has_delta(k))}

    def _prepare_calibrated_steps(self, plan, log):
        """SmoothQuant (changes layer formats), bias correction (may add bias tensors) and the
        --calibration-lora weighting: all decided before the header is computed."""
        oo = self.opts.optimizer_options or {}
        notes = []
        from .optimizers.smoothquant import apply_to_plan, plans_smoothquant
        if plans_smoothquant(plan):
            notes += apply_to_plan(plan, self.calibration, self.options)
        self.bias_correction = None
        if oo.get("bias_correction"):
            from .optimizers.bias_correction import plan_bias_correction
            self.bias_correction = plan_bias_correction(plan, self.calibration)
            notes += self.bias_correction["notes"]
        self.input_scales = None
        if oo.get("input_scale") or oo.get("static_activations"):
            from .optimizers.input_scale import plan_input_scales
            self.input_scales = plan_input_scales(plan, self.calibration)
            notes += self.input_scales["notes"]
        self.lora_directions = None
        if oo.get("calibration_lora"):
            from .optimizers.objective import LoraDirections
            # its weight is typed and range-checked once, in optimizers/options.py
            self.lora_directions = LoraDirections(
                oo["calibration_lora"], {k: (i.dtype, i.shape) for k, i in self.reader.infos.items()})
        for n in notes:
            log(n)
        plan.notes.extend(notes)

    def process(self, key: str, device: Optional[torch.device] = None
                ) -> Tuple[Dict[str, torch.Tensor], Optional[Tuple[str, LayerQuality]]]:
        """Output tensors (on the CPU) for input tensor ``key`` (read by ``run``'s read-ahead thread when
        it is in ``self.prefetched``), and the layer's quality entry if it is a layer. Raises
        BadWeightsError for non-finite weights of a layer to quantize. The layer runs where the memory
        policy places it (``memory.place_layer``) and is retried smaller or on the CPU when the GPU runs
        out of memory (``memory.run_guarded``)."""
        info = self.reader.info(key)
        t = self.prefetched.pop(key, None)
        if t is None:
            t = self.reader.get(key)
        if self.merger is not None:
            t = self.merger.apply(key, t)
        lp = self.plan.layer_for_key(key)
        if (self.bias_correction and key.endswith(".bias")
                and key[: -len(".bias")] in self.bias_correction["layers"]):
            return {}, None  # written, corrected, together with its layer's weight
        if lp is None or lp.spec is None:
            if self.merger is not None:  # refuses a merge that overflows the dtype the tensor is written in
                t = self.merger.cast(key, t, info.dtype)
            out = {key: t.to(info.dtype) if t.dtype != info.dtype else t}
            if lp is None:
                return out, None
            kept = LayerQuality(format=f"keep {info.dtype_name}", shape=list(info.shape), quantized=False,
                                reason=lp.reason)
            if self.reader.source(key):
                kept.notes.append(f"input {self.reader.source(key)}")
            return out, (lp.base, kept)
        policy = self.memory
        if device is not None and torch.device(device) != policy.device:
            policy = dataclasses.replace(policy, device=torch.device(device))
        rotated = lp.spec.cls.rotated(lp.spec.params)
        placement = place_layer(info.shape, self.opts.optimizer, policy, rotated)
        lora_delta = self.lora_directions.delta(key, t) if self.lora_directions is not None else None
        stats = self.calibration.for_layer(lp.base) if self.calibration is not None else None
        seed = (self.opts.optimizer_options or {}).get("manual_seed")

        def attempt(pl):
            # the non-finite check runs on the device: on a GPU it costs nothing, on the host it would
            # be a full pass over every weight in the main thread
            w = t.to(pl.device, non_blocking=t.is_pinned())
            bad = _nonfinite(w)
            if bad:
                raise BadWeightsError(f"{display_name(key)}: weight has {bad}; refusing to quantize it "
                                      "(use nan_policy='keep' to keep such layers unquantized)")
            _check_float32_range(w, key, info.dtype_name)
            w = w.to(torch.float32)
            decisions = LayerDecisions(
                row_segments=pl.row_segments,
                hessian_device=str(pl.hessian_device) if pl.hessian_device is not None else None,
                bf16_hadamard=rotated and policy.use_bf16(
                    "hadamard", w.numel(), pl.device,
                    exact_input=info.dtype == torch.bfloat16 and t.dtype == torch.bfloat16),
                bf16_hessian=rotated and policy.use_bf16("hessian", w.shape[1] ** 2, pl.device))
            ctx = LayerContext(base=lp.base, device=pl.device, options=self.options, decisions=decisions,
                               orig_dtype=info.dtype, log=self.log, lora_delta=lora_delta, stats=stats)
            try:
                res = quantize_layer(self.optimizer, w, lp.spec, ctx, seed)
            except IndefiniteHessianError as e:
                src = (f"{self.calibration.describe()}, statistics {display_name(stats.name)}"
                       if stats is not None else "the weight-only objective")
                raise CalibrationError(f"{display_name(lp.base)}: optimizer {self.opts.optimizer} cannot use "
                                       f"{src}: {e}") from None
            qw = res.qw
            if qw.format != lp.spec.format or qw.params != lp.spec.params:
                raise ConvertError(f"internal error: optimizer {self.opts.optimizer} returned "
                                   f"{qw.format} {qw.params} for {display_name(lp.base)}, planned {lp.spec.describe()}")
            # quality from the tensors as written, dequantized on the device (the host copy is bitwise equal)
            tensors = dict(lp.spec.cls.tensors(lp.base, qw))
            if self.bias_correction and lp.base in self.bias_correction["layers"]:
                tensors.update(self._corrected_bias(lp, w, qw, ctx, info.dtype))
                res.info.setdefault("notes", []).append("bias corrected with the calibration mean")
            if self.input_scales and lp.base in self.input_scales["layers"]:
                from .optimizers.input_scale import input_scale
                tensors[lp.base + ".input_scale"] = input_scale(stats.absmax).to(w.device)
            deq = _dequantize_written(lp, tensors, info.dtype)
            _check_written_finite(lp, tensors, deq, w)
            lq = _layer_quality(lp, w, tensors, info.dtype, self.opts.optimizer, res.info, deq)
            return {k: self.to_host(v) for k, v in tensors.items()}, lq

        (tensors, lq), notes = run_guarded(attempt, placement, self.opts.optimizer, policy, display_name(lp.base), self.log)
        if self.reader.source(key):
            lq.notes.append(f"input {self.reader.source(key)}; SQNR measured against the dequantized input")
        if placement.reason:
            lq.notes.append(f"placed on {placement.describe()}: {placement.reason}")
        lq.notes.extend(notes)
        return tensors, (lp.base, lq)

    def _corrected_bias(self, lp, w, qw, ctx, weight_dtype) -> Dict[str, torch.Tensor]:
        from .optimizers.bias_correction import corrected_bias
        bkey = lp.base + ".bias"
        b, dtype = None, weight_dtype
        if bkey in self.reader.infos:
            b, dtype = self.reader.get(bkey), self.reader.info(bkey).dtype
            if self.merger is not None:
                b = self.merger.apply(bkey, b)
        nb = corrected_bias(b, w, qw.dequantize().to(w.device), ctx.stats.mean)
        return {bkey: nb.to(dtype).cpu()}

    def open_writer(self) -> StreamingWriter:
        """The writer of the output file. The job takes the output's lock here (``OutputBusyError`` when
        another conversion writes the same output) and holds it until the quality report is written
        (``finish``) or the job is closed, so the model and its report are one run's."""
        if self.output_lock is None:
            self.output_lock = OutputLock(self.output_path).acquire()
        return StreamingWriter(self.output_path, self.entries, self.metadata, overwrite=self.opts.overwrite,
                               checksums=self.opts.verify, lock=self.output_lock)

    def release_output(self):
        lock, self.output_lock = self.output_lock, None
        if lock is not None:
            lock.release()

    @property
    def pin_host_memory(self) -> bool:
        """Stage GPU transfers through page-locked host buffers (reused by CUDA's caching host allocator):
        pageable copies run at a fraction of the bus speed. Not with --low-memory (locked RAM)."""
        return self.memory.device.type == "cuda" and not self.opts.low_memory

    def read_input(self, key: str) -> Optional[torch.Tensor]:
        if key in self.streamed:
            return None  # copied in chunks by ``run`` (``copy_streamed``), never read whole
        return self.reader.get(key, pin=self.pin_host_memory)

    def copy_streamed(self, writer: StreamingWriter, key: str):
        """Copy pass-through tensor ``key`` from the input to ``writer`` in chunks of at most
        STREAM_CHUNK_BYTES: memory stays bounded whatever the tensor's size (a 10 GB embedding table
        is never held whole)."""
        info = self.reader.info(key)
        writer.write_chunks(key, info.dtype, info.shape, self.reader.iter_chunks(key, STREAM_CHUNK_BYTES))

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type != "cuda" or not self.pin_host_memory:
            return t.cpu()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t)
        return out

    def run(self, progress: Optional[ProgressFn] = None,
            check_cancel: Optional[Callable[[], None]] = None,
            layer_progress: Optional[Callable[[float, int, str], None]] = None) -> "ConversionResult":
        """Stream every tensor through one writer. Reading the next tensors (a bounded read-ahead thread)
        and writing finished ones (a bounded write-behind thread) overlap the quantization of the current
        one; ``--low-memory`` does all three in turn, one tensor at a time.

        ``check_cancel`` runs between tensors and, rate-limited, inside the optimizer loops of a layer
        (``checkpoint``); ``layer_progress(layers done as a float, layers, name)`` follows a layer as
        it runs (``progress`` reports whole layers)."""
        n_layers = len(self.plan.quantized_layers())
        done = 0
        bound = self.memory.prefetch_bytes
        sizes = {k: 0 if k in self.streamed else self.reader.info(k).nbytes for k in self.order}
        writer = None
        try:
            with self.open_writer() as writer:
                with WriteBehind(writer, bound) as out, \
                        Prefetcher(self.read_input, self.order, sizes, bound) as inputs:
                    for key, t in inputs:
                        if check_cancel is not None:
                            check_cancel()
                        if key in self.streamed:
                            self.copy_streamed(writer, key)
                            continue
                        self.prefetched = {key: t}
                        del t
                        lp = self.plan.layer_for_key(key)
                        inner = None
                        if layer_progress is not None and lp is not None and lp.spec is not None:
                            inner = (lambda f, _d=done, _n=lp.base: layer_progress(_d + f, n_layers, _n))
                        with checkpoint_scope(check_cancel, inner):
                            tensors, layer = self.process(key)
                        self.prefetched = {}
                        out.put(tensors)
                        del tensors
                        if layer is not None:
                            self.report.add(*layer)
                            if layer[1].quantized:
                                done += 1
                                if progress is not None:
                                    progress(done, n_layers, layer[0])
                writer.finish(verify=lambda tmp: self.verify(tmp, writer.checksums))
            return self.finish(writer.checksums, verified=True)
        except BaseException as e:
            if writer is not None and writer.published:  # an interrupt after the rename: the file is there
                note_published(e, self.output_path)
            raise

    def verify(self, path: str, checksums: Dict[str, str]):
        """Check a written file (the ``.partial`` before it is renamed): header, keys, dtypes and shapes
        against the plan always; with ``--verify`` also every tensor's SHA-256 and the quality report
        recomputed from the file."""
        verify_output(path, self.entries, checksums if self.opts.verify else None)
        if self.opts.verify:
            verify_quality(self, path)

    def finish(self, checksums: Dict[str, str], verified: bool = False) -> "ConversionResult":
        """After the file is in place: verify it (unless ``run`` did before the rename), finalize and
        write the report, then release the output's lock. A file that fails verification is removed.
        An interrupt that lands here is marked ``output_published`` (the model is in place)."""
        out = self.output_path
        published = verified
        try:
            if not verified:
                try:
                    self.verify(out, checksums)
                except BaseException:
                    try:
                        os.unlink(out)
                    except FileNotFoundError:
                        pass
                    raise
                published = True
            self.reader.close()
            seconds = time.perf_counter() - self.t0
            plan = self.plan
            self.report.finalize(bytes_in=os.path.getsize(self.input_path), bytes_out=os.path.getsize(out),
                                 seconds=round(seconds, 3), optimizer=self.opts.optimizer,
                                 presets=plan.presets, family=plan.family,
                                 input=os.path.basename(self.input_path), output=os.path.basename(out),
                                 **self.summary_extra)
            for w_ in self.report.warnings:
                self.log("warning: " + w_)
            pause_point("report")
            try:
                paths = (self.report.write(self.opts.report_path, overwrite=self.opts.overwrite)
                         if self.opts.report_path else [])
            except OSError as e:  # disk full, permissions: the model itself is complete and verified
                raise OutputPathError(f"{out} was written, but the quality report {self.opts.report_path} "
                                      f"could not be: {e.strerror or e}") from None
        except BaseException as e:
            if published:
                note_published(e, out)
            raise
        finally:
            self.release_output()
        return ConversionResult(out, plan, self.report, seconds, paths, self.lora_report)

    def close(self):
        self.release_output()
        self.reader.close()
        if self.calibration is not None and self._own_calibration:
            self.calibration.close()
        from .optimizers.gptq import clear_graphs
        clear_graphs()  # the captured GPTQ sweeps hold VRAM: give it back to the host (ComfyUI) when done


def convert_file(input_path: str, output_path: Optional[str] = None, options: Optional[ConvertOptions] = None,
                 progress: Optional[ProgressFn] = None, check_cancel: Optional[Callable[[], None]] = None,
                 log: Callable[[str], None] = lambda m: None,
                 layer_progress: Optional[Callable[[float, int, str], None]] = None) -> ConversionResult:
    """Convert ``input_path`` to a quantized safetensors file. See ``ConvertOptions`` and ``run``."""
    job = ConversionJob(input_path, output_path, options, log)
    try:
        return job.run(progress, check_cancel, layer_progress)
    finally:
        job.close()


def _dequantize_written(lp, tensors: Dict[str, torch.Tensor], orig_dtype) -> torch.Tensor:
    """The layer's weight rebuilt from exactly the tensors written, dequantized like a loader (float32)."""
    prefix = lp.base + "."
    stored = {k[len(prefix):]: v for k, v in tensors.items()}
    if "comfy_quant" in stored:
        cfg = json.loads(bytes(stored["comfy_quant"].tolist()).decode("utf-8"))
        return quantized_weight_from_tensors(lp.base, cfg, stored, orig_dtype).dequantize()
    return stored["weight"].float()


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_float32_range(t: torch.Tensor, key: str, dtype_name: str):
    """A float64 weight whose finite values exceed float32's range (|x| > 3.4e38) cannot be quantized:
    every format computes in float32, where such a value is Inf. Refused whatever --nan-policy says
    (it is not NaN/Inf in the file), naming the tensor, the value and the range."""
    if t.dtype != torch.float64 or t.numel() == 0:
        return
    m = float(t.abs().amax())
    if m > FLOAT32_MAX:
        n = int((t.abs() > FLOAT32_MAX).sum())
        raise BadWeightsError(
            f"{display_name(key)}: {dtype_name} weight has {n} value(s) out of float32 range (largest "
            f"magnitude {m:.6g} > {FLOAT32_MAX:.6g}); they cannot be quantized (the quantization math is "
            "float32). Rescale the model, or keep this layer with --exclude-layers")


def _check_written_finite(lp, tensors: Dict[str, torch.Tensor], deq: torch.Tensor, w: torch.Tensor):
    """The last check before a quantized layer is handed to the writer: every float tensor written
    (scales, fp16 weights, extra factors) and the weight they dequantize to must be finite. The input
    was finite (checked before), so a non-finite value here is an overflow of the format's math (e.g.
    the convrot rotation of rows near float32's largest value); nothing non-finite is ever written."""
    what = None
    for k, v in tensors.items():
        # (1-byte floats -- fp8 weights -- have no isfinite: their values are checked as the dequantized weight)
        if v.is_floating_point() and v.element_size() > 1 and not bool(torch.isfinite(v).all()):
            what = f"{display_name(k)} would hold {_nonfinite(v)}"
            break
    if what is None and not bool(torch.isfinite(deq).all()):
        what = f"the stored layer would dequantize to {_nonfinite(deq)}"
    if what is None:
        return
    amax = float(w.abs().amax()) if w.numel() else 0.0
    why = ""
    if lp.spec.cls.rotated(lp.spec.params):
        why = (f" the rotation multiplies values by up to sqrt(group size) and the weight's largest "
               f"magnitude is {amax:.6g}, beyond float32's range after rotation;")
    raise BadWeightsError(f"{display_name(lp.weight_key)}: quantizing it as {lp.spec.describe()} overflows "
                          f"float32: {what};{why} refusing to write non-finite values. Keep this layer with "
                          "--exclude-layers, or choose a format without rotation for it (--layer-config)")


def _layer_quality(lp, w: torch.Tensor, tensors: Dict[str, torch.Tensor], orig_dtype, optimizer: str,
                   info: Dict[str, Any], deq: Optional[torch.Tensor] = None) -> LayerQuality:
    """Quality of the stored tensors, rebuilt from exactly what is written and dequantized like a loader."""
    if deq is None:
        deq = _dequantize_written(lp, tensors, orig_dtype)
    st = error_stats(w, deq.to(w.device))
    lq = LayerQuality(format=lp.spec.describe(), shape=list(lp.shape), quantized=True, optimizer=optimizer,
                      mse=st["mse"], sqnr_db=st["sqnr_db"], max_abs_err=st["max_abs_err"],
                      reason=lp.reason, fallback=lp.fallback_reason)
    if info.get("output_sqnr_db") is not None:
        lq.output_sqnr_db = float(info["output_sqnr_db"])
    for n in info.get("notes", []):
        lq.notes.append(str(n))
    return lq


def _keep_nonfinite_layers(reader, plan: ConversionPlan, merger, log):
    for lp in plan.quantized_layers():
        t = reader.get(lp.weight_key)
        if merger is not None:
            t = merger.apply(lp.weight_key, t)
        bad = _nonfinite(t)
        if bad:
            log(f"warning: {display_name(lp.weight_key)} has {bad}; kept unquantized (nan_policy='keep')")
            lp.reason = f"non-finite weights ({bad}) kept unquantized"
            lp.spec = None


def verify_output(path: str, entries: List[OutputEntry], checksums: Optional[Dict[str, str]] = None):
    """Reopen the written file: the header must list exactly the planned keys, dtypes and shapes; with
    ``checksums`` every tensor's bytes are re-read and compared."""
    import hashlib
    with SafetensorsReader(path) as r:
        want = {e.key: e for e in entries}
        if set(r.keys()) != set(want):
            missing = sorted(set(want) - set(r.keys()))[:3]
            extra = sorted(set(r.keys()) - set(want))[:3]
            raise ConvertError(f"verification of {path} failed: missing {missing}, unexpected {extra}")
        for k, e in want.items():
            info = r.info(k)
            if info.dtype != e.dtype or tuple(info.shape) != tuple(e.shape):
                raise ConvertError(f"verification of {path} failed: {display_name(k)} is {info.dtype_name} {list(info.shape)}, "
                                   f"planned {e.dtype} {list(e.shape)}")
        if checksums:
            for k, digest in checksums.items():
                h = hashlib.sha256()
                for chunk in r.iter_chunks(k, STREAM_CHUNK_BYTES):
                    h.update(chunk)
                if h.hexdigest() != digest:
                    raise ConvertError(f"verification of {path} failed: checksum of {display_name(k)} differs from what was written")


QUALITY_RTOL = 1e-5  # GPU reductions may sum in another order than the recomputation on the CPU


def verify_quality(job: "ConversionJob", path: str):
    """``--verify``: rebuild every quantized layer from the written file exactly as the loader does,
    recompute its error against the input weights (LoRAs merged again), and require the per-layer
    numbers and the summary to equal the report's."""
    from .loading import quant_layer_configs, read_layer
    from .metrics import error_stats

    def close(a, b):
        if a is None or b is None:
            return a is None and b is None
        if a == b:  # also +inf == +inf (exact layers)
            return True
        return abs(a - b) <= QUALITY_RTOL * max(abs(a), abs(b), 1e-12)

    fresh = QualityReport(job.opts.quality_threshold)
    with SafetensorsReader(path) as out:
        cfgs = quant_layer_configs(out)
        for base, lq in job.report.layers.items():
            lp = job.plan.layers.get(base)
            if not lq.quantized or lp is None:
                fresh.add(base, lq)
                continue
            info = job.reader.info(lp.weight_key)
            w = job.reader.get(lp.weight_key)
            if job.merger is not None:
                w = job.merger.apply(lp.weight_key, w)
            w = w.to(torch.float32)
            if base in cfgs:
                deq = read_layer(out, base, cfgs[base], info.dtype)[0].dequantize()
            else:
                deq = out.get(lp.weight_key).float()
            st = error_stats(w, deq)
            for name in ("mse", "sqnr_db", "max_abs_err"):
                if not close(st[name], getattr(lq, name)):
                    raise ConvertError(f"verification of {path} failed: layer {display_name(base)} {name} recomputed from "
                                       f"the file is {st[name]}, the report says {getattr(lq, name)}")
            fresh.add(base, dataclasses.replace(lq, mse=st["mse"], sqnr_db=st["sqnr_db"],
                                                max_abs_err=st["max_abs_err"]))
    want, got = job.report.finalize(), fresh.finalize()
    for name in ("layers_quantized", "layers_kept", "layers_fallback", "formats", "mean_sqnr_db",
                 "min_sqnr_db", "layers_below_threshold"):
        a, b = got.get(name), want.get(name)
        same = close(a, b) if isinstance(a, float) or isinstance(b, float) else a == b
        if not same:
            raise ConvertError(f"verification of {path} failed: summary {name} recomputed from the file is "
                               f"{a}, the report says {b}")
