"""Calibration as a file you keep (issue 15): captured once through the Python API, reused by the CLI's
``--calibration-data`` with the very same integers as the in-memory statistics; one format for every
writer (metadata: model family, token and prompt counts, layer shapes), validated on read; statistics of
another model refused naming the layer."""
import json

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.calibration import (capture_calibration, check_matches_model, collect,
                                                     load_calibration)
from convert_to_quant.quant_core.errors import CalibrationError
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader, load_file, save_file


class Net(torch.nn.Module):
    """Names like a DiT block: attention projections reading one input, an MLP."""

    def __init__(self, width=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        b = self.blocks[0]
        b.q, b.k = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        b.fc1, b.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def forward(self, x):
        b = self.blocks[0]
        x = x + b.q(x) * torch.sigmoid(b.k(x))
        return x + b.fc2(torch.nn.functional.gelu(b.fc1(x)))


def _batches(n=3, tokens=16, width=64):
    g = torch.Generator().manual_seed(1)
    # correlated, non-zero-mean activations: GPTQ's Hessian then differs clearly from the identity
    mix = torch.randn(width, width, generator=g)
    return [torch.randn(2, tokens, width, generator=g) @ mix + 0.5 for _ in range(n)]


def _model_file(tmp_path, net):
    p = str(tmp_path / "net.safetensors")
    save_file({k: v.detach().clone() for k, v in net.state_dict().items()}, p)
    return p


def _tensors_and_bytes(path):
    with SafetensorsReader(path) as r:
        return {k: (r.get(k).dtype, r.get(k).contiguous().view(torch.uint8).flatten().tolist()) for k in r.keys()}


def test_capture_once_and_reuse_from_the_cli_gives_the_same_integers(tmp_path, capsys):
    net = Net()
    src = _model_file(tmp_path, net)
    batches = _batches()
    # the API, statistics in memory
    mem = collect(net, batches)
    api_out = str(tmp_path / "api.safetensors")
    convert_file(src, api_out, ConvertOptions(optimizer="gptq", calibration_data=mem, device="cpu"))
    # captured once into a file that is kept ...
    cal = str(tmp_path / "net_calibration.safetensors")
    summary = capture_calibration(net, batches, cal)
    assert summary["layers"] == 4 and summary["groups"] == 3  # q and k read one input
    # ... with what it is in its metadata
    data = load_calibration(cal)
    meta = data.metadata
    assert meta["prompts"] == "3" and meta["tokens"] == str(3 * 2 * 16) and meta["model_family"] == "unknown"
    assert json.loads(meta["layer_shapes"]) == {"blocks.0.q": 64, "blocks.0.k": 64, "blocks.0.fc1": 64,
                                                "blocks.0.fc2": 128}
    data.close()
    # ... and reused by the CLI
    cli_out = str(tmp_path / "cli.safetensors")
    rc = cli.main(["-i", src, "-o", cli_out, "--optimizer", "gptq", "--calibration-data", cal,
                   "--device", "cpu"])
    assert rc == 0, capsys.readouterr()
    a, b = _tensors_and_bytes(api_out), _tensors_and_bytes(cli_out)
    assert set(a) == set(b) and any(dt == torch.int8 for dt, _ in a.values())
    assert a == b  # byte-identical tensors
    # the calibration mattered: GPTQ without it (weight-only objective) gives other integers
    plain = str(tmp_path / "plain.safetensors")
    convert_file(src, plain, ConvertOptions(optimizer="gptq", device="cpu"))
    q = "blocks.0.fc2.weight"
    assert not torch.equal(load_file(plain)[q], load_file(cli_out)[q])


def test_in_memory_and_saved_statistics_are_the_same_file(tmp_path):
    """``CalibrationData.save`` (after ``collect``) and ``capture_calibration`` write one format."""
    net = Net()
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    collect(net, _batches()).save(a)
    capture_calibration(net, _batches(), b)
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    with SafetensorsReader(a) as ra, SafetensorsReader(b) as rb:
        ma, mb = ra.metadata, rb.metadata
    for k in ("calibration_format", "layers", "layer_shapes", "model_family", "tokens", "prompts"):
        assert ma[k] == mb[k], k


def test_calibration_of_another_model_is_refused_naming_the_layer(tmp_path, capsys):
    cal = str(tmp_path / "cal.safetensors")
    capture_calibration(Net(), _batches(), cal)
    # a model whose fc1 reads 32 features instead of 64
    other = {"blocks.0.q.weight": torch.randn(64, 64), "blocks.0.k.weight": torch.randn(64, 64),
             "blocks.0.fc1.weight": torch.randn(128, 32), "blocks.0.fc2.weight": torch.randn(64, 128)}
    src = str(tmp_path / "other.safetensors")
    save_file(other, src)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(CalibrationError, match=r"cal\.safetensors was captured on another model: layer blocks\.0\.fc1 "
                                               r"has in_features 64 there, but blocks\.0\.fc1\.weight of .*other"
                                               r"\.safetensors is \[128, 32\]"):
        convert_file(src, out, ConvertOptions(optimizer="gptq", calibration_data=cal, device="cpu"))
    # a model without that layer, through the CLI: exit 2, one error line, no output
    del other["blocks.0.fc1.weight"]
    save_file(other, src)
    rc = cli.main(["-i", src, "-o", out, "--optimizer", "gptq", "--calibration-data", cal, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "its layer blocks.0.fc1 (in_features 64) is not a linear layer of" in err, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [ln for ln in err.splitlines() if ln]
    assert not (tmp_path / "out.safetensors").exists()
    # prefixes differ between captured module names and checkpoint keys: still the same model
    data = load_calibration(cal)
    check_matches_model(data, {"model.diffusion_model." + k: v.shape for k, v in Net().state_dict().items()})
    data.close()


@pytest.mark.parametrize("damage,message", [
    ("shapes_json", r"metadata 'layer_shapes' is not a JSON object of in_features"),
    ("shapes_wrong", r"metadata 'layer_shapes' gives blocks\.0\.fc2 in_features 64, its statistics have 128"),
    ("tokens_meta", r"metadata 'tokens' must be a non-negative integer, got '-5'"),
    ("dtype", r"blocks\.0\.fc1\.hessian must be float32 \[64, 64\], got float16 \[64, 64\]"),
    ("shape", r"blocks\.0\.fc1\.mean must be float32 \[64\], got float32 \[63\]"),
    ("tokens_dtype", r"blocks\.0\.fc1\.tokens must be int64 \[2\], got float32 \[2\]"),
    ("nan", r"blocks\.0\.fc1: hessian has NaN or Inf values"),
])
def test_malformed_calibration_files_are_clear_errors(tmp_path, damage, message):
    good = str(tmp_path / "good.safetensors")
    capture_calibration(Net(), _batches(), good)
    t = load_file(good)
    with SafetensorsReader(good) as r:
        meta = dict(r.metadata)
    if damage == "shapes_json":
        meta["layer_shapes"] = "{not json"
    elif damage == "shapes_wrong":
        meta["layer_shapes"] = json.dumps({**json.loads(meta["layer_shapes"]), "blocks.0.fc2": 64})
    elif damage == "tokens_meta":
        meta["tokens"] = "-5"
    elif damage == "dtype":
        t["blocks.0.fc1.hessian"] = t["blocks.0.fc1.hessian"].half()
    elif damage == "shape":
        t["blocks.0.fc1.mean"] = t["blocks.0.fc1.mean"][:63].clone()
    elif damage == "tokens_dtype":
        t["blocks.0.fc1.tokens"] = t["blocks.0.fc1.tokens"].float()
    elif damage == "nan":
        h = t["blocks.0.fc1.hessian"].clone()
        h[2, 5] = h[5, 2] = float("nan")
        t["blocks.0.fc1.hessian"] = h
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad, metadata=meta)
    src = _model_file(tmp_path, Net())
    with pytest.raises(CalibrationError, match=r"bad\.safetensors: .*" + message):
        convert_file(src, str(tmp_path / "out.safetensors"),
                     ConvertOptions(optimizer="gptq", calibration_data=bad, device="cpu"))
    assert not (tmp_path / "out.safetensors").exists()


def test_example_calibration_is_the_same_format_and_checked_against_the_model(tmp_path, minilm_path):
    """``--example``'s statistics (MiniLM on real sentences): the same metadata as the API's; they
    match the MiniLM checkpoint and are refused for another model."""
    pytest.importorskip("transformers")
    from convert_to_quant.quant_core.example import CALIBRATION_SENTENCES, capture_minilm_calibration
    from convert_to_quant.quant_core.safetensors_io import SafetensorsReader as R
    p = str(tmp_path / "minilm_calibration.safetensors")
    capture_minilm_calibration(p, CALIBRATION_SENTENCES[:16])
    data = load_calibration(p)
    try:
        m = data.metadata
        assert m["model_family"] == "bert" and m["prompts"] == "16"
        # tokens: the unpadded tokens of the 16 sentences (the attention mask counts them)
        from convert_to_quant.quant_core.example import load_model
        _, tok = load_model()
        enc = tok(list(CALIBRATION_SENTENCES[:16]), padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        assert int(m["tokens"]) == int(enc["attention_mask"].sum())
        shapes = json.loads(m["layer_shapes"])
        assert len(shapes) == 37 and shapes["encoder.layer.0.intermediate.dense"] == 384
        with R(minilm_path) as r:
            check_matches_model(data, {k: i.shape for k, i in r.infos.items()}, "MiniLM")
        with pytest.raises(CalibrationError, match=r"was captured on another model: its layer \S+ "
                                                   r"\(in_features \d+\) is not a linear layer of net"):
            check_matches_model(data, {k: v.shape for k, v in Net().state_dict().items()}, "net")
    finally:
        data.close()
