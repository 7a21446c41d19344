"""The on-disk formats: one module per format, one registry (``FORMATS``), filled here from one list.

Every format follows FORMATS.md (the contract with ComfyUI / comfy-kitchen). A format class is a
namespace of classmethods around a frozen ``Params`` dataclass, like comfy-kitchen's layouts; its module
holds everything about it: ``Params`` (each rule on the parameters checked once, in ``__post_init__``),
quantize / dequantize, the keys it writes, its ``comfy_quant`` JSON and its runtime ``linear``. The
interface (``base.QuantFormat``):

* ``check_fits(shape, params)`` -> ``None`` or the reason this layer cannot use the format;
* ``to_storage(w, params)`` / ``from_storage(w, params)``: the space the integers live in (the
  convrot rotation; identity otherwise);
* ``compute_scale(w_storage, params)``: the round-to-nearest scale from the weight's abs-max;
* ``expand_scale(scale, shape, params)``: the per-element scale matrix ``S`` with
  ``W_storage ≈ q * S`` -- what optimizers need to choose integers themselves;
* ``round_storage(x)``: the nearest grid value of ``x = W_storage / S`` (int8: ties to even, ±127);
* ``pack(q, scale, params, orig_dtype)``: a ``QuantizedWeight`` from grid values and scales;
* ``quantize(w, params)``: round-to-nearest; ``dequantize(qw)``: float32 in the original space,
  exactly as a loader computes it;
* ``output_spec(base, shape, params, orig_dtype)`` and ``tensors(base, qw)``: the keys written;
* ``comfy_quant(params)`` / ``params_from_config(cfg, tensors)``: the per-layer JSON and back;
* ``linear``: the runtime linear of formats our kernels do not run natively (``kernels.quantized_linear``).

Optimizers only ever talk to formats through this interface, so adding a format is one module here,
one line in ``_ALL`` below, and its tests. Nothing registers anything when a ``Params`` is built.
"""
from .base import (FORMATS, QMAX, SCALE_MIN, QuantFormat, QuantizedWeight, TensorSpec,  # noqa: F401
                   _absmax_scale, _round_temp_to_int8, comfy_quant_bytes, comfy_quant_tensor,
                   expand_row_or_tensor_scale, get_format, parse_comfy_quant, quantized_weight_from_tensors,
                   register_format, round_to_int8, row_or_tensor_scale)
from .fp16 import FP16
from .fp8 import Float8E4M3
from .int8_blockwise import Int8Blockwise
from .int8_quip import Int8QuIP
from .int8_smoothquant import Int8SmoothQuant
from .int8_tensorwise import Int8Tensorwise
from .spec import FormatSpec, fallback_chain, resolve_fit  # noqa: F401
from .choice import make_spec, spec_from_choice, with_smoothquant  # noqa: F401

_ALL = (Int8Tensorwise, Int8Blockwise, FP16, Int8SmoothQuant, Int8QuIP, Float8E4M3)
for _cls in _ALL:
    register_format(_cls)
