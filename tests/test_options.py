"""Typed optimizer options (issue 16): one dataclass per optimizer family, built alike from the CLI's
flags, the Quantize node's JSON and the API's dict; unknown keys, wrong types and out-of-range values are
errors naming the key, from all three; per-layer decisions live apart from the user's options."""
import dataclasses

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.node_options import quantize_node_options
from convert_to_quant.quant_core.optimizers import LayerContext, LayerDecisions, OptimizerOptions, get_optimizer
from convert_to_quant.quant_core.optimizers.base import optimizer_cost
from convert_to_quant.quant_core.optimizers.options import GPTQOptions
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.formats import make_spec

from helpers import write_model

BAD = (({"bogus": 1}, r"unknown option\(s\) 'bogus'"),
       ({"gptq_damp": "0.1"}, r"option 'gptq_damp' must be a finite number, got '0\.1'"),
       ({"num_iter": 2.5}, r"option 'num_iter' must be an integer, got float 2\.5"),
       ({"smoothquant_alpha": 1.5}, r"option 'smoothquant_alpha' must be a finite number in \[0, 1\], got float 1\.5"),
       ({"lr_schedule": "cosine"}, r"option 'lr_schedule' must be one of adaptive, exponential, plateau"),
       ({"row_segments": 4}, r"unknown option\(s\) 'row_segments' \(row_segments: decided per layer"))


@pytest.fixture
def model(tmp_path):
    g = torch.Generator().manual_seed(1)
    return write_model(tmp_path / "m.safetensors", {"fc.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16)})


@pytest.mark.parametrize("options,msg", BAD)
def test_api_refuses_unknown_keys_and_wrong_types_naming_the_key(model, tmp_path, options, msg):
    out = tmp_path / "o.safetensors"
    with pytest.raises(PlanError, match=msg):
        convert_file(model, str(out), ConvertOptions(optimizer="gptq", optimizer_options=options))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # nothing written


@pytest.mark.parametrize("options,msg", BAD)
def test_node_json_refuses_unknown_keys_and_wrong_types_naming_the_key(options, msg):
    import json
    with pytest.raises(PlanError, match="optimizer_options: " + msg):
        quantize_node_options("int8_tensorwise", "axis", 128, False, "256", "none", "gptq", 1000, 8.0773e-3, "cpu",
                              optimizer_options=json.dumps(options))


@pytest.mark.parametrize("argv,msg", ((["--bogus", "1"], "unrecognized arguments: --bogus 1"),
                                      (["--gptq-damp", "x"], "argument --gptq-damp/--gptq_damp: must be a finite number"),
                                      (["--num_iter", "2.5"], "argument --num_iter/--num-iter: must be an integer"),
                                      (["--smoothquant-alpha", "1.5"], "argument --smoothquant-alpha/--smoothquant_alpha: must be")))
def test_cli_refuses_unknown_flags_and_wrong_types_naming_the_flag(model, tmp_path, capsys, argv, msg):
    assert cli.main(["-i", model, "-o", str(tmp_path / "o.safetensors"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_the_three_entry_points_build_the_same_typed_options(model, tmp_path):
    """CLI flags, node JSON and API dict with the same values give equal typed options (defaults once)."""
    args = cli.build_parser().parse_args(["-i", model, "--optimizer", "adamw", "--num_iter", "7", "--gptq-damp", "0.1",
                                          "--quip-seed", "3", "--streaming-mode", "auto", "--bf16-compute", "off"])
    from_cli = OptimizerOptions.from_dict(cli.options_from_args(args).optimizer_options)
    from_node = OptimizerOptions.from_dict(quantize_node_options(
        "int8_tensorwise", "axis", 128, False, "256", "none", "adamw", 7, 8.0773e-3, "cpu",
        optimizer_options='{"gptq_damp": 0.1, "quip_seed": 3}').optimizer_options)
    from_api = OptimizerOptions.from_dict({"num_iter": 7, "gptq_damp": 0.1, "quip_seed": 3})
    assert from_cli == from_node == from_api
    assert from_api.gptq == GPTQOptions(gptq_damp=0.1) and from_api.learned_rounding.num_iter == 7
    assert from_api.user_dict() == {"num_iter": 7, "gptq_damp": 0.1, "quip_seed": 3}
    assert isinstance(OptimizerOptions.from_dict({"gptq_damp": 1}).gptq.gptq_damp, float)  # JSON 1 is a number


def test_layer_decisions_live_apart_from_the_users_options():
    """A dict handed to LayerContext (tests, old callers) has its decision keys split off; the typed
    options never hold them, and the optimizer reads them from ``ctx.decisions``."""
    ctx = LayerContext(base="x", options={"gptq_damp": 0.05, "row_segments": 2, "bf16_hessian": True})
    assert ctx.decisions == LayerDecisions(row_segments=2, bf16_hessian=True)
    assert ctx.options.user_dict() == {"gptq_damp": 0.05}
    assert ctx.options["row_segments"] == 2  # readable by name, as the older code reads options
    with pytest.raises(PlanError, match="unknown option"):
        LayerContext(base="x", options={"gptq_dmp": 0.05})
    # the decision reaches the sweep: 2 row segments = the same integers as 1 (rows are independent)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    spec = make_spec()
    a = get_optimizer("gptq")(w, spec, LayerContext(base="x"))
    b = get_optimizer("gptq")(w, spec, LayerContext(base="x", decisions=LayerDecisions(row_segments=2)))
    assert a.info["row_segments"] == 1 and b.info["row_segments"] == 2
    assert torch.equal(a.qw.qdata, b.qw.qdata)


def test_each_optimizer_declares_its_cost_beside_it():
    gptq, quip, adamw, rtn = (optimizer_cost(n) for n in ("gptq", "quip", "adamw", "rtn"))
    assert gptq is quip and gptq.row_sweep and not adamw.row_sweep and not rtn.row_sweep
    e = gptq.estimate(3072, 3072, False)
    assert e.factor == 20 * 3072 ** 2 and rtn.estimate(3072, 3072, False).hessian == 0
    assert gptq.time(3072, 3072) > rtn.time(3072, 3072)
    assert dataclasses.is_dataclass(e)
