"""The command line: seed flag names, dry runs, rejected combinations, exit codes, the example."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

from helpers import file_sha256, tiny_dit, write_model


@pytest.fixture
def dit(tmp_path):
    return write_model(tmp_path / "flux_tiny.safetensors", tiny_dit())


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_both_flag_spellings(tmp_path, dit, capsys):
    for i, flags in enumerate((["--scaling_mode", "tensor"], ["--scaling-mode", "tensor"])):
        out = tmp_path / f"o{i}.safetensors"
        code, _, err = run_cli(["-i", dit, "-o", out, *flags, "--comfy_quant", "--verbose", "MINIMAL"], capsys)
        assert code == 0, err
        with SafetensorsReader(str(out)) as r:
            assert r.info("double_blocks.0.img_attn.qkv.weight_scale").shape == ()
    assert file_sha256(tmp_path / "o0.safetensors") == file_sha256(tmp_path / "o1.safetensors")


def test_default_output_name_and_formats(tmp_path, dit, capsys):
    code, out, _ = run_cli(["-i", dit, "--report-quality"], capsys)
    assert code == 0
    default = tmp_path / "flux_tiny_int8.safetensors"
    assert default.exists() and (tmp_path / "flux_tiny_int8_quality.json").exists()
    assert (tmp_path / "flux_tiny_int8_quality.md").exists()
    assert "weight SQNR" in out
    with SafetensorsReader(str(default)) as r:  # default scaling: per-row
        assert r.info("double_blocks.0.img_attn.qkv.weight_scale").shape == (768, 1)


def test_block_convrot_fp16_presets(tmp_path, dit, capsys):
    o = tmp_path / "b.safetensors"
    assert run_cli(["-i", dit, "-o", o, "--scaling_mode", "block", "--block_size", "128"], capsys)[0] == 0
    with SafetensorsReader(str(o)) as r:
        assert r.info("double_blocks.0.img_mlp.0.weight_scale").shape == (8, 2)
    o = tmp_path / "c.safetensors"
    assert run_cli(["-i", dit, "-o", o, "--convrot", "--convrot-group-size", "64"], capsys)[0] == 0
    o = tmp_path / "f.safetensors"
    assert run_cli(["-i", dit, "-o", o, "--fp16"], capsys)[0] == 0
    with SafetensorsReader(str(o)) as r:
        assert r.info("double_blocks.0.img_attn.qkv.weight").dtype_name == "F16"
        assert not any(k.endswith("comfy_quant") for k in r.keys())
    o = tmp_path / "p.safetensors"
    code, out, _ = run_cli(["-i", dit, "-o", o, "--preset", "auto", "--report-quality", tmp_path / "rep.json"],
                           capsys)
    assert code == 0 and "detected model family 'flux'" in out
    rep = json.load(open(tmp_path / "rep.json"))
    assert rep["layers"]["img_in"]["quantized"] is False
    assert rep["layers"]["double_blocks.0.img_attn.qkv"]["quantized"] is True


@pytest.mark.parametrize("flags,msg", [
    (["--fp16", "--convrot"], "--fp16"),
    (["--convrot", "--scaling_mode", "block"], "per-row"),
    (["--simple", "--optimizer", "gptq"], "--simple"),
    (["--custom-type", "fp16"], "--custom-layers"),
    (["--merge-lora-scale", "0.5"], "--merge-lora"),
    (["--convrot", "--convrot-group-size", "128"], "invalid choice: 128 (choose from 16, 64, 256, 1024)"),
    (["--preset", "nosuchmodel"], "unknown preset"),
    (["--layer-config", "/nonexistent.json"], "does not exist"),
])
def test_rejected_combinations_are_clear(tmp_path, dit, capsys, flags, msg):
    code, out, err = run_cli(["-i", dit, "-o", tmp_path / "x.safetensors", *flags], capsys)
    assert code == 2
    assert err.startswith("error:") and msg in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_dry_run_analyze_reads_only_the_header(tmp_path, dit, capsys, monkeypatch):
    from convert_to_quant.quant_core import safetensors_io

    def no_data(*a, **k):
        raise AssertionError("analyze must not read tensor data")

    monkeypatch.setattr(safetensors_io.SafetensorsReader, "get", no_data)
    code, out, _ = run_cli(["-i", dit, "--dry-run", "analyze", "--preset", "auto"], capsys)
    assert code == 0
    assert "double_blocks.0.img_attn.qkv" in out and "int8_tensorwise/row" in out
    assert "estimated size" in out and "preset --flux skips 'img_in'" in out
    assert os.listdir(tmp_path) == ["flux_tiny.safetensors"]


def test_dry_run_create_template_then_use_it(tmp_path, dit, capsys):
    code, out, _ = run_cli(["-i", dit, "--dry-run", "create-template", "--preset", "auto"], capsys)
    tpl = tmp_path / "flux_tiny_layer_config.json"
    assert code == 0 and tpl.exists()
    cfg = json.load(open(tpl))
    cfg[r"^double_blocks\.0\.img_mlp\.0$"] = {"format": "int8_blockwise", "block_size": 64}
    tpl.write_text(json.dumps(cfg))
    o = tmp_path / "t.safetensors"
    assert run_cli(["-i", dit, "-o", o, "--layer-config", tpl], capsys)[0] == 0
    with SafetensorsReader(str(o)) as r:
        assert r.info("double_blocks.0.img_mlp.0.weight_scale").shape == (16, 4)
        assert r.info("img_in.weight").dtype_name == "BF16"  # the template kept the preset's decision


def test_missing_input_and_pickle_refused(tmp_path, capsys):
    code, _, err = run_cli(["-i", tmp_path / "nope.safetensors"], capsys)
    assert code == 2 and "no such file" in err
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04not really a pickle")
    code, _, err = run_cli(["-i", p], capsys)
    assert code == 2 and "pickle" in err


def test_console_script_is_installed(tmp_path, dit):
    exe = shutil.which("convert_to_quant") or os.path.join(os.path.dirname(sys.executable), "convert_to_quant")
    r = subprocess.run([exe, "-i", dit, "-o", str(tmp_path / "s.safetensors"), "--verbose", "MINIMAL"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "convert_to_quant", "--list-presets"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--wan" in r.stdout and "--zimage_refiner" in r.stdout
