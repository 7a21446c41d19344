"""Quality metrics and the quality report.

Every number is computed from the weights as stored (the exact tensors written to the file,
dequantized the way the loader dequantizes them) against the float weights they replace, in float64.
"""
from __future__ import annotations

import errno
import json
import math
import re
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from .errors import display_name


def error_stats(ref: torch.Tensor, approx: torch.Tensor, chunk_elems: int = 1 << 22) -> Dict[str, Optional[float]]:
    """MSE, SQNR (dB) and max abs error of ``approx`` against ``ref``, computed in float64.

    SQNR = 10·log10(Σref² / Σ(ref−approx)²): ``+inf`` when the error is exactly zero (an exact layer),
    ``None`` when the signal is zero (undefined). The difference is taken in float64, so weights near
    float32's largest value (3.4e38) give finite errors instead of Inf - Inf. Works in row chunks so a
    12288×3072 layer costs a few tens of MB of float64 scratch.
    """
    r2 = ref.detach().reshape(ref.shape[0], -1) if ref.dim() > 1 else ref.detach().reshape(1, -1)
    a2 = approx.detach().to(r2.device).reshape(r2.shape)
    rows = max(1, chunk_elems // max(r2.shape[1], 1))
    err = sig = 0.0
    mx = 0.0
    for i in range(0, r2.shape[0], rows):
        r = r2[i:i + rows].to(torch.float64)
        e = a2[i:i + rows].to(torch.float64) - r
        err += float(torch.linalg.vector_norm(e)) ** 2
        sig += float(torch.linalg.vector_norm(r)) ** 2
        if e.numel():
            mx = max(mx, float(e.abs().amax()))
    n = max(ref.numel(), 1)
    if sig == 0.0:
        sqnr = None
    elif err == 0.0:
        sqnr = math.inf
    else:
        ratio = sig / err
        sqnr = math.inf if ratio == math.inf else -math.inf if ratio == 0.0 else 10.0 * math.log10(ratio)
    return {"mse": err / n, "sqnr_db": sqnr, "max_abs_err": mx}


def _finite(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> Optional[float]:
    return error_stats(ref, approx)["sqnr_db"]


@dataclass
class LayerQuality:
    format: str
    shape: List[int]
    quantized: bool
    mse: Optional[float] = None
    sqnr_db: Optional[float] = None
    max_abs_err: Optional[float] = None
    optimizer: Optional[str] = None
    output_sqnr_db: Optional[float] = None
    reason: str = ""
    fallback: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Quantized without any error (SQNR +inf)."""
        return self.sqnr_db is not None and self.sqnr_db == math.inf

    def to_dict(self) -> dict:
        """Strict JSON: a non-finite number is never written. An exact layer (SQNR +inf) has no
        ``sqnr_db`` and ``"exact": true``; any other non-finite number is left out."""
        d = asdict(self)
        out = {k: v for k, v in d.items() if v is not None and v != [] and v != ""
               and not (isinstance(v, float) and not math.isfinite(v))}
        if self.exact:
            out["exact"] = True
        return out


class QualityReport:
    """Per-layer quality plus a summary; writes JSON and Markdown."""

    def __init__(self, threshold_db: Optional[float] = None):
        self.layers: Dict[str, LayerQuality] = {}
        self.summary: Dict[str, object] = {}
        self.threshold_db = threshold_db
        self.warnings: List[str] = []
        self.notes: List[str] = []

    def add(self, base: str, lq: LayerQuality):
        self.layers[base] = lq
        if (self.threshold_db is not None and lq.quantized and lq.sqnr_db is not None
                and not lq.exact and lq.sqnr_db < self.threshold_db):
            self.warnings.append(f"{display_name(base)}: SQNR {lq.sqnr_db:.2f} dB is below the threshold "
                                 f"{self.threshold_db:g} dB ({lq.format})")

    def finalize(self, **extra) -> Dict[str, object]:
        q = [l for l in self.layers.values() if l.quantized]
        finite = [l.sqnr_db for l in q if _finite(l.sqnr_db)]
        out_sq = [l.output_sqnr_db for l in q if _finite(l.output_sqnr_db)]
        formats: Dict[str, int] = {}
        for l in q:
            formats[l.format] = formats.get(l.format, 0) + 1
        s: Dict[str, object] = {
            "layers_quantized": len(q),
            "layers_kept": len(self.layers) - len(q),
            "layers_fallback": sum(1 for l in q if l.fallback),
            "fallback_reasons": _count(_general_reason(l.fallback) for l in q if l.fallback),
            "formats": formats,
            "mean_sqnr_db": sum(finite) / len(finite) if finite else None,
            "min_sqnr_db": min(finite) if finite else None,
            "min_sqnr_layer": (min((l for l in self.layers if self.layers[l].quantized
                                    and _finite(self.layers[l].sqnr_db)),
                                   key=lambda k: self.layers[k].sqnr_db, default=None)),
        }
        exact = sum(1 for l in q if l.exact)
        if exact:
            s["layers_exact"] = exact
        if out_sq:
            s["mean_output_sqnr_db"] = sum(out_sq) / len(out_sq)
            s["min_output_sqnr_db"] = min(out_sq)
        if self.threshold_db is not None:
            s["threshold_db"] = self.threshold_db
            s["layers_below_threshold"] = len(self.warnings)
        s.update(extra)
        if self.notes:
            s["notes"] = list(self.notes)
        self.summary = s
        return s

    def to_dict(self) -> dict:
        return {"summary": self.summary, "layers": {k: v.to_dict() for k, v in self.layers.items()}}

    def summary_lines(self) -> List[str]:
        s = self.summary
        lines = [f"layers quantized: {s.get('layers_quantized')}, kept: {s.get('layers_kept')}"
                 + (f", fallback: {s.get('layers_fallback')}" if s.get("layers_fallback") else "")
                 + (" (" + "; ".join(f"{n}: {r}" for r, n in s["fallback_reasons"].items()) + ")"
                    if s.get("layers_fallback") and s.get("fallback_reasons") else "")]
        if s.get("mean_sqnr_db") is not None:
            lines.append(f"weight SQNR: mean {s['mean_sqnr_db']:.2f} dB, min {s['min_sqnr_db']:.2f} dB "
                         f"({display_name(s.get('min_sqnr_layer'))})")
        if s.get("layers_exact"):
            lines.append(f"exact (no quantization error, SQNR +inf): {s['layers_exact']} layer(s)")
        if s.get("mean_output_sqnr_db") is not None:
            lines.append(f"output SQNR (calibration activations): mean {s['mean_output_sqnr_db']:.2f} dB, "
                         f"min {s['min_output_sqnr_db']:.2f} dB")
        if "bytes_in" in s and "bytes_out" in s:
            lines.append(f"size: {s['bytes_in'] / 1e6:.1f} MB -> {s['bytes_out'] / 1e6:.1f} MB"
                         + (f" in {s['seconds']:.1f} s" if "seconds" in s else ""))
        return lines

    def markdown(self) -> str:
        s = self.summary
        out = ["# Quantization quality report", ""]
        out += [f"- {line}" for line in self.summary_lines()]
        for n in s.get("notes", []) or []:
            out.append(f"- note: {n}")
        out += ["", "| layer | format | shape | SQNR dB | output SQNR dB | MSE | max abs err | note |",
                "|---|---|---|---:|---:|---:|---:|---|"]

        def f(v, fmt):
            if v is None:
                return ""
            return format(v, fmt) if math.isfinite(v) else ("exact" if v > 0 else str(v))

        for name, l in self.layers.items():
            note = l.fallback or ("" if l.quantized else l.reason)
            out.append(f"| `{_md_cell(display_name(name))}` | {l.format} | {'x'.join(map(str, l.shape))} | {f(l.sqnr_db, '.2f')} | "
                       f"{f(l.output_sqnr_db, '.2f')} | {f(l.mse, '.3e')} | {f(l.max_abs_err, '.3e')} | {note} |")
        return "\n".join(out) + "\n"

    def write(self, path: str, overwrite: bool = True, mode: Optional[int] = None) -> List[str]:
        """Write ``path`` (JSON) and the Markdown table next to it (``.md``); returns both paths. Without
        ``overwrite`` an existing file is not replaced (``FileExistsError``). ``mode``: their permission
        bits (default: what ``open()`` gives a new file, 0666 less the umask)."""
        json_path, md_path = report_file_paths(path)
        _atomic_write_text(json_path, json.dumps(self.to_dict(), indent=1, allow_nan=False,
                                                  default=_json_default), overwrite, mode)
        _atomic_write_text(md_path, self.markdown(), overwrite, mode)
        return [json_path, md_path]


def _md_cell(text: str) -> str:
    """Text inside a Markdown table cell: a ``|`` or backtick from a layer name cannot break the row."""
    return text.replace("|", "\\|").replace("`", "'")


def quality_report_path(report_quality: Optional[str], output: str) -> Optional[str]:
    """``--report-quality`` as a path: none, ``auto`` (``<output stem>_quality.json``) or the path given."""
    if report_quality is None:
        return None
    if report_quality == "auto":
        return os.path.splitext(output)[0] + "_quality.json"
    return report_quality


def report_file_paths(path: str) -> List[str]:
    """The JSON and Markdown files ``QualityReport.write(path)`` creates."""
    base, ext = os.path.splitext(path)
    json_path = path if ext.lower() == ".json" else path + ".json"
    md_path = (base if ext.lower() in (".json", ".md") else path) + ".md"
    return [json_path, md_path]


def _json_default(o):
    raise TypeError(f"not JSON serializable: {type(o)}")


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the process umask (read without
    changing it where /proc tells it: ``os.umask`` is process-wide and racy between threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _count(items) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _general_reason(reason: str) -> str:
    """A layer's fallback reason without its own sizes, so that layers with the same cause count together
    ("in_features 100 is not divisible by block size 128 -> ..." -> "in_features not divisible by ...")."""
    reason = re.sub(r"\bin_features \d+ is not", "in_features not", reason)
    return re.sub(r",? got (shape )?\[[\d, ]*\]", "", reason)


def _atomic_write_text(path: str, text: str, overwrite: bool = True, mode: Optional[int] = None):
    """Write ``text`` to a temporary file next to ``path`` and move it into place in one step. Without
    ``overwrite`` it is linked into place, which fails (``FileExistsError``) if ``path`` exists, also
    when it appeared after the run's checks."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".partial")
    try:
        # mkstemp makes 0600 files: give the report the mode of a normal new file (or of its model)
        os.fchmod(fd, default_file_mode() if mode is None else mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
