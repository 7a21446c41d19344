"""Which base-model weight a LoRA key belongs to.

LoRA files name layers in many dialects; this module turns all of them into ``Target``s -- a base key
plus, for fused weights, the rows the delta lands on -- and leaves the math to ``lora.py``.

LoRA side (``split_lora_key`` / ``lora_name_candidates``):

* a key is ``<module><suffix>``; the suffix says what the tensor is (``.lora_down.weight``,
  ``.lora_A.weight``, ``.lora_A.default.weight``, ``.hada_w1_a``, ``.lokr_w2``, ``.alpha``, ``.diff``...);
* the module name carries a trainer prefix that says which part of the model it targets:
  kohya ``lora_unet_`` / ``lora_te_`` / ``lora_te1_``..., OneTrainer ``lora_transformer_``, SimpleTuner
  ``lycoris_``, diffusers ``transformer.`` / ``unet.`` / ``text_encoder.``, PEFT ``base_model.model.``,
  ComfyUI ``diffusion_model.`` / ``text_encoders.<clip_l|t5xxl|...>.``; or none at all.
  Kohya names replace every ``.`` by ``_``, so names are compared both dotted and "flat".

Base side (``BaseIndex``): every weight of the model is indexed under its own name (with and without
the checkpoint prefix ``model.diffusion_model.`` / ``diffusion_model.`` / ``<clip_l|t5xxl|...>.transformer.``)
and under the names other layouts give it. The layouts are data (``FAMILIES``): one ``Family`` per DiT
family with renames (diffusers name <-> ComfyUI/original name) and fused weights (a diffusers LoRA on
``to_q``/``to_k``/``to_v`` lands on rows of the fused ``qkv`` weight; Flux single blocks fuse
q, k, v and the MLP input in ``linear1``). Both directions work: a diffusers LoRA on a ComfyUI-layout file
(rows of the fused weight) and an original-layout LoRA on a diffusers-layout file (the LoRA delta is split
by rows over the separate weights). The row sizes come from the base shapes, never from constants, so
the same rules serve every model size. The facts follow ComfyUI's ``comfy/lora.py``
(``model_lora_keys_unet``/``model_lora_keys_clip``) and ``comfy/utils.py`` (``flux_to_diffusers``,
``mmdit_to_diffusers``, ``z_image_to_diffusers``) and diffusers' key conversion tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

# ------------------------------------------------------------------------------------------------
# LoRA key suffixes
# ------------------------------------------------------------------------------------------------
# (regex matched at the end of a key, role). Order matters: longer, more specific forms first.
# "up"/"down"/"mid" are the LoRA factors (up = B, down = A); "up_bias" is PEFT's lora_bias.
_ADAPTER = r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?"
_SUFFIX_RULES: Tuple[Tuple[str, str], ...] = (
    (r"\.lora_up\.weight", "up"),
    (r"\.lora_down\.weight", "down"),
    (r"\.lora_mid\.weight", "mid"),
    (r"\.lora_B" + _ADAPTER + r"\.weight", "up"),
    (r"\.lora_A" + _ADAPTER + r"\.weight", "down"),
    (r"\.lora_B" + _ADAPTER + r"\.bias", "up_bias"),
    (r"_lora\.up\.weight", "up"),
    (r"_lora\.down\.weight", "down"),
    (r"\.lora\.up\.weight", "up"),
    (r"\.lora\.down\.weight", "down"),
    (r"\.lora_linear_layer\.up\.weight", "up"),
    (r"\.lora_linear_layer\.down\.weight", "down"),
    (r"\.lora_B", "up"),  # Mochi's trainer: no ".weight"
    (r"\.lora_A", "down"),
    (r"\.up\.weight", "up"),  # XLabs / USO Flux LoRAs: "...processor.qkv_lora1.up.weight"
    (r"\.down\.weight", "down"),
    (r"\.alpha", "alpha"),
    (r"\.dora_scale", "dora_scale"),
    (r"\.lora_magnitude_vector" + _ADAPTER + r"(?:\.weight)?", "dora_magnitude"),
    (r"\.hada_w1_a", "hada_w1_a"), (r"\.hada_w1_b", "hada_w1_b"),
    (r"\.hada_w2_a", "hada_w2_a"), (r"\.hada_w2_b", "hada_w2_b"),
    (r"\.hada_t1", "hada_t1"), (r"\.hada_t2", "hada_t2"),
    (r"\.lokr_w1_a", "lokr_w1_a"), (r"\.lokr_w1_b", "lokr_w1_b"),
    (r"\.lokr_w2_a", "lokr_w2_a"), (r"\.lokr_w2_b", "lokr_w2_b"),
    (r"\.lokr_w1", "lokr_w1"), (r"\.lokr_w2", "lokr_w2"), (r"\.lokr_t2", "lokr_t2"),
    (r"\.diff_b", "diff_b"),
    (r"\.diff", "diff"),
    (r"\.set_weight", "set_weight"),
    (r"\.w_norm", "w_norm"),
    (r"\.b_norm", "b_norm"),
    (r"\.reshape_weight", "reshape_weight"),
    # adapters ComfyUI knows that we do not merge: recognised so the error names them
    (r"\.oft_blocks", "unsupported:OFT/BOFT:oft_blocks"), (r"\.oft_diag", "unsupported:OFT/BOFT:oft_diag"),
    (r"\.rescale", "unsupported:OFT/BOFT:rescale"),
    (r"\.oft_R" + _ADAPTER + r"\.weight", "unsupported:OFT/BOFT:oft_R"),
    (r"\.a1\.weight", "unsupported:GLoRA:a1"), (r"\.a2\.weight", "unsupported:GLoRA:a2"),
    (r"\.b1\.weight", "unsupported:GLoRA:b1"), (r"\.b2\.weight", "unsupported:GLoRA:b2"),
)
_SUFFIX_RES = tuple((re.compile(pat + r"$"), role) for pat, role in _SUFFIX_RULES)
# Suffixes are matched in the last SUFFIX_WINDOW characters of a key only (the longest is a PEFT adapter
# name inside ".lora_B.<adapter>.weight"), so a hostile megabyte-long key costs what a short one does.
SUFFIX_WINDOW = 512


def unsupported_kind(role: str) -> Optional[str]:
    """The adapter type of a tensor role we recognise but do not merge (OFT, GLoRA), else None."""
    return role.split(":")[1] if role.startswith("unsupported:") else None


def split_lora_key(key: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """``(module, role, adapter name or None)`` for a LoRA file key, or None if the key is not a
    LoRA tensor we know."""
    start = max(1, len(key) - SUFFIX_WINDOW)  # the module name is never empty
    for rx, role in _SUFFIX_RES:
        # leftmost match that runs to the end = the shortest module name, as "^(.+?)<suffix>$" would give
        m = rx.search(key, start)
        if m:
            return key[:m.start()], role, (m.groupdict().get("adapter") or None)
    return None


# ------------------------------------------------------------------------------------------------
# LoRA module name prefixes
# ------------------------------------------------------------------------------------------------
# (prefix, tag). The tag says which part of a full model the trainer meant: "unet" (the diffusion
# model), "te" (the only text encoder), "te1"/"te2"/"te3" (first/second/third text encoder), or None.
_LORA_PREFIXES: Tuple[Tuple[str, Optional[str]], ...] = (
    ("lora_unet_", "unet"), ("lora_prior_unet_", "unet"), ("lycoris_", "unet"), ("lora_transformer_", "unet"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te"),
    ("lora_prior_te_", "te"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("transformer.", "unet"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "te3"), ("text_encoder.", "te1"),
    ("base_model.model.", None),
)
_TEXT_ENCODERS_RE = re.compile(r"^text_encoders\.(?P<slot>[A-Za-z0-9_]+)\.(?:transformer\.)?")

TE_TAGS = ("te", "te1", "te2", "te3")


# At most this many trainer prefixes are stripped from one name (real names stack two: PEFT's
# ``base_model.model.`` before ``transformer.``); every candidate is a copy of the name, so a bound keeps
# a hostile name such as ``"lora_unet_" * 20000 + "x"`` at a few copies instead of one per prefix.
MAX_PREFIX_STRIPS = 4


def lora_name_candidates(module: str) -> Tuple[Optional[str], List[str]]:
    """The trainer tag of a LoRA module name and the names to look up, least stripped first: the name
    itself, then one more known prefix stripped per candidate, at most ``MAX_PREFIX_STRIPS`` times (so
    time and memory are linear in the name's length)."""
    tag: Optional[str] = None
    cands = [module]
    rest = module
    while len(cands) <= MAX_PREFIX_STRIPS:
        m = _TEXT_ENCODERS_RE.match(rest)
        if m:
            rest = rest[m.end():]
            tag = tag or "slot:" + m.group("slot")
            cands.append(rest)
            continue
        for prefix, ptag in _LORA_PREFIXES:
            if rest.startswith(prefix) and len(rest) > len(prefix):
                rest = rest[len(prefix):]
                if ptag is not None and tag is None:
                    tag = ptag
                # Wan-Fun LoRAs write "lora_unet__blocks_0_..." (one underscore too many)
                if prefix.endswith("_"):
                    rest = rest.lstrip("_")
                cands.append(rest)
                break
        else:
            break
    return tag, cands


def flat(name: str) -> str:
    """Kohya's spelling of a dotted module path."""
    return name.replace(".", "_")


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One base tensor (and its bias) that a LoRA module changes, and which rows of it.

    ``rows``: ``(start, length)`` rows of the base weight that receive the delta (a part of a fused
    weight), or None for all of it. ``src_rows``: ``(start, length)`` rows of the LoRA delta that go
    here (an original-layout LoRA on a fused weight applied to a model that keeps the parts separate),
    or None for all of it. ``delta_rows``: the row count the LoRA delta must have. ``swap_halves``: the
    delta's two row halves trade places (diffusers stores (scale, shift) where ComfyUI has (shift,
    scale) in the final AdaLN modulation)."""

    key: str
    bias_key: Optional[str]
    shape: Tuple[int, ...]
    rows: Optional[Tuple[int, int]] = None
    src_rows: Optional[Tuple[int, int]] = None
    delta_rows: Optional[int] = None
    swap_halves: bool = False
    via: str = "name"

    @property
    def slice_shape(self) -> Tuple[int, ...]:
        if self.rows is None:
            return tuple(self.shape)
        return (self.rows[1],) + tuple(self.shape[1:])

    @property
    def expected_delta_rows(self) -> int:
        if self.delta_rows is not None:
            return self.delta_rows
        return self.slice_shape[0] if self.slice_shape else 1


# ------------------------------------------------------------------------------------------------
# model families: renames and fused weights
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rename:
    orig: str  # ComfyUI / original checkpoint layout; "{i}" is a block number
    alt: str  # the other layout's name (diffusers, or the trainer's)
    swap: str = ""  # "always": swap row halves; "if_2h": only when rows == 2 * columns


@dataclass(frozen=True)
class Fused:
    orig: str  # the fused weight in the original layout
    parts: Tuple[str, ...]  # the separate weights, in row order
    split: str  # how to cut the fused rows: "qkv" (q has `in` rows, k = v), "qkv_mlp", "first3"


@dataclass(frozen=True)
class Family:
    name: str
    orig_signature: str  # regex: some module of an original-layout model matches it
    alt_signature: Tuple[str, ...]  # regexes: each matches some module of an alternate-layout model
    renames: Tuple[Rename, ...] = ()
    fused: Tuple[Fused, ...] = ()


def _block(orig_prefix: str, alt_prefix: str, pairs: Sequence[Tuple[str, str]], swap: str = "") -> List[Rename]:
    return [Rename(orig_prefix + a, alt_prefix + b, swap) for a, b in pairs]


def _flux_family() -> Family:
    d, td = "double_blocks.{i}.", "transformer_blocks.{i}."
    s, ts = "single_blocks.{i}.", "single_transformer_blocks.{i}."
    renames = _block(d, td, [
        ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
        ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
        ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
        ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
        # Flux.2 (SwiGLU MLPs)
        ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
        ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out"),
    ]) + _block(s, ts, [
        ("linear2", "proj_out"), ("modulation.lin", "norm.linear"),
        # Flux.2 keeps q, k, v and the MLP fused in diffusers too
        ("linear2", "attn.to_out"), ("linear1", "attn.to_qkv_mlp_proj"),
    ]) + _block(d, d, [  # XLabs / USO processor LoRAs ("double_blocks.N.processor.qkv_lora1.up.weight")
        ("img_attn.qkv", "processor.qkv_lora1"), ("txt_attn.qkv", "processor.qkv_lora2"),
        ("img_attn.proj", "processor.proj_lora1"), ("txt_attn.proj", "processor.proj_lora2"),
    ]) + _block(s, s, [("linear2", "processor.proj")]) + [Rename(a, b) for a, b in (
        ("img_in", "x_embedder"), ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
        ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
        ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        ("single_stream_modulation.lin", "single_stream_modulation.linear"),
        ("final_layer.linear", "proj_out"),
        # Chroma's distilled guidance approximator
        ("distilled_guidance_layer.layers.{i}.in_layer", "distilled_guidance_layer.layers.{i}.linear_1"),
        ("distilled_guidance_layer.layers.{i}.out_layer", "distilled_guidance_layer.layers.{i}.linear_2"),
    )] + [Rename("final_layer.adaLN_modulation.1", "norm_out.linear", "always")]
    fused = (
        Fused(d + "img_attn.qkv", (td + "attn.to_q", td + "attn.to_k", td + "attn.to_v"), "qkv"),
        Fused(d + "txt_attn.qkv", (td + "attn.add_q_proj", td + "attn.add_k_proj", td + "attn.add_v_proj"), "qkv"),
        Fused(s + "linear1", (ts + "attn.to_q", ts + "attn.to_k", ts + "attn.to_v", ts + "proj_mlp"), "qkv_mlp"),
        Fused(s + "linear1", (s + "linear1_qkv",), "first3"),  # ComfyUI's name for the q/k/v rows (USO LoRAs)
        Fused(s + "linear1", (s + "processor.qkv",), "first3"),  # USO's own name ("processor.qkv_lora.up")
    )
    return Family("flux", r"^(double_blocks\.\d+\.img_attn\.qkv|single_blocks\.\d+\.linear1)$",
                  (r"^single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_qkv_mlp_proj|proj_mlp)$",),
                  tuple(renames), fused)


def _hunyuan_video_family() -> Family:
    # HunyuanVideo's original (Tencent) names, used by diffusion-pipe and musubi LoRAs, vs ComfyUI's.
    d, s = "double_blocks.{i}.", "single_blocks.{i}."
    renames = _block(d, d, [
        ("img_mod.lin", "img_mod.linear"), ("txt_mod.lin", "txt_mod.linear"),
        ("img_mlp.0", "img_mlp.fc1"), ("img_mlp.2", "img_mlp.fc2"),
        ("txt_mlp.0", "txt_mlp.fc1"), ("txt_mlp.2", "txt_mlp.fc2"),
        ("img_attn.qkv", "img_attn_qkv"), ("img_attn.proj", "img_attn_proj"),
        ("txt_attn.qkv", "txt_attn_qkv"), ("txt_attn.proj", "txt_attn_proj"),
    ]) + _block(s, s, [("modulation.lin", "modulation.linear")])
    return Family("hunyuan_video", r"^double_blocks\.\d+\.img_attn\.qkv$", (r"^double_blocks\.\d+\.img_attn_qkv$",),
                  tuple(renames))


def _sd3_family() -> Family:
    j, t = "joint_blocks.{i}.", "transformer_blocks.{i}."
    renames = _block(j, t, [
        ("x_block.attn.proj", "attn.to_out.0"), ("context_block.attn.proj", "attn.to_add_out"),
        ("x_block.attn2.proj", "attn2.to_out.0"),
        ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
        ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2"),
        ("x_block.adaLN_modulation.1", "norm1.linear"),
    ]) + [
        # the last block's context modulation has only (shift, scale): diffusers stores (scale, shift)
        Rename(j + "context_block.adaLN_modulation.1", t + "norm1_context.linear", "if_2h"),
        Rename("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
        Rename("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
        Rename("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
        Rename("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
        Rename("x_embedder.proj", "pos_embed.proj"),
        Rename("final_layer.linear", "proj_out"),
        Rename("final_layer.adaLN_modulation.1", "norm_out.linear", "always"),
    ]
    fused = (
        Fused(j + "x_block.attn.qkv", (t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"), "qkv"),
        Fused(j + "context_block.attn.qkv",
              (t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"), "qkv"),
        Fused(j + "x_block.attn2.qkv", (t + "attn2.to_q", t + "attn2.to_k", t + "attn2.to_v"), "qkv"),
    )
    return Family("sd3", r"^joint_blocks\.\d+\.x_block\.attn\.qkv$",
                  (r"^transformer_blocks\.\d+\.attn\.to_q$", r"^pos_embed\.proj$"), tuple(renames), fused)


def _zimage_family() -> Family:
    renames: List[Rename] = []
    fused: List[Fused] = []
    for blocks in ("layers", "noise_refiner", "context_refiner"):
        b = blocks + ".{i}.attention."
        renames.append(Rename(b + "out", b + "to_out.0"))
        fused.append(Fused(b + "qkv", (b + "to_q", b + "to_k", b + "to_v"), "qkv"))
    renames += [
        Rename("final_layer.linear", "all_final_layer.2-1.linear"),
        Rename("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
        Rename("x_embedder", "all_x_embedder.2-1"),
    ]
    return Family("zimage", r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv$",
                  (r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.to_q$",), tuple(renames), tuple(fused))


def _wan_family() -> Family:
    b = "blocks.{i}."
    renames = _block(b, b, [
        ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
        ("self_attn.o", "attn1.to_out.0"),
        ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
        ("cross_attn.o", "attn2.to_out.0"),
        ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
        ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ]) + [Rename(a, c) for a, c in (
        ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        ("time_projection.1", "condition_embedder.time_proj"),
        ("head.head", "proj_out"),
        ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
        ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    )]
    return Family("wan", r"^blocks\.\d+\.self_attn\.q$", (r"^blocks\.\d+\.attn1\.to_q$",), tuple(renames))


# Qwen-Image: ComfyUI keeps the diffusers names, so plain name matching covers it.
FAMILIES: Tuple[Family, ...] = (_flux_family(), _hunyuan_video_family(), _sd3_family(), _zimage_family(),
                                _wan_family())


def _template_re(template: str) -> "re.Pattern[str]":
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED: Dict[str, "re.Pattern[str]"] = {}


def _rx(template: str) -> "re.Pattern[str]":
    rx = _COMPILED.get(template)
    if rx is None:
        rx = _COMPILED[template] = _template_re(template)
    return rx


def _split_rows(split: str, shape: Tuple[int, ...], n_parts: int) -> Optional[List[int]]:
    """Row counts of the parts of a fused weight of ``shape`` ([out, in, ...]); None if it does not fit."""
    if len(shape) < 2:
        return None
    rows, cols = shape[0], shape[1]
    if split == "qkv":  # q has `in` rows (the hidden size); k and v share the rest (GQA-safe)
        rest = rows - cols
        if n_parts != 3 or rest <= 0 or rest % 2:
            return None
        return [cols, rest // 2, rest // 2]
    if split == "qkv_mlp":
        if n_parts != 4 or rows <= 3 * cols:
            return None
        return [cols, cols, cols, rows - 3 * cols]
    if split == "first3":
        if n_parts != 1 or rows < 3 * cols:
            return None
        return [3 * cols]
    raise ValueError(f"unknown split rule {split!r}")


# ------------------------------------------------------------------------------------------------
# base model index
# ------------------------------------------------------------------------------------------------
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_TE_SLOT_RE = re.compile(
    r"^(?:text_encoders\.)?(?P<slot>clip_[lgh]|t5xxl|t5xl|t5base|umt5xxl|pile_t5xl|mt5xl|byt5_small|"
    r"hydit_clip|jina_clip_2|llama|qwen[0-9a-z_]*|gemma[0-9a-z_]*|mistral[0-9a-z_]*)\.(?:transformer\.)?")
_TE_PREFIX_RE = re.compile(r"^(?:cond_stage_model\.(?:transformer\.)?|conditioner\.embedders\.\d+\.(?:transformer\.)?)")
_T5_SLOTS = ("t5xxl", "t5xl", "t5base", "umt5xxl", "pile_t5xl", "mt5xl")
# which text-encoder slots a trainer tag means when the base holds several
_TAG_SLOTS = {"te1": ("clip_l", "clip_h", "hydit_clip"), "te2": ("clip_g",) + _T5_SLOTS, "te3": _T5_SLOTS}

PRIORITY_NAME, PRIORITY_RENAME, PRIORITY_FUSED = 3, 2, 1


def canonical_base_name(key: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``(name without checkpoint prefix, kind, slot)``: kind "dit", "te" or None (a file holding one
    model whose kind its names do not say)."""
    for p in _DIT_PREFIXES:
        if key.startswith(p):
            return key[len(p):], "dit", None
    m = _TE_SLOT_RE.match(key)
    if m:
        return key[m.end():], "te", m.group("slot")
    m = _TE_PREFIX_RE.match(key)
    if m:
        return key[m.end():], "te", None
    return key, None, None


