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
from .formats import FP16, FormatSpec, make_spec, resolve_fit, spec_from_choice
from .safetensors_io import FLOAT_DTYPES, OutputEntry, TensorInfo

MAX_REGEX_LEN = 1000


class UserRegex:
    r"""A regex from the user (flag or layer-config key). Patterns that are plain
    text -- optionally anchored with ``^`` / ``$``, metacharacters escaped with ``\`` as ``re.escape``
    and ``--dry-run create-template`` write them -- are matched as text, without ``re`` (same result,
    no backtracking, and a set of 200k of them is matched in one pass); the others are compiled."""

    __slots__ = ("pattern", "literal", "_compiled")

    def __init__(self, pattern: str, compiled: Optional["re.Pattern"] = None):
        self.pattern = pattern
        self.literal = literal_form(pattern)
        self._compiled = compiled

    @property
    def compiled(self) -> "re.Pattern":
        if self._compiled is None:
            self._compiled = re.compile(self.pattern)
        return self._compiled

    @property
    def flags(self) -> int:
        return self.compiled.flags

    def matches(self, name: str, fullmatch: bool) -> bool:
        if self.literal is not None:
            return literal_matches(self.literal, name, fullmatch)
        rx = self.compiled
        return (rx.fullmatch(name) if fullmatch else rx.search(name)) is not None

    def __repr__(self):
        return f"UserRegex({self.pattern!r})"


_REGEX_META = frozenset(".^$*+?{}[]|()")


def literal_form(pattern: str) -> Optional[Tuple[str, bool, bool]]:
    r"""``(text, anchored at the start, anchored at the end)`` when ``pattern`` matches exactly like that
    text: ordinary characters, ``\`` + a character that is not an ASCII letter or digit (a literal in
    ``re``), an optional leading ``^`` and trailing ``$``. ``None`` for anything else (classes, ``\d``,
    ``\n``, groups, inline flags, ...), which is then matched by ``re`` itself."""
    start = pattern.startswith("^")
    i = 1 if start else 0
    out: List[str] = []
    end = False
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            nxt = pattern[i + 1]
            if nxt.isascii() and nxt.isalnum():
                return None
            out.append(nxt)
            i += 2
            continue
        if c == "$" and i == n - 1:
            end = True
            break
        if c in _REGEX_META:
            return None
        out.append(c)
        i += 1
    return "".join(out), start, end


def literal_matches(lit: Tuple[str, bool, bool], name: str, fullmatch: bool) -> bool:
    """``re`` semantics of an anchored literal: ``$`` also matches before a final newline (search)."""
    text, start, end = lit
    if fullmatch:
        return name == text
    if start and end:
        return name == text or name == text + "\n"
    if start:
        return name.startswith(text)
    if end:
        return name.endswith(text) or (name.endswith("\n") and name[:-1].endswith(text))
    return text in name


def compile_user_regex(pattern: str, where: str) -> UserRegex:
    """Validate (and, unless it is plain text, compile) a regex given by the user, with an error that
    names where it came from."""
    if not isinstance(pattern, str):
        raise PlanError(f"{where}: regex must be a string, got {type(pattern).__name__}")
    if len(pattern) > MAX_REGEX_LEN:
        raise PlanError(f"{where}: regex is longer than {MAX_REGEX_LEN} characters")
    rx = UserRegex(pattern)
    if rx.literal is None:
        try:
            rx._compiled = re.compile(pattern)
        except re.error as e:
            raise PlanError(f"{where}: invalid regex {pattern!r}: {e}") from None
    return rx


class _LiteralIndex:
    """Many literal patterns matched against one name in time that depends on the name's length and the
    number of distinct pattern lengths, not on the number of patterns."""

    def __init__(self, items: Sequence[Tuple[int, Tuple[str, bool, bool]]], fullmatch: bool):
        self.fullmatch = fullmatch
        self.exact: Dict[str, List[int]] = {}
        self.prefix: Dict[int, Dict[str, List[int]]] = {}
        self.suffix: Dict[int, Dict[str, List[int]]] = {}
        self.inside: Dict[int, Dict[str, List[int]]] = {}
        self.n_inside = 0
        for idx, (text, start, end) in items:
            if fullmatch or (start and end):
                self.exact.setdefault(text, []).append(idx)
            elif start:
                self.prefix.setdefault(len(text), {}).setdefault(text, []).append(idx)
            elif end:
                self.suffix.setdefault(len(text), {}).setdefault(text, []).append(idx)
            else:
                self.inside.setdefault(len(text), {}).setdefault(text, []).append(idx)
                self.n_inside += 1

    def hits(self, name: str) -> List[int]:
        out: List[int] = []
        ex = self.exact
        out += ex.get(name, ())
        if self.fullmatch:
            return out
        stripped = name[:-1] if name.endswith("\n") else None
        if stripped is not None:
            out += ex.get(stripped, ())
        L = len(name)
        for ln, d in self.prefix.items():
            if ln <= L:
                out += d.get(name[:ln], ())
        for ln, d in self.suffix.items():
            seen = set()
            for s in (name, stripped):
                if s is not None and ln <= len(s):
                    for i in d.get(s[len(s) - ln:], ()):
                        if i not in seen:
                            seen.add(i)
                            out.append(i)
        if self.inside:
            windows = sum(L - ln + 1 for ln in self.inside if ln <= L)
            if windows <= 4 * self.n_inside:
                for ln, d in self.inside.items():
                    if ln <= L:
                        for sub in {name[i:i + ln] for i in range(L - ln + 1)} & d.keys():
                            out += d[sub]
            else:
                for d in self.inside.values():
                    for text, idxs in d.items():
                        if text in name:
                            out += idxs
        return out


