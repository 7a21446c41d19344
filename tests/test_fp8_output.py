"""FP8 output (issue 16): ``float8_e4m3fn`` weights with one float32 scale per tensor, the comfy_quant
format ComfyUI core writes -- added as one format module (``quant_core/formats/fp8.py``)."""
import json

import pytest
import torch

from convert_to_quant import kernels
from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.calibration import LayerStats
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import Float8E4M3, spec_from_choice
from convert_to_quant.quant_core.fp8_input import open_input
from convert_to_quant.quant_core.loading import load_quantized_file
from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer
from convert_to_quant.quant_core.optimizers.objective import output_sqnr_db
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader, load_file

from helpers import write_model

SPEC = spec_from_choice("fp8")
# every finite float8_e4m3fn value, float64
GRID = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
GRID = torch.unique(GRID[torch.isfinite(GRID)])


@pytest.fixture
def model(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = {"a.weight": (torch.randn(96, 128, generator=g) * 0.03).to(torch.bfloat16),
         "a.bias": torch.randn(96, generator=g).to(torch.bfloat16),
         "b.weight": (torch.randn(128, 96, generator=g) * 3.0).to(torch.bfloat16)}
    return write_model(tmp_path / "m.safetensors", t), t


def test_file_keys_and_comfy_kitchen_dequantizes_it_bit_exactly(model, tmp_path, capsys):
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.fp8 import TensorCoreFP8Layout
    src, t = model
    out = tmp_path / "fp8.safetensors"
    assert cli.main(["-i", src, "-o", str(out), "--fp8", "--verbose", "MINIMAL"]) == 0, capsys.readouterr().err
    with SafetensorsReader(str(out)) as r:
        assert r.info("a.weight").dtype_name == "F8_E4M3" and r.info("a.weight_scale").shape == ()
        meta = json.loads(r.metadata["_quantization_metadata"])["layers"]
    assert meta == {"a": {"format": "float8_e4m3fn"}, "b": {"format": "float8_e4m3fn"}}
    sd = load_file(str(out))
    assert json.loads(bytes(sd["a.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    _, layers = load_quantized_file(str(out))
    for base in ("a", "b"):
        q, s = sd[base + ".weight"], sd[base + ".weight_scale"]
        assert s.dtype == torch.float32 and torch.equal(s, t[base + ".weight"].float().abs().amax() / 448.0)
        p = TensorCoreFP8Layout.Params(scale=s, orig_dtype=torch.float32, orig_shape=tuple(q.shape))
        theirs = QuantizedTensor(q, "TensorCoreFP8Layout", p).dequantize()
        ours = layers[base].dequantize()
        assert theirs.dtype == ours.dtype == torch.float32 and torch.equal(theirs, ours)  # bit for bit
    # our own fp8 input reader reads the file as the float model it stands for
    with open_input(str(out)) as r:
        assert torch.equal(r.get("a.weight"), layers["a"].dequantize())


def test_round_to_nearest_picks_the_nearest_fp8_value():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.logspace(-3, 1, 256)  # many binades, subnormals too
    qw = Float8E4M3.quantize(w, SPEC.params)
    x = w.double() / float(qw.scale)
    nearest = GRID[(x.reshape(-1, 1) - GRID.reshape(1, -1)).abs().argmin(1)].reshape(x.shape)
    got = qw.qdata.double()
    dist_got, dist_best = (x - got).abs(), (x - nearest).abs()
    assert torch.equal(dist_got, dist_best)  # nearest (a tie may pick either neighbour: same distance)
    assert torch.equal(qw.scale, w.abs().amax() / 448.0) and float(got.abs().max()) == 448.0


def _calibrated_layer(seed=0, out=128, inn=256):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    mix = torch.randn(inn, inn, generator=g) / inn ** 0.5
    x = torch.randn(4096, inn, generator=g) @ (torch.eye(inn) + 2 * mix)  # correlated inputs
    x[:, :4] *= 20  # a few outlier channels
    return w, LayerStats("l", x.T @ x, x.abs().amax(0), x.mean(0), 4096, 4096)


def test_gptq_on_the_fp8_grid_beats_round_to_nearest_by_at_least_1_db():
    w, st = _calibrated_layer()
    h = st.hessian_mean()
    rtn = Float8E4M3.quantize(w, SPEC.params).dequantize()
    res = get_optimizer("gptq")(w.clone(), SPEC, LayerContext(base="l", stats=st))
    assert res.qw.format == "float8_e4m3fn" and res.qw.qdata.dtype == torch.float8_e4m3fn
    assert bool(torch.isin(res.qw.qdata.double() / 1, GRID).all())  # every stored value is on the grid
    s_rtn, s_gptq = output_sqnr_db(w, rtn, h), output_sqnr_db(w, res.qw.dequantize(), h)
    print(f"fp8 output SQNR: rtn {s_rtn:.2f} dB, gptq {s_gptq:.2f} dB")
    assert s_gptq >= s_rtn + 1.0


@pytest.mark.parametrize("opt", ["original", "adamw", "radam"])
def test_learned_rounding_on_the_fp8_grid(opt):
    """Learned rounding on the E4M3 grid (each weight learns between the two values around it, the polish
    may move it further, as GPTQ does): every stored value is on the grid and the layer-output error beats
    round-to-nearest by at least 1 dB and GPTQ's (learning starts from GPTQ with calibration data)."""
    w, st = _calibrated_layer()
    h = st.hessian_mean()
    ctx = LayerContext(base="l", stats=st, options={"num_iter": 200})
    res = get_optimizer(opt)(w.clone(), SPEC, ctx)
    q = res.qw.qdata
    assert res.qw.format == "float8_e4m3fn" and q.dtype == torch.float8_e4m3fn
    assert bool(torch.isin(q.double(), GRID).all())
    rtn = Float8E4M3.quantize(w, SPEC.params).dequantize()
    gptq = get_optimizer("gptq")(w.clone(), SPEC, LayerContext(base="l", stats=st)).qw.dequantize()
    s_rtn, s_gptq, s_lr = (output_sqnr_db(w, x, h) for x in (rtn, gptq, res.qw.dequantize()))
    print(f"fp8 output SQNR: rtn {s_rtn:.2f} dB, gptq {s_gptq:.2f} dB, {opt} {s_lr:.2f} dB")
    assert s_lr >= s_rtn + 1.0
    assert s_lr >= s_gptq


def test_learned_rounding_writes_an_fp8_file(model, tmp_path):
    src, _ = model
    out = tmp_path / "x.safetensors"
    res = convert_file(src, str(out), ConvertOptions(plan=PlanOptions(spec=SPEC, default_skip=False),
                                                    optimizer="original", optimizer_options={"num_iter": 50}))
    with SafetensorsReader(str(out)) as r:
        assert r.get("a.weight").dtype == torch.float8_e4m3fn
    assert res.output_path == str(out)


def test_loader_runs_fp8_layers(model, tmp_path):
    """The runtime linear beside the format: on this machine (no sm89 GPU) the dequantized weight."""
    src, t = model
    out = str(tmp_path / "fp8.safetensors")
    convert_file(src, out, ConvertOptions(plan=PlanOptions(spec=SPEC)))
    _, layers = load_quantized_file(out)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    bias = t["a.bias"]
    y = kernels.quantized_linear(x, layers["a"], bias)
    ref = torch.nn.functional.linear(x, layers["a"].dequantize().to(torch.bfloat16), bias)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 96) and torch.equal(y, ref)
    with pytest.raises(PlanError, match="--fp8 stores float8_e4m3fn with one scale per tensor"):
        cli.validate_args(cli.build_parser().parse_args(["-i", src, "--fp8", "--scaling_mode", "block"]), None)
