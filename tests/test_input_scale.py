"""Static activation scales (--input_scale / --static-activations) and the seed flags that must act
or be refused: --full_precision_matrix_mult, --quip-hadamard, --quip-seed, --calib_samples."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from convert_to_quant import kernels
from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.calibration import collect, load_calibration
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.loading import load_quantized_file
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture()
def tiny(tmp_path):
    m = Tiny()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 16, 64, generator=g) * (1 + i) for i in range(4)]
    cal = str(tmp_path / "cal.safetensors")
    collect(m, batches).save(cal)
    src = str(tmp_path / "tiny.safetensors")
    save_file({k: v.detach().clone() for k, v in m.state_dict().items()}, src)
    return m, src, cal, batches


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_input_scale_stored_from_calibration_absmax(tiny, tmp_path, capsys):
    m, src, cal, batches = tiny
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["-i", src, "-o", out, "--calibration-data", cal, "--input_scale", "--no-default-skip",
                            "--scaling_mode", "tensor"], capsys)
    assert code == 0, err
    # the abs-max the layers really saw, in float64
    x1 = torch.cat([b.reshape(-1, 64) for b in batches]).double()
    want1 = x1.abs().max() / 127
    want2 = torch.relu(x1 @ m.fc1.weight.double().t() + m.fc1.bias.double()).abs().max() / 127
    with SafetensorsReader(str(out)) as r:
        for base, want in (("fc1", want1), ("fc2", want2)):
            info = r.info(base + ".input_scale")
            assert info.dtype_name == "F32" and tuple(info.shape) == ()
            got = r.get(base + ".input_scale").double()
            assert torch.allclose(got, want, rtol=1e-5), (base, got, want)
    # the same through --static-activations: byte-identical
    out2 = tmp_path / "s.safetensors"
    assert run_cli(["-i", src, "-o", out2, "--calibration-data", cal, "--static-activations", "--no-default-skip",
                    "--scaling_mode", "tensor"], capsys)[0] == 0
    assert open(out, "rb").read() == open(out2, "rb").read()


def test_input_scale_only_where_the_raw_input_is_quantized(tiny, tmp_path):
    _, src, cal, _ = tiny
    opts = ConvertOptions(plan=PlanOptions(spec=make_spec(convrot=True, convrot_groupsize=64), default_skip=False),
                          calibration_data=cal, optimizer_options={"input_scale": True}, overwrite=True)
    res = convert_file(src, str(tmp_path / "c.safetensors"), opts)
    with SafetensorsReader(str(tmp_path / "c.safetensors")) as r:
        assert not any(k.endswith(".input_scale") for k in r.keys())
    assert any("rotated" in n for n in res.report.notes)


def test_input_scale_needs_calibration(tiny, tmp_path, capsys):
    _, src, _, _ = tiny
    out = tmp_path / "o.safetensors"
    for flag in ("--input_scale", "--static-activations"):
        code, _, err = run_cli(["-i", src, "-o", out, flag], capsys)
        assert code == 2 and err.count("\n") == 1 and f"{flag} stores scales measured" in err, err
    assert not out.exists()
    with pytest.raises(PlanError, match="input_scale needs calibration_data"):
        convert_file(src, str(out), ConvertOptions(optimizer_options={"input_scale": True}))
    assert not out.exists()


def test_static_kernel_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 64, generator=g)
    w = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    ws = torch.rand(32, 1, generator=g) * 0.01 + 1e-3
    bias = torch.randn(32, generator=g)
    s = torch.tensor(x.abs().max().item() / 127 * 0.5)  # half the range: the largest inputs clip
    y = kernels.int8_linear_static_input(x, w, ws, s, bias)
    q = torch.clamp(torch.round(x.double() / s.double()), -127, 127)
    ref = (q @ w.double().t()) * (ws.double().reshape(-1) * s.double()) + bias.double()
    assert y.shape == (5, 7, 32) and y.dtype == x.dtype
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert (x.abs() > 127 * s).any()  # clipping was exercised
    # a NaN / inf in a token gives that token's outputs NaN, not clipped plausible numbers
    xb = x.clone()
    xb[1, 2, 5] = float("nan")
    xb[3, 0, 9] = float("inf")
    yb = kernels.int8_linear_static_input(xb, w, ws, s, bias)
    bad = torch.zeros(5, 7, dtype=torch.bool)
    bad[1, 2] = bad[3, 0] = True
    assert bool(torch.isnan(yb[bad]).all()) and torch.equal(yb[~bad], y[~bad])


def test_runtime_uses_the_static_scale(tiny, tmp_path, monkeypatch):
    """With CONVERT_TO_QUANT_STATIC_INPUT=1 our loader's linear (kernels.quantized_linear, PreparedLinear)
    runs a layer that has an input_scale with it, and one without it per token: the two differ, and the
    static one equals the static kernel. By default (measured slower and less accurate) the stored scale
    is not used: per token, like a layer without one."""
    _, src, cal, batches = tiny
    out = str(tmp_path / "o.safetensors")
    opts = ConvertOptions(plan=PlanOptions(spec=make_spec(scaling_mode="tensor"), default_skip=False),
                          calibration_data=cal, optimizer_options={"input_scale": True}, overwrite=True)
    convert_file(src, out, opts)
    _, qlayers = load_quantized_file(out)
    qw = qlayers["fc1"]
    assert "input_scale" in qw.extra
    x = batches[0].reshape(-1, 64)
    dynamic = kernels.int8_linear(x, qw.qdata, qw.scale, None)
    assert torch.equal(kernels.quantized_linear(x, qw, None), dynamic)
    assert torch.equal(kernels.prepare_linear(qw)(x), dynamic)
    monkeypatch.setenv(kernels.STATIC_INPUT_ENV, "1")
    static = kernels.quantized_linear(x, qw, None)
    want = kernels.int8_linear_static_input(x, qw.qdata, qw.scale, qw.extra["input_scale"], None)
    assert torch.equal(static, want)
    assert torch.equal(kernels.prepare_linear(qw)(x), want)
    assert not torch.equal(static, dynamic)


def test_no_quip_hadamard_is_a_real_switch(tiny, tmp_path, capsys):
    _, src, _, _ = tiny
    outs = {}
    for flags in ((), ("--quip-hadamard",), ("--no-quip-hadamard",)):
        o = tmp_path / f"q{len(outs)}.safetensors"
        code, _, err = run_cli(["-i", src, "-o", o, "--optimizer", "quip", "--no-default-skip",
                                "--convrot-group-size", "64", *flags], capsys)
        assert code == 0, err
        with SafetensorsReader(str(o)) as r:
            outs[flags] = json.loads(bytes(r.get("fc1.comfy_quant").tolist()))
    assert outs[()] == outs[("--quip-hadamard",)] and outs[()].get("convrot") is True
    assert "convrot" not in outs[("--no-quip-hadamard",)]


@pytest.mark.parametrize("flags,words", [
    (["--full_precision_matrix_mult"], "CONVERT_TO_QUANT_KERNEL_PATH=dequant"),
    (["-fpmm"], "--full_precision_matrix_mult is not available yet"),
    (["--quip-seed", "3"], "--quip-store-transformed"),
    (["--optimizer", "quip", "--quip-seed", "3"], "--quip-store-transformed"),
    (["--quip-hadamard"], "need --optimizer quip"),
    (["--no-quip-hadamard"], "need --optimizer quip"),
    (["--optimizer", "quip", "--no-quip-hadamard", "--quip-store-transformed"], "without a rotation"),
    (["--calib_samples", "8"], "--calib_samples sets how many sentences --example captures"),
    (["--example", "--calib_samples", "8"], "--calib_samples has no effect here"),
    (["--input_scale", "--fp16", "--calibration-data", __file__], "--fp16 layers have none"),
])
def test_seed_flags_refused_where_they_would_do_nothing(flags, words, tiny, tmp_path, capsys):
    _, src, _, _ = tiny
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["-i", src, "-o", out, *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert not out.exists()
