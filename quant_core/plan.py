"""The conversion plan: which tensor gets which format, decided from the header alone.

Candidates for quantization are 2-D floating-point ``*.weight`` tensors (linear layers). Everything else
(biases, norms, conv 4-D/5-D kernels, embeddings tables the presets name, ...) is copied unchanged.

Decision order for a candidate (first rule that applies wins):
1. a preset's ``drop`` list -> removed from the output;
2. the first ``--layer-config`` entry whose regex matches (``skip`` or a format);
3. ``--exclude-layers`` regex -> kept;
4. ``--custom-layers`` regex -> the custom format;
5. a preset's ``quantize_only`` list (when it has one) -> kept if not listed;
6. a preset's ``skip`` list, then the default skip list -> kept;
7. the default format.
A layer whose shape does not fit its format falls back along ``formats.fallback_chain`` (or straight to
``--fallback fp16``) and the plan records why.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import presets as presets_mod
from .errors import PlanError, UnsupportedInputError, display_name
from .formats import FP16, FormatSpec, make_spec, resolve_fit
from .safetensors_io import FLOAT_DTYPES, OutputEntry, TensorInfo

MAX_REGEX_LEN = 1000


def compile_user_regex(pattern: str, where: str) -> "re.Pattern":
    """Compile a regex given by the user, with an error that names where it came from."""
    if not isinstance(pattern, str):
        raise PlanError(f"{where}: regex must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_REGEX_LEN:
        raise PlanError(f"{where}: regex is longer than {MAX_REGEX_LEN} characters")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError(f"{where}: invalid regex {pattern!r}: {e}") from None


# A user regex is matched against names from a model file someone else made. Python's ``re`` cannot be
# interrupted, and patterns such as ``(a+)+$`` or ``(a|a)*$`` take exponential time on a long name, so
# all user-regex matching of a plan runs in a short-lived child interpreter that is killed after
# REGEX_TIME_LIMIT_S seconds; the error names the pattern that was still running. Exact ``re``
# semantics, no extra dependency, no false refusals of patterns that merely look nested.
REGEX_TIME_LIMIT_S = float(os.environ.get("CONVERT_TO_QUANT_REGEX_TIMEOUT", "10"))

_MATCH_WORKER = r"""
import json, re, sys
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
names = job["names"]
for pattern, flags in job["patterns"]:
    rx = re.compile(pattern, flags)
    fn = rx.fullmatch if job["fullmatch"] else rx.search
    sys.stdout.write(json.dumps([i for i, n in enumerate(names) if fn(n) is not None]) + "\n")
    sys.stdout.flush()
