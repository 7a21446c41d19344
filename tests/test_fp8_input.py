"""FP8 checkpoints as input (issue 15 item 5): ComfyUI scaled fp8 (``scale_weight`` + ``scaled_fp8``
marker) and core ``comfy_quant`` fp8 layers are dequantized (scales applied in float32) before
quantization; the report's SQNR is measured against what the fp8 file means; scale keys are consumed;
kept layers are written as BF16; anything quantized that is not understood is refused."""
import json
import math

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.errors import UnsupportedInputError
from convert_to_quant.quant_core.formats import comfy_quant_tensor
from convert_to_quant.quant_core.loading import load_quantized_file
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import load_file, save_file

from helpers import file_sha256

# a Flux-like model: the preset --flux (auto-detected) keeps img_in in high precision
LAYERS = {"img_in": (64, 32), "double_blocks.0.img_attn.qkv": (96, 64), "double_blocks.0.img_mlp.0": (128, 64),
          "single_blocks.0.linear1": (96, 64), "final_layer.linear": (32, 64)}
KEPT = ("img_in", "final_layer.linear")
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def fp8_model(path, layout="scaled", dtype=torch.float8_e4m3fn, seed=0):
    """(file, {base: float64 reference = fp8 weight x scale}) for layout ``scaled`` (ComfyUI scaled fp8),
    ``comfy_quant`` (core fp8 layers) or ``plain`` (fp8 weights, no scales, no marker)."""
    g = torch.Generator().manual_seed(seed)
    sd, ref, layers_meta = {}, {}, {}
    for i, (base, shape) in enumerate(LAYERS.items()):
        w = torch.randn(shape, generator=g) * (0.02 * (i + 1))
        scale = torch.tensor(1.0) if layout == "plain" else (w.abs().amax() / FP8_MAX[dtype]).float()
        q = (w / scale).to(dtype)
        sd[base + ".weight"] = q
        sd[base + ".bias"] = (torch.randn(shape[0], generator=g) * 0.01).to(torch.bfloat16)
        ref[base] = q.double() * scale.double()
        if layout == "scaled":
            sd[base + ".scale_weight"] = scale.reshape(())
            if i % 2:
                sd[base + ".scale_input"] = torch.tensor(0.5)
        elif layout == "comfy_quant":
            fmt = "float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2"
            sd[base + ".weight_scale"] = scale.reshape(())
            sd[base + ".comfy_quant"] = comfy_quant_tensor({"format": fmt})
            layers_meta[base] = {"format": fmt}
            if i % 2:
                sd[base + ".input_scale"] = torch.tensor(0.5)
    sd["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(16, dtype=torch.bfloat16)
    meta = {"modelspec.title": "tiny fp8"}
    if layout == "scaled":
        sd["scaled_fp8"] = torch.empty(0, dtype=dtype)
    elif layout == "comfy_quant":
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers_meta})
    save_file(sd, str(path), metadata=meta)
    return str(path), ref


def sqnr64(ref, approx):
    ref, approx = ref.double(), approx.double()
    return 10 * math.log10(float((ref ** 2).sum()) / float(((ref - approx) ** 2).sum()))


CASES = [("scaled", torch.float8_e4m3fn), ("comfy_quant", torch.float8_e4m3fn), ("scaled", torch.float8_e5m2),
         ("comfy_quant", torch.float8_e5m2), ("plain", torch.float8_e4m3fn)]


@pytest.mark.parametrize("layout,dtype", CASES, ids=[f"{a}-{str(b)[11:]}" for a, b in CASES])
def test_fp8_converts_to_int8_with_a_true_report(tmp_path, layout, dtype):
    inp, ref = fp8_model(tmp_path / "fp8.safetensors", layout, dtype)
    digest = file_sha256(inp)
    out = str(tmp_path / "int8.safetensors")
    rep = str(tmp_path / "report.json")
    convert_file(inp, out, ConvertOptions(plan=PlanOptions(presets=["auto"]), report_path=rep, verify=True))
    assert file_sha256(inp) == digest
    sd = load_file(out)
    report = json.loads(open(rep, encoding="utf-8").read())
    # scale keys, markers and the input's comfy_quant metadata are consumed, not copied
    for k in sd:
        assert not k.endswith((".scale_weight", ".scale_input", ".input_scale")) and k != "scaled_fp8", k
    loaded, qlayers = load_quantized_file(out)
    assert set(qlayers) == set(LAYERS) - set(KEPT)
    for base in LAYERS:
        if base in KEPT:
            # kept: the dequantized float (fp8 x scale in float32) written as BF16, and the report says so
            w = sd[base + ".weight"]
            assert w.dtype == torch.bfloat16 and (base + ".comfy_quant") not in sd
            assert torch.equal(w, ref[base].float().to(torch.bfloat16))
            lay = report["layers"][base]
            assert lay["quantized"] is False and lay["format"] == "keep BF16"
            assert any("dequantized to BF16" in n for n in lay["notes"]), lay
            continue
        q, s = sd[base + ".weight"], sd[base + ".weight_scale"]
        assert q.dtype == torch.int8
        deq64 = q.double() * s.double()  # the written int8 dequantized here, in float64
        assert torch.allclose(deq64, loaded[base + ".weight"].double(), rtol=1e-6, atol=1e-9)
        want = sqnr64(ref[base], deq64)
        assert want > 30  # close to the fp8-dequantized reference
        assert torch.allclose(deq64, ref[base], atol=float(ref[base].abs().amax()) / 100)
        lay = report["layers"][base]
        assert lay["sqnr_db"] == pytest.approx(want, rel=1e-5, abs=1e-4), (base, lay["sqnr_db"], want)
        assert any("SQNR measured against the dequantized input" in n for n in lay["notes"])
    meta = json.loads(__import__("convert_to_quant.quant_core.safetensors_io", fromlist=["x"])
                      .read_header(out)[1]["_quantization_metadata"])
    assert set(meta["layers"]) == set(LAYERS) - set(KEPT)
    assert all(c["format"].startswith("int8") for c in meta["layers"].values())
    assert any("fp8 tensor(s)" in n for n in report["summary"].get("notes", []))


