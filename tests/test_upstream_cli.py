"""Command lines of convert-to-quant 1.3.4 (PyPI): each runs with the same meaning as our native
spelling (byte-identical output) or exits 2 with one ``error:`` line that says what to use instead."""
import os

import pytest

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

from helpers import file_sha256, tiny_dit, write_model

# (upstream command line, the same conversion in our own flags)
SAME = [
    ("--int8 --comfy_quant --simple", "--scaling_mode tensor --simple"),
    ("--int8 --comfy_quant", "--scaling_mode tensor"),
    ("--int8 --scaling_mode row --comfy_quant --simple", "--scaling_mode axis --simple"),
    ("--int8 --scaling-mode row --save-quant-metadata", "--scaling_mode axis"),
    ("--int8 --scaling_mode block --comfy_quant --simple", "--scaling_mode block --block_size 128"),
    ("--int8 --scaling_mode block --block_size 64 --comfy_quant", "--scaling_mode block --block_size 64"),
    ("--int8 --scaling_mode block2d --group_size 64", "--scaling_mode block --block_size 64"),
    ("--int8 --scaling_mode block --group-size 32", "--scaling_mode block --block_size 32"),
    ("--int8 --scaling_mode row --convrot --convrot_group_size 64 --comfy_quant",
     "--convrot --convrot-group-size 64"),
    ("--int8 --scaling_mode row --simple -lm", "--low-memory"),
    ("--int8 --manual_seed -1 --simple", "--scaling_mode tensor"),
    ("--int8 --manual-seed 7 --scaling_mode row", "--manual_seed 7"),
    ("--int8 --custom-layers img_mlp --custom-type int8 --custom-scaling-mode row",
     "--scaling_mode tensor --custom-layers img_mlp --custom-type int8 --custom-scaling-mode axis"),
    ("--int8 --scaling_mode row --exclude-layers txt_in --flux2", "--exclude-layers txt_in --flux2"),
    ("--int8 --scaling_mode row --optimizer adamw --num_iter 3 --lr 0.01 --lr_schedule plateau "
     "--lr_patience 1 --lr_factor 0.95 -esstall 50 -esloss 1e-9 -eslr 1e-10 --top_p 0.2 --min_k 8 --max_k 16",
     "--optimizer adamw --num_iter 3 --lr 0.01 --lr_schedule plateau --lr_patience 1 --lr_factor 0.95 "
     "--early-stop-stall 50 --early-stop-loss 1e-9 --early-stop-lr 1e-10 --min_k 8 --max_k 16"),
]

