"""Calibration statistics from real forward passes, and their safetensors file.

Capture: ``CalibrationCollector`` puts a forward pre-hook on every ``nn.Linear`` of any torch module and,
while the caller runs the model on real inputs, accumulates for each layer's *input* activations ``x``
(flattened to ``[tokens, in]``):

* the Hessian ``H = Σ x xᵀ`` (``[in, in]``; float32 by default, float64 on request) and its token count;
* the per-channel abs-max ``max |x_j|`` (SmoothQuant) and sum ``Σ x_j`` (bias correction: ``E[x]``).

Layers that receive the very same input tensor (q/k/v of an attention block, gate/up of a gated MLP)
share one set of statistics, found on the first batch and checked on every later one.

Memory policy (a 12B DiT has ~64 GB of fp32 Hessians; see ``docs/OPTIMIZERS.md`` for the measurement):

1. Accumulators live on the capture device in the accumulation dtype. ``capture_calibration`` takes a
   byte budget; when all Hessians do not fit, the layers are split into *passes* (in first-call order)
   that each fit, and the caller's batches are run once per pass. Peak accumulator memory <= budget
   (or the single largest Hessian, if that alone exceeds the budget).
2. When a pass ends its statistics are spilled straight into the output safetensors file (the header is
   known after the first, statistics-free discovery batch: layer widths and the shared-input groups),
   one group at a time, so host memory holds at most one layer's statistics.
3. ``max_tokens_per_call`` subsamples the rows used for the Hessian (abs-max and mean still see every
   token): it bounds the O(tokens·in²) compute, not the memory.

On disk (``save``/``capture_calibration``) each group of layers is stored under the name of its first
layer: ``<name>.hessian`` float32 ``[in, in]`` (the sum, not the mean), ``<name>.absmax`` float32 ``[in]``,
``<name>.mean`` float32 ``[in]``, ``<name>.tokens`` int64 ``[2]`` (tokens in the Hessian, tokens in the
mean/abs-max). ``__metadata__`` holds ``calibration_format``, a JSON ``layers`` map
``{layer name: group name}``, a JSON ``layer_shapes`` map ``{layer name: in_features}``, ``model_family``
(the preset family detected from the model's parameter names, or ``unknown``), ``tokens`` (the most
tokens any layer saw) and ``prompts`` (the number of calibration samples: sentences, sampler model calls,
or batches). Files of the Python API (``capture_calibration``, ``CalibrationData.save``), the Capture
Calibration node and ``--example`` are all written here, in this one format. ``load_calibration``
validates all of that (header first, each group's values when read, lazily);
``check_matches_model`` refuses a file captured on another model, naming the first layer that differs.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .checkpoint import checkpoint
from .errors import CalibrationError, display_name
from .safetensors_io import OutputEntry, SafetensorsReader, StreamingWriter

CALIBRATION_FORMAT = "convert_to_quant.calibration/1"
SUFFIXES = ("hessian", "absmax", "mean", "tokens")
# header bytes kept free for the metadata known only after the capture (``tokens``)
_HEADER_RESERVE = 64


def model_family(model: torch.nn.Module) -> str:
    """The preset family of ``model`` from its parameter names (``presets.detect_family``), or ``unknown``."""
    from .presets import detect_family
    try:
        keys = [n for n, _ in model.named_parameters()]
    except Exception:
        keys = []
    return detect_family(keys) or "unknown"


@dataclass
class LayerStats:
    """Statistics of one layer's input activations (shared by every layer reading that input)."""

    name: str  # group name: the first layer that read this input
    hessian: torch.Tensor  # Σ x xᵀ over ``n_tokens`` tokens, [in, in]
    absmax: torch.Tensor  # max |x_j| over all tokens, [in]
    mean: torch.Tensor  # E[x_j] over all tokens, [in]
    n_tokens: int  # tokens summed into the Hessian
    n_seen: int  # tokens seen by abs-max and mean

    @property
    def in_features(self) -> int:
        return self.hessian.shape[0]

    def hessian_mean(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """``E[x xᵀ] = H / n``: the layer-output error of a weight error ``D`` is ``tr(D E[xxᵀ] Dᵀ)``."""
        # in the requested dtype directly: a float64 detour would double a 15360² Hessian on the GPU
        return self.hessian.to(device=device, dtype=dtype) / max(self.n_tokens, 1)

    def to(self, device) -> "LayerStats":
        return LayerStats(self.name, self.hessian.to(device), self.absmax.to(device), self.mean.to(device),
                          self.n_tokens, self.n_seen)


# ------------------------------------------------------------------------------------------------
# name matching: module names (capture) vs weight keys (conversion) may differ by a prefix
# ------------------------------------------------------------------------------------------------
def _match_name(base: str, names: Iterable[str]) -> Optional[str]:
    """Exact match, else the unique name that is a dotted suffix of ``base`` or has ``base`` as one
    (``model.diffusion_model.x.y`` <-> ``x.y``); ``None`` when absent or ambiguous."""
    names = list(names)
    if base in names:
        return base
    hits = [n for n in names if base.endswith("." + n) or n.endswith("." + base)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:  # prefer the longest common dotted suffix
        def common(n):
            a, b = n.split(".")[::-1], base.split(".")[::-1]
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            return k
        best = max(common(n) for n in hits)
        top = [n for n in hits if common(n) == best]
        if len(top) == 1:
            return top[0]
    return None


# ------------------------------------------------------------------------------------------------
# the calibration file
# ------------------------------------------------------------------------------------------------
class CalibrationData:
    """Statistics for a set of layers: in memory (after capture) or read lazily from a file."""

    def __init__(self, layers: Dict[str, str], groups: Optional[Dict[str, LayerStats]] = None,
                 reader: Optional[SafetensorsReader] = None, metadata: Optional[Dict[str, str]] = None,
                 cache_groups: int = 2):
        self.layers = dict(layers)  # layer name -> group name
        self._groups = dict(groups or {})
        self._reader = reader
        self.metadata = dict(metadata or {})
        self._cache: "OrderedDict[str, LayerStats]" = OrderedDict()
        self._cache_groups = cache_groups
        self._resolved: Dict[str, Optional[str]] = {}

    @property
    def path(self) -> Optional[str]:
        return self._reader.path if self._reader is not None else None

    def group_names(self) -> List[str]:
        return list(dict.fromkeys(self.layers.values()))

    def resolve(self, base: str) -> Optional[str]:
        """The captured layer name that ``base`` (a weight key without ``.weight``) refers to."""
        if base not in self._resolved:
            self._resolved[base] = _match_name(base, self.layers)
        return self._resolved[base]

    def group(self, name: str) -> LayerStats:
        if name in self._groups:
            return self._groups[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        if self._reader is None:
            raise CalibrationError(f"calibration statistics for {display_name(name)} are missing")
        st = _read_group(self._reader, name)
        self._cache[name] = st
        while len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return st

    def for_layer(self, base: str) -> Optional[LayerStats]:
        """Statistics of ``base``'s input, or ``None`` if this layer was not captured."""
        name = self.resolve(base)
        if name is None:
            return None
        return self.group(self.layers[name])

    def shares_input(self, base: str) -> List[str]:
        """Captured layers reading the same input as ``base`` (including itself)."""
        name = self.resolve(base)
        if name is None:
            return []
        g = self.layers[name]
        return [n for n, gg in self.layers.items() if gg == g]

    def entries(self) -> List[OutputEntry]:
        out = []
        for g in self.group_names():
            n = self._in_features(g)
            out += group_entries(g, n)
        return out

    def _in_features(self, g: str) -> int:
        if g in self._groups:
            return self._groups[g].in_features
        return int(self._reader.info(f"{g}.hessian").shape[0])

    def save(self, path: str, metadata: Optional[Dict[str, str]] = None, overwrite: bool = True) -> str:
        """Write every group to ``path`` (atomically)."""
        groups = self.group_names()
        widths = {g: self._in_features(g) for g in groups}
        tokens = max((self.group(g).n_seen for g in groups), default=0)
        meta = file_metadata(self.layers, {**self.metadata, "tokens": str(tokens), **(metadata or {})}, widths)
        with StreamingWriter(path, self.entries(), meta, overwrite=overwrite, preallocate=False) as w:
            for g in groups:
                write_group(w, self.group(g))
        return path

    def describe(self) -> str:
        """Where these statistics come from, for messages."""
        return f"calibration file {self.path}" if self.path else "the in-memory calibration data"

    def layer_width(self, layer: str) -> int:
        return self._in_features(self.layers[layer])

    def close(self):
        if self._reader is not None:
            self._reader.close()
        self._cache.clear()


def group_entries(group: str, in_features: int) -> List[OutputEntry]:
    return [OutputEntry(f"{group}.hessian", torch.float32, (in_features, in_features)),
            OutputEntry(f"{group}.absmax", torch.float32, (in_features,)),
            OutputEntry(f"{group}.mean", torch.float32, (in_features,)),
            OutputEntry(f"{group}.tokens", torch.int64, (2,))]


def file_metadata(layers: Dict[str, str], extra: Optional[Dict[str, str]] = None,
                  widths: Optional[Dict[str, int]] = None) -> Dict[str, str]:
    """The header metadata of a calibration file; ``widths``: in_features of each group."""
    meta = {str(k): str(v) for k, v in (extra or {}).items()}
    meta.setdefault("model_family", "unknown")
    meta["calibration_format"] = CALIBRATION_FORMAT
    meta["layers"] = json.dumps(layers, sort_keys=True, separators=(",", ":"))
    if widths is not None:
        meta["layer_shapes"] = json.dumps({n: int(widths[g]) for n, g in layers.items()}, sort_keys=True,
                                          separators=(",", ":"))
    return meta


def write_group(writer: StreamingWriter, st: LayerStats):
    g = st.name
    writer.write(f"{g}.hessian", st.hessian.detach().to("cpu", torch.float32).contiguous())
    writer.write(f"{g}.absmax", st.absmax.detach().to("cpu", torch.float32).contiguous())
    writer.write(f"{g}.mean", st.mean.detach().to("cpu", torch.float32).contiguous())
    writer.write(f"{g}.tokens", torch.tensor([st.n_tokens, st.n_seen], dtype=torch.int64))


def _read_group(reader: SafetensorsReader, g: str) -> LayerStats:
    where = f"{reader.path}: {display_name(g)}"
    for s in SUFFIXES:
        if f"{g}.{s}" not in reader:
            raise CalibrationError(f"{where}: tensor {display_name(g + '.' + s)} is missing")
    h = reader.get(f"{g}.hessian")
    absmax, mean, tok = reader.get(f"{g}.absmax"), reader.get(f"{g}.mean"), reader.get(f"{g}.tokens")
    if h.dim() != 2 or h.shape[0] != h.shape[1] or not h.is_floating_point():
        raise CalibrationError(f"{where}: hessian must be a square float matrix, got {h.dtype} {list(h.shape)}")
    n = h.shape[0]
    for t, s in ((absmax, "absmax"), (mean, "mean")):
        if tuple(t.shape) != (n,) or not t.is_floating_point():
            raise CalibrationError(f"{where}: {s} must be a float vector of length {n}, got {t.dtype} {list(t.shape)}")
    if tuple(tok.shape) != (2,) or tok.dtype != torch.int64:
        raise CalibrationError(f"{where}: tokens must be int64 [2], got {tok.dtype} {list(tok.shape)}")
    n_tokens, n_seen = int(tok[0]), int(tok[1])
    if n_tokens <= 0 or n_seen <= 0:
        raise CalibrationError(f"{where}: token count {n_tokens}/{n_seen} is not positive")
    for t, s in ((h, "hessian"), (absmax, "absmax"), (mean, "mean")):
        if not bool(torch.isfinite(t).all()):
            raise CalibrationError(f"{where}: {s} has NaN or Inf values")
    if bool((absmax < 0).any()):
        raise CalibrationError(f"{where}: absmax has negative values")
    d = torch.diagonal(h)
    if bool((d < 0).any()):
        raise CalibrationError(f"{where}: hessian has a negative diagonal; it is not XᵀX")
    asym = float((h - h.T).abs().max()) if n else 0.0
    if asym > 1e-3 * float(d.abs().max().clamp(min=1e-30)):
        raise CalibrationError(f"{where}: hessian is not symmetric (max asymmetry {asym:.3g})")
    return LayerStats(g, h.float(), absmax.float(), mean.float(), n_tokens, n_seen)


def _json_map(path: str, meta: Dict[str, str], key: str, value_type, what: str) -> Optional[dict]:
    if key not in meta:
        return None
    try:
        m = json.loads(meta[key])
        if not isinstance(m, dict) or not all(isinstance(k, str) and type(v) is value_type for k, v in m.items()):
            raise ValueError(f"not an object of {what}")
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply to parse
        raise CalibrationError(f"{path}: metadata {key!r} is not a JSON object of {what} "
                               f"({'nested too deeply' if isinstance(e, RecursionError) else e})") from None
    return m


def _count(path: str, meta: Dict[str, str], key: str):
    v = meta.get(key)
    if v is not None and not (v.isascii() and v.isdigit() and len(v) < 20):
        raise CalibrationError(f"{path}: metadata {key!r} must be a non-negative integer, got {v[:40]!r}")


def load_calibration(path: str) -> CalibrationData:
    """Open a calibration file, validate its header and metadata (names, dtypes, shapes, counts); each
    group's values are read and checked (NaN, symmetry, token counts) when first used. Never unpickles:
    a file that is not safetensors is refused by ``SafetensorsReader``."""
    if not os.path.isfile(path):
        raise CalibrationError(f"calibration file {path} does not exist")
    reader = SafetensorsReader(path)
    try:
        meta = reader.metadata
        fmt = meta.get("calibration_format")
        if fmt != CALIBRATION_FORMAT:
            raise CalibrationError(f"{path} is not a calibration file of this tool (calibration_format "
                                   f"{fmt!r}, expected {CALIBRATION_FORMAT!r}); capture one with "
                                   "quant_core.calibration.capture_calibration")
        if "layers" not in meta:
            raise CalibrationError(f"{path}: metadata 'layers' is missing")
        layers = _json_map(path, meta, "layers", str, "names")
        shapes = _json_map(path, meta, "layer_shapes", int, "in_features")
        for k in ("tokens", "prompts"):
            _count(path, meta, k)
        if not layers:
            raise CalibrationError(f"{path}: metadata 'layers' lists no layer")
        for g in dict.fromkeys(layers.values()):
            where = f"{path}: group {display_name(g)}"
            for s in SUFFIXES:
                if f"{g}.{s}" not in reader:
                    raise CalibrationError(f"{where}: tensor {display_name(g + '.' + s)} is missing")
            info = reader.info(f"{g}.hessian")
            if len(info.shape) != 2 or info.shape[0] != info.shape[1]:
                raise CalibrationError(f"{path}: {display_name(g + '.hessian')} must be square, got {list(info.shape)}")
            n = int(info.shape[0])
            want = {"hessian": (torch.float32, (n, n)), "absmax": (torch.float32, (n,)),
                    "mean": (torch.float32, (n,)), "tokens": (torch.int64, (2,))}
            for s, (dt, shape) in want.items():
                i = reader.info(f"{g}.{s}")
                if i.dtype != dt or tuple(i.shape) != shape:
                    raise CalibrationError(f"{where}: {display_name(g + '.' + s)} must be "
                                           f"{str(dt).replace('torch.', '')} {list(shape)}, got "
                                           f"{str(i.dtype).replace('torch.', '')} {list(i.shape)}")
        if shapes is not None:
            for name, g in layers.items():
                n = int(reader.info(f"{g}.hessian").shape[0])
                if shapes.get(name) != n:
                    raise CalibrationError(f"{path}: metadata 'layer_shapes' gives {display_name(name)} "
                                           f"in_features {shapes.get(name)}, its statistics have {n}")
        return CalibrationData(layers, reader=reader, metadata=meta)
    except BaseException:
        reader.close()
        raise


def check_matches_model(calib: CalibrationData, weights: Dict[str, Sequence[int]], model: str = "the model"):
    """Refuse statistics captured on another model: every captured layer must be a 2-D ``<layer>.weight``
    of ``weights`` (names matched as in conversion: exact, or unique dotted suffix) with the same
    in_features. The error names the first layer (in the file's order) that is not."""
    bases = {k[:-len(".weight")]: tuple(s) for k, s in weights.items() if k.endswith(".weight") and len(s) == 2}
    for layer in calib.layers:
        base = _match_name(layer, bases)
        n = calib.layer_width(layer)
        if base is None:
            raise CalibrationError(f"{calib.describe()} was captured on another model: its layer "
                                   f"{display_name(layer)} (in_features {n}) is not a linear layer of {model}")
        if bases[base][1] != n:
            raise CalibrationError(f"{calib.describe()} was captured on another model: layer {display_name(layer)} "
                                   f"has in_features {n} there, but {display_name(base + '.weight')} of {model} "
                                   f"is {list(bases[base])} (in_features {bases[base][1]})")


# ------------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------------
class _Accumulator:
    def __init__(self, name: str, in_features: int, device, dtype):
        self.name = name
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.absmax = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.sum = torch.zeros(in_features, device=device, dtype=torch.float64)
        self.n_tokens = 0
        self.n_seen = 0

    @property
    def nbytes(self) -> int:
        return self.hessian.numel() * self.hessian.element_size() + self.absmax.numel() * 12

    def add(self, x2d: torch.Tensor, hessian_rows: Optional[torch.Tensor]):
        xf = x2d.to(self.hessian.device, torch.float32)
        self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))
        self.sum += xf.sum(dim=0, dtype=torch.float64)
        self.n_seen += xf.shape[0]
        xh = xf if hessian_rows is None else xf.index_select(0, hessian_rows.to(xf.device))
        xh = xh.to(self.hessian.dtype)
        self.hessian.addmm_(xh.T, xh)
        self.n_tokens += xh.shape[0]

    def stats(self) -> LayerStats:
        """The finished statistics; the Hessian is symmetrized in place (no second full copy)."""
        _symmetrize_(self.hessian)
        return LayerStats(self.name, self.hessian.float(), self.absmax.clone(),
                          (self.sum / max(self.n_seen, 1)).float(), self.n_tokens, self.n_seen)


def _symmetrize_(h: torch.Tensor, chunk: int = 1024):
    """``h ← (h + hᵀ)/2`` in place, ``chunk`` rows at a time: exact symmetry despite the summation order
    of the GEMMs, with ``chunk x in`` temporaries instead of two full copies."""
    n = h.shape[0]
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        avg = 0.5 * (h[i0:i1, i0:] + h[i0:, i0:i1].T)
        h[i0:i1, i0:] = avg
        h[i0:, i0:i1] = avg.T


def hessian_bytes(in_features: int, dtype=torch.float32) -> int:
    return in_features * in_features * torch.empty((), dtype=dtype).element_size() + in_features * 12


class CalibrationCollector:
    """Hooks every ``nn.Linear`` of ``model`` (or those ``select(name)`` accepts) while in a ``with``
    block and accumulates the statistics of their inputs while the caller runs the model.

    ``share_inputs``: layers fed the same input tensor share one set of statistics (decided on the first
    call of each layer, checked on every later one). ``only``: accumulate just these group names (the
    others are still observed, to keep the sharing check exact) -- used for multi-pass capture.
    """

    def __init__(self, model: torch.nn.Module, device=None, dtype: torch.dtype = torch.float32,
                 max_tokens_per_call: Optional[int] = None, seed: int = 0,
                 select: Optional[Callable[[str], bool]] = None, share_inputs: bool = True,
                 only: Optional[Sequence[str]] = None, groups: Optional[Dict[str, str]] = None,
                 window: int = 8):
        if dtype not in (torch.float32, torch.float64):
            raise CalibrationError(f"Hessian accumulation dtype must be float32 or float64, got {dtype}")
        self.model = model
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.max_tokens = max_tokens_per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.share_inputs = share_inputs
        self.only = set(only) if only is not None else None
        self.linears: Dict[str, torch.nn.Linear] = {
            n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (select is None or select(n))}
        if not self.linears:
            raise CalibrationError("the model has no nn.Linear layers to calibrate")
        self.groups: Dict[str, str] = dict(groups or {})  # layer -> group (first reader of the input)
        self.order: List[str] = list(dict.fromkeys(self.groups.values()))  # groups in first-call order
        self.acc: Dict[str, _Accumulator] = {}
        self._recent: "OrderedDict[int, Tuple[torch.Tensor, str]]" = OrderedDict()  # recent inputs
        self._window = window
        self._handles = []
        self.calls = 0
        self.peak_bytes = 0
        # tokens to keep for the batch being run (e.g. an attention mask: padding is no real input);
        # applied to every input whose leading dimensions have the mask's shape
        self.mask: Optional[torch.Tensor] = None

    # -- hooks -----------------------------------------------------------------------------------
    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._recent.clear()
        return False

    def _make_hook(self, name: str):
        def hook(module, args):
            if not args or not torch.is_tensor(args[0]):
                return None
            self._observe(name, args[0].detach())
            return None
        return hook

    def _same_input(self, x: torch.Tensor) -> Optional[str]:
        for _, (t, g) in reversed(self._recent.items()):
            if t is x or (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
                          and t.dtype == x.dtype and t._version == x._version and t.device == x.device):
                return g
        return None

    def _observe(self, name: str, x: torch.Tensor):
        checkpoint()  # cancel inside a model call (rate-limited; a no-op outside a checkpoint_scope)
        in_features = x.shape[-1]
        known = self.groups.get(name)
        shared = self._same_input(x) if self.share_inputs else None
        if known is None:
            group = shared if shared is not None else name
            self.groups[name] = group
            if group == name:
                self.order.append(name)
        else:
            group = known
            if self.share_inputs and group != name and shared != group:
                raise CalibrationError(
                    f"layer {display_name(name)} shared its input with {display_name(group)} in the first batch but not now; "
                    "capture with share_inputs=False")
        if group != name:
            return  # its group's first layer accumulates this input
        self._recent[id(x)] = (x, group)
        while len(self._recent) > self._window:
            self._recent.popitem(last=False)
        if self.only is not None and group not in self.only:
            return
        acc = self.acc.get(group)
        if acc is None:
            dev = self.device or x.device
            acc = self.acc[group] = _Accumulator(group, in_features, dev, self.dtype)
            self.peak_bytes = max(self.peak_bytes, sum(a.nbytes for a in self.acc.values()))
        if acc.hessian.shape[0] != in_features:
            raise CalibrationError(f"layer {display_name(name)}: input width changed from {acc.hessian.shape[0]} to {in_features}")
        x2d = x.reshape(-1, in_features)
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            x2d = x2d[self.mask.reshape(-1).to(device=x2d.device, dtype=torch.bool)]
        rows = None
        if self.max_tokens is not None and x2d.shape[0] > self.max_tokens:
            rows = torch.randperm(x2d.shape[0], generator=self.gen)[: self.max_tokens]
        acc.add(x2d, rows)
        self.calls += 1

    # -- results ---------------------------------------------------------------------------------
    def layer_map(self) -> Dict[str, str]:
        return {n: g for n, g in self.groups.items()}

    def release(self, group: str) -> LayerStats:
        """The finished statistics of ``group``; frees its accumulator."""
        return self.acc.pop(group).stats()

    def data(self, metadata: Optional[Dict[str, str]] = None) -> CalibrationData:
        """All statistics accumulated so far, as ``CalibrationData`` (on the CPU)."""
        groups = {g: a.stats().to("cpu") for g, a in self.acc.items()}
        layers = {n: g for n, g in self.groups.items() if g in groups}
        return CalibrationData(layers, groups, metadata=metadata)


def plan_passes(order: Sequence[str], widths: Dict[str, int], budget_bytes: Optional[int],
                dtype=torch.float32) -> List[List[str]]:
    """Split groups (in call order) into passes whose accumulators fit ``budget_bytes``."""
    if budget_bytes is None:
        return [list(order)]
    passes: List[List[str]] = []
    cur: List[str] = []
    used = 0
    for g in order:
        b = hessian_bytes(widths[g], dtype)
        if cur and used + b > budget_bytes:
            passes.append(cur)
            cur, used = [], 0
        cur.append(g)
        used += b
    if cur:
        passes.append(cur)
    return passes


def capture_calibration(model: torch.nn.Module, batches: Sequence, path: str,
                        forward: Callable[[torch.nn.Module, object], object] = None,
                        device=None, dtype: torch.dtype = torch.float32,
                        budget_bytes: Optional[int] = None, max_tokens_per_call: Optional[int] = None,
                        select: Optional[Callable[[str], bool]] = None, share_inputs: bool = True,
                        metadata: Optional[Dict[str, str]] = None, overwrite: bool = True,
                        mask: Optional[Callable[[object], torch.Tensor]] = None,
                        log: Callable[[str], None] = lambda m: None) -> Dict[str, object]:
    """Run ``forward(model, batch)`` over ``batches`` and write the statistics of every hooked Linear's
    input to ``path``, within ``budget_bytes`` of accumulator memory (see the module docstring).
    ``mask(batch)``: a boolean [batch, tokens] tensor of the tokens to count (padding excluded).
    ``metadata`` goes into the file's header; ``model_family`` (default: detected from the parameter
    names) and ``prompts`` (default: the number of batches) may be set there.

    Returns a summary: passes, groups, layers, tokens, peak accumulator bytes, total Hessian bytes.
    """
    forward = forward or (lambda m, b: m(b))
    batches = list(batches)
    if not batches:
        raise CalibrationError("no calibration batches")
    # discovery: which layers run, their widths and shared inputs (no statistics)
    discover = CalibrationCollector(model, device=device, dtype=dtype, select=select,
                                    share_inputs=share_inputs, only=())
    with torch.no_grad(), discover:
        forward(model, batches[0])
    groups = discover.layer_map()
    if not groups:
        raise CalibrationError("the forward pass called none of the model's nn.Linear layers")
    widths = {g: discover.linears[g].in_features for g in discover.order}
    passes = plan_passes(discover.order, widths, budget_bytes, dtype)
    total = sum(hessian_bytes(widths[g], dtype) for g in discover.order)
    log(f"calibration: {len(groups)} layers in {len(widths)} input groups, "
        f"{total / 1e6:.1f} MB of statistics, {len(passes)} pass(es)")
    entries = [e for g in discover.order for e in group_entries(g, widths[g])]
    meta = file_metadata(groups, {"model_family": model_family(model), "prompts": str(len(batches)),
                                  **(metadata or {}), "batches": str(len(batches)), "passes": str(len(passes))},
                         widths)
    peak = 0
    tokens = 0
    with StreamingWriter(path, entries, meta, overwrite=overwrite, preallocate=False,
                         header_reserve=_HEADER_RESERVE) as writer:
        for i, members in enumerate(passes):
            col = CalibrationCollector(model, device=device, dtype=dtype, max_tokens_per_call=max_tokens_per_call,
                                       select=select, share_inputs=share_inputs, only=members, groups=groups)
            with torch.no_grad(), col:
                for j, b in enumerate(batches):
                    checkpoint((i * len(batches) + j) / (len(passes) * len(batches)))
                    col.mask = mask(b) if mask is not None else None
                    forward(model, b)
            peak = max(peak, col.peak_bytes)
            for g in members:
                if g not in col.acc:
                    raise CalibrationError(f"layer {display_name(g)} ran in the first batch but not in pass {i + 1}")
                st = col.release(g)
                tokens = max(tokens, st.n_seen)
                write_group(writer, st)
                del st
            log(f"calibration pass {i + 1}/{len(passes)}: {len(members)} groups written")
        writer.set_metadata({**meta, "tokens": str(tokens)})
        writer.finish()
    return {"passes": len(passes), "groups": len(widths), "layers": len(groups), "peak_accumulator_bytes": peak,
            "total_statistics_bytes": total, "max_tokens_per_layer": tokens}


def collect(model: torch.nn.Module, batches: Iterable, forward: Callable = None,
            mask: Optional[Callable[[object], torch.Tensor]] = None, **kw) -> CalibrationData:
    """In-memory capture (small models, tests): run every batch once and return the statistics."""
    forward = forward or (lambda m, b: m(b))
    col = CalibrationCollector(model, **kw)
    n = 0
    with torch.no_grad(), col:
        for b in batches:
            col.mask = mask(b) if mask is not None else None
            forward(model, b)
            n += 1
    return col.data(metadata={"model_family": model_family(model), "prompts": str(n)})
