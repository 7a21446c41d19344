"""The quant_core helpers the ComfyUI nodes stand on, tested without ComfyUI (they run in CI):
``paths.publish_file`` (Save node) and ``model_quant`` (on-the-fly quantize node)."""
import errno
import os

import pytest
import torch

from convert_to_quant.quant_core.errors import OutputPathError
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors, tensor_infos
from convert_to_quant.quant_core.paths import publish_file
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file, output_path_in_folder
from convert_to_quant.quant_core.plan import PlanOptions
from convert_to_quant.quant_core.safetensors_io import load_file, read_header


def _file(path, data=b"finished model bytes"):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_publish_links_without_copy_and_keeps_source(tmp_path):
    src = _file(tmp_path / "tmp.safetensors")
    dst = str(tmp_path / "out" / "model.safetensors")
    os.makedirs(os.path.dirname(dst))
    publish_file(src, dst)
    assert open(dst, "rb").read() == b"finished model bytes"
    assert os.path.exists(src) and os.path.samefile(src, dst)  # one inode: no second copy on disk
    assert os.listdir(os.path.dirname(dst)) == ["model.safetensors"]


def test_publish_refuses_existing_unless_overwrite(tmp_path):
    src = _file(tmp_path / "tmp.safetensors", b"new")
    dst = _file(tmp_path / "model.safetensors", b"old")
    with pytest.raises(OutputPathError, match="already exists"):
        publish_file(src, dst)
    assert open(dst, "rb").read() == b"old"
    publish_file(src, dst, overwrite=True)
    assert open(dst, "rb").read() == b"new"
    assert not os.path.exists(dst + ".partial")


def test_publish_copies_across_file_systems(tmp_path, monkeypatch):
    src = _file(tmp_path / "tmp.safetensors", os.urandom(3 << 20))
    dst = str(tmp_path / "model.safetensors")

    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    publish_file(src, dst)
    assert open(dst, "rb").read() == open(src, "rb").read()
    assert not os.path.samefile(src, dst) and not os.path.exists(dst + ".partial")


def test_publish_failure_leaves_nothing(tmp_path, monkeypatch):
    src = _file(tmp_path / "tmp.safetensors")
    dst = str(tmp_path / "model.safetensors")

    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def broken_replace(a, b):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        publish_file(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["tmp.safetensors"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "bad\x00name", "C:\\x"])
def test_save_names_that_escape_are_refused(tmp_path, name):
    with pytest.raises(OutputPathError):
        output_path_in_folder(str(tmp_path), name)


def test_in_memory_quantization_equals_the_file_pipeline(tmp_path, minilm_path):
    """Quantizing a loaded model (on-the-fly node) stores exactly what converting its file stores."""
    sd = load_file(minilm_path)
    opts = PlanOptions(spec=make_spec(), presets=("auto",))
    plan = plan_for_tensors(sd, opts)
    mem = quantize_tensors(sd, plan)
    out = str(tmp_path / "minilm_int8.safetensors")
    convert_file(minilm_path, out, ConvertOptions(plan=opts, device="cpu"))
    disk = load_file(out)
    assert set(mem) == set(disk)
    for k in disk:
        assert mem[k].dtype == disk[k].dtype and torch.equal(mem[k], disk[k]), k
    assert len(plan.quantized_layers()) >= 36
    # tensors that are not quantized are passed through by reference (no copy of a loaded model)
    kept = next(k for k in sd if plan.layer_for_key(k) is None)
    assert mem[kept] is sd[kept]


def test_tensor_infos_match_a_real_header(minilm_path):
    sd = load_file(minilm_path)
    infos, _ = read_header(minilm_path)
    mine = tensor_infos(sd)
    for k, i in infos.items():
        assert (mine[k].dtype_name, mine[k].shape, mine[k].nbytes) == (i.dtype_name, i.shape, i.nbytes)


def test_in_memory_quantization_refuses_non_finite():
    from convert_to_quant.quant_core.errors import BadWeightsError
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    sd = {"layer.weight": w}
    plan = plan_for_tensors(sd, PlanOptions(spec=make_spec()))
    with pytest.raises(BadWeightsError, match="layer.weight"):
        quantize_tensors(sd, plan)
