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


# ------------------------------------------------------------------------------------------------
# issue 14: every numeric flag checked while parsing; usage errors are one line; files a run reads
# ------------------------------------------------------------------------------------------------
NEGATIVE_ALLOWED = {"quality_threshold", "merge_lora_scale", "manual_seed"}  # a dB threshold, a LoRA strength, -1 = random (convert-to-quant)


def numeric_flags():
    """(dest, flag, is_int) of every flag that takes numbers, found in the parser itself, so that a
    flag added later is swept too."""
    out = []
    for a in cli.build_parser()._actions:
        if a.option_strings and a.type is not None and a.type not in (str, str.upper):
            is_int = a.type is int or getattr(a.type, "kind", None) is int
            out.append((a.dest, max(a.option_strings, key=len), is_int))
    return out


def test_the_sweep_sees_every_numeric_flag():
    dests = {d for d, _, _ in numeric_flags()}
    assert {"block_size", "convrot_group_size", "manual_seed", "gptq_damp", "quality_threshold", "lr",
            "num_iter", "merge_lora_scale", "calib_samples", "bf16_threshold", "quip_seed"} <= dests
    assert len(dests) >= 30
    for a in cli.build_parser()._actions:  # a plain int/float type accepts nan, inf or 2**70: only with choices
        if a.type in (int, float):
            assert a.choices, a.dest