# A user regex is matched against names from a model file someone else made. Python's ``re`` cannot be
# interrupted, and patterns such as ``(a+)+$`` or ``(a|a)*$`` take exponential time on a long name, so
# the regexes that are not plain text are matched in a short-lived child interpreter, one pattern at a
# time, and the child is killed when one pattern runs longer than REGEX_TIME_LIMIT_S seconds; the error
# names that pattern. The limit is per pattern (a large set of harmless patterns is never refused for
# its size). Exact ``re`` semantics, no extra dependency, no false refusals of patterns that merely
# look nested.
REGEX_TIME_LIMIT_S = float(os.environ.get("CONVERT_TO_QUANT_REGEX_TIMEOUT", "10"))
REGEX_START_LIMIT_S = 120.0  # the child's start-up and reading the names (not a user pattern's time)

_MATCH_WORKER = r"""
import json, re, sys
job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
names = job["names"]
sys.stdout.write("ready\n")
sys.stdout.flush()
for pattern in job["patterns"]:
    rx = re.compile(pattern)
    fn = rx.fullmatch if job["fullmatch"] else rx.search
    sys.stdout.write(json.dumps([i for i, n in enumerate(names) if fn(n) is not None]) + "\n")
    sys.stdout.flush()
"""


def _as_user_regex(rx) -> UserRegex:
    if isinstance(rx, UserRegex):
        return rx
    if isinstance(rx, re.Pattern):
        if rx.flags & ~re.UNICODE:
            raise PlanError(f"regex {rx.pattern!r}: flags are not supported")
        return UserRegex(rx.pattern, rx)
    return UserRegex(rx)


def match_user_regexes(patterns: Sequence[Tuple[object, str]], names: Sequence[str], fullmatch: bool,
                       time_limit_s: Optional[float] = None) -> List[set]:
    """For each ``(regex, where it came from)`` (a ``UserRegex``, compiled pattern or string), the set
    of ``names`` it matches (``search``, or ``fullmatch``). Plain-text patterns are matched here
    through one index; the others in a child process, each within ``time_limit_s``; a pattern that does
    not finish in time raises PlanError naming it and where it came from."""
    rxs = [_as_user_regex(rx) for rx, _ in patterns]
    result: List[set] = [set() for _ in rxs]
    lits = [(i, rx.literal) for i, rx in enumerate(rxs) if rx.literal is not None]
    if lits:
        index = _LiteralIndex(lits, fullmatch)
        for n in dict.fromkeys(names):
            for i in index.hits(n):
                result[i].add(n)
    others = [i for i, rx in enumerate(rxs) if rx.literal is None]
    if others:
        limit = REGEX_TIME_LIMIT_S if time_limit_s is None else time_limit_s
        found = _match_in_child([rxs[i] for i in others], [patterns[i][1] for i in others], names,
                                fullmatch, limit)
        for i, hit in zip(others, found):
            result[i] = hit
    return result


def _match_in_child(rxs: List[UserRegex], wheres: List[str], names: Sequence[str], fullmatch: bool,
                    limit: float) -> List[set]:
    import queue
    import subprocess
    import sys
    import threading

    names = list(names)
    job = json.dumps({"names": names, "fullmatch": bool(fullmatch),
                      "patterns": [rx.pattern for rx in rxs]}).encode("utf-8")
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _MATCH_WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError:  # no usable interpreter to start (frozen app): match here, without the time limit
        return [{n for n in names if rx.matches(n, fullmatch)} for rx in rxs]
    lines: "queue.Queue" = queue.Queue()
    err_chunks: List[bytes] = []

    def feed():
        try:
            proc.stdin.write(job)
            proc.stdin.close()
        except OSError:  # the child died or was killed: its exit status tells
            pass

    def read_out():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def read_err():
        err_chunks.append(proc.stderr.read())

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, read_out, read_err)]
    for t in threads:
        t.start()
    out: List[set] = []
    try:
        first = True
        while len(out) < len(rxs):
            try:
                line = lines.get(timeout=REGEX_START_LIMIT_S if first else limit)
            except queue.Empty:
                if first:
                    raise PlanError(f"matching layer names against {len(rxs)} regexes: the helper process "
                                    f"did not start within {REGEX_START_LIMIT_S:g} s") from None
                rx, where = rxs[len(out)], wheres[len(out)]
                raise PlanError(f"{where}: regex {rx.pattern!r} did not finish matching {len(names)} layer "
                                f"names in {limit:g} s: it backtracks catastrophically (nested quantifiers "
                                "such as (a+)+, or alternatives that overlap such as (a|ab)*). Rewrite it "
                                "without nested repetition, e.g. a+ instead of (a+)+.") from None
            if line is None:
                break
            if first:
                first = False
                continue
            out.append({names[i] for i in json.loads(line)})
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for t in threads:
            t.join(timeout=5)
    if len(out) != len(rxs):
        err = b"".join(err_chunks)
        raise PlanError(f"matching layer names against {[rx.pattern for rx in rxs][:5]} failed "
                        f"(exit {proc.returncode}): {err.decode('utf-8', 'replace')[-500:]}")
    return out