# (upstream command line, words the one error line must contain)
REFUSED = [
    ("--optimizer prodigy", ["prodigy", "--optimizer adamw"]),
    ("--int8 --use_speed", ["Prodigy", "--optimizer adamw"]),
    ("--scaling_mode row --comfy_quant", ["FP8", "--fp8", "--int8 --scaling_mode row"]),
    ("--scaling_mode block2d", ["FP8", "--fp8"]),
    ("--int8 --scaling_mode block3d", ["block3d", "--scaling_mode block"]),
    ("--nvfp4 --comfy_quant", ["NVFP4", "--int8"]),
    ("--mxfp8", ["MXFP8"]),
    ("--int8 --custom-layers x --custom-type fp8", ["--custom-type fp8", "--fp8"]),
    ("--int8 --custom-layers x --custom-type nvfp4", ["NVFP4", "--custom-type int8"]),
    ("--fallback fp8", ["--fallback fp8", "--fp8"]),
    ("--int8 --exclude-layers x --fallback int8", ["--custom-layers", "--custom-type int8"]),
    ("--int8 --fp16", ["--int8", "--fp16"]),
    ("--int8 --convrot", ["--convrot", "per-row"]),
    ("--int8 --heur", ["--heur", "--exclude-layers"]),
    ("--full_matrix", ["--full_matrix", "--max_k"]),
    ("--calib_cpu", ["--calib_cpu"]),
    ("--dynamic-convrot", ["--convrot-group-size"]),
    ("--extract-lora --lora-rank 16", ["--extract-lora"]),
    ("--lora-rank 16", ["--lora-rank", "--extract-lora"]),
    ("--convert-fp8-scaled", ["fp8_scaled"]),
    ("--convert-int8-scaled", [".scale_weight"]),
    ("--actcal --actcal-samples 8", ["--actcal", "--input_scale"]),
    ("--edit-quant --remove-keys full_precision_matrix_mult", ["--edit-quant"]),
    ("--input-scales s.json", ["--input-scales", "--input_scale"]),
    ("--output-dtype float16", ["--output-dtype"]),
    ("--preserve-layers x", ["--preserve-layers"]),
    ("--lr-shape-influence 0.5", ["--lr-shape-influence"]),
    ("--scale-optimization joint", ["--scale-optimization"]),
    ("--custom-layers x --custom-convrot", ["--layer-config"]),
    ("--fallback-block-size 64", ["--custom-block-size"]),
    ("--gemma4", ["--gemma4", "--exclude-layers"]),
    ("--ltxv2", ["--ltxv2", "--list-presets"]),
    ("--verbose-pinned", ["--verbose DEBUG"]),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("up")
    return write_model(d / "flux_tiny.safetensors", tiny_dit(width=64, blocks=1))


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("upstream,native", SAME, ids=[u for u, _ in SAME])
def test_upstream_line_runs_as_native(upstream, native, model, tmp_path, capsys):
    a, b = tmp_path / "upstream.safetensors", tmp_path / "native.safetensors"
    code, _, err = _run(["-i", model, "-o", a, *upstream.split()], capsys)
    assert code == 0, err
    code, _, err = _run(["-i", model, "-o", b, *native.split()], capsys)
    assert code == 0, err
    assert file_sha256(a) == file_sha256(b)


def test_int8_means_tensorwise_and_row_means_per_row(model, tmp_path, capsys):
    """What convert-to-quant 1.3.4 writes for these lines (checked against its output): --int8 alone
    is one scale per tensor, --scaling_mode row one scale per output row."""
    for flags, shape in (("--int8", ()), ("--int8 --scaling_mode row", (192, 1))):
        o = tmp_path / "o.safetensors"
        assert _run(["-i", model, "-o", o, "--overwrite", *flags.split()], capsys)[0] == 0
        with SafetensorsReader(str(o)) as r:
            assert r.info("double_blocks.0.img_attn.qkv.weight_scale").shape == shape


def test_int8_without_optimizer_says_what_runs(model, tmp_path, capsys):
    code, out, _ = _run(["-i", model, "-o", tmp_path / "o.safetensors", "--int8"], capsys)
    assert code == 0
    assert "Prodigy" in out and "round-to-nearest" in out
    code, out, _ = _run(["-i", model, "-o", tmp_path / "p.safetensors", "--int8", "--simple"], capsys)
    assert code == 0 and "Prodigy" not in out


@pytest.mark.parametrize("upstream,words", REFUSED, ids=[u for u, _ in REFUSED])
def test_upstream_line_refused_with_one_line(upstream, words, model, tmp_path, capsys):
    out_path = tmp_path / "o.safetensors"
    code, out, err = _run(["-i", model, "-o", out_path, *upstream.split()], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out_path.exists() and os.listdir(tmp_path) == []


def test_upstream_help_sections_print_our_help(capsys):
    for flag in ("--help-learned", "-hl", "--help-experimental", "-hm"):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([flag])
        assert e.value.code == 0
        assert "--scaling_mode" in capsys.readouterr().out


def test_refused_flags_are_not_in_help(capsys):
    text = cli.build_parser().format_help()
    for flag in ("--heur", "--nvfp4", "--extract-lora", "--gemma4", "--help-learned", "block3d", "mxfp8"):
        assert flag not in text


def test_manual_seed_minus_one_only(model, tmp_path, capsys):
    for bad in ("-2", "-1.0"):
        code, _, err = _run(["-i", model, "-o", tmp_path / "o.safetensors", "--manual_seed", bad], capsys)
        assert code == 2 and "--manual_seed" in err and "-1: random" in err, err
