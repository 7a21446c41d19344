"""Formats: round trips on random and real (MiniLM) weights, the comfy-kitchen oracle, rounding."""
import math

import pytest
import torch

from convert_to_quant.quant_core.formats import (FORMATS, FP16, Int8Blockwise, Int8Tensorwise, fallback_chain,
                                                 make_spec, resolve_fit)
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.hadamard import regular_hadamard, rotate_groups
from convert_to_quant.quant_core.metrics import sqnr_db
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

from helpers import heavy_tailed

SPECS = {
    "row": make_spec(scaling_mode="axis"),
    "tensor": make_spec(scaling_mode="tensor"),
    "convrot16": make_spec(convrot=True, convrot_groupsize=16),
    "convrot64": make_spec(convrot=True, convrot_groupsize=64),
    "convrot256": make_spec(convrot=True, convrot_groupsize=256),
    "block128": make_spec(scaling_mode="block", block_size=128),
    "block64": make_spec(scaling_mode="block", block_size=64),
    "fp16": make_spec(format="fp16"),
}


def reference_dequant(qw):
    """float64 reference of what FORMATS.md says each format means."""
    if qw.format == "fp16":
        return qw.qdata.double()
    q = qw.qdata.double()
    s = qw.scale.double()
    if qw.format == "int8_blockwise":
        g = qw.params.group_size
        out = torch.empty_like(q)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                out[i * g:(i + 1) * g, j * g:(j + 1) * g] = q[i * g:(i + 1) * g, j * g:(j + 1) * g] * s[i, j]
        return out
    w = q * (s.reshape(-1, 1) if s.dim() else s)
    if qw.params.convrot:
        g = qw.params.convrot_groupsize
        h = regular_hadamard(g, dtype=torch.float64)
        w = (w.reshape(w.shape[0], -1, g) @ h.T).reshape(w.shape)
    return w


@pytest.mark.parametrize("name", list(SPECS))
def test_round_trip_random(name):
    spec = SPECS[name]
    w = heavy_tailed((320, 512), seed=1).to(torch.bfloat16)
    qw = spec.cls.quantize(w, spec.params)
    deq = qw.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    torch.testing.assert_close(deq.double(), reference_dequant(qw), rtol=1e-6, atol=1e-7)
    if spec.format != "fp16":
        assert qw.qdata.dtype == torch.int8
        assert int(qw.qdata.abs().max()) <= 127
        # round to nearest: every stored integer is the nearest to w/scale in storage space
        ws = spec.cls.to_storage(w.float(), spec.params)
        S = spec.cls.expand_scale(qw.scale, ws.shape, spec.params)
        assert float((ws / S - qw.qdata.float()).abs().max()) <= 0.5 + 1e-4
    s = sqnr_db(w.float(), deq)
    assert s > {"tensor": 25, "block128": 28, "block64": 28, "fp16": 60}.get(name, 35), s


def test_rounding_is_nearest_ties_to_even_not_truncation():
    spec = make_spec(scaling_mode="tensor")
    # scale = 127/127 = 1 -> values quantize to round(x)
    w = torch.tensor([[127.0, 0.6, -0.6, 1.5, 2.5, -1.5, -2.5, 0.49]])
    qw = spec.cls.quantize(w, spec.params)
    assert qw.qdata.tolist() == [[127, 1, -1, 2, 2, -2, -2, 0]]


def test_all_zero_weight_is_exact():
    for spec in SPECS.values():
        w = torch.zeros(64, 256)
        qw = spec.cls.quantize(w, spec.params)
        assert torch.count_nonzero(qw.dequantize()) == 0
        assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("name", ["row", "convrot64", "block128", "tensor", "fp16"])
def test_round_trip_minilm_weights(minilm_path, name):
    spec = SPECS[name]
    with SafetensorsReader(minilm_path) as r:
        w = r.get("encoder.layer.0.intermediate.dense.weight")
    qw = spec.cls.quantize(w, spec.params)
    torch.testing.assert_close(qw.dequantize().double(), reference_dequant(qw), rtol=1e-6, atol=1e-7)
    assert sqnr_db(w, qw.dequantize()) > (25 if name == "tensor" else 30)


