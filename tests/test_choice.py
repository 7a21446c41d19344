"""One choice -> one file (issue 16): the CLI's flags and the Quantize node's widgets go through the same
``formats.spec_from_choice``, so the same choice writes byte-identical files, for every format x
optimizer pair that runs without calibration data."""
import json

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import FormatSpec, Int8Tensorwise, make_spec, spec_from_choice
from convert_to_quant.quant_core.node_options import quantize_node_options
from convert_to_quant.quant_core.pipeline import convert_file
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

from helpers import write_model

OPTIMIZERS = ("rtn", "gptq", "quip", "original", "adamw", "radam")
# node widgets (format, scaling, block_size, convrot, convrot_group_size) -> the same choice as CLI flags
FORMATS = {
    "int8_tensorwise/axis": (("int8_tensorwise", "axis", 128, False, "256"), []),
    "int8_tensorwise/tensor": (("int8_tensorwise", "tensor", 128, False, "256"), ["--scaling_mode", "tensor"]),
    "int8_tensorwise/convrot64": (("int8_tensorwise", "axis", 128, True, "64"),
                                  ["--convrot", "--convrot-group-size", "64"]),
    "int8_blockwise/64": (("int8_blockwise", "axis", 64, False, "256"), ["--scaling_mode", "block", "--block_size", "64"]),
    "fp16": (("fp16", "axis", 128, False, "256"), ["--fp16"]),
    "int8_quip": (("int8_quip", "axis", 128, False, "256"), ["--quip-store-transformed"]),
    "float8_e4m3fn": (("float8_e4m3fn", "axis", 128, False, "256"), ["--fp8"]),
}
NUM_ITER = 12  # learned rounding: enough steps to change integers, few enough for a quick test


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    t = {"blocks.0.fc1.weight": (torch.randn(128, 256, generator=g) * 0.05).to(torch.bfloat16),
         "blocks.0.fc1.bias": torch.randn(128, generator=g).to(torch.bfloat16),
         "blocks.0.fc2.weight": (torch.randn(256, 128, generator=g) * 0.05).to(torch.bfloat16),
         "blocks.0.norm.weight": torch.ones(256, dtype=torch.bfloat16)}
    return write_model(tmp_path_factory.mktemp("choice") / "m.safetensors", t)


def _cli(src, out, flags, optimizer):
    args = ["-i", src, "-o", out, "--optimizer", optimizer, "--num_iter", str(NUM_ITER), "--verbose", "MINIMAL",
            *flags]
    try:
        code = cli.main(args)
    except SystemExit as e:  # pragma: no cover - argparse never exits on errors here (Parser.error)
        code = e.code
    return code


def _node(src, out, widgets, optimizer):
    fmt, scaling, block, convrot, group = widgets
    opts = quantize_node_options(fmt, scaling, block, convrot, group, "none", optimizer, NUM_ITER, 8.0773e-3, "auto")
    return convert_file(src, out, opts)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("choice", sorted(FORMATS))
def test_cli_and_node_write_the_same_bytes(model, tmp_path, capsys, choice, optimizer):
    widgets, flags = FORMATS[choice]
    if choice == "int8_quip" and optimizer != "quip":
        # int8_quip is QuIP's own format: both refuse other calibrated or learned optimizers; the CLI says
        # --quip-store-transformed needs --optimizer quip (also for rtn, which the node allows)
        assert _cli(model, str(tmp_path / "c.safetensors"), flags, optimizer) == 2
        assert "needs --optimizer quip" in capsys.readouterr().err
        if optimizer != "rtn":
            with pytest.raises(PlanError, match="use optimizer quip"):
                _node(model, str(tmp_path / "n.safetensors"), widgets, optimizer)
        assert not list(tmp_path.iterdir())
        return
    c, n = tmp_path / "cli.safetensors", tmp_path / "node.safetensors"
    assert _cli(model, str(c), flags, optimizer) == 0, capsys.readouterr().err
    _node(model, str(n), widgets, optimizer)
    assert c.read_bytes() == n.read_bytes()
    with SafetensorsReader(str(c)) as r:
        meta = json.loads(r.metadata.get("_quantization_metadata", '{"layers": {}}'))["layers"]
    if choice == "fp16":
        assert meta == {}
    elif optimizer == "quip" and choice in ("int8_tensorwise/axis", "int8_tensorwise/convrot64"):
        # the fix: QuIP on per-row int8_tensorwise keeps its incoherence in the file (convrot), from the
        # node as from the CLI (the node used to write plain LDLQ)
        g = 64 if choice.endswith("convrot64") else 256
        assert meta["blocks.0.fc1"] == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": g}
    else:
        assert {m["format"] for m in meta.values()} == {widgets[0]}


def test_spec_from_choice_vocabulary():
    """axis and row name one thing; block with int8 selects int8_blockwise; the format's Params checks
    its own rules (one place), the choice only the rules that tie formats to optimizers / SmoothQuant."""
    assert spec_from_choice("int8", "axis") == spec_from_choice("int8_tensorwise", "row") == \
        FormatSpec("int8_tensorwise", Int8Tensorwise.Params(scaling="row"))
    assert spec_from_choice("int8", "block", 64).describe() == "int8_blockwise/64"
    assert spec_from_choice("int8_blockwise", "tensor", 32).describe() == "int8_blockwise/32"  # no scale choice
    assert spec_from_choice("int8", "axis", optimizer="quip").describe() == "int8_tensorwise/row+convrot256"
    assert spec_from_choice("int8", "tensor", optimizer="quip").describe() == "int8_tensorwise/tensor"
    assert spec_from_choice("int8", "tensor", smoothquant=True).describe() == "int8_smoothquant"
    assert spec_from_choice("fp16", smoothquant=True).format == "fp16"
    assert make_spec("int8", "axis", convrot=True, convrot_groupsize=64) == spec_from_choice("int8", None, None, True, 64)
    for kwargs, msg in (({"scaling": "rows"}, "unknown scaling mode 'rows'"),
                        ({"format": "fp16", "convrot": True}, "only available with int8_tensorwise"),
                        ({"format": "int8", "scaling": "tensor", "convrot": True}, "convrot needs per-row scaling"),
                        ({"format": "int8", "convrot": True, "convrot_groupsize": 32}, "group size must be one of"),
                        ({"format": "int8_blockwise", "block_size": 24}, "multiple of 16"),
                        ({"format": "int8_quip", "optimizer": "gptq"}, "use optimizer quip"),
                        ({"format": "int8", "convrot": True, "smoothquant": True}, "SmoothQuant stores"),
                        ({"format": "int4"}, "unknown format 'int4'")):
        with pytest.raises(PlanError, match=msg):
            spec_from_choice(**kwargs)
