"""The conversion pipeline: one safetensors file in, one quantized safetensors file (and report) out.

``convert_file`` streams: it validates the input header, builds the plan, computes the whole output
header from the plan, then reads, (merges LoRAs into,) quantizes and writes one tensor at a time, so peak
memory is about one layer. The output appears atomically at the end or not at all.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .errors import BadWeightsError, ConvertError, OutputPathError
from .formats import quantized_weight_from_tensors
from .metrics import LayerQuality, QualityReport, error_stats
from .optimizers import LayerContext, get_optimizer
from .plan import ConversionPlan, PlanOptions, build_plan
from .safetensors_io import OutputEntry, SafetensorsReader, StreamingWriter

FORMAT_VERSION = "1.0"
ProgressFn = Callable[[int, int, str], None]


@dataclass
class ConvertOptions:
    plan: PlanOptions = field(default_factory=PlanOptions)
    optimizer: str = "rtn"
    optimizer_options: Dict[str, Any] = field(default_factory=dict)
    calibration_data: Optional[str] = None
    loras: List[str] = field(default_factory=list)
    lora_strengths: List[float] = field(default_factory=list)
    lora_dampen: bool = False
    device: str = "auto"
    low_memory: bool = False
    report_path: Optional[str] = None
    quality_threshold: Optional[float] = 30.0
    nan_policy: str = "error"  # "error": refuse NaN/Inf weights; "keep": keep such layers unquantized
    overwrite: bool = False
    verify: bool = False
    extra_metadata: Dict[str, str] = field(default_factory=dict)


@dataclass
class ConversionResult:
    output_path: str
    plan: ConversionPlan
    report: QualityReport
    seconds: float
    report_paths: List[str] = field(default_factory=list)
    lora_report: Any = None


def resolve_device(name: str) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"device {name!r} asked for, but no CUDA GPU is available")
    return dev


def default_output_path(input_path: str) -> str:
    stem, _ = os.path.splitext(input_path)
    return stem + "_int8.safetensors"


def validate_paths(input_path: str, output_path: str, overwrite: bool = False) -> str:
    """Refuse an output that is the input (also via a symlink), has no .safetensors suffix, sits in a
    missing or unwritable folder, or exists without ``overwrite``. Returns the absolute output path."""
    for p, what in ((input_path, "input"), (output_path, "output")):
        if "\x00" in os.fspath(p):
            raise OutputPathError(f"{what} path contains a NUL byte")
    out = os.path.abspath(output_path)
    if not out.lower().endswith(".safetensors"):
        raise OutputPathError(f"output {output_path} must end in .safetensors")
    if os.path.realpath(out) == os.path.realpath(input_path) or (
            os.path.exists(out) and os.path.exists(input_path) and os.path.samefile(out, input_path)):
        raise OutputPathError(f"output {output_path} is the input file; refusing to overwrite the input")
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise OutputPathError(f"output folder {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {d} is not writable")
    if os.path.lexists(out) and not overwrite:
        raise OutputPathError(f"{out} already exists (use --overwrite to replace it)")
    if os.path.isdir(out):
        raise OutputPathError(f"output {out} is a directory")
    return out


def quantization_metadata(plan: ConversionPlan) -> Dict[str, dict]:
    layers = {}
    for lp in plan.quantized_layers():
        cfg = lp.spec.cls.comfy_quant(lp.spec.params)
        if cfg is not None:
            layers[lp.base] = cfg
    return layers


def _check_not_quantized(reader: SafetensorsReader):
    if "_quantization_metadata" in reader.metadata or any(k.endswith(".comfy_quant") for k in reader.keys()):
        raise ConvertError(f"{reader.path} is already quantized (it has comfy_quant metadata); "
                           "convert the original float model instead")


def _nonfinite(t: torch.Tensor) -> Optional[str]:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        return f"{n_nan} NaN and {n_inf} Inf values"
    return None


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
        self.reader = SafetensorsReader(input_path)
        try:
            self._prepare(output_path or default_output_path(input_path))
        except BaseException:
            self.reader.close()
            raise

    def _prepare(self, output_path: str):
        opts, reader, log = self.opts, self.reader, self.log
        self.output_path = validate_paths(reader.path, output_path, opts.overwrite)
        _check_not_quantized(reader)
        self.plan = plan = build_plan(reader.infos, opts.plan)
        for note in plan.notes:
            log(note)
        self.optimizer = get_optimizer(opts.optimizer)
        self.device = resolve_device(opts.device)

        self.merger, self.lora_report = None, None
        if opts.loras:
            from .lora import LoraMerger
            self.merger = LoraMerger.from_files(opts.loras, opts.lora_strengths or [1.0] * len(opts.loras),
                                                dampen=opts.lora_dampen)
            self.lora_report = self.merger.bind(
                {k: (i.dtype, i.shape) for k, i in reader.infos.items()},
                kept={lp.weight_key for lp in plan.layers.values() if lp.spec is None})
            for line in self.lora_report.lines():
                log(line)

        self.calibration = None
        if opts.calibration_data:
            from .calibration import load_calibration
            self.calibration = load_calibration(opts.calibration_data)

        if opts.nan_policy == "keep":
            _keep_nonfinite_layers(reader, plan, self.merger, log)
        elif opts.nan_policy != "error":
            raise ConvertError(f"unknown NaN policy {opts.nan_policy!r} (error, keep)")

        self.entries = plan.output_entries()
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

    def process(self, key: str, device: Optional[torch.device] = None
                ) -> Tuple[Dict[str, torch.Tensor], Optional[Tuple[str, LayerQuality]]]:
        """Output tensors (on the CPU) for input tensor ``key``, and the layer's quality entry if it is a
        layer. Raises BadWeightsError for non-finite weights of a layer to quantize."""
        info = self.reader.info(key)
        t = self.reader.get(key)
        if self.merger is not None:
            t = self.merger.apply(key, t)
        lp = self.plan.layer_for_key(key)
        if lp is None or lp.spec is None:
            out = {key: t.to(info.dtype) if t.dtype != info.dtype else t}
            if lp is None:
                return out, None
            return out, (lp.base, LayerQuality(format=f"keep {info.dtype_name}", shape=list(info.shape),
                                               quantized=False, reason=lp.reason))
        bad = _nonfinite(t)
        if bad:
            raise BadWeightsError(f"{key}: weight has {bad}; refusing to quantize it "
                                  "(use --nan-policy keep to keep such layers unquantized)")
        device = device or self.device
        w = t.to(device=device, dtype=torch.float32)
        del t
        ctx = LayerContext(base=lp.base, device=device, options=self.opts.optimizer_options,
                           orig_dtype=info.dtype, log=self.log,
                           stats=self.calibration.for_layer(lp.base) if self.calibration is not None else None)
        res = self.optimizer(w, lp.spec, ctx)
        qw = res.qw
        if qw.format != lp.spec.format or qw.params != lp.spec.params:
            raise ConvertError(f"internal error: optimizer {self.opts.optimizer} returned "
                               f"{qw.format} {qw.params} for {lp.base}, planned {lp.spec.describe()}")
        tensors = {k: v.detach().cpu() for k, v in lp.spec.cls.tensors(lp.base, qw).items()}
        lq = _layer_quality(lp, w, tensors, info.dtype, self.opts.optimizer, res.info)
        return tensors, (lp.base, lq)

    def open_writer(self) -> StreamingWriter:
        return StreamingWriter(self.output_path, self.entries, self.metadata, overwrite=self.opts.overwrite)

    def run(self, progress: Optional[ProgressFn] = None,
            check_cancel: Optional[Callable[[], None]] = None) -> "ConversionResult":
        n_layers = len(self.plan.quantized_layers())
        done = 0
        with self.open_writer() as writer:
            for key in self.order:
                if check_cancel is not None:
                    check_cancel()
                tensors, layer = self.process(key)
                for k, v in tensors.items():
                    writer.write(k, v)
                del tensors
                if layer is not None:
                    self.report.add(*layer)
                    if layer[1].quantized:
                        done += 1
                        if progress is not None:
                            progress(done, n_layers, layer[0])
            writer.finish()
        return self.finish(writer.checksums)

    def finish(self, checksums: Dict[str, str]) -> "ConversionResult":
        """After the file is in place: verify it, finalize and write the report."""
        self.reader.close()
        out = self.output_path
        verify_output(out, self.entries, checksums if self.opts.verify else None)
        seconds = time.perf_counter() - self.t0
        plan = self.plan
        self.report.finalize(bytes_in=os.path.getsize(self.input_path), bytes_out=os.path.getsize(out),
                             seconds=round(seconds, 3), optimizer=self.opts.optimizer, presets=plan.presets,
                             family=plan.family, input=os.path.basename(self.input_path),
                             output=os.path.basename(out))
        for w_ in self.report.warnings:
            self.log("warning: " + w_)
        paths = self.report.write(self.opts.report_path) if self.opts.report_path else []
        return ConversionResult(out, plan, self.report, seconds, paths, self.lora_report)

    def close(self):
        self.reader.close()


def convert_file(input_path: str, output_path: Optional[str] = None, options: Optional[ConvertOptions] = None,
                 progress: Optional[ProgressFn] = None, check_cancel: Optional[Callable[[], None]] = None,
                 log: Callable[[str], None] = lambda m: None) -> ConversionResult:
    """Convert ``input_path`` to a quantized safetensors file. See ``ConvertOptions``."""
    job = ConversionJob(input_path, output_path, options, log)
    try:
        return job.run(progress, check_cancel)
    finally:
        job.close()


def _layer_quality(lp, w: torch.Tensor, tensors: Dict[str, torch.Tensor], orig_dtype, optimizer: str,
                   info: Dict[str, Any]) -> LayerQuality:
    """Quality of the stored tensors, rebuilt from exactly what is written and dequantized like a loader."""
    prefix = lp.base + "."
    stored = {k[len(prefix):]: v for k, v in tensors.items()}
    if "comfy_quant" in stored:
        cfg = json.loads(bytes(stored["comfy_quant"].tolist()).decode("utf-8"))
        deq = quantized_weight_from_tensors(lp.base, cfg, stored, orig_dtype).dequantize()
    else:
        deq = stored["weight"].float()
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
            log(f"warning: {lp.weight_key} has {bad}; kept unquantized (--nan-policy keep)")
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
                raise ConvertError(f"verification of {path} failed: {k} is {info.dtype_name} {list(info.shape)}, "
                                   f"planned {e.dtype} {list(e.shape)}")
        if checksums:
            for k, digest in checksums.items():
                if hashlib.sha256(r.get_raw(k)).hexdigest() != digest:
                    raise ConvertError(f"verification of {path} failed: checksum of {k} differs from what was written")
