"""End-to-end conversion: files we write, their metadata, their quality numbers, comfy-kitchen agreement,
and the foundation's error cases."""
import json
import math
import os
import shutil
import struct

import pytest
import torch

from convert_to_quant.quant_core.errors import (BadWeightsError, ConvertError, OutputPathError,
                                                SafetensorsFormatError)
from convert_to_quant.quant_core.formats import make_spec, parse_comfy_quant
from convert_to_quant.quant_core.loading import load_quantized_file, read_quantized_layers
from convert_to_quant.quant_core.metrics import error_stats
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader, load_file

from helpers import file_sha256, tiny_dit, write_model

SPECS = {"row": make_spec(), "tensor": make_spec(scaling_mode="tensor"),
         "convrot": make_spec(convrot=True, convrot_groupsize=64), "block": make_spec(scaling_mode="block"),
         "fp16": make_spec(format="fp16")}


def opts(spec="row", **kw):
    return ConvertOptions(plan=PlanOptions(spec=SPECS[spec], presets=kw.pop("presets", ["auto"])), **kw)


@pytest.fixture
def dit_file(tmp_path):
    sd = tiny_dit()
    sd["patch_embedding.weight"] = torch.randn(32, 16, 1, 2, 2).to(torch.bfloat16)  # 5-D conv passes through
    return write_model(tmp_path / "dit.safetensors", sd, metadata={"modelspec.title": "tiny", "author": "t"})


@pytest.mark.parametrize("spec", list(SPECS))
def test_minilm_report_matches_the_written_file(tmp_path, minilm_path, spec):
    out = str(tmp_path / "m.safetensors")
    res = convert_file(minilm_path, out, opts(spec, report_path=str(tmp_path / "r.json")))
    original = load_file(minilm_path)
    deq, layers = load_quantized_file(out)
    rep = json.load(open(tmp_path / "r.json"))
    assert (tmp_path / "r.md").exists()
    n_quant = 0
    for base, lq in rep["layers"].items():
        if not lq["quantized"]:
            assert torch.equal(deq[base + ".weight"], original[base + ".weight"])
            continue
        n_quant += 1
        st = error_stats(original[base + ".weight"], deq[base + ".weight"])
        if st["sqnr_db"] == math.inf:  # lossless (MiniLM's fp32 weights are exactly fp16-representable)
            assert "sqnr_db" not in lq and lq["exact"] is True and spec == "fp16"
        else:
            assert lq["sqnr_db"] == pytest.approx(st["sqnr_db"], abs=1e-9)
        assert lq["mse"] == pytest.approx(st["mse"], rel=1e-9, abs=1e-30)
        assert lq["max_abs_err"] == pytest.approx(st["max_abs_err"], rel=1e-6)
    assert n_quant == rep["summary"]["layers_quantized"] == 37  # 36 encoder linears + pooler
    assert rep["summary"]["layers_kept"] == 3  # the bert preset keeps the 3 embedding tables
    if spec != "fp16":
        assert rep["summary"]["mean_sqnr_db"] > (25 if spec == "tensor" else 30)
    assert res.report.summary["bytes_out"] == os.path.getsize(out)


@pytest.mark.parametrize("spec", ["row", "tensor", "convrot", "block"])
def test_metadata_agrees_and_input_metadata_is_preserved(dit_file, tmp_path, spec):
    out = str(tmp_path / "o.safetensors")
    convert_file(dit_file, out, opts(spec, presets=[]))
    with SafetensorsReader(out) as r:
        assert r.metadata["modelspec.title"] == "tiny" and r.metadata["author"] == "t"
        meta = json.loads(r.metadata["_quantization_metadata"])
        assert meta["format_version"] == "1.0"
        per_layer = {k[:-len(".comfy_quant")]: parse_comfy_quant(r.get(k)) for k in r.keys()
                     if k.endswith(".comfy_quant")}
        assert per_layer == meta["layers"] and len(per_layer) > 0
        for base, cfg in per_layer.items():
            assert r.info(base + ".weight").dtype == torch.int8
            scale = r.info(base + ".weight_scale")
            if cfg["format"] == "int8_blockwise":
                assert len(scale.shape) == 2 and cfg["group_size"] == 128
            elif spec == "tensor":
                assert scale.shape == ()
            else:
                assert scale.shape == (r.info(base + ".weight").shape[0], 1)
            if spec == "convrot":
                assert cfg == {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}
        # everything that is not a quantized weight is copied byte-identically
        src = load_file(dit_file)
        for k, t in src.items():
            if k[:-len(".weight")] not in per_layer:
                assert torch.equal(r.get(k), t) and r.get(k).dtype == t.dtype, k


def test_every_core_layer_dequantizes_identically_in_comfy_kitchen(tmp_path, minilm_path):
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.base import QuantizedTensor
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout
    for spec in ("row", "tensor", "convrot"):
        out = str(tmp_path / f"{spec}.safetensors")
        convert_file(minilm_path, out, opts(spec))
        with SafetensorsReader(out) as r:
            layers, _ = read_quantized_layers(r, torch.float32)
        for base, qw in layers.items():
            p = TensorWiseINT8Layout.Params(scale=qw.scale, orig_dtype=torch.float32,
                                            orig_shape=tuple(qw.qdata.shape), convrot=qw.params.convrot,
                                            convrot_groupsize=qw.params.convrot_groupsize)
            theirs = QuantizedTensor(qw.qdata, "TensorWiseINT8Layout", p).dequantize()
            ours = qw.dequantize()
            assert float((theirs - ours).abs().max()) <= 1e-6 * float(ours.abs().max()), base


