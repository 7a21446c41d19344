"""Issue 8: fuzzing safetensors headers (hypothesis).

A valid small model is mutated -- raw bytes of the length prefix and header (flips, insertions,
deletions, truncation), and the parsed header's values replaced by arbitrary JSON -- then converted.
Every outcome must be a success whose output verifies, or a ``ConvertError`` subclass: never another
exception, a crash or a hang (hypothesis' deadline); never a ``.partial`` or output after an error;
never a changed input. A second fuzzer does the same to a *quantized* file read by our loader.

CI runs a bounded number of examples; ``FUZZ_EXAMPLES=20000`` runs a long campaign (numbers from one
are in docs/RELIABILITY.md). Each test prints its tally.
"""
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections import Counter

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from convert_to_quant.quant_core.errors import ConvertError  # noqa: E402
from convert_to_quant.quant_core.loading import load_quantized_file  # noqa: E402
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file  # noqa: E402
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader, save_file  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, derandomize="FUZZ_SEED" not in os.environ,
                suppress_health_check=list(HealthCheck), database=None)


def _valid_model() -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(16, 32, generator=g), "a.bias": torch.randn(16, generator=g),
          "b.weight": torch.randn(8, 16, generator=g).bfloat16(), "norm": torch.ones(4, dtype=torch.float16),
          "step": torch.tensor(7, dtype=torch.int64)}
    d = tempfile.mkdtemp()
    try:
        p = os.path.join(d, "m.safetensors")
        save_file(sd, p, metadata={"note": "fuzz base"})
        with open(p, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d)


def _quantized_model() -> bytes:
    d = tempfile.mkdtemp()
    try:
        src, out = os.path.join(d, "m.safetensors"), os.path.join(d, "q.safetensors")
        with open(src, "wb") as f:
            f.write(BASE)
        convert_file(src, out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d)


BASE = _valid_model()
BASE_QUANT = _quantized_model()


def split(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8:8 + n], blob[8 + n:]


# --- mutations ---------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "I8"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@st.composite
def byte_mutation(draw, base: bytes):
    n, header, data = split(base)
    blob = bytearray(base[:8 + n])  # length prefix + header are the attack surface
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "prefix"]))
        i = draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and blob:
            blob[i] = draw(st.sampled_from(b'{}[]",:0123456789-eE.\\ \x00\xff\x80tfn'))
        elif kind == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and blob:
            del blob[i:i + draw(st.integers(1, 8))]
        elif kind == "prefix":
            blob[0:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, 2 ** 63, 2 ** 64 - 1])
                                               if n > 1 else st.integers(0, 2 ** 64 - 1)))
    tail = data
    if draw(st.booleans()):  # sometimes also cut or extend the data section
        tail = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=16))
    return bytes(blob) + tail


@st.composite
def json_mutation(draw, base: bytes):
    """Replace, delete or add one value of the parsed header, keeping the length prefix consistent."""
    n, header, data = split(base)
    h = json.loads(header)
    keys = list(h)
    key = draw(st.sampled_from(keys + ["new.weight"]))
    if key == "new.weight" or draw(st.booleans()):
        h[key] = draw(json_values) if draw(st.booleans()) else {
            "dtype": draw(json_values), "shape": draw(json_values), "data_offsets": draw(json_values)}
    elif key == "__metadata__":
        h[key] = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    else:
        entry = dict(h[key])
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if draw(st.integers(0, 4)) == 0:
            entry.pop(field, None)
        elif field == "shape" and draw(st.booleans()):
            entry[field] = draw(st.lists(st.integers(-1, 2 ** 64), max_size=9))
        elif field == "data_offsets" and draw(st.booleans()):
            entry[field] = draw(st.lists(st.integers(-1, len(data) + 64), min_size=2, max_size=2))
        else:
            entry[field] = draw(json_values)
        h[key] = entry
    raw = json.dumps(h, allow_nan=True).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


# --- the property ------------------------------------------------------------------------------------
TALLY = {"convert": Counter(), "load": Counter()}


def _sha(p):
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _convert_property(blob: bytes):
    d = tempfile.mkdtemp(prefix="fuzz-")
    try:
        inp, out = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        with open(inp, "wb") as f:
            f.write(blob)
        h = _sha(inp)
        try:
            convert_file(inp, out, ConvertOptions(quality_threshold=None))
        except ConvertError as e:
            TALLY["convert"][type(e).__name__] += 1
            assert str(e), "an error without a message"
            assert not os.path.exists(out)
        else:
            TALLY["convert"]["converted"] += 1
            with SafetensorsReader(out) as r:  # a success must be a valid file
                for k in r.keys():
                    r.get(k)
        assert [f for f in os.listdir(d) if f.endswith(".partial")] == []
        assert _sha(inp) == h
    finally:
        shutil.rmtree(d)


def _load_property(blob: bytes):
    d = tempfile.mkdtemp(prefix="fuzzq-")
    try:
        p = os.path.join(d, "q.safetensors")
        with open(p, "wb") as f:
            f.write(blob)
        try:
            sd, layers = load_quantized_file(p)
        except ConvertError as e:
            TALLY["load"][type(e).__name__] += 1
            assert str(e)
        else:
            TALLY["load"]["loaded"] += 1
            for t in sd.values():
                assert isinstance(t, torch.Tensor)
    finally:
        shutil.rmtree(d)


@FUZZ
@given(st.one_of(byte_mutation(BASE), json_mutation(BASE)))
def test_fuzz_convert(blob):
    _convert_property(blob)


@FUZZ
@given(st.one_of(byte_mutation(BASE_QUANT), json_mutation(BASE_QUANT)))
def test_fuzz_quantized_loader(blob):
    _load_property(blob)


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    t0 = time.perf_counter()
    yield
    for what, c in TALLY.items():
        if c:
            print(f"\nfuzz {what}: {sum(c.values())} cases in {time.perf_counter() - t0:.1f} s (module total): "
                  f"{dict(c.most_common())}")


def test_the_fuzzer_reaches_both_outcomes(monkeypatch):
    """The properties are not vacuous: the unmutated bases convert/load, a known one-byte mutation is a
    ConvertError, and a planted bug (the header parser raising a plain ValueError) is caught."""
    before = Counter(TALLY["convert"]), Counter(TALLY["load"])
    _convert_property(BASE)
    _load_property(BASE_QUANT)
    assert TALLY["convert"]["converted"] == before[0]["converted"] + 1
    assert TALLY["load"]["loaded"] == before[1]["loaded"] + 1
    n, header, data = split(BASE)
    _convert_property(BASE[:8] + header.replace(b'"F32"', b'"F33"', 1) + data)
    assert TALLY["convert"]["SafetensorsFormatError"] == before[0]["SafetensorsFormatError"] + 1

    from convert_to_quant.quant_core import safetensors_io

    def buggy_parse(*a, **k):
        raise ValueError("planted bug")
    monkeypatch.setattr(safetensors_io, "parse_header", buggy_parse)
    with pytest.raises(ValueError, match="planted bug"):
        _convert_property(BASE)