@dataclass
class LayerConfigRule:
    pattern: UserRegex
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
    specs: Dict[str, FormatSpec] = {}  # the same settings (a generated template repeats a few) -> one spec
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
        key = json.dumps(cfg, sort_keys=True)
        spec = specs.get(key)
        if spec is None:
            spec = specs[key] = spec_from_settings(cfg, default_spec, at)
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
    # an entry's unset fields inherit the run's format choice (its scaling, tile, rotation)
    scaling = cfg.get("scaling_mode", getattr(dp, "scaling", None))
    if fmt in ("int8", "int8_tensorwise") and scaling == "block" and "format" in cfg:
        raise PlanError(f"{where}: format {fmt} with scaling_mode block; use int8_blockwise")
    try:
        return spec_from_choice(
            fmt, scaling, cfg.get("block_size", getattr(dp, "group_size", None)),
            convrot=cfg.get("convrot", getattr(dp, "convrot", False) if fmt == d.format else False),
            convrot_groupsize=cfg.get("convrot_groupsize", getattr(dp, "convrot_groupsize", None)))
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
    default_skip = presets_mod.default_skip() if opts.default_skip else ()
    exclude = compile_user_regex(opts.exclude_layers, "--exclude-layers") if opts.exclude_layers else None
    custom = compile_user_regex(opts.custom_layers, "--custom-layers") if opts.custom_layers else None
    rules = list(opts.layer_config)
    user_rx = [(r.pattern, r.source) for r in rules] + \
        [(rx, w) for rx, w in ((exclude, "--exclude-layers"), (custom, "--custom-layers")) if rx is not None]
    first_rule: Dict[str, int] = {}  # name -> index of the first layer-config rule matching it
    flag_hits: Dict[str, set] = {}
    if user_rx:  # answer every regex question of this plan up front, under the time limit
        names = [n for k, i in infos.items() if is_candidate(i) for n in (k, k[: -len(".weight")])]
        hits = match_user_regexes(user_rx, names, opts.fullmatch)
        for i in range(len(rules) - 1, -1, -1):
            for n in hits[i]:
                first_rule[n] = i
        for (_, w), h in zip(user_rx[len(rules):], hits[len(rules):]):
            flag_hits[w] = h
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
        idx = min((first_rule[n] for n in (key, base) if n in first_rule), default=None)
        rule = rules[idx] if idx is not None else None
        if rule is not None:
            spec, reason = (None, f"{rule.source}: skip") if rule.skip else (rule.spec, rule.source)
        elif exclude is not None and (key in flag_hits["--exclude-layers"] or base in flag_hits["--exclude-layers"]):
            spec, reason = None, "--exclude-layers"
        elif custom is not None and (key in flag_hits["--custom-layers"] or base in flag_hits["--custom-layers"]):
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
    if not opts.presets and family is not None:
        changed = _preset_would_change(presets_mod.get_preset(family), infos, layers)
        if changed:  # only where the preset would decide something differently
            notes.append(f"detected model family '{family}': its preset (--{family} or --preset auto) would "
                         f"keep {changed} more tensor(s) in high precision or drop them")
    return ConversionPlan(infos=dict(infos), layers=layers, dropped=dropped, family=family,
                          presets=[p.name for p in presets], notes=notes)


def _preset_would_change(preset, infos: Dict[str, TensorInfo], layers: Dict[str, "LayerPlan"]) -> int:
    """How many tensors ``preset`` would drop, or keep unquantized where this plan quantizes them."""
    n = 0
    for key in infos:
        if any(s in key for s in preset.drop):
            n += 1
            continue
        lp = layers.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if lp is None or lp.spec is None or lp.reason != "default format":
            continue
        if (preset.quantize_only and presets_mod.first_match(key, preset.quantize_only) is None) \
                or any(s in key for s in preset.skip):
            n += 1
    return n


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