@pytest.mark.parametrize("dest,flag,is_int", numeric_flags(), ids=[d for d, _, _ in numeric_flags()])
def test_every_numeric_flag_refuses_nan_inf_huge_negative(tmp_path, dit, capsys, dest, flag, is_int):
    bad = ["nan", "inf", "-inf", "1e999", "-1e999", "", "x"]
    bad += [str(2 ** 64), "1.5"] if is_int else []
    bad += [] if dest in NEGATIVE_ALLOWED else ["-1"]
    out = tmp_path / "x.safetensors"
    for value in bad:
        code, _, err = run_cli(["-i", dit, "-o", out, f"{flag}={value}"], capsys)
        assert code == 2, (flag, value, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: argument "), (value, err)
        named = lines[0].split(": ")[1][len("argument "):].split("/")  # "error: argument --a_b/--a-b: ..."
        assert flag in named and (repr(value) in lines[0] or f"invalid choice: {value} (" in lines[0]), (value, err)
        assert "usage:" not in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["flux_tiny.safetensors"]


REAL_PROCESS_BAD_ARGS = [
    (["--manual_seed", str(2 ** 70)], "argument --manual_seed/--manual-seed: must be an integer in [0, 2**64), "
                                      f"got '{2 ** 70}'"),
    (["--gptq-damp", "inf"], "argument --gptq-damp/--gptq_damp: must be a finite number in (0, 1000], got 'inf'"),
    (["--quality-threshold", "nan"], "argument --quality-threshold/--quality_threshold: must be a finite number, "
                                     "got 'nan'"),
    (["--convrot", "--convrot-group-size", "65536"], "invalid choice: 65536 (choose from 16, 64, 256, 1024)"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--scaling_mode", "diagonal"], "argument --scaling_mode/--scaling-mode: invalid choice: 'diagonal'"),
    (["--block_size"], "argument --block_size/--block-size: expected one argument"),
    (["--device", "meta"], "device 'meta' is not supported; use auto, cpu, cuda or cuda:N"),
]


def test_real_process_bad_values_and_usage_errors_are_one_line(tmp_path, dit):
    """As separate processes (started together): exit 2, one ``error:`` line -- argparse's own errors
    with a pointer to --help instead of the usage block --, no traceback, nothing written."""
    procs = [(flags, want, subprocess.Popen(
        [sys.executable, "-m", "convert_to_quant", "-i", dit, "-o", str(tmp_path / "x.safetensors"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for flags, want in REAL_PROCESS_BAD_ARGS]
    for flags, want, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (flags, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and want in err, (flags, err)
        assert out == "" and ("--device" in flags or "(run convert_to_quant --help for the flags)" in err), err
    assert os.listdir(tmp_path) == ["flux_tiny.safetensors"]


@pytest.mark.parametrize("flags,want", [
    (["--gptq-damp=-1"], "argument --gptq-damp/--gptq_damp: must be a finite number in (0, 1000], got '-1'"),
    (["--block_size", "17"], "argument --block_size/--block-size: must be a multiple of 16 in [16, 4096], got '17'"),
    (["--num_iter", "0"], "argument --num_iter/--num-iter: must be an integer in [1, 2**63), got '0'"),
    (["--lr", "1e38"], "argument --lr: must be a finite number in (0, 1000], got '1e38'"),
    (["--merge-lora-scale", "1", "nan"], "argument --merge-lora-scale/--merge_lora_scale: must be a finite number, "
                                         "got 'nan'"),
    (["--max_k", "8", "--min_k", "64"], "--max_k (8) must be >= --min_k (64)"),
    (["--device", "cuda:abc"], "device 'cuda:abc' is not supported; use auto, cpu, cuda or cuda:N"),
])
def test_bad_values_name_the_flag_and_the_range(tmp_path, dit, capsys, flags, want):
    code, _, err = run_cli(["-i", dit, "-o", tmp_path / "x.safetensors", *flags], capsys)
    assert code == 2 and err.startswith("error: " + want) and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["flux_tiny.safetensors"]


def test_a_gpu_this_machine_lacks_is_a_clear_error(tmp_path, dit, capsys):
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code, _, err = run_cli(["-i", dit, "-o", tmp_path / "x.safetensors", "--device", f"cuda:{max(n, 7)}"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err == (f"error: device 'cuda:{max(n, 7)}' asked for, but " +
                   ("no CUDA GPU is available\n" if n == 0 else f"this machine has {n} CUDA GPU"))[:len(err)]
    assert os.listdir(tmp_path) == ["flux_tiny.safetensors"]


def test_accepted_bounds_still_convert(tmp_path, dit, capsys):
    """The edges of the accepted ranges are accepted: seed 2**64-1, a negative threshold, damping 1000."""
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["-i", dit, "-o", out, "--manual_seed", str(2 ** 64 - 1), "--quality-threshold=-5",
                            "--gptq-damp", "1000", "--block_size", "4096", "--device", "CPU", "--verbose", "MINIMAL"],
                           capsys)
    assert code == 0, err
    with SafetensorsReader(str(out)) as r:
        assert r.info("double_blocks.0.img_attn.qkv.weight").dtype_name == "I8"


def _tree(d):
    return {f: file_sha256(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def test_create_template_never_replaces_what_the_run_reads(tmp_path, capsys):
    from corpus import layer_config, small_model
    inp = small_model(tmp_path / "m.json")  # a model under a .json name: -o m.json would be the input
    cfg = layer_config(tmp_path / "cfg.json", {"attn": {"skip": True}})
    before = _tree(tmp_path)
    for flags, want in (
            (["-o", inp, "--overwrite"], f"layer-config template {inp} is the input file; refusing to overwrite the input"),
            (["-o", cfg, "--layer-config", cfg, "--overwrite"],
             f"layer-config template {cfg} is the layer-config file; refusing to overwrite the layer-config"),
            (["-o", cfg], f"layer-config template {cfg} already exists (pass --overwrite")):
        code, _, err = run_cli(["-i", inp, "--dry-run", "create-template", *flags], capsys)
        assert code == 2 and err.startswith("error: " + want) and err.count("\n") == 1, err
        assert _tree(tmp_path) == before
    os.link(inp, tmp_path / "hard.json")  # a hard link to the input is the input
    code, _, err = run_cli(["-i", inp, "--dry-run", "create-template", "-o", tmp_path / "hard.json", "--overwrite"],
                           capsys)
    assert code == 2 and "hard.json is the input file " in err
    # --overwrite replaces an earlier template that the run does not read
    code, _, err = run_cli(["-i", inp, "--dry-run", "create-template", "-o", cfg, "--overwrite"], capsys)
    assert code == 0, err
    template = json.load(open(cfg))
    assert template != {"attn": {"skip": True}} and any("blocks" in k for k in template), template
    assert _tree(tmp_path)["m.json"] == before["m.json"]


def test_reports_replace_files_only_with_overwrite(tmp_path, dit, capsys):
    """The automatic <out>_quality.json/.md: an existing one stops the run before any work (the model is
    not written either); with --overwrite both are replaced by the new report."""
    out = tmp_path / "o.safetensors"
    (tmp_path / "o_quality.md").write_text("my notes")
    code, _, err = run_cli(["-i", dit, "-o", out, "--report-quality"], capsys)
    assert code == 2 and err == (f"error: quality report file {tmp_path / 'o_quality.md'} already exists "
                                 "(pass --overwrite to replace it)\n")
    assert sorted(os.listdir(tmp_path)) == ["flux_tiny.safetensors", "o_quality.md"]
    assert (tmp_path / "o_quality.md").read_text() == "my notes"
    code, _, err = run_cli(["-i", dit, "-o", out, "--report-quality", "--overwrite", "--verbose", "MINIMAL"], capsys)
    assert code == 0, err
    assert json.load(open(tmp_path / "o_quality.json"))["summary"]["layers_quantized"] > 0
    assert "my notes" not in (tmp_path / "o_quality.md").read_text()


def test_report_write_refuses_a_file_that_appeared_after_the_checks(tmp_path):
    """Without overwrite the report is linked into place: a file that appeared meanwhile stays."""
    from convert_to_quant.quant_core.metrics import QualityReport
    rep = QualityReport(30.0)
    rep.finalize(bytes_in=1, bytes_out=1, seconds=0.0)
    (tmp_path / "r.md").write_text("appeared")
    with pytest.raises(FileExistsError):
        rep.write(str(tmp_path / "r.json"), overwrite=False)
    assert (tmp_path / "r.md").read_text() == "appeared"
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.md"]  # the JSON went in before the .md was refused
    assert rep.write(str(tmp_path / "r.json"), overwrite=True) == [str(tmp_path / "r.json"), str(tmp_path / "r.md")]
    assert (tmp_path / "r.md").read_text() != "appeared"