@dataclass
class _Entry:
    priority: int
    kind: Optional[str]
    slot: Optional[str]
    targets: Tuple[Target, ...]


@dataclass
class Resolution:
    targets: Tuple[Target, ...] = ()
    name: str = ""  # the name that matched
    error: str = ""  # why nothing matched (empty when matched)


class BaseIndex:
    """All the names under which a LoRA may refer to the weights of one base model."""

    def __init__(self, shapes: Mapping[str, Tuple[int, ...]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.dotted: Dict[str, List[_Entry]] = {}
        self.flat: Dict[str, List[_Entry]] = {}
        self.slots: Set[str] = set()
        self.families: Dict[str, str] = {}  # family name -> "orig" | "alt"
        # canonical module name -> (full module name, kind, slot, weight key)
        modules: Dict[str, Tuple[str, Optional[str], Optional[str], str]] = {}
        for key in self.shapes:
            canon, kind, slot = canonical_base_name(key)
            if slot:
                self.slots.add(slot)
            if key.endswith(".weight"):
                full_mod, mod = key[:-len(".weight")], canon[:-len(".weight")]
                tgt = Target(key, self._bias(full_mod), self.shapes[key])
                self._add(mod, PRIORITY_NAME, kind, slot, (tgt,))
                if full_mod != mod:
                    self._add(full_mod, PRIORITY_NAME, kind, slot, (tgt,))
                modules[mod] = (full_mod, kind, slot, key)
            else:
                # any other parameter (norm scales, biases, pos_embed...) answers to its own key, for
                # ".diff" / ".set_weight" patches that name the parameter itself
                tgt = Target(key, None, self.shapes[key])
                self._add(canon, PRIORITY_NAME, kind, slot, (tgt,))
                if canon != key:
                    self._add(key, PRIORITY_NAME, kind, slot, (tgt,))
        self._add_family_aliases(modules)

    def _bias(self, full_module: str) -> Optional[str]:
        b = full_module + ".bias"
        return b if b in self.shapes else None

    def _add(self, name: str, priority: int, kind, slot, targets: Tuple[Target, ...]):
        entry = _Entry(priority, kind, slot, targets)
        self.dotted.setdefault(name, []).append(entry)
        self.flat.setdefault(flat(name), []).append(entry)

    def _add_family_aliases(self, modules):
        names = list(modules)
        for fam in FAMILIES:
            orig_rx = re.compile(fam.orig_signature)
            if any(orig_rx.match(n) for n in names):
                self.families[fam.name] = "orig"
                self._forward(fam, modules)
            elif all(any(re.match(sig, n) for n in names) for sig in fam.alt_signature):
                self.families[fam.name] = "alt"
                self._reverse(fam, modules)

    def _forward(self, fam: Family, modules):
        """The model has the original names: alternate names become aliases (fused ones with rows)."""
        for mod, (full, kind, slot, wkey) in modules.items():
            shape = self.shapes[wkey]
            for rn in fam.renames:
                m = _rx(rn.orig).match(mod)
                if m:
                    swap = rn.swap == "always" or (rn.swap == "if_2h" and len(shape) >= 2 and shape[0] == 2 * shape[1])
                    self._add(rn.alt.format(**m.groupdict()), PRIORITY_RENAME, kind, slot,
                              (Target(wkey, self._bias(full), shape, swap_halves=swap, via="rename"),))
            for fu in fam.fused:
                m = _rx(fu.orig).match(mod)
                if not m:
                    continue
                sizes = _split_rows(fu.split, shape, len(fu.parts))
                if sizes is None:
                    continue
                off = 0
                for part, n in zip(fu.parts, sizes):
                    self._add(part.format(**m.groupdict()), PRIORITY_FUSED, kind, slot,
                              (Target(wkey, self._bias(full), shape, rows=(off, n), via="fused rows"),))
                    off += n

    def _reverse(self, fam: Family, modules):
        """The model has the alternate names: original names become aliases; an original fused name
        maps onto every separate part, each taking its rows of the LoRA delta."""
        for mod, (full, kind, slot, wkey) in modules.items():
            shape = self.shapes[wkey]
            for rn in fam.renames:
                m = _rx(rn.alt).match(mod)
                if m:
                    swap = rn.swap == "always" or (rn.swap == "if_2h" and len(shape) >= 2 and shape[0] == 2 * shape[1])
                    self._add(rn.orig.format(**m.groupdict()), PRIORITY_RENAME, kind, slot,
                              (Target(wkey, self._bias(full), shape, swap_halves=swap, via="rename"),))
            for fu in fam.fused:
                m = _rx(fu.parts[0]).match(mod)
                if not m:
                    continue
                groups = m.groupdict()
                parts = [p.format(**groups) for p in fu.parts]
                if not all(p in modules for p in parts):
                    continue
                sizes = [self.shapes[modules[p][3]][0] for p in parts]
                total = sum(sizes)
                targets, off = [], 0
                for p, n in zip(parts, sizes):
                    pfull, _, _, pkey = modules[p]
                    targets.append(Target(pkey, self._bias(pfull), self.shapes[pkey], src_rows=(off, n),
                                          delta_rows=total, via="split rows"))
                    off += n
                self._add(fu.orig.format(**groups), PRIORITY_FUSED, kind, slot, tuple(targets))

    # --- lookup ---------------------------------------------------------------------------------
    def _compatible(self, tag: Optional[str], entry: _Entry) -> bool:
        if tag is None:
            return True
        if tag == "unet":
            return entry.kind in (None, "dit")
        if entry.kind == "dit":
            return False
        if tag.startswith("slot:"):
            return entry.slot is None or entry.slot == tag[len("slot:"):]
        wanted = _TAG_SLOTS.get(tag)
        if wanted and entry.slot is not None and any(s in self.slots for s in wanted):
            return entry.slot in wanted
        return True

    def _pick(self, entries: List[_Entry], tag: Optional[str]) -> Optional[Tuple[Tuple[Target, ...], bool]]:
        ok = [e for e in entries if self._compatible(tag, e)]
        if not ok:
            return None
        best = max(e.priority for e in ok)
        tops = {e.targets for e in ok if e.priority == best}
        return next(iter(tops)), len(tops) > 1

    def resolve(self, module: str) -> Resolution:
        """Targets of a LoRA module name, trying each candidate name dotted, then flat (kohya)."""
        tag, cands = lora_name_candidates(module)
        for table, spell in ((self.dotted, lambda s: s), (self.flat, flat)):
            for cand in cands:
                entries = table.get(spell(cand))
                if not entries:
                    continue
                picked = self._pick(entries, tag)
                if picked is None:
                    continue
                targets, ambiguous = picked
                if ambiguous:
                    return Resolution(name=cand, error=f"the name {cand!r} fits several layers of the model")
                return Resolution(targets=targets, name=cand)
        return Resolution(error="no layer of the model has this name")