"""


def match_user_regexes(patterns: Sequence[Tuple["re.Pattern", str]], names: Sequence[str], fullmatch: bool,
                       time_limit_s: Optional[float] = None) -> List[set]:
    """For each ``(compiled regex, where it came from)``, the set of ``names`` it matches (``search``, or
    ``fullmatch``), computed in a child process with a time limit; a pattern that does not finish
    raises PlanError naming it and where it came from."""
    import subprocess
    import sys

    if not patterns:
        return []
    limit = REGEX_TIME_LIMIT_S if time_limit_s is None else time_limit_s
    job = json.dumps({"names": list(names), "fullmatch": bool(fullmatch),
                      "patterns": [[rx.pattern, rx.flags] for rx, _ in patterns]}).encode("utf-8")
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _MATCH_WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:  # no usable interpreter to start (frozen app): match here, without the time limit
        return [{n for n in names if (rx.fullmatch(n) if fullmatch else rx.search(n)) is not None}
                for rx, _ in patterns]
    try:
        out, err = proc.communicate(job, timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rx, where = patterns[min(out.count(b"\n"), len(patterns) - 1)]
        raise PlanError(f"{where}: regex {rx.pattern!r} did not finish matching {len(names)} layer names "
                        f"in {limit:g} s: it backtracks catastrophically (nested quantifiers such as "
                        "(a+)+, or alternatives that overlap such as (a|ab)*). Rewrite it without nested "
                        "repetition, e.g. a+ instead of (a+)+.") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    lines = out.decode("utf-8").splitlines()
    if proc.returncode != 0 or len(lines) != len(patterns):
        raise PlanError(f"matching layer names against {[rx.pattern for rx, _ in patterns]} failed "
                        f"(exit {proc.returncode}): {err.decode('utf-8', 'replace')[-500:]}")
    return [{names[i] for i in json.loads(line)} for line in lines]


@dataclass
class LayerConfigRule:
    pattern: "re.Pattern"
    source: str
    skip: bool = False
    spec: Optional[FormatSpec] = None


LAYER_CONFIG_FIELDS = {"format", "scaling_mode", "block_size", "convrot", "convrot_groupsize", "skip"}


def parse_layer_config(data, default_spec: FormatSpec, where: str = "layer-config") -> List[LayerConfigRule]:
    """``{regex: {format, scaling_mode, block_size, convrot, convrot_groupsize, skip}}``.

    Keys starting with ``_`` are comments. Missing fields inherit from the default format.
    """
    if not isinstance(data, dict):
        raise PlanError(f"{where}: must be a JSON object mapping regex -> settings")
    rules = []
    for pattern, cfg in data.items():
        if not isinstance(pattern, str):
            raise PlanError(f"{where}: keys must be regex strings, got {pattern!r}")
        if pattern.startswith("_"):
            continue
        at = f"{where}[{pattern!r}]"
        if not isinstance(cfg, dict):
            raise PlanError(f"{at}: settings must be an object, got {type(cfg).__name__}")
        unknown = set(cfg) - LAYER_CONFIG_FIELDS
        if unknown:
            raise PlanError(f"{at}: unknown field(s) {sorted(unknown)}; allowed: {sorted(LAYER_CONFIG_FIELDS)}")
        _check_setting_types(cfg, at)
        rx = compile_user_regex(pattern, at)
        if cfg.get("skip"):
            rules.append(LayerConfigRule(rx, at, skip=True))
            continue
        spec = spec_from_settings(cfg, default_spec, at)
        rules.append(LayerConfigRule(rx, at, spec=spec))
    return rules


# JSON type of each layer-config field: no coercion ("false" is not false, 16.9 is not 16, true is not 1)
_SETTING_TYPES = {"format": (str, "a string"), "scaling_mode": (str, "a string"),
                  "block_size": (int, "an integer"), "convrot_groupsize": (int, "an integer"),
                  "convrot": (bool, "true or false"), "skip": (bool, "true or false")}


def _check_setting_types(cfg: dict, where: str):
    for name, value in cfg.items():
        if name not in _SETTING_TYPES:
            continue
        typ, what = _SETTING_TYPES[name]
        ok = isinstance(value, bool) if typ is bool else (isinstance(value, typ) and not isinstance(value, bool))
        if not ok:
            raise PlanError(f"{where}: invalid value for field {name!r}: it must be {what} (JSON), got "
                           f"{_json_type(value)} {_json_text(value)}")


def _json_type(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _json_text(v, limit: int = 80) -> str:
    try:
        t = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        t = repr(v)
    return t if len(t) <= limit else t[:limit] + "..."


def spec_from_settings(cfg: dict, default_spec: FormatSpec, where: str) -> FormatSpec:
    _check_setting_types(cfg, where)
    d = default_spec
    fmt = cfg.get("format", d.format)
    dp = d.params
    scaling = cfg.get("scaling_mode")
    if scaling is None:
        if d.format == "int8_blockwise":
            scaling = "block"
        elif d.format == "int8_tensorwise":
            scaling = "tensor" if dp.scaling == "tensor" else "axis"
        else:
            scaling = "axis"
    if fmt == "int8_blockwise":
        scaling = "block"
    elif fmt in ("int8", "int8_tensorwise") and scaling == "block" and "format" in cfg:
        raise PlanError(f"{where}: format {fmt} with scaling_mode block; use int8_blockwise")
    try:
        return make_spec(
            format=fmt, scaling_mode=scaling,
            block_size=cfg.get("block_size", getattr(dp, "group_size", 128)),
            convrot=cfg.get("convrot", getattr(dp, "convrot", False) if fmt == d.format else False),
            convrot_groupsize=cfg.get("convrot_groupsize", getattr(dp, "convrot_groupsize", 256)))
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


def load_layer_config(path: str, default_spec: FormatSpec) -> List[LayerConfigRule]:
    if not os.path.isfile(path):
        raise PlanError(f"layer-config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError covers JSONDecodeError
        raise PlanError(f"layer-config file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise PlanError(f"layer-config file {path} cannot be read: {e.strerror}") from None
    return parse_layer_config(data, default_spec, where=path)


@dataclass
class PlanOptions:
    spec: FormatSpec = field(default_factory=make_spec)
    presets: Sequence[str] = ()  # preset names, or "auto"
    default_skip: bool = True
    custom_layers: Optional[str] = None
    custom_spec: Optional[FormatSpec] = None
    exclude_layers: Optional[str] = None
    layer_config: Sequence[LayerConfigRule] = ()
    fullmatch: bool = False
    fallback: Optional[str] = None  # None/"int8": fallback chain; "fp16": straight to fp16


@dataclass
class LayerPlan:
    base: str
    shape: Tuple[int, ...]
    dtype_name: str
    spec: Optional[FormatSpec]  # None = kept in original precision
    reason: str = ""  # where the decision came from
    requested: Optional[FormatSpec] = None
    fallback_reason: Optional[str] = None

    @property
    def weight_key(self) -> str:
        return self.base + ".weight"

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    def describe(self) -> str:
        return self.spec.describe() if self.spec else f"keep {self.dtype_name}"


@dataclass
class ConversionPlan:
    infos: Dict[str, TensorInfo]
    layers: Dict[str, LayerPlan]  # by base, in file order; all candidates (quantized or kept)
    dropped: List[str]
    family: Optional[str]
    presets: List[str]
    notes: List[str] = field(default_factory=list)

    def layer_for_key(self, key: str) -> Optional[LayerPlan]:
        if key.endswith(".weight"):
            return self.layers.get(key[: -len(".weight")])
        return None

    def quantized_layers(self) -> List[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.spec is not None]

    def output_entries(self, extra: Optional[Dict[str, List[OutputEntry]]] = None) -> List[OutputEntry]:
        """Every output tensor in input order: a quantized layer's weight key expands to its format's
        keys; ``extra[base]`` adds tensors a step creates (e.g. a bias from bias correction)."""
        entries: List[OutputEntry] = []
        dropped = set(self.dropped)
        for key, info in self.infos.items():
            if key in dropped:
                continue
            lp = self.layer_for_key(key)
            if lp is not None and lp.spec is not None:
                for k, dt, shape in lp.spec.cls.output_spec(lp.base, info.shape, lp.spec.params, info.dtype):
                    entries.append(OutputEntry(k, dt, tuple(shape)))
                for e in (extra or {}).get(lp.base, []):
                    entries.append(e)
            else:
                entries.append(OutputEntry(key, info.dtype, info.shape))
        _refuse_colliding_keys(entries, self)
        return entries

    def estimate(self) -> Dict[str, int]:
        bytes_in = sum(i.nbytes for i in self.infos.values())
        bytes_out = sum(e.nbytes for e in self.output_entries())
        return {"bytes_in": bytes_in, "bytes_out": bytes_out,
                "layers_quantized": len(self.quantized_layers()),
                "layers_kept": len(self.layers) - len(self.quantized_layers()),
                "tensors_passthrough": len(self.infos) - len(self.layers) - len(self.dropped),
                "tensors_dropped": len(self.dropped)}

    def table(self) -> str:
        rows = [f"{'layer':<60} {'shape':>16}  {'format':<28} reason"]
        for lp in self.layers.values():
            shape = "x".join(str(s) for s in lp.shape)
            why = lp.reason + (f"; fallback: {lp.fallback_reason}" if lp.fallback_reason else "")
            rows.append(f"{display_name(lp.base):<60} {shape:>16}  {lp.describe():<28} {why}")
        return "\n".join(rows)


def _refuse_colliding_keys(entries: List[OutputEntry], plan: "ConversionPlan"):
    """A hostile or half-converted input can hold a tensor named like one a quantized layer writes
    (``x.weight_scale`` next to a float ``x.weight``): say so instead of failing on a duplicate key."""
    seen = set()
    for e in entries:
        if e.key in seen:
            layer = next((lp for lp in plan.layers.values() if lp.spec is not None and e.key.startswith(lp.base + ".")),
                         None)
            what = f"quantizing layer {layer.base!r} ({layer.describe()}) writes one too" if layer else \
                "a conversion step writes one too"
            raise UnsupportedInputError(
                f"output tensor {e.key!r} would be written twice: the input already has a tensor of that name "
                f"and {what}. Is the input partly quantized? Keep that layer with --exclude-layers, or "
                "convert the original float model")
        seen.add(e.key)


def is_candidate(info: TensorInfo) -> bool:
    return info.name.endswith(".weight") and info.dtype_name in FLOAT_DTYPES and len(info.shape) == 2


def build_plan(infos: Dict[str, TensorInfo], opts: PlanOptions) -> ConversionPlan:
    keys = list(infos)
    family = presets_mod.detect_family(keys)
    names: List[str] = []
    notes: List[str] = []
    for name in opts.presets:
        if name == "auto":
            if family is None:
                notes.append("--preset auto: no known model family detected; only the default skip list applies")
            else:
                notes.append(f"--preset auto: detected model family '{family}', applying preset --{family}")
                names.append(family)
        else:
            names.append(name)
    presets = [presets_mod.get_preset(n) for n in dict.fromkeys(names)]
    if not opts.presets and family is not None:
        notes.append(f"detected model family '{family}': consider --{family} (or --preset auto) to keep "
                     "its sensitive layers in high precision")
    default_skip = presets_mod.default_skip() if opts.default_skip else ()
    match = (lambda rx, k: rx.fullmatch(k) is not None) if opts.fullmatch else (lambda rx, k: rx.search(k) is not None)
    exclude = compile_user_regex(opts.exclude_layers, "--exclude-layers") if opts.exclude_layers else None
    custom = compile_user_regex(opts.custom_layers, "--custom-layers") if opts.custom_layers else None
    user_rx = [(r.pattern, r.source) for r in opts.layer_config] + \
        [(rx, w) for rx, w in ((exclude, "--exclude-layers"), (custom, "--custom-layers")) if rx is not None]
    if user_rx:  # answer every regex question of this plan up front, under the time limit
        names = [n for k, i in infos.items() if is_candidate(i) for n in (k, k[: -len(".weight")])]
        hits = {id(rx): h for (rx, _), h in zip(user_rx, match_user_regexes(user_rx, names, opts.fullmatch))}
        match = lambda rx, k: k in hits[id(rx)]  # noqa: E731
    quantize_only = [s for p in presets for s in p.quantize_only]

    dropped: List[str] = []
    layers: Dict[str, LayerPlan] = {}
    for key, info in infos.items():
        drop_hit = next(((p.name, s) for p in presets for s in p.drop if s in key), None)
        if drop_hit:
            dropped.append(key)
            continue
        if not is_candidate(info):
            continue
        base = key[: -len(".weight")]
        spec: Optional[FormatSpec] = opts.spec
        reason = "default format"
        rule = next((r for r in opts.layer_config if match(r.pattern, key) or match(r.pattern, base)), None)
        if rule is not None:
            spec, reason = (None, f"{rule.source}: skip") if rule.skip else (rule.spec, rule.source)
        elif exclude is not None and (match(exclude, key) or match(exclude, base)):
            spec, reason = None, "--exclude-layers"
        elif custom is not None and (match(custom, key) or match(custom, base)):
            spec, reason = (opts.custom_spec or opts.spec), "--custom-layers"
        else:
            if quantize_only and presets_mod.first_match(key, quantize_only) is None:
                spec, reason = None, "not in the preset's quantize list"
            else:
                hit = next(((p.name, s) for p in presets for s in p.skip if s in key), None)
                if hit:
                    spec, reason = None, f"preset --{hit[0]} skips '{hit[1]}'"
                else:
                    s = presets_mod.first_match(key, default_skip)
                    if s is not None:
                        spec, reason = None, f"default skip list '{s}'"
        lp = LayerPlan(base, info.shape, info.dtype_name, spec, reason, requested=spec)
        if spec is not None:
            if opts.fallback == "fp16":
                reason_bad = spec.cls.check_fits(info.shape, spec.params)
                fit = FormatSpec(FP16.name, FP16.Params()) if reason_bad else spec
            else:
                fit, reason_bad = resolve_fit(spec, info.shape)
            if reason_bad:
                lp.fallback_reason = f"{reason_bad} -> {fit.describe() if fit else 'kept'}"
            lp.spec = fit
        layers[base] = lp
    return ConversionPlan(infos=dict(infos), layers=layers, dropped=dropped, family=family,
                          presets=[p.name for p in presets], notes=notes)


def layer_config_template(plan: ConversionPlan) -> dict:
    """A layer-config JSON for this model: one exact-match entry per candidate layer with its current
    decision, ready to edit (see docs of --layer-config)."""
    out = {"_comment": ("Keys are Python regexes matched against the layer name (search, or full match "
                        "with --fullmatch); first match wins. Fields: format (int8_tensorwise, "
                        "int8_blockwise, fp16), scaling_mode (tensor, axis, block), block_size, convrot, "
                        "convrot_groupsize, skip. Generated by convert_to_quant --dry-run create-template.")}
    for lp in plan.layers.values():
        rx = "^" + re.escape(lp.base) + "$"
        if lp.spec is None:
            out[rx] = {"skip": True}
        elif lp.spec.format == "int8_tensorwise":
            p = lp.spec.params
            d = {"format": "int8_tensorwise", "scaling_mode": "tensor" if p.scaling == "tensor" else "axis"}
            if p.convrot:
                d.update(convrot=True, convrot_groupsize=p.convrot_groupsize)
            out[rx] = d
        elif lp.spec.format == "int8_blockwise":
            out[rx] = {"format": "int8_blockwise", "block_size": lp.spec.params.group_size}
        else:
            out[rx] = {"format": lp.spec.format}
    return out