def test_sqnr_is_not_against_the_raw_fp8_values(tmp_path):
    """The scale matters: a report measured against fp8 values without their scale would be far off."""
    inp, ref = fp8_model(tmp_path / "fp8.safetensors", "scaled")
    out = str(tmp_path / "o.safetensors")
    res = convert_file(inp, out, ConvertOptions(plan=PlanOptions(presets=["auto"])))
    base = "double_blocks.0.img_attn.qkv"
    sd = load_file(out)
    deq = sd[base + ".weight"].double() * sd[base + ".weight_scale"].double()
    assert torch.allclose(deq, ref[base], atol=float(ref[base].abs().amax()) / 100)
    raw = load_file(inp)[base + ".weight"].double()
    assert not torch.allclose(deq, raw, atol=float(raw.abs().amax()) / 10)
    assert res.report.layers[base].sqnr_db == pytest.approx(sqnr64(ref[base], deq), rel=1e-5)


def _cli_refuses(tmp_path, capsys, inp, pattern):
    out = tmp_path / "out.safetensors"
    digest = file_sha256(inp)
    capsys.readouterr()
    code = cli.main(["-i", inp, "-o", str(out), "--verbose", "MINIMAL"])
    text = capsys.readouterr()
    text = text.out + text.err
    errs = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errs) == 1 and "Traceback" not in text, text
    assert __import__("re").search(pattern, errs[0]), errs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [__import__("os").path.basename(inp)]
    assert file_sha256(inp) == digest
    with pytest.raises(UnsupportedInputError, match=pattern):
        convert_file(inp, str(out))
    assert not out.exists()


def test_unknown_comfy_quant_format_is_refused(tmp_path, capsys):
    p = str(tmp_path / "nv.safetensors")
    save_file({"lin.weight": torch.zeros(8, 16, dtype=torch.uint8), "lin.weight_scale": torch.ones(()),
               "lin.comfy_quant": comfy_quant_tensor({"format": "nvfp4"})}, p)
    _cli_refuses(tmp_path, capsys, p, r"nv\.safetensors is already quantized \(layer lin has comfy_quant format 'nvfp4'\)")


def test_fp8_without_scale_in_a_scaled_file_is_refused(tmp_path, capsys):
    inp, _ = fp8_model(tmp_path / "fp8.safetensors", "scaled")
    sd = load_file(inp)
    del sd["single_blocks.0.linear1.scale_weight"]
    save_file(sd, inp)
    _cli_refuses(tmp_path, capsys, inp, r"single_blocks\.0\.linear1\.weight is a F8_E4M3 weight without "
                 r"single_blocks\.0\.linear1\.scale_weight, but the file is ComfyUI scaled fp8")


@pytest.mark.parametrize("extra,pattern", [
    ({"lin.weight": torch.zeros(8, 8, dtype=torch.uint8)}, r"lin\.weight is an integer \(U8\) weight"),
    ({"lin.weight": torch.zeros(8, 8, dtype=torch.uint8), "lin.weight.absmax": torch.ones(4)},
     r"lin\.weight\.absmax belongs to a packed quantized layout"),
    ({"lin.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn), "lin.weight_scale": torch.ones(())},
     r"lin\.weight is F8_E4M3 with a lin\.weight_scale but no comfy_quant config"),
    ({"lin.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn), "lin.scale_weight": torch.ones(8)},
     r"lin\.scale_weight \(the scale of lin\.weight\) must be one float number"),
    ({"lin.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn), "lin.scale_weight": torch.tensor(float("nan"))},
     r"lin\.scale_weight \(the scale of lin\.weight\) is nan"),
    ({"lin.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn),
      "lin.comfy_quant": comfy_quant_tensor({"format": "float8_e4m3fn"})},
     r"lin\.weight is comfy_quant float8_e4m3fn but has no lin\.weight_scale"),
    ({"lin.weight": torch.zeros(8, 8, dtype=torch.bfloat16), "lin.weight_scale": torch.ones(()),
      "lin.comfy_quant": comfy_quant_tensor({"format": "float8_e5m2"})},
     r"lin\.weight: comfy_quant format float8_e5m2 needs a F8_E5M2 weight, got BF16"),
])
def test_other_quantized_layouts_are_refused(tmp_path, extra, pattern):
    p = str(tmp_path / "m.safetensors")
    save_file(dict(extra), p)
    with pytest.raises(UnsupportedInputError, match=pattern):
        convert_file(p, str(tmp_path / "o.safetensors"))
    assert not (tmp_path / "o.safetensors").exists()


def test_dry_run_plans_fp8_layers(tmp_path, capsys):
    inp, _ = fp8_model(tmp_path / "fp8.safetensors", "scaled")
    capsys.readouterr()
    assert cli.main(["-i", inp, "--dry-run", "analyze", "--preset", "auto"]) == 0
    text = capsys.readouterr().out
    assert "3 layers quantized, 2 kept" in text, text
    assert "fp8 tensor(s) (scaled fp8) dequantized" in text
