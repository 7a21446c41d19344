"""The command line as a new user meets it: --help, --version, default names, hints, summaries,
messages, file modes, progress output."""
import argparse
import os
import re
import stat

import pytest
import torch

from convert_to_quant import __version__
from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.errors import OutputPathError
from convert_to_quant.quant_core.formats import spec_from_choice
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions, build_plan
from convert_to_quant.quant_core.safetensors_io import TensorInfo

from helpers import tiny_dit, write_model


@pytest.fixture
def dit(tmp_path):
    return write_model(tmp_path / "flux_tiny.safetensors", tiny_dit(width=64, blocks=1))


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_every_option_explained_defaults_once_and_true():
    parser = cli.build_parser()
    fmt = parser._get_formatter()
    shown = [a for a in parser._actions if a.help is not argparse.SUPPRESS]
    assert len(shown) > 90
    for a in shown:
        text = fmt._get_help_string(a)
        assert text and text.strip(), f"{a.option_strings} has no help text"
        assert len(re.findall(r"\(default[: ]", text)) <= 1, (a.option_strings, text)
        if "(default: %(default)s)" in text:  # the appended default is the parser's real one
            assert a.default is not None and a.default is not False
    help_text = parser.format_help()
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    # groups as the seed README / SEED_NOTES group them
    groups = [g.title for g in parser._action_groups if g.title]
    for title in ("input / output", "format", "mixed precision", "presets", "optimizer",
                  "calibration / SmoothQuant", "memory", "quality", "LoRA merge"):
        assert title in groups
    # a stated default matches what parsing gives
    ns = parser.parse_args(["-i", "x.safetensors"])
    assert ns.num_iter == 1000 and ns.scaling_mode == "axis" and ns.block_size == 128
    assert re.search(r"--num_iter.*\n.*default: 1000", help_text)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"convert_to_quant {__version__}"


def test_fp16_default_name_says_fp16(tmp_path, dit, capsys):
    code, out, err = run_cli(["-i", dit, "--fp16"], capsys)
    assert code == 0, err
    assert (tmp_path / "flux_tiny_fp16.safetensors").exists()
    assert not (tmp_path / "flux_tiny_int8.safetensors").exists()
    assert "flux_tiny_fp16.safetensors" in out
    # the API names it the same way
    res = convert_file(dit, None, ConvertOptions(plan=PlanOptions(spec=spec_from_choice("fp16")),
                                                 overwrite=True))
    assert res.output_path.endswith("flux_tiny_fp16.safetensors")


def _infos(keys):
    return {k: TensorInfo(k, "F32", (64, 64), 0, 64 * 64 * 4) for k in keys}


def test_family_hint_only_where_the_preset_changes_something():
    keys = ["encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"]
    # the default skip list already keeps the embedding table: --bert would change nothing
    assert not any("bert" in n for n in build_plan(_infos(keys), PlanOptions()).notes)
    notes = build_plan(_infos(keys), PlanOptions(default_skip=False)).notes
    assert any("'bert'" in n and "1 more tensor" in n for n in notes), notes
    assert not any("bert" in n for n in build_plan(_infos(keys), PlanOptions(presets=["bert"])).notes)


def test_summary_gives_fallback_reasons(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.fc.weight": torch.randn(64, 96, generator=g) for i in range(3)}
    sd["blocks.0.proj.weight"] = torch.randn(64, 128, generator=g)
    src = write_model(tmp_path / "m.safetensors", sd)
    code, out, err = run_cli(["-i", src, "-o", tmp_path / "o.safetensors", "--scaling_mode", "block",
                              "--block_size", "64"], capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("layers quantized"))
    assert "fallback: 3 (3: in_features not divisible by block size 64 -> " in line, line


def test_api_errors_name_parameters_cli_names_flags(tmp_path, dit, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(OutputPathError) as e:
        convert_file(dit, str(out), ConvertOptions())
    assert "overwrite=True" in str(e.value) and "--" not in str(e.value).split("exists", 1)[1]
    code, _, err = run_cli(["-i", dit, "-o", out], capsys)
    assert code == 2 and "(pass --overwrite to replace it)" in err and "overwrite=True" not in err


def test_report_and_template_get_the_model_file_mode(tmp_path, dit, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o.safetensors"
        assert run_cli(["-i", dit, "-o", out, "--report-quality"], capsys)[0] == 0
        assert run_cli(["-i", dit, "--dry-run", "create-template"], capsys)[0] == 0
        mode = stat.S_IMODE(os.stat(out).st_mode)
        assert mode == 0o644
        for p in (tmp_path / "o_quality.json", tmp_path / "o_quality.md", tmp_path / "flux_tiny_layer_config.json"):
            assert stat.S_IMODE(os.stat(p).st_mode) == mode, p
    finally:
        os.umask(old)


def test_progress_without_a_terminal_is_plain_lines(tmp_path, dit, capsys):
    code, out, err = run_cli(["-i", dit, "-o", tmp_path / "o.safetensors"], capsys)  # stderr: not a tty
    assert code == 0
    assert "\r" not in err and "\r" not in out
    lines = [l for l in err.splitlines() if l.startswith("progress: ")]
    assert 2 <= len(lines) <= 11, err
    m = re.match(r"progress: (\d+)/(\d+) layers", lines[-1])
    assert m and m.group(1) == m.group(2)
    code, out, err = run_cli(["-i", dit, "-o", tmp_path / "p.safetensors", "--verbose", "MINIMAL"], capsys)
    assert code == 0 and "progress" not in err


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    from convert_to_quant.quant_core.progress import ProgressBar

    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    s = Tty()
    bar = ProgressBar(cli.Console(1), stream=s)
    for i in range(1, 6):
        bar.update(i, 5, f"layer{i}")
    bar.close()
    assert "\r" in s.text and "progress:" not in s.text