def test_convrot_beats_plain_rows_on_outlier_columns():
    w = heavy_tailed((256, 1024), seed=3, outlier_cols=8)
    plain = SPECS["row"].cls.quantize(w, SPECS["row"].params).dequantize()
    rot = SPECS["convrot256"].cls.quantize(w, SPECS["convrot256"].params).dequantize()
    assert sqnr_db(w, rot) > sqnr_db(w, plain) + 3


def test_hadamard_is_the_regular_orthogonal_involution():
    for g in (16, 64, 256, 1024):
        h = regular_hadamard(g, dtype=torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(g, dtype=torch.float64))
        torch.testing.assert_close(h, h.T)
        assert torch.all((h * math.sqrt(g)).abs().round() == 1)
    x = torch.randn(3, 512, dtype=torch.float64)
    torch.testing.assert_close(rotate_groups(rotate_groups(x, 64), 64), x)
    with pytest.raises(PlanError):
        regular_hadamard(128)


def test_fallback_when_shape_does_not_fit():
    spec = SPECS["convrot256"]
    fit, why = resolve_fit(spec, (128, 384))
    assert fit.params.convrot_groupsize == 64 and "384" in why
    fit, why = resolve_fit(spec, (128, 360))  # 360 = 8*45: no power-of-4 group divides it
    assert fit.format == "int8_tensorwise" and not fit.params.convrot
    fit, why = resolve_fit(SPECS["block128"], (128, 200))
    assert fit.format == "int8_tensorwise" and "200" in why
    assert [s.describe() for s in fallback_chain(spec)] == [
        "int8_tensorwise/row+convrot256", "int8_tensorwise/row+convrot64", "int8_tensorwise/row+convrot16",
        "int8_tensorwise/row", "fp16"]


def test_bad_params_are_clear_errors():
    for g in (128, 4, 4096, 65536):  # 4**k beyond the supported sizes would build a 4**k x 4**k matrix
        with pytest.raises(PlanError, match=f"convrot group size must be one of 16, 64, 256, 1024, got {g}"):
            make_spec(convrot=True, convrot_groupsize=g)
    with pytest.raises(PlanError, match="per-row"):
        make_spec(scaling_mode="tensor", convrot=True)
    with pytest.raises(PlanError, match="unknown format"):
        make_spec(format="int4")
    with pytest.raises(PlanError, match="multiple of 16"):
        make_spec(scaling_mode="block", block_size=100)


def test_registry_has_one_class_per_format():
    assert {"int8_tensorwise", "int8_blockwise", "fp16"} <= set(FORMATS)
    assert FORMATS["int8_tensorwise"] is Int8Tensorwise and FORMATS["int8_blockwise"] is Int8Blockwise
    assert FORMATS["fp16"] is FP16
    assert Int8Tensorwise.core_loadable and not Int8Blockwise.core_loadable


# --- comfy-kitchen: the library stock ComfyUI uses to read our files ---------------------------
ck = pytest.importorskip("comfy_kitchen")


def _ck_tensor(qw, orig_dtype=torch.float32):
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout
    p = TensorWiseINT8Layout.Params(scale=qw.scale, orig_dtype=orig_dtype, orig_shape=tuple(qw.qdata.shape),
                                    convrot=qw.params.convrot, convrot_groupsize=qw.params.convrot_groupsize)
    return QuantizedTensor(qw.qdata, "TensorWiseINT8Layout", p)


@pytest.mark.parametrize("name", ["row", "tensor", "convrot16", "convrot64", "convrot256"])
def test_comfy_kitchen_dequantizes_identically(name, minilm_path):
    spec = SPECS[name]
    with SafetensorsReader(minilm_path) as r:
        ws = [r.get("encoder.layer.2.output.dense.weight")[:, :1024], heavy_tailed((384, 1024), seed=5)]
    for w in ws:
        qw = spec.cls.quantize(w, spec.params)
        ours = qw.dequantize()
        theirs = _ck_tensor(qw).dequantize()
        assert float((ours - theirs).abs().max()) <= 1e-6 * float(ours.abs().max())
        x = torch.randn(7, w.shape[1])
        y_ck = torch.nn.functional.linear(x, _ck_tensor(qw))
        y_ours = torch.nn.functional.linear(x, ours)
        # comfy-kitchen's linear quantizes activations per row (W8A8): within activation-quant error
        rel = float((y_ck - y_ours).norm() / y_ours.norm())
        assert rel < 0.02, rel
