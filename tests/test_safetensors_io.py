"""Reader/writer: interoperability with the safetensors library, streaming writes, atomicity."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save

from convert_to_quant.quant_core.errors import OutputPathError, SafetensorsFormatError
from convert_to_quant.quant_core.safetensors_io import (OutputEntry, SafetensorsReader, StreamingWriter,
                                                        load_file, save_file)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(5, generator=g).half(),
        "b.weight": torch.randint(-127, 128, (3, 4), dtype=torch.int8, generator=g),
        "b.weight_scale": torch.tensor(0.25),
        "c.conv": torch.randn(2, 3, 1, 2, 2, generator=g),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "flag": torch.tensor([True, False]),
    }


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    ts = sample_tensors()
    p = tmp_path / "lib.safetensors"
    st_save(ts, str(p), metadata={"modelspec.title": "x"})
    with SafetensorsReader(str(p)) as r:
        assert r.metadata == {"modelspec.title": "x"}
        for k, t in ts.items():
            got = r.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_library_reads_files_we_write(tmp_path):
    ts = sample_tensors()
    p = tmp_path / "ours.safetensors"
    save_file(ts, str(p), metadata={"k": "v"})
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, t in ts.items():
            assert torch.equal(f.get_tensor(k), t)
    # every tensor starts aligned to its item size (like the official writer)
    with SafetensorsReader(str(p)) as r:
        for info in r.infos.values():
            assert (r.data_start + info.begin) % info.dtype.itemsize == 0 or info.nbytes == 0


def test_streaming_writer_accepts_any_order_and_renames_atomically(tmp_path):
    ts = sample_tensors()
    p = tmp_path / "s.safetensors"
    entries = [OutputEntry(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]
    w = StreamingWriter(str(p), entries, {"m": "1"})
    for k in reversed(list(ts)):
        assert not p.exists() and (tmp_path / "s.safetensors.partial").exists()
        w.write(k, ts[k])
    w.finish()
    assert not (tmp_path / "s.safetensors.partial").exists()
    assert {k: torch.equal(v, ts[k]) for k, v in load_file(str(p)).items()} == {k: True for k in ts}


def test_writer_refuses_wrong_tensor_and_cleans_up_on_error(tmp_path):
    p = tmp_path / "e.safetensors"
    with pytest.raises(Exception, match="planned as"):
        with StreamingWriter(str(p), [OutputEntry("x", torch.float32, (2, 2))]) as w:
            w.write("x", torch.zeros(3, 3))
    assert not p.exists() and not (tmp_path / "e.safetensors.partial").exists()
    with pytest.raises(Exception, match="never written"):
        StreamingWriter(str(p), [OutputEntry("x", torch.float32, (2,))]).finish()
    assert not p.exists() and not (tmp_path / "e.safetensors.partial").exists()


def test_writer_does_not_overwrite_without_permission(tmp_path):
    p = tmp_path / "o.safetensors"
    p.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        StreamingWriter(str(p), [OutputEntry("x", torch.float32, (1,))])
    assert p.read_bytes() == b"keep me"


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob,msg", [
    (b"\x01\x02", "at least 8"),
    (struct.pack("<Q", 10_000) + b"{}", "beyond the end"),
    (struct.pack("<Q", 5) + b"hello", "not a JSON object"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated"),
    (_raw({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    (_raw({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12 bytes"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    (_raw({"x": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8), "needs"),
])
def test_bad_headers_are_clear_errors(tmp_path, blob, msg):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(SafetensorsFormatError, match=msg):
        SafetensorsReader(str(p))
