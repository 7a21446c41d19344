"""The loaders' ``attention`` option: INT8 attention (``kernels.attention``) installed through the MODEL's
model options as ``transformer_options["optimized_attention_override"]``, which every ComfyUI attention
function consults per call. Being a model option, it travels with clones (LoRA loaders, other patches keep
it) and with TorchCompileModel (the kernel is the ``convert_to_quant::int8_attention`` custom op); calls it
does not take (masks, other head dims, float32 on CUDA, ...) run the attention they would have run."""
from __future__ import annotations

from ..kernels.attention import Int8AttentionOverride
from ..quant_core.errors import ConvertError

ATTENTION_CHOICES = ("default", "int8")
ATTENTION_TOOLTIP = ("int8: Q·Kᵀ on the int8 tensor cores (K smoothed by its mean, per-token scales, fp32 "
                     "softmax, P·V in bf16/fp16) for long sequences (video, large images); masks and head "
                     "dims other than 64/128 keep ComfyUI's attention. On CPU it runs the torch emulation "
                     "(same numerics, no speed-up)")
OVERRIDE_KEY = "optimized_attention_override"


def with_attention(patcher, mode: str):
    """``patcher`` itself for "default"; for "int8" a clone whose model options route attention through
    ``Int8AttentionOverride`` (an override already there is kept as its fallback)."""
    if mode not in ATTENTION_CHOICES:
        raise ConvertError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {mode!r}")
    if mode == "default":
        return patcher
    m = patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(OVERRIDE_KEY)
    if not isinstance(prev, Int8AttentionOverride):
        to[OVERRIDE_KEY] = Int8AttentionOverride(previous=prev)
    return m


def attention_override(patcher):
    """The INT8 override installed on ``patcher`` (None if its attention is the default)."""
    o = patcher.model_options.get("transformer_options", {}).get(OVERRIDE_KEY)
    return o if isinstance(o, Int8AttentionOverride) else None
