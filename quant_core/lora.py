"""Merging LoRAs into base weights, with ComfyUI's LoRA math.

Use while streaming a conversion::

    merger = LoraMerger.from_files(paths, strengths, dampen=False, strict=False)
    report = merger.bind({key: (dtype, shape), ...}, kept={weight keys the plan keeps high precision})
    for key in keys:                      # any order, one tensor at a time
        t = merger.apply(key, reader.get(key))   # merged float32 if a LoRA changes it, else t unchanged

or in memory: ``merge_state_dict(sd, paths, strengths)``.

``bind`` checks everything from the base header and the (small, fully loaded) LoRA tensors before a
single output byte exists: every LoRA module is matched to base weights (``lora_keys``), every
factor's shape and rank checked, every delta's shape compared with the rows it lands on. Problems
raise one ``LoRAError`` listing them; keys that match no layer are listed in the report (an error with
``strict``); a LoRA file that changes nothing at all is an error.

Math (float32, the order ComfyUI's ``calculate_weight`` uses, so results agree to the last bit where
the inputs are the same):

* LoRA / LoCon:  ``W += strength * (alpha / rank) * (up @ down)``; rank = rows of ``down``; with a
  ``lora_mid`` (LoCon/Tucker) ``up``, ``mid`` and ``down`` are contracted first. Conv weights: the
  product is reshaped to the 4-D weight.
* LoHa: ``W += strength * (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)``, rank = rows of ``w1_b``;
  with ``hada_t1/t2`` (CP) each factor is ``einsum(t, b, a)``.
* LoKr: ``W += strength * s * kron(w1, w2)`` where ``w1``/``w2`` are stored or ``a @ b`` (``w2`` also
  as ``einsum(t2, b, a)``); ``s = alpha / rank`` with rank = rows of ``w2_b`` if ``w2`` is factored,
  else of ``w1_b``; ``s = 1`` when neither is factored (LyCORIS' "full matrix" mode).
* ``.diff`` / ``.w_norm``: ``W += strength * diff``; ``.diff_b`` / ``.b_norm``: ``bias += strength * diff_b``;
  ``.set_weight``: ``W = set_weight`` (strength ignored, as in ComfyUI); PEFT ``lora_B.bias``:
  ``bias += strength * scale * lora_B.bias`` (PEFT's merge).
* DoRA (``dora_scale``, PEFT ``lora_magnitude_vector``): the weight-decomposed form ComfyUI uses.

alpha: the module's ``.alpha`` tensor, else the file's metadata (a PEFT/diffusers config --
``lora_alpha``, ``alpha_pattern``, ``use_rslora`` -- or kohya's ``ss_network_alpha``), else ``rank``
(scale 1).

Untrusted input (docs/RELIABILITY.md §9): strengths and every alpha must be finite, metadata JSON is
parsed with bounded integers and nesting, ``alpha_pattern`` regexes run under a time limit, and ``apply``
/ ``cast`` refuse any NaN/Inf the merge creates (``LoRAError`` naming the LoRA, layer and cause).

Dampening (off by default): rows of a weight that ``k >= 2`` of the merged LoRA *files* change get the
sum of those changes multiplied by ``1/sqrt(k)`` -- once, in ``apply``. Independent deltas add up in norm
like ``sqrt(k)``; this keeps the combined change about as large as one LoRA's. Rows only one file
touches are untouched.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import LoRAError
from .lora_keys import TE_TAGS, BaseIndex, Target, lora_name_candidates, split_lora_key, unsupported_kind
from .safetensors_io import SafetensorsReader, check_input_path

MAX_LISTED = 20  # problems quoted in one error message


# ------------------------------------------------------------------------------------------------
# one LoRA module (all tensors of one layer in one file)
# ------------------------------------------------------------------------------------------------
@dataclass
class LoraModule:
    name: str  # the module name as written in the file (without suffix)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor
    keys: Dict[str, str] = field(default_factory=dict)  # role -> file key
    kind: str = ""  # lora | loha | lokr | diff | set | bias-only
    alpha: Optional[float] = None
    alpha_source: str = "rank"
    alpha_where: str = ""  # the tensor key or metadata entry alpha came from (for messages)
    rslora: bool = False

    @property
    def label(self) -> str:
        """The name for messages (escaped, a hostile length cut short)."""
        return _show(self.name)

    # --- structure ----------------------------------------------------------------------------
    def classify(self) -> Optional[str]:
        """Set ``kind`` from the roles present; return an error message for an inconsistent module."""
        roles = set(self.tensors)
        for role in roles:
            what = unsupported_kind(role)
            if what:
                return f"{what} adapters are not supported for merging"
        if "reshape_weight" in roles:
            return ("has a reshape_weight (a LoRA that changes the layer's shape, e.g. a BFL control "
                    "LoRA); merging it into a fixed-shape model is not supported")
        weight_kinds = []
        if roles & {"up", "down", "mid"}:
            weight_kinds.append("lora")
        if any(r.startswith("hada_") for r in roles):
            weight_kinds.append("loha")
        if any(r.startswith("lokr_") for r in roles):
            weight_kinds.append("lokr")
        if roles & {"diff", "w_norm"}:
            weight_kinds.append("diff")
        if "set_weight" in roles:
            weight_kinds.append("set")
        if len(weight_kinds) > 1:
            return f"mixes several adapter types ({', '.join(weight_kinds)}) for one layer"
        if weight_kinds:
            self.kind = weight_kinds[0]
        elif roles & {"diff_b", "b_norm", "up_bias"}:
            self.kind = "bias-only"
            if "up_bias" in roles:
                return "has lora_B.bias without lora_A/lora_B weights"
        else:
            self.kind = ""  # only alpha / dora_scale: nothing to merge; listed as unmatched
            return None
        problem = self._check_factors()
        if problem is None and self.rank == 0:
            problem = "has rank 0 (empty LoRA factors): there is nothing to merge and alpha / rank is undefined"
        return problem

    def _check_factors(self) -> Optional[str]:
        t = self.tensors
        if self.kind == "lora":
            if "up" not in t or "down" not in t:
                return f"has lora_{'down' if 'down' in t else 'up'} without its lora_{'up' if 'down' in t else 'down'}"
            up, down = t["up"], t["down"]
            if up.dim() < 2 or down.dim() < 2:
                return f"LoRA factors must be at least 2-D (up {list(up.shape)}, down {list(down.shape)})"
            r_up, r_down = up.shape[1], down.shape[0]
            if "mid" in t:
                mid = t["mid"]
                if mid.dim() < 3 or mid.shape[0] != r_up or mid.shape[1] != r_down:
                    return (f"rank mismatch: lora_mid {list(mid.shape)} does not connect up {list(up.shape)} "
                            f"and down {list(down.shape)}")
            elif r_up != r_down:
                return (f"rank mismatch: up {list(up.shape)} has inner size {r_up} but down "
                        f"{list(down.shape)} has rank {r_down}")
            if "up_bias" in t and t["up_bias"].shape[0] != up.shape[0]:
                return f"lora_B.bias {list(t['up_bias'].shape)} does not match lora_B {list(up.shape)}"
        elif self.kind == "loha":
            need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
            miss = [r for r in need if r not in t]
            if miss:
                return "LoHa module lacks " + ", ".join(miss)
            if ("hada_t1" in t) != ("hada_t2" in t):
                return "LoHa module has only one of hada_t1/hada_t2"
            w1a, w1b, w2a, w2b = (t[r] for r in need)
            if "hada_t1" in t:
                t1, t2 = t["hada_t1"], t["hada_t2"]
                for a, b, tt, n in ((w1a, w1b, t1, 1), (w2a, w2b, t2, 2)):
                    if tt.dim() < 2 or a.shape[0] != tt.shape[0] or b.shape[0] != tt.shape[1]:
                        return (f"rank mismatch: hada_t{n} {list(tt.shape)} does not connect hada_w{n}_a "
                                f"{list(a.shape)} and hada_w{n}_b {list(b.shape)}")
            else:
                for a, b, n in ((w1a, w1b, 1), (w2a, w2b, 2)):
                    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                        return (f"rank mismatch: hada_w{n}_a {list(a.shape)} @ hada_w{n}_b {list(b.shape)} "
                                "do not multiply")
                if (w1a.shape[0], w1b.shape[1]) != (w2a.shape[0], w2b.shape[1]):
                    return "the two LoHa products have different shapes"
        elif self.kind == "lokr":
            for n in (1, 2):
                full, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
                if full in t:
                    continue
                if a not in t or b not in t:
                    return f"LoKr module has neither lokr_w{n} nor both lokr_w{n}_a and lokr_w{n}_b"
                if n == 2 and "lokr_t2" in t:
                    tt = t["lokr_t2"]
                    if tt.dim() < 3 or t[a].shape[0] != tt.shape[0] or t[b].shape[0] != tt.shape[1]:
                        return (f"rank mismatch: lokr_t2 {list(tt.shape)} does not connect lokr_w2_a "
                                f"{list(t[a].shape)} and lokr_w2_b {list(t[b].shape)}")
                elif t[a].dim() != 2 or t[b].dim() != 2 or t[a].shape[1] != t[b].shape[0]:
                    return (f"rank mismatch: lokr_w{n}_a {list(t[a].shape)} @ lokr_w{n}_b {list(t[b].shape)} "
                            "do not multiply")
        return None

    @property
    def rank(self) -> Optional[int]:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            if "lokr_w2" not in t:
                return int(t["lokr_w2_b"].shape[0])
            if "lokr_w1" not in t:
                return int(t["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        """The multiplier of the delta apart from strength: alpha/rank (ComfyUI's convention)."""
        if self.kind in ("diff", "set", "bias-only"):
            return 1.0
        if self.kind == "lokr" and self.rank is None:
            return 1.0  # both Kronecker factors stored whole: LyCORIS uses scale 1
        if self.alpha is None:
            return 1.0
        r = self.rank
        return self.alpha / (math.sqrt(r) if self.rslora else r)

    # --- shapes -------------------------------------------------------------------------------
    def delta_shape(self) -> Optional[Tuple[int, ...]]:
        """Shape of the weight delta as the factors produce it (rows first); None for bias-only."""
        t = self.tensors
        if self.kind == "lora":
            up, down = t["up"], t["down"]
            tail = tuple(t["mid"].shape[2:]) if "mid" in t else tuple(down.shape[2:])
            return (up.shape[0], down.shape[1]) + tail
        if self.kind == "loha":
            if "hada_t1" in t:
                return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]) + tuple(t["hada_t1"].shape[2:])
            return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
        if self.kind == "lokr":
            w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
            if "lokr_w2" in t:
                w2 = tuple(t["lokr_w2"].shape)
            elif "lokr_t2" in t:
                w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]) + tuple(t["lokr_t2"].shape[2:])
            else:
                w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
            return (w1[0] * w2[0], w1[1] * w2[1]) + tuple(w2[2:])
        if self.kind == "diff":
            return tuple((t.get("diff") if "diff" in t else t["w_norm"]).shape)
        if self.kind == "set":
            return tuple(t["set_weight"].shape)
        return None

    def bias_delta(self) -> Optional[torch.Tensor]:
        t = self.tensors
        for role in ("diff_b", "b_norm", "up_bias"):
            if role in t:
                return t[role]
        return None

    @property
    def bias_scale(self) -> float:
        """PEFT scales ``lora_B.bias`` like the weight delta; ComfyUI adds ``.diff_b`` as it is."""
        return self.scale if "up_bias" in self.tensors else 1.0

    # --- math ---------------------------------------------------------------------------------
    def weight_delta(self) -> torch.Tensor:
        """The unscaled float32 delta (before alpha/rank and strength), rows first."""
        t = {k: v.to(torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            up, down = t["up"], t["down"]
            if "mid" in t:
                mid = t["mid"]  # [r_up, r_down, k...]
                down2 = down.reshape(down.shape[0], down.shape[1])
                # contract mid with down first (as ComfyUI does), then with up
                md = torch.mm(down2.t(), mid.transpose(0, 1).flatten(start_dim=1))  # [in, r_up*k...]
                md = md.reshape((down2.shape[1], mid.shape[0]) + tuple(mid.shape[2:])).transpose(0, 1)
                return torch.mm(up.flatten(start_dim=1), md.flatten(start_dim=1)).reshape(self.delta_shape())
            return torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(self.delta_shape())
        if self.kind == "loha":
            if "hada_t1" in t:
                m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                m1 = torch.mm(t["hada_w1_a"], t["hada_w1_b"])
                m2 = torch.mm(t["hada_w2_a"], t["hada_w2_b"])
            return m1 * m2
        if self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
            if w2.dim() == 4:
                w1 = w1.unsqueeze(2).unsqueeze(2)
            return torch.kron(w1.contiguous(), w2.contiguous())
        if self.kind == "diff":
            return t["diff"] if "diff" in t else t["w_norm"]
        if self.kind == "set":
            return t["set_weight"]
        raise LoRAError(f"internal error: no weight delta for a {self.kind} module")

    @property
    def dora(self) -> Optional[torch.Tensor]:
        return self.tensors.get("dora_scale", self.tensors.get("dora_magnitude"))

    @property
    def dora_mode(self) -> str:
        """"comfy": kohya/LyCORIS ``dora_scale`` merged with ComfyUI's ``weight_decompose``;
        "peft": PEFT's ``lora_magnitude_vector`` merged as ``merge_and_unload`` does."""
        return "comfy" if "dora_scale" in self.tensors else "peft"


# ------------------------------------------------------------------------------------------------
# one LoRA file
# ------------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    name: str
    strength: float
    modules: "OrderedDict[str, LoraModule]"
    metadata: Dict[str, str]
    config_source: str = ""
    unrecognized: List[str] = field(default_factory=list)  # keys that are no LoRA tensor we know
    problems: List[str] = field(default_factory=list)  # structural errors
    broken: set = field(default_factory=set)  # names of the modules with a structural error

    @property
    def key_style(self) -> str:
        names = list(self.modules)
        roles = {r for m in self.modules.values() for r in m.tensors}
        styles = []
        if any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")) for n in names):
            styles.append("kohya")
        if roles & {"up", "down"} and any("lora_A" in k or "lora_B" in k
                                          for m in self.modules.values() for k in m.keys.values()):
            styles.append("diffusers/PEFT")
        if any(n.startswith(("diffusion_model.", "text_encoders.")) for n in names):
            styles.append("ComfyUI")
        kinds = Counter(m.kind for m in self.modules.values() if m.kind)
        styles += [k for k in ("loha", "lokr", "diff") if kinds.get(k)]
        return "+".join(styles) or "plain"


def _show(name: str, limit: int = 160) -> str:
    """A LoRA-file name for a message: non-printable characters escaped, a hostile length cut short."""
    s = name if name.isprintable() else repr(name)[1:-1]
    return s if len(s) <= limit else f"{s[:limit]}... ({len(name)} characters)"


def _coerce_alpha(t: torch.Tensor, key: str, name: str) -> float:
    if t.numel() != 1:
        raise LoRAError(f"{name}: {_show(key)}: alpha must be a single number, got shape {list(t.shape)}")
    v = float(t.reshape(()).to(torch.float64).item())
    if not math.isfinite(v):
        raise LoRAError(f"{name}: {_show(key)}: alpha is {v}")
    return v


# ------------------------------------------------------------------------------------------------
# alpha from metadata: numbers and JSON from someone else's file
# ------------------------------------------------------------------------------------------------
_MAX_JSON_INT_DIGITS = 309  # a longer integer does not fit a float64 anyway


def _json_int(s: str) -> int:
    if len(s.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer with {len(s.lstrip('-'))} digits")
    return int(s)


def _parse_json(raw: str) -> Any:
    """``json.loads`` for text from a LoRA file: an integer too long for Python's int/str conversion
    limit or nesting deeper than the interpreter's recursion limit raise ValueError with a plain reason
    (never RecursionError or a hint about ``sys.set_int_max_str_digits``)."""
    try:
        return json.loads(raw, parse_int=_json_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _finite_number(v: Any, where: str, why: str = " (it would make the merged weights NaN/Inf)") -> float:
    """A JSON/metadata number (or numeric string) as a finite float, or LoRAError naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise LoRAError(f"{where} must be a number, got {'a boolean' if isinstance(v, bool) else type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    except ValueError:
        raise LoRAError(f"{where} must be a number, got {_show(repr(v))}") from None
    if not math.isfinite(f):
        shown = _show(str(v)) if isinstance(v, str) or not isinstance(v, int) else f"an integer of {len(str(v))} digits"
        raise LoRAError(f"{where} must be a finite number, got {shown}{why}")
    return f


def _check_strength(x: Any, name: str) -> float:
    """A LoRA strength as a finite float; LoRAError naming the file otherwise."""
    try:
        f = float(x)
    except (TypeError, ValueError, OverflowError):
        raise LoRAError(f"{name}: LoRA strength {_show(repr(x))} is not a number") from None
    if not math.isfinite(f):
        raise LoRAError(f"{name}: LoRA strength {f} is not a finite number")
    return f


@dataclass
class _AdapterConfig:
    """The PEFT LoraConfig fields that change the merge (from metadata or adapter_config.json)."""
    lora_alpha: Optional[float] = None
    r: Optional[int] = None
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    source: str = ""


def _config_from_dict(d: Mapping[str, Any], source: str) -> Optional[_AdapterConfig]:
    """The config's merge-relevant fields, each checked: numbers finite, ``r`` a positive integer,
    ``alpha_pattern`` an object of numbers, ``use_rslora`` a boolean. ``rank_pattern`` is not read: the
    rank of each module is the row count of its stored factors (what PEFT's rank_pattern produced)."""
    if "lora_alpha" not in d and "alpha_pattern" not in d:
        return None
    alpha = d.get("lora_alpha")
    alpha = None if alpha is None else _finite_number(alpha, f"{source}: lora_alpha")
    r = d.get("r")
    if r is not None:
        rf = _finite_number(r, f"{source}: r", why="")
        if rf != int(rf) or rf < 1:
            raise LoRAError(f"{source}: r must be a positive integer, got {_show(repr(r))}")
        r = int(rf)
    pats = d.get("alpha_pattern")
    if pats is None:
        pats = {}
    if not isinstance(pats, dict):
        raise LoRAError(f"{source}: alpha_pattern must be an object mapping module-name patterns to "
                        f"alphas, got {type(pats).__name__}")
    pattern = {str(k): _finite_number(v, f"{source}: alpha_pattern[{_show(repr(str(k)))}]") for k, v in pats.items()}
    rs = d.get("use_rslora", False)
    if rs is not None and not isinstance(rs, bool):
        raise LoRAError(f"{source}: use_rslora must be true or false, got {_show(repr(rs))}")
    return _AdapterConfig(lora_alpha=alpha, r=r, alpha_pattern=pattern, use_rslora=bool(rs), source=source)


def _adapter_configs(path: str, metadata: Mapping[str, str]) -> Dict[Optional[str], _AdapterConfig]:
    """Configs keyed by the component prefix they apply to (None: the whole file).

    Sources, first found wins: a JSON LoraConfig in the safetensors ``__metadata__`` (diffusers'
    ``lora_adapter_metadata`` -- unprefixed, or prefixed per component as ``transformer.lora_alpha`` --
    or any value holding ``lora_alpha``), kohya's ``ss_network_alpha``, then the PEFT
    ``adapter_config.json`` beside an ``adapter_model.safetensors``. ``lora_adapter_metadata`` and
    ``adapter_config.json`` must be valid; other values that merely mention ``lora_alpha`` (free-text
    training notes) are used only when they are a JSON object."""
    configs: Dict[Optional[str], _AdapterConfig] = {}
    candidates = []
    if "lora_adapter_metadata" in metadata:
        candidates.append(("lora_adapter_metadata", metadata["lora_adapter_metadata"]))
    candidates += [(k, v) for k, v in metadata.items() if k != "lora_adapter_metadata" and "lora_alpha" in v]
    where = os.path.basename(path)
    for k, raw in candidates:
        src = f"{where} metadata[{_show(repr(k))}]"
        try:
            d = _parse_json(raw)
        except ValueError as e:
            if k == "lora_adapter_metadata":
                raise LoRAError(f"{src}: the PEFT adapter config is not valid JSON ({e})") from None
            continue
        if not isinstance(d, dict):
            if k == "lora_adapter_metadata":
                raise LoRAError(f"{src}: the PEFT adapter config must be a JSON object, got {type(d).__name__}")
            continue
        cfg = _config_from_dict(d, src)
        if cfg is not None:
            configs.setdefault(None, cfg)
            continue
        groups: Dict[str, Dict[str, Any]] = {}
        for kk, vv in d.items():
            if "." in kk:
                comp, field_ = kk.split(".", 1)
                groups.setdefault(comp, {})[field_] = vv
        for comp, sub in groups.items():
            cfg = _config_from_dict(sub, f"{src} ({_show(comp)})")
            if cfg is not None:
                configs.setdefault(comp, cfg)
    if None not in configs and "ss_network_alpha" in metadata:
        raw = metadata["ss_network_alpha"]
        src = f"{where} metadata['ss_network_alpha']"
        try:
            float(raw)
        except (ValueError, OverflowError):
            pass  # "None" and other non-numbers some trainers write: alpha falls back to the rank
        else:
            configs[None] = _AdapterConfig(lora_alpha=_finite_number(raw, src), source=src)
    if not configs and os.path.basename(path) == "adapter_model.safetensors":
        side = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
        if os.path.isfile(side):
            try:
                with open(side, "r", encoding="utf-8") as f:
                    d = _parse_json(f.read())
            except (OSError, ValueError) as e:
                raise LoRAError(f"{side}: cannot read the PEFT adapter config ({e})") from None
            cfg = _config_from_dict(d, side) if isinstance(d, dict) else None
            if cfg is not None:
                configs[None] = cfg
    return configs


# A file's alpha_pattern keys are module names or short regexes that match in microseconds; a pattern
# still running after this long (or after the user-regex limit, if lower) is refused.
FILE_REGEX_TIME_LIMIT_S = 5.0


def _pattern_alphas(cfg: _AdapterConfig, names_per_module: Dict[str, List[str]]) -> Dict[str, float]:
    """Module -> alpha from ``cfg.alpha_pattern``, as PEFT resolves it: the first pattern ``p`` (in the
    config's order) with ``re.match(rf"(.*\\.)?({p})$", name)`` for one of the module's candidate names.
    The patterns come from a file, so they are matched like user regexes (``plan.match_user_regexes``):
    in a child process with a time limit (``FILE_REGEX_TIME_LIMIT_S``, or the user-regex limit if lower),
    so a catastrophically backtracking pattern such as ``(a+)+b`` is an error naming it instead of an
    hour of CPU. A pattern that is no valid regex is compared
    literally (the name, or its last dotted parts)."""
    from . import plan as plan_mod
    from .errors import PlanError
    all_names = sorted({n for names in names_per_module.values() for n in names})
    compiled, literal = [], {}
    for i, p in enumerate(cfg.alpha_pattern):
        try:
            compiled.append((re.compile(rf"^(.*\.)?({p})$"), f"{cfg.source}: alpha_pattern[{_show(repr(p))}]", i))
        except (re.error, RecursionError, OverflowError):
            literal[i] = p
    try:
        sets = plan_mod.match_user_regexes([(rx, where) for rx, where, _ in compiled], all_names, fullmatch=False,
                                           time_limit_s=min(plan_mod.REGEX_TIME_LIMIT_S, FILE_REGEX_TIME_LIMIT_S))
    except PlanError as e:  # the message names the file (cfg.source) and the pattern
        raise LoRAError(str(e)) from None
    matched = {i: s for (_, _, i), s in zip(compiled, sets)}
    values = list(cfg.alpha_pattern.values())
    out: Dict[str, float] = {}
    for mod, names in names_per_module.items():
        for i in range(len(values)):
            if i in literal:
                p = literal[i]
                hit = any(n == p or n.endswith("." + p) for n in names)
            else:
                hit = any(n in matched[i] for n in names)
            if hit:
                out[mod] = values[i]
                break
    return out


def _component_of(module: str) -> Optional[str]:
    return module.split(".", 1)[0] if "." in module else None


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str, strength: float,
               path_for_config: Optional[str] = None) -> LoraFile:
    """Group a LoRA file's tensors by module, resolve alpha and check each module's structure."""
    modules: "OrderedDict[str, LoraModule]" = OrderedDict()
    unrecognized: List[str] = []
    adapters: Dict[str, List[str]] = {}
    for key, tensor in tensors.items():
        parsed = split_lora_key(key)
        if parsed is None:
            unrecognized.append(key)
            continue
        module, role, adapter = parsed
        if adapter is not None:
            adapters.setdefault(adapter, []).append(key)
        mod = modules.setdefault(module, LoraModule(module))
        if role in mod.tensors:
            raise LoRAError(f"{name}: {_show(key)} and {_show(mod.keys[role])} are the same tensor of layer "
                            f"{_show(repr(module))}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoRAError(f"{name}: {_show(key)} contains NaN or Inf values")
        if not tensor.is_floating_point() and role != "reshape_weight":
            raise LoRAError(f"{name}: {_show(key)} is {tensor.dtype}; LoRA tensors must be floating point")
        mod.tensors[role] = tensor
        mod.keys[role] = key
    if len(adapters) > 1:
        raise LoRAError(f"{name}: holds several PEFT adapters ({', '.join(sorted(adapters))}); "
                        "save one adapter per file")
    strength = _check_strength(strength, name)
    configs = _adapter_configs(path_for_config or name, metadata)
    lf = LoraFile(name, strength, modules, dict(metadata), unrecognized=unrecognized)
    lf.config_source = "; ".join(sorted({c.source for c in configs.values()}))
    from_config: Dict[int, Tuple[_AdapterConfig, List[LoraModule]]] = {}
    for mod in modules.values():
        problem = mod.classify()
        if problem:
            lf.problems.append(f"{mod.label}: {problem}")
            mod.kind = ""
            lf.broken.add(mod.name)
            continue
        if "alpha" in mod.tensors:
            mod.alpha = _coerce_alpha(mod.tensors["alpha"], mod.keys["alpha"], name)
            mod.alpha_source, mod.alpha_where = "tensor", _show(mod.keys["alpha"])
        else:
            cfg = configs.get(_component_of(mod.name)) or configs.get(None)
            if cfg is not None:
                from_config.setdefault(id(cfg), (cfg, []))[1].append(mod)
    for cfg, mods in from_config.values():
        by_pattern = _pattern_alphas(cfg, {m.name: lora_name_candidates(m.name)[1] for m in mods}) \
            if cfg.alpha_pattern else {}
        for mod in mods:
            a = by_pattern.get(mod.name, cfg.lora_alpha)
            if a is not None:
                mod.alpha, mod.alpha_source, mod.rslora = a, "metadata", cfg.use_rslora
                mod.alpha_where = cfg.source + (" alpha_pattern" if mod.name in by_pattern else "")
    return lf


def load_lora_file(path: str, strength: float) -> LoraFile:
    """Read a LoRA safetensors file completely (LoRAs are small) and parse it."""
    check_input_path(path)
    with SafetensorsReader(path) as r:
        tensors = {k: r.get(k) for k in r.keys()}
        metadata = dict(r.metadata)
    if not tensors:
        raise LoRAError(f"{path}: the file holds no tensors")
    return parse_lora(tensors, metadata, path, strength, path_for_config=path)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclass
class LoraFileReport:
    path: str
    strength: float
    key_style: str
    modules: int
    matched: int = 0
    alpha_sources: Dict[str, int] = field(default_factory=dict)
    unmatched: List[str] = field(default_factory=list)  # "key or module: why"
    other_component: List[str] = field(default_factory=list)  # modules for a part of the model not in this file
    config_source: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MergeReport:
    files: List[LoraFileReport] = field(default_factory=list)
    changed_keys: List[str] = field(default_factory=list)  # base tensors the merge changes
    kept_high_precision: List[str] = field(default_factory=list)  # changed weights the plan keeps unquantized
    warnings: List[str] = field(default_factory=list)
    dampen: bool = False
    strict: bool = False

    @property
    def matched_modules(self) -> int:
        return sum(f.matched for f in self.files)

    @property
    def unmatched(self) -> List[str]:
        return [u for f in self.files for u in f.unmatched]

    def lines(self) -> List[str]:
        out = []
        for f in self.files:
            src = ", ".join(f"{n} {s}" for s, n in sorted(f.alpha_sources.items()))
            out.append(f"LoRA {os.path.basename(f.path)} (strength {f.strength:g}, {f.key_style} keys): "
                       f"{f.matched}/{f.modules} modules matched; alpha from {src or '-'}")
            if f.other_component:
                out.append(f"  {len(f.other_component)} modules are for another part of the model (not in this "
                           f"file), skipped: {_abbrev(f.other_component)}")
            if f.unmatched:
                out.append(f"  warning: {len(f.unmatched)} LoRA keys matched nothing and were NOT merged: "
                           f"{_abbrev(f.unmatched)}")
        out.append(f"LoRA merge changes {len(self.changed_keys)} tensors"
                   + (" (dampening on)" if self.dampen else ""))
        if self.kept_high_precision:
            out.append(f"  {len(self.kept_high_precision)} merged layers stay high precision per the plan "
                       f"(merged anyway): {_abbrev(self.kept_high_precision)}")
        out += [f"  warning: {w}" for w in self.warnings]
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"files": [f.to_dict() for f in self.files], "changed_keys": list(self.changed_keys),
                "kept_high_precision": list(self.kept_high_precision), "warnings": list(self.warnings),
                "matched_modules": self.matched_modules, "dampen": self.dampen, "strict": self.strict}


def _abbrev(items: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ------------------------------------------------------------------------------------------------
# the merger
# ------------------------------------------------------------------------------------------------
@dataclass
class _Contribution:
    file_index: int
    module: LoraModule
    target: Target
    strength: float
    bias: bool  # this contribution changes the bias (bias_key) rather than the weight
    shared: bool = False  # the module's delta also serves other targets (an original fused LoRA split)


def _normalize_strengths(names: Sequence[str], strengths) -> List[float]:
    """One finite strength per LoRA file (one value serves all), checked before any file is read."""
    n = len(names)
    if strengths is None:
        return [1.0] * n
    s = [strengths] * n if isinstance(strengths, (int, float, str)) or not hasattr(strengths, "__len__") \
        else list(strengths)
    if len(s) == 1:
        s = s * n
    if len(s) != n:
        raise LoRAError(f"{n} LoRA files but {len(s)} strengths (give one value or one per file)")
    return [_check_strength(x, nm) for x, nm in zip(s, names)]


def _shape_of(v) -> Tuple[Tuple[int, ...], Optional[torch.dtype]]:
    if isinstance(v, torch.Tensor):
        return tuple(v.shape), v.dtype
    if hasattr(v, "shape"):
        return tuple(v.shape), getattr(v, "dtype", None)
    dtype, shape = v
    return tuple(shape), dtype


class LoraMerger:
    """Several LoRA files, each with its own strength, merged into one base model tensor by tensor."""

    def __init__(self, files: Sequence[LoraFile], dampen: bool = False, strict: bool = False):
        if not files:
            raise LoRAError("no LoRA files given")
        self.files = list(files)
        self.dampen = bool(dampen)
        self.strict = bool(strict)
        self.report: Optional[MergeReport] = None
        self._by_key: Dict[str, List[_Contribution]] = {}
        self._row_factor: Dict[str, torch.Tensor] = {}
        self._applied: set = set()
        self._cache: Tuple[Optional[int], Optional[torch.Tensor]] = (None, None)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_files(cls, paths: Sequence[str], strengths: Union[None, float, Sequence[float]] = None,
                   dampen: bool = False, strict: bool = False) -> "LoraMerger":
        paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        s = _normalize_strengths(paths, strengths)
        return cls([load_lora_file(p, st) for p, st in zip(paths, s)], dampen=dampen, strict=strict)

    @classmethod
    def from_state_dicts(cls, loras: Sequence[Mapping[str, torch.Tensor]],
                         strengths: Union[None, float, Sequence[float]] = None,
                         metadata: Optional[Sequence[Mapping[str, str]]] = None,
                         names: Optional[Sequence[str]] = None, dampen: bool = False,
                         strict: bool = False) -> "LoraMerger":
        names = names or [f"lora[{i}]" for i in range(len(loras))]
        s = _normalize_strengths(names, strengths)
        metadata = metadata or [{}] * len(loras)
        return cls([parse_lora(sd, md, nm, st) for sd, md, nm, st in zip(loras, metadata, names, s)],
                   dampen=dampen, strict=strict)

    # --- validation against a base model --------------------------------------------------------
    def bind(self, base_infos: Mapping[str, Any],
             kept: Optional[Union[Iterable[str], Callable[[str], bool]]] = None) -> MergeReport:
        """Match every LoRA module to the base model described by ``base_infos`` (key -> (dtype, shape),
        a ``TensorInfo`` or a tensor) and validate every shape. Raises ``LoRAError`` (nothing merged,
        nothing written) for structural problems, shape mismatches, a file that matches nothing, or
        -- with ``strict`` -- any LoRA key that matches nothing. ``kept``: weight keys (or a predicate)
        the conversion keeps in high precision; they are merged too and listed in the report."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        dtypes: Dict[str, Optional[torch.dtype]] = {}
        for k, v in base_infos.items():
            shapes[k], dtypes[k] = _shape_of(v)
        index = BaseIndex(shapes)
        errors: List[str] = []
        report = MergeReport(dampen=self.dampen, strict=self.strict)
        by_key: Dict[str, List[_Contribution]] = {}

        for fi, lf in enumerate(self.files):
            errors += [f"{lf.name}: {p}" for p in lf.problems]
            fr = LoraFileReport(lf.name, lf.strength, lf.key_style, len(lf.modules), config_source=lf.config_source)
            report.files.append(fr)
            fr.unmatched += [f"{_show(k)}: not a LoRA tensor this merger knows" for k in lf.unrecognized]
            # match every module; decide per trainer tag whether unmatched ones belong to another part
            per_tag: Dict[Optional[str], Dict[str, int]] = {}
            results = []
            for mod in lf.modules.values():
                if not mod.kind:
                    if mod.name not in lf.broken:
                        fr.unmatched.append(f"{', '.join(_show(k) for k in sorted(mod.keys.values()))}: no LoRA weights for this "
                                            "layer in the file (nothing to merge)")
                    continue
                tag, _ = lora_name_candidates(mod.name)
                res = index.resolve(mod.name)
                problem = None if res.error else self._check_targets(mod, res.targets, shapes, dtypes)
                stats = per_tag.setdefault(tag, {"named": 0, "fit": 0})
                if not res.error:
                    stats["named"] += 1
                    if problem is None:
                        stats["fit"] += 1
                results.append((mod, tag, res, problem))
            fitting_tags = {t for t, s in per_tag.items() if s["fit"]}
            for mod, tag, res, problem in results:
                other_fits = bool(fitting_tags - {tag}) and tag is not None and tag not in fitting_tags
                if res.error:
                    if other_fits:
                        fr.other_component.append(mod.label)
                    else:
                        fr.unmatched.append(f"{mod.label} ({', '.join(_show(k) for k in sorted(mod.keys.values()))}): "
                                            f"{res.error}")
                    continue
                if problem is not None:
                    if other_fits and tag in TE_TAGS + ("unet",):
                        # names fit, shapes do not, and another encoder of the LoRA does fit: this tag
                        # is for a different text encoder of the same pipeline (e.g. SDXL te2 = CLIP-G
                        # against a CLIP-L file)
                        fr.other_component.append(mod.label)
                    else:
                        errors.append(f"{lf.name}: {mod.label}: {problem}")
                    continue
                fr.matched += 1
                fr.alpha_sources[mod.alpha_source] = fr.alpha_sources.get(mod.alpha_source, 0) + 1
                for tgt in res.targets:
                    if mod.kind != "bias-only":
                        by_key.setdefault(tgt.key, []).append(
                            _Contribution(fi, mod, tgt, lf.strength, False, shared=len(res.targets) > 1))
                    if mod.bias_delta() is not None:
                        by_key.setdefault(tgt.bias_key, []).append(_Contribution(fi, mod, tgt, lf.strength, True))
            if fr.matched == 0 and not lf.problems:
                if lf.modules:
                    listed = [_show(m) for m in list(lf.modules)[:5]]
                    errors.append(f"{lf.name}: none of its {len(lf.modules)} modules matches a layer of this model "
                                  f"(e.g. {', '.join(listed)}); is it a LoRA for another model?")
                else:
                    errors.append(f"{lf.name}: holds no LoRA tensors this merger knows (keys like "
                                  f"{', '.join(_show(k) for k in lf.unrecognized[:5])})")
            if self.strict and fr.unmatched:
                errors += [f"{lf.name}: {u} (strict mode)" for u in fr.unmatched]

        self._check_overlaps(by_key, report)
        if errors:
            head = f"{len(errors)} LoRA problem{'s' if len(errors) > 1 else ''}; nothing was merged or written:"
            more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
            raise LoRAError(head + "".join("\n  " + e for e in errors[:MAX_LISTED]) + more)

        self._by_key = by_key
        self._row_factor = self._dampening(by_key, shapes) if self.dampen else {}
        self._applied = set()
        report.changed_keys = sorted(by_key)
        is_kept = kept if callable(kept) else (set(kept).__contains__ if kept is not None else (lambda k: False))
        report.kept_high_precision = [k for k in report.changed_keys if k.endswith(".weight") and is_kept(k)]
        self.report = report
        return report

    def _check_targets(self, mod: LoraModule, targets: Sequence[Target], shapes, dtypes) -> Optional[str]:
        dshape = mod.delta_shape()
        for tgt in targets:
            dt = dtypes.get(tgt.key)
            if isinstance(dt, torch.dtype) and not dt.is_floating_point:
                return f"base tensor {tgt.key} is {dt}, not a float weight (already quantized?)"
            if dshape is not None and (len(dshape) == 0 or len(tgt.shape) == 0):
                if tgt.rows is not None or tgt.src_rows is not None or math.prod(dshape) != math.prod(tgt.shape):
                    return f"shape mismatch: the LoRA delta is {list(dshape)} but {tgt.key} is {list(tgt.shape)}"
            elif dshape is not None:
                want_rows = tgt.expected_delta_rows
                slice_shape = tgt.slice_shape
                want_numel = math.prod(slice_shape) if tgt.src_rows is None else \
                    want_rows * math.prod(slice_shape[1:])
                if dshape[0] != want_rows or math.prod(dshape) != want_numel:
                    where = f"{tgt.key}" + (f" rows {tgt.rows[0]}:{tgt.rows[0] + tgt.rows[1]}" if tgt.rows else "")
                    return (f"shape mismatch: the LoRA delta is {list(dshape)} but {where} is "
                            f"{list(slice_shape)}" + (f" (LoRA rows {want_rows} expected)" if tgt.src_rows else ""))
                if tgt.swap_halves and dshape[0] % 2:
                    return f"cannot swap the halves of an odd-row delta for {tgt.key}"
                if mod.dora is not None:
                    if tgt.rows is not None or tgt.src_rows is not None:
                        return f"DoRA on a part of the fused weight {tgt.key} is not supported"
                    m = mod.dora
                    rows, cols = slice_shape[0], (slice_shape[1] if len(slice_shape) > 1 else 1)
                    ok = (m.numel() == rows) if mod.dora_mode == "peft" else \
                        (m.shape[0] == rows and m.numel() == rows) or (m.numel() == cols and m.dim() >= 2
                                                                       and m.shape[1] == cols)
                    if not ok:
                        return (f"shape mismatch: DoRA magnitude {list(m.shape)} fits neither the rows nor the "
                                f"columns of {tgt.key} {list(slice_shape)}")
            b = mod.bias_delta()
            if b is not None:
                if tgt.bias_key is None:
                    return f"has a bias delta but the base layer {tgt.key} has no bias"
                bshape = shapes[tgt.bias_key]
                brows = tgt.rows[1] if tgt.rows else (bshape[0] if bshape else 1)
                want = tgt.expected_delta_rows if tgt.src_rows else brows
                if b.dim() != 1 or b.shape[0] != want:
                    return f"shape mismatch: the bias delta is {list(b.shape)} but {tgt.bias_key} needs [{want}]"
        return None

    def _check_overlaps(self, by_key: Dict[str, List[_Contribution]], report: MergeReport):
        for key, contribs in by_key.items():
            seen: Dict[int, List[Tuple[int, int, str]]] = {}
            for c in contribs:
                if c.module.kind == "set":
                    continue
                r = c.target.rows or (0, 1 << 62)
                for (s, n, other) in seen.get(c.file_index, []):
                    if r[0] < s + n and s < r[0] + r[1] and other != c.module.label:
                        report.warnings.append(f"{self.files[c.file_index].name}: {c.module.label} and {other} "
                                               f"both change {key} (both merged)")
                seen.setdefault(c.file_index, []).append((r[0], r[1], c.module.label))

    def _dampening(self, by_key: Dict[str, List[_Contribution]], shapes) -> Dict[str, torch.Tensor]:
        factors = {}
        for key, contribs in by_key.items():
            rows = shapes[key][0] if shapes[key] else 1
            per_file: Dict[int, torch.Tensor] = {}
            for c in contribs:
                mask = per_file.setdefault(c.file_index, torch.zeros(rows, dtype=torch.bool))
                if c.target.rows is None:
                    mask[:] = True
                else:
                    mask[c.target.rows[0]:c.target.rows[0] + c.target.rows[1]] = True
            if len(per_file) < 2:
                continue
            count = torch.stack(list(per_file.values())).sum(0).clamp(min=1).to(torch.float32)
            if float(count.max()) > 1:
                factors[key] = count.rsqrt()
        return factors

    # --- merging --------------------------------------------------------------------------------
    @property
    def changed_keys(self) -> List[str]:
        return sorted(self._by_key)

    def has_delta(self, key: str) -> bool:
        return key in self._by_key

    def pending(self) -> List[str]:
        """Keys with a delta that ``apply`` has not seen yet."""
        return [k for k in self._by_key if k not in self._applied]

    def _delta(self, mod: LoraModule) -> torch.Tensor:
        # one-entry cache: a LoRA on a fused weight of an original-layout model is split over several
        # separate weights, each needing the same product; reads a snapshot so threads never mix deltas
        cached_id, cached = self._cache
        if cached_id == id(mod):
            return cached
        d = mod.weight_delta()
        self._cache = (id(mod), d)
        return d

    def apply(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with every LoRA delta for ``key`` merged, as a new float32 tensor; ``tensor``
        itself (unchanged, not copied) when no LoRA touches ``key``."""
        if self.report is None:
            raise LoRAError("internal error: LoraMerger.apply before bind")
        contribs = self._by_key.get(key)
        if not contribs:
            return tensor
        w = tensor.detach().to(torch.float32, copy=True)
        # what was already non-finite in the input (kept as it is under --nan-policy keep, refused with
        # the model to blame otherwise); anything the merge makes non-finite is the LoRA's fault
        base_ok = bool(torch.isfinite(w).all())
        base_finite = None if base_ok else torch.isfinite(w)
        factor = self._row_factor.get(key)
        for c in contribs:
            tgt = c.target
            view = w if tgt.rows is None else w.narrow(0, tgt.rows[0], tgt.rows[1])
            if c.bias:
                d = c.module.bias_delta().to(torch.float32)
                s = c.strength * c.module.bias_scale
            elif c.shared:
                d = self._delta(c.module)
                s = c.strength * c.module.scale
            else:
                d = c.module.weight_delta()
                s = c.strength * c.module.scale
            if tgt.swap_halves:
                half = d.shape[0] // 2
                d = torch.cat([d[half:], d[:half]], dim=0)
            if tgt.src_rows is not None:
                d = d.narrow(0, tgt.src_rows[0], tgt.src_rows[1])
            d = d.reshape(view.shape)
            if c.module.kind == "set" and not c.bias:
                view.copy_(d)
            elif c.module.dora is not None and not c.bias:
                self._apply_dora(view, d, c.module.scale, c.strength, c.module.dora, c.module.dora_mode,
                                 factor)
            else:
                # a product computed just for this target is scaled in place; anything that may alias the
                # LoRA's own tensors (diffs) or serve other targets is copied. Same values either way.
                fresh = not c.bias and not c.shared and c.module.kind in ("lora", "loha", "lokr")
                upd = d.mul_(s) if fresh else d * s
                if factor is not None:
                    f = factor if tgt.rows is None else factor.narrow(0, tgt.rows[0], tgt.rows[1])
                    upd = upd * f.reshape((-1,) + (1,) * (upd.dim() - 1))
                view.add_(upd)
            if base_ok and bool(torch.isfinite(view).all()):
                continue
            new_bad = ~torch.isfinite(view)
            if base_finite is not None:
                new_bad &= base_finite if tgt.rows is None else base_finite.narrow(0, tgt.rows[0], tgt.rows[1])
            n_bad = int(new_bad.sum())
            if n_bad:
                raise LoRAError(self._nonfinite_message(key, c, s, n_bad))
        self._applied.add(key)
        return w

    def cast(self, key: str, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``merged`` (from ``apply``) in the dtype it is written in (a layer kept in float16, a bias).
        Values the merge pushed beyond that dtype's range would be written as Inf: a LoRAError naming
        the LoRA(s) instead. Values that were already non-finite pass (``--nan-policy keep``)."""
        if merged.dtype == dtype:
            return merged
        out = merged.to(dtype)
        if key not in self._by_key or not dtype.is_floating_point or bool(torch.isfinite(out).all()):
            return out
        n_bad = int((~torch.isfinite(out) & torch.isfinite(merged)).sum())
        if not n_bad:
            return out
        biggest = float(merged.abs().nan_to_num(posinf=0.0).max())
        who = "; ".join(f"{self.files[c.file_index].name}: {c.module.label} ({self._factors(c)})"
                        for c in self._by_key[key])
        raise LoRAError(f"merging {who} into {key} gives values up to {biggest:g}; {n_bad} of them are beyond "
                        f"the range of {str(dtype).replace('torch.', '')} ({torch.finfo(dtype).max:g}), the dtype "
                        f"{key} is written in, and would be stored as Inf. Nothing was written; lower the "
                        "strength or fix the LoRA's alpha.")

    @staticmethod
    def _factors(c: "_Contribution") -> str:
        """"strength S x alpha A from <where> / rank R = S*A/R" (what multiplies the LoRA's delta)."""
        mod = c.module
        s = c.strength * (mod.bias_scale if c.bias else mod.scale)
        parts = [f"strength {c.strength:g}"]
        if mod.alpha is not None and (not c.bias or "up_bias" in mod.tensors):
            parts.append(f"alpha {mod.alpha:g} from {mod.alpha_where or mod.alpha_source} / "
                         f"{'sqrt(rank)' if mod.rslora else 'rank'} {mod.rank}")
        return " x ".join(parts) + (f" = {s:g}" if len(parts) > 1 else "")

    def _nonfinite_message(self, key: str, c: "_Contribution", s: float, n_bad: int) -> str:
        """Why merging one LoRA module made ``n_bad`` values of ``key`` NaN/Inf: the strength, alpha, the
        LoRA's own product (finite factors can overflow in ``up @ down``), DoRA's renormalization, or the
        sum with the weight."""
        mod, lf = c.module, self.files[c.file_index]
        delta_ok = c.bias or bool(torch.isfinite(mod.weight_delta()).all())
        factors = self._factors(c)
        if not math.isfinite(s):
            cause = f"{factors} is not finite"
        elif not delta_ok:
            cause = "the LoRA's own delta (its factors multiplied out) overflows float32"
        elif mod.kind == "set" and not c.bias:
            cause = "its set_weight replaces the weight with non-finite values"
        elif mod.dora is not None and not c.bias:
            cause = (f"the DoRA renormalization ({factors}) divides by a zero or overflowing row norm of the "
                     "merged weight")
        else:
            cause = f"the delta scaled by {factors} overflows float32"
        return (f"{lf.name}: merging {mod.label} into {key} makes {n_bad} value{'s' if n_bad > 1 else ''} NaN "
                f"or Inf: {cause}. Nothing was written; lower the strength or fix the LoRA's alpha.")

    @staticmethod
    def _apply_dora(weight: torch.Tensor, diff: torch.Tensor, scale: float, strength: float,
                    magnitude: torch.Tensor, mode: str, factor: Optional[torch.Tensor]):
        """Weight-decomposed LoRA: the merged weight is renormalized to the stored magnitude, then
        blended with the original weight by ``strength``.

        "comfy" is ComfyUI's ``weight_decompose`` to the letter: a magnitude with one value per output
        row divides by the norm of the weight *before* the LoRA, one per input column by the norm of the
        merged weight, plus float32 eps. "peft" is PEFT's merge: magnitude / row norm of the merged
        weight."""
        magnitude = magnitude.to(torch.float32)
        weight_calc = weight + diff * scale
        if mode == "peft":
            norm = weight_calc.reshape(weight_calc.shape[0], -1).norm(dim=1)
            weight_calc = weight_calc * (magnitude.reshape(-1) / norm).reshape((-1,) + (1,) * (weight.dim() - 1))
        else:
            if magnitude.shape[0] == weight_calc.shape[0]:
                norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
                norm = norm.reshape((weight.shape[0],) + (1,) * (weight.dim() - 1))
            else:
                norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                        .reshape((weight_calc.shape[1],) + (1,) * (weight_calc.dim() - 1)).transpose(0, 1))
            norm = norm + torch.finfo(torch.float32).eps
            weight_calc = weight_calc * (magnitude / norm)
        if strength != 1.0 or factor is not None:
            change = (weight_calc - weight) * strength
            if factor is not None:
                change = change * factor.reshape((-1,) + (1,) * (change.dim() - 1))
            weight.add_(change)
        else:
            weight.copy_(weight_calc)


# ------------------------------------------------------------------------------------------------
# in-memory use
# ------------------------------------------------------------------------------------------------
def merge_state_dict(sd: Mapping[str, torch.Tensor], lora_paths: Sequence[str],
                     strengths: Union[None, float, Sequence[float]] = None, dampen: bool = False,
                     strict: bool = False, out_dtype: Optional[torch.dtype] = None,
                     kept=None) -> Tuple[Dict[str, torch.Tensor], MergeReport]:
    """A new state dict with the LoRAs merged, and the report. ``sd`` is not modified. Merged tensors
    get ``out_dtype`` (None: each tensor's own dtype; ``torch.float32`` keeps full precision for a
    quantizer that follows); untouched tensors are the same objects as in ``sd``."""
    merger = LoraMerger.from_files(lora_paths, strengths, dampen=dampen, strict=strict)
    report = merger.bind({k: v for k, v in sd.items()}, kept=kept)
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if merger.has_delta(k):
            out[k] = merger.cast(k, merger.apply(k, v), out_dtype or v.dtype)
        else:
            out[k] = v
    return out, report
