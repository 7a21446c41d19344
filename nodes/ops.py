"""ComfyUI ``custom_operations`` whose Linear layers keep int8 weights and run our kernels.

``QuantOps`` subclasses ``comfy.ops.manual_cast`` (so every other layer type behaves exactly as stock
ComfyUI's) and replaces ``Linear``: ``_load_from_state_dict`` reads a layer's ``weight`` /
``weight_scale`` / ``comfy_quant`` tensors (FORMATS.md) and keeps the int8 integers as the ``weight``
parameter, so ComfyUI's memory management moves them with ``.to()`` (model unload, lowvram offload) and
counts their real size. Layers stored in float stay float and use the stock manual-cast path.

LoRA at runtime: ``attach_patches`` turns ComfyUI's LoRA patches for this layer into a low-rank side path
next to the int8 GEMM, ``y = int8_gemm(x) + (x·Aᵀ)·(s·B)ᵀ`` (all LoRAs of a layer concatenated into one
pair of skinny matrices), never touching the integers. Patches that are not plain low-rank LoRA (LoHa,
LoKr, DoRA, full diffs, model merges) become one dense delta ``ΔW`` in the compute dtype, computed once
when the model is patched with ComfyUI's own ``calculate_weight`` on the dequantized weight.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_patcher
import comfy.ops
import comfy.weight_adapter

from ..kernels import dequantize as kernel_dequantize
from ..kernels import prepare_linear, quantized_linear, runtime_path
from ..kernels.launch import lora_rank_padded
from ..quant_core.errors import ConvertError, SafetensorsFormatError
from ..quant_core.formats import (FormatSpec, QuantizedWeight, comfy_quant_tensor, get_format,
                                  parse_comfy_quant, quantized_weight_from_tensors)

log = logging.getLogger("convert_to_quant")

# tensors of a quantized layer besides weight/bias (extra per-format tensors come from the format)
QUANT_SUFFIXES = ("weight_scale", "comfy_quant")


def _low_rank_factors(patch, out_features: int, in_features: int
                      ) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[int, int]]]]:
    """(down [r, in], scaled up [rows, r], output row slice) for a plain LoRA patch, else None.

    A ComfyUI patch is ``(strength, adapter, strength_model, offset, function)``; ``offset`` =
    ``(dim, start, length)`` targets a slice of a fused weight (e.g. q of a fused qkv)."""
    strength, adapter, strength_model, offset, function = patch
    if function is not None or strength_model != 1.0:
        return None
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    if up.dim() != 2 or down.dim() != 2:
        return None
    rows, rows_slice = out_features, None
    if offset is not None:
        dim, start, length = offset
        if dim != 0:
            return None
        rows, rows_slice = int(length), (int(start), int(length))
    rank = down.shape[0]
    if tuple(up.shape) != (rows, rank) or down.shape[1] != in_features:
        return None
    scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
    return down.float(), up.float() * scale, rows_slice


class QuantLinearMixin:
    """What our Linear adds to ``comfy.ops.manual_cast.Linear`` (kept separate so the text-encoder ops
    and the diffusion-model ops share it)."""

    quant_spec: Optional[FormatSpec] = None
    # None: the kernels' path table (W8A8 for most shapes). A float dtype: weight-only W8A16 with the
    # activations in that dtype (the text-encoder loader's "accurate" mode; docs/NODES.md)
    activation_dtype: Optional[torch.dtype] = None

    def _init_quant(self, in_features: int, out_features: int, dtype: Optional[torch.dtype] = None):
        torch.nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        # the dtype ComfyUI built the layer with (its weight dtype for the model): biases are stored in it, as
        # ComfyUI's own layers store theirs -- else every call casts them (on a CPU, fp32 compute and a bf16
        # file: 20 casts per step in the tiny Wan, ~0.45 ms). Unquantized float weights keep the file's dtype
        # (memory: they can be large); fp8 and other storage dtypes keep the file's dtype.
        self.float_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else None
        # nothing is allocated here: the real tensors (int8 or float) arrive in _load_from_state_dict
        self.weight = None
        self.bias = None
        self.weight_scale = None
        self.quant_spec = None
        self.lora_groups: List[Optional[Tuple[int, int]]] = []
        self.has_dense_delta = False

    # --- loading ------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        w = state_dict.get(prefix + "weight")
        cq = state_dict.get(prefix + "comfy_quant")
        base = prefix[:-1]
        if w is None:
            missing_keys.append(prefix + "weight")
        elif cq is not None:
            cfg = parse_comfy_quant(cq, where=prefix + "comfy_quant")
            parts = {k[len(prefix):]: v for k, v in state_dict.items()
                     if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] != "bias"}
            qw = quantized_weight_from_tensors(base, cfg, parts)
            if qw.format == "fp16":
                self.weight = torch.nn.Parameter(qw.qdata, requires_grad=False)
            else:
                if tuple(qw.qdata.shape) != (self.out_features, self.in_features):
                    raise SafetensorsFormatError(
                        f"{base}: stored weight {list(qw.qdata.shape)} does not fit the model's layer "
                        f"[{self.out_features}, {self.in_features}]")
                self.set_quantized(qw)
        elif w.dtype == torch.int8:
            raise SafetensorsFormatError(f"{base}.weight is int8 but the layer has no comfy_quant config "
                                         "(and the file no _quantization_metadata entry for it)")
        else:
            self.weight = torch.nn.Parameter(w, requires_grad=False)
        b = state_dict.get(prefix + "bias")
        if b is not None:
            self.bias = torch.nn.Parameter(self._stored(b), requires_grad=False)

    def _stored(self, t: torch.Tensor) -> torch.Tensor:
        """A bias from the file in ``float_dtype`` (where that is set and the bias is a float tensor)."""
        dt = self.float_dtype
        if dt is None or t.dtype == dt or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return t
        return t.to(dt)

    def set_quantized(self, qw: QuantizedWeight):
        get_format(qw.format)  # unknown formats fail here with the registry's message
        self.quant_spec = FormatSpec(qw.format, qw.params)
        self.weight = torch.nn.Parameter(qw.qdata, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(qw.scale.float(), requires_grad=False)
        # the per-layer config travels in the state dict, so saving this model writes a loadable file
        self.register_buffer("comfy_quant", comfy_quant_tensor(get_format(qw.format).comfy_quant(qw.params)))
        for suffix, t in qw.extra.items():
            self.register_buffer(suffix, t)
        self._extra_names = tuple(qw.extra)

    @property
    def is_quantized(self) -> bool:
        return self.quant_spec is not None

    def quantized_weight(self, device: Optional[torch.device] = None) -> QuantizedWeight:
        q, s = self.weight, self.weight_scale
        extra = {n: getattr(self, n) for n in getattr(self, "_extra_names", ())}
        if device is not None and q.device != device:
            q = q.to(device, non_blocking=True)
            s = s.to(device, non_blocking=True)
            extra = {n: t.to(device, non_blocking=True) for n, t in extra.items()}
        return QuantizedWeight(self.quant_spec.format, self.quant_spec.params, q, s, torch.float32, extra)

    # --- the hooks ComfyUI's ModelPatcher looks for (get_key_weight: convert_/set_<param>) -------
    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """Integers (as a float tensor, how ModelPatcher hands them over) -> float weight."""
        if not self.is_quantized:
            return weight
        qw = self.quantized_weight(weight.device)
        qw.qdata = weight.round().clamp(-127, 127).to(torch.int8)
        return get_format(qw.format).dequantize(qw).to(weight.dtype)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        raise ConvertError(
            "this int8 layer cannot be re-quantized in place by ComfyUI's generic patcher (hook-based LoRA "
            "scheduling is not supported on quantized models); load LoRAs with LoraLoader / "
            "LoraLoaderModelOnly, which this model applies as a low-rank side path")

    # --- LoRA side paths ------------------------------------------------------------------------
    def clear_patches(self):
        for i in range(len(self.lora_groups)):
            self._buffers.pop(f"lora_down_{i}", None)
            self._buffers.pop(f"lora_up_{i}", None)
        self.lora_groups = []
        self._buffers.pop("lora_dense", None)
        self.has_dense_delta = False

    def attach_patches(self, patches: Sequence, key: str, device: torch.device, dtype: torch.dtype) -> str:
        """Replace this layer's side paths by the ones for ``patches`` (ComfyUI's patch list for
        ``<layer>.weight``). Returns "low-rank" or "dense" (how they were applied)."""
        self.clear_patches()
        factors = [_low_rank_factors(p, self.out_features, self.in_features) for p in patches]
        if all(f is not None for f in factors):
            groups = {}
            for down, up, rows in factors:
                groups.setdefault(rows, ([], []))
                groups[rows][0].append(down)
                groups[rows][1].append(up)
            for i, (rows, (downs, ups)) in enumerate(groups.items()):
                down, up = torch.cat(downs, 0), torch.cat(ups, 1)
                r = down.shape[0]
                rp = lora_rank_padded(r)  # zero rows/columns: the kernels' LoRA epilogue takes 16, 32, 64, ...
                if rp != r:
                    down = torch.cat([down, down.new_zeros(rp - r, down.shape[1])], 0)
                    up = torch.cat([up, up.new_zeros(up.shape[0], rp - r)], 1)
                self.register_buffer(f"lora_down_{i}", down.to(device=device, dtype=dtype).contiguous(),
                                     persistent=False)
                self.register_buffer(f"lora_up_{i}", up.to(device=device, dtype=dtype).contiguous(),
                                     persistent=False)
                self.lora_groups.append(rows)
            return "low-rank"
        # not plain LoRA: let ComfyUI compute the patched weight once, keep only the difference
        w = kernel_dequantize(self.quantized_weight(device), torch.float32)
        patched = comfy.lora.calculate_weight(patches, w.clone(), key)
        self.register_buffer("lora_dense", (patched - w).to(dtype), persistent=False)
        self.has_dense_delta = True
        return "dense"

    def _fused_lora(self, x: torch.Tensor):
        """(h, up) for the kernels' LoRA epilogue: the whole-layer LoRA group (group 0 when it covers
        every output row), h = x · downᵀ by one skinny GEMM; the int8 GEMM adds h · upᵀ to its fp32
        accumulator before rounding, so the output is written once (no separate read-modify-write
        pass over y). None where the group is sliced, absent or in another dtype."""
        if not self.lora_groups or self.lora_groups[0] is not None:
            return None
        down, up = self.lora_down_0, self.lora_up_0
        if down.dtype != x.dtype or down.device != x.device or x.dtype == torch.float32:
            return None
        h = torch.mm(x.reshape(-1, x.shape[-1]), down.t())
        return h.reshape(x.shape[:-1] + (h.shape[-1],)), up

    def _add_side_paths(self, x: torch.Tensor, y: torch.Tensor, first: int = 0) -> torch.Tensor:
        # y is a fresh GEMM output: accumulate into it in place (one read + one write of y per LoRA
        # group, the up-projection's epilogue does the add) -- at video token counts the side path is
        # memory-bound, and a separate "y + h" would double its traffic
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])  # a view of the contiguous kernel output (a copy otherwise: still right)
        for i, rows in enumerate(self.lora_groups):
            if i < first:  # already added in the GEMM's epilogue
                continue
            down = getattr(self, f"lora_down_{i}").to(device=x.device, dtype=x.dtype)
            up = getattr(self, f"lora_up_{i}").to(device=x.device, dtype=x.dtype)
            h = torch.mm(x2, down.t())
            if rows is None:
                y2.addmm_(h, up.t())
            else:
                start, length = rows
                y2[:, start:start + length].addmm_(h, up.t())
        if self.has_dense_delta:
            y2.addmm_(x2, self.lora_dense.to(device=x.device, dtype=x.dtype).t())
        return y2.reshape(y.shape)

    # --- forward --------------------------------------------------------------------------------
    def _cast_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        b = self.bias
        if b.device != x.device or b.dtype != x.dtype:  # .to() itself costs microseconds per call
            b = b.to(device=x.device, dtype=x.dtype, non_blocking=True)
        for f in self.bias_function:
            b = f(b)
        return b

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu() (ComfyUI's load, unload and offload): the prepared kernel operands refer to
        # the old storage, drop them so a moved-away weight frees its memory
        self.__dict__.pop("_prepared_linear", None)
        return super()._apply(fn, *args, **kwargs)

    def _prepared(self, device: torch.device):
        """The kernels' ``PreparedLinear`` for this layer's weight on ``device``, made once and kept while
        the weight stays where it is (ComfyUI moves parameters by replacing their data: the cache key is
        the storage). Weights that live elsewhere (lowvram offload) are moved per call and not kept."""
        w, s = self.weight, self.weight_scale
        if w.device != device:
            return None
        key = (w.data_ptr(), s.data_ptr(), device)
        cached = self.__dict__.get("_prepared_linear")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_prepared_linear"] = (key, prepare_linear(self.quantized_weight(), device))
        return cached[1]

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._cast_bias(x)
        # LowVramPatch entries re-apply LoRA patches to a float weight; ours already live in the side
        # paths (QuantModelPatcher attaches them), so only other weight functions need a float weight
        wf = self.weight_function
        extra_fns = [f for f in wf if not isinstance(f, comfy.model_patcher.LowVramPatch)] if wf else wf
        if extra_fns:
            w = kernel_dequantize(self.quantized_weight(x.device), x.dtype)
            for f in extra_fns:
                w = f(w)
            y = F.linear(x, w, bias)
        else:
            # without Triton: on a CPU "cpu" (int8 GEMM for large layers where the CPU multiplies int8 fast,
            # else dequant), elsewhere (MPS, ...) "dequant": chunked dequantize + F.linear in x's dtype
            path = runtime_path(x.device)
            act = self.activation_dtype
            if path == "cpu" and act is not None:
                path = "dequant"  # weight-only asked for (the text encoder's bf16 activations): no int8 activations
            # under torch.compile the custom ops are traced instead (storage pointers are not traceable)
            run = None if torch.compiler.is_compiling() else self._prepared(x.device)
            lora = self._fused_lora(x) if self.lora_groups and path is None and act is None else None
            fused = 1 if lora is not None else 0
            if act is not None and path is None and run is not None:
                # weight-only: activations rounded once to ``act``, fp32 accumulation, output in x's dtype
                y = run(x if x.dtype == act else x.to(act), bias, "w8a16", x.dtype)
            elif run is not None:
                y = run(x, bias, path, None, lora)
            else:
                y = quantized_linear(x, self.quantized_weight(x.device), bias, path=path, lora=lora)
            if len(self.lora_groups) > fused or self.has_dense_delta:
                y = self._add_side_paths(x, y, fused)
            return y
        if self.lora_groups or self.has_dense_delta:
            y = self._add_side_paths(x, y)
        return y


class DequantizeOnLoadMixin:
    """For layer types our kernels do not run (embedding tables): a quantized weight is dequantized once
    at load into the dtype the layer was built with, so a file that quantized them still loads right."""

    dequantized_from: Optional[str] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        cq = state_dict.get(prefix + "comfy_quant")
        if cq is not None and prefix + "weight" in state_dict:
            cfg = parse_comfy_quant(cq, where=prefix + "comfy_quant")
            parts = {k[len(prefix):]: v for k, v in state_dict.items()
                     if k.startswith(prefix) and "." not in k[len(prefix):] and k[len(prefix):] != "bias"}
            qw = quantized_weight_from_tensors(prefix[:-1], cfg, parts)
            dtype = self.weight.dtype if self.weight is not None and self.weight.is_floating_point() else torch.float32
            state_dict = {k: v for k, v in state_dict.items() if k not in (prefix + "weight_scale", prefix + "comfy_quant")}
            state_dict[prefix + "weight"] = get_format(qw.format).dequantize(qw).to(dtype)
            self.dequantized_from = qw.format
        return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                             unexpected_keys, error_msgs)


class QuantOps(comfy.ops.manual_cast):
    """``custom_operations`` for diffusion models and text encoders with int8 Linear layers."""

    class Linear(QuantLinearMixin, comfy.ops.manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            self._init_quant(in_features, out_features, dtype)

        def reset_parameters(self):
            return None

        def forward(self, *args, **kwargs):
            if self.quant_spec is not None:
                return self.forward_quantized(*args, **kwargs)
            return super().forward(*args, **kwargs)


    class Embedding(DequantizeOnLoadMixin, comfy.ops.manual_cast.Embedding):
        pass


def match_stock_casting(model: torch.nn.Module) -> int:
    """Per-call weight casting as stock ComfyUI would have it. ComfyUI builds a model with
    ``comfy.ops.disable_weight_init`` (layers use their weights as stored) when the weights are kept in the
    compute dtype (``manual_cast_dtype`` None), and with ``manual_cast`` (every norm, conv, embedding and
    float Linear casts its weight and bias on each call) only otherwise; ``custom_operations`` are used as
    given, so ``QuantOps`` (a ``manual_cast``) would pay the cast on every layer of every model. On a model
    whose ``manual_cast_dtype`` is None this turns the per-call cast off (the layer's own
    ``comfy_cast_weights``) for each float layer whose weight and bias are stored in the compute dtype (a
    quantized file's float tensors can keep another dtype: those layers go on casting). ComfyUI's lowvram
    load turns casting back on for the modules it offloads and restores it afterwards, as for its own
    layers. Returns how many layers changed."""
    if getattr(model, "manual_cast_dtype", torch.float32) is not None or not hasattr(model, "get_dtype"):
        return 0
    compute = model.get_dtype()
    n = 0
    for m in model.modules():
        if (not isinstance(m, comfy.ops.CastWeightBiasOp) or not m.comfy_cast_weights
                or "comfy_cast_weights" in vars(m) or getattr(m, "is_quantized", False)):
            continue
        stored = [t for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if t is not None]
        if all(isinstance(t, torch.Tensor) and t.dtype == compute for t in stored):
            m.comfy_cast_weights = False
            n += 1
    return n


def consumed_quant_layers(model: torch.nn.Module) -> List[str]:
    """Names of the modules that took a quantized weight from the state dict (int8 Linear layers and
    layers dequantized at load)."""
    return [n for n, m in model.named_modules()
            if (isinstance(m, QuantLinearMixin) and m.is_quantized)
            or (isinstance(m, DequantizeOnLoadMixin) and m.dequantized_from is not None)]


def quant_linears(model: torch.nn.Module):
    """(name, module) of every int8 Linear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinearMixin) and m.is_quantized]