def test_convrot_fallback_is_reported(tmp_path, minilm_path):
    res = convert_file(minilm_path, str(tmp_path / "c.safetensors"),
                       ConvertOptions(plan=PlanOptions(spec=make_spec(convrot=True), presets=["auto"])))
    layers = res.report.to_dict()["layers"]
    fb = [b for b, l in layers.items() if l.get("fallback")]
    # 384-wide inputs cannot use g=256: they fall back to g=64 and the report says so
    assert len(fb) == 31 and "384" in layers[fb[0]]["fallback"] and "convrot64" in layers[fb[0]]["fallback"]
    assert res.report.summary["layers_fallback"] == 31


def test_default_output_path_and_never_overwrite_input(tmp_path, dit_file):
    res = convert_file(dit_file, None, opts(presets=[]))
    assert res.output_path == str(tmp_path / "dit_int8.safetensors")
    before = file_sha256(dit_file)
    with pytest.raises(OutputPathError, match="is the input"):
        convert_file(dit_file, dit_file, opts(presets=[]))
    link = tmp_path / "link.safetensors"
    os.symlink(dit_file, link)
    with pytest.raises(OutputPathError, match="is the input"):
        convert_file(dit_file, str(link), opts(presets=[], overwrite=True))
    assert file_sha256(dit_file) == before
    with pytest.raises(OutputPathError, match="already exists"):
        convert_file(dit_file, res.output_path, opts(presets=[]))


def _assert_clean(tmp_path, input_path, before_hash):
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".partial") or p.startswith("out")]
    assert leftovers == []
    if before_hash is not None:
        assert file_sha256(input_path) == before_hash


def test_nan_and_inf_weights_are_refused_and_leave_nothing(tmp_path):
    for bad in (float("nan"), float("inf")):
        sd = tiny_dit()
        w = sd["double_blocks.1.img_mlp.0.weight"].clone()
        w[3, 5] = bad
        sd["double_blocks.1.img_mlp.0.weight"] = w
        src = write_model(tmp_path / "nan.safetensors", sd)
        h = file_sha256(src)
        with pytest.raises(BadWeightsError, match=r"double_blocks\.1\.img_mlp\.0\.weight.*(NaN|Inf)"):
            convert_file(src, str(tmp_path / "out.safetensors"), opts(presets=[]))
        _assert_clean(tmp_path, src, h)
        # policy "keep": that layer stays in high precision and the report says so
        res = convert_file(src, str(tmp_path / "kept.safetensors"), opts(presets=[], nan_policy="keep",
                                                                         overwrite=True))
        assert not res.report.layers["double_blocks.1.img_mlp.0"].quantized
        assert "non-finite" in res.report.layers["double_blocks.1.img_mlp.0"].reason


def _corrupt(path, how):
    data = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if how == "truncated":
        return bytes(data[: len(data) - 100])
    if how == "header_too_long":
        return struct.pack("<Q", len(data) + 10) + bytes(data[8:])
    k = next(k for k in header if k != "__metadata__")
    if how == "bad_offsets":
        header[k]["data_offsets"] = [header[k]["data_offsets"][0] + 2, header[k]["data_offsets"][1] + 2]
    if how == "unknown_dtype":
        header[k]["dtype"] = "F7"
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + bytes(data[8 + n:])


@pytest.mark.parametrize("how,msg", [("truncated", "truncated"), ("header_too_long", "beyond the end"),
                                     ("bad_offsets", "(overlap|hole|past|ends at|bytes after)"),
                                     ("unknown_dtype", "unknown dtype")])
def test_broken_inputs_are_clear_errors(tmp_path, dit_file, how, msg):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(_corrupt(dit_file, how))
    h = file_sha256(bad)
    with pytest.raises(SafetensorsFormatError, match=msg):
        convert_file(str(bad), str(tmp_path / "out.safetensors"), opts(presets=[]))
    _assert_clean(tmp_path, str(bad), h)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permissions cannot be tested as root")
def test_unwritable_output_dir_nonroot(tmp_path, dit_file):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            convert_file(dit_file, str(d / "out.safetensors"), opts(presets=[]))
    finally:
        d.chmod(0o700)


def test_unwritable_output_dir(tmp_path, dit_file, monkeypatch):
    # works as root too: the check consults os.access, which we make say "no" for that folder only
    d = tmp_path / "ro"
    d.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if os.path.abspath(p) == str(d) else real(p, m))
    with pytest.raises(OutputPathError, match="not writable"):
        convert_file(dit_file, str(d / "out.safetensors"), opts(presets=[]))
    assert os.listdir(d) == []
    with pytest.raises(OutputPathError, match="does not exist"):
        convert_file(dit_file, str(tmp_path / "nope" / "out.safetensors"), opts(presets=[]))


def test_already_quantized_input_is_refused(tmp_path, dit_file):
    out = str(tmp_path / "q.safetensors")
    convert_file(dit_file, out, opts(presets=[]))
    with pytest.raises(ConvertError, match="already quantized"):
        convert_file(out, str(tmp_path / "qq.safetensors"), opts(presets=[]))


def test_verify_rechecks_checksums(tmp_path, dit_file):
    out = str(tmp_path / "v.safetensors")
    res = convert_file(dit_file, out, opts(presets=[], verify=True))
    assert os.path.exists(res.output_path)


def test_rerun_is_byte_identical(tmp_path, dit_file):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    convert_file(dit_file, a, opts("convrot", presets=["auto"]))
    convert_file(dit_file, b, opts("convrot", presets=["auto"]))
    assert file_sha256(a) == file_sha256(b)
