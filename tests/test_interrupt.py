"""Issue 8: a conversion stopped part-way (Ctrl-C, SIGTERM, a cancel callback, a kill, a failed
verification) leaves no output and no ``.partial``; rerunning produces the byte-identical file.

The CLI runs as a real subprocess on a generated model. The test waits until the ``.partial`` file
holds the first layers' integers (read from the offsets in its own header), freezes the process with
SIGSTOP, checks nothing is in place yet, then delivers the signal and lets it continue -- so the
signal provably lands mid-conversion, however fast or slow the machine is.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.errors import ConversionCancelled, ConvertError
from convert_to_quant.quant_core.pipeline import ConversionJob, ConvertOptions, convert_file
from convert_to_quant.quant_core.safetensors_io import save_file

from helpers import file_sha256

N_LAYERS, WIDTH = 24, 512
WAIT_FOR_LAYER = 2  # signal once this layer's integers are in the .partial file


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A bf16 model big enough that a conversion spans many layers (24 x 512x512, 12.6 MB), and its
    reference conversion made without interruption."""
    d = tmp_path_factory.mktemp("interrupt_model")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(N_LAYERS):
        sd[f"blocks.{i}.fc.weight"] = (torch.randn(WIDTH, WIDTH, generator=g) * 0.02).bfloat16()
        sd[f"blocks.{i}.fc.bias"] = torch.zeros(WIDTH, dtype=torch.bfloat16)
    path = str(d / "model.safetensors")
    save_file(sd, path, metadata={"source": "test_interrupt"})
    ref = str(d / "reference.safetensors")
    convert_file(path, ref)
    return path, file_sha256(path), file_sha256(ref)


def _layer_written(partial: str, key: str) -> bool:
    """True once ``key``'s bytes in the preallocated (zero-filled) partial file are non-zero."""
    try:
        with open(partial, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            header = json.loads(f.read(n))
            begin, end = header[key]["data_offsets"]
            f.seek(8 + n + begin)
            return any(f.read(end - begin))
    except (OSError, ValueError, KeyError):
        return False


def _assert_clean(out):
    assert not os.path.exists(out), "an output file was left behind"
    assert not os.path.exists(out + ".partial"), "a .partial file was left behind"
    leftovers = [f for f in os.listdir(os.path.dirname(out)) if f.endswith(".partial") or f.startswith(".tmp-")]
    assert not leftovers, leftovers


def _start_and_freeze(model_path, out, *extra, stderr=subprocess.PIPE):
    """Start the CLI and SIGSTOP it once layer WAIT_FOR_LAYER is written; returns the stopped process."""
    proc = subprocess.Popen([sys.executable, "-m", "convert_to_quant", "-i", model_path, "-o", out,
                             "--verbose", "MINIMAL", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    key = f"blocks.{WAIT_FOR_LAYER}.fc.weight"
    deadline = time.monotonic() + 120
    while not _layer_written(out + ".partial", key):
        if proc.poll() is not None:
            raise AssertionError(f"the conversion ended before layer {WAIT_FOR_LAYER} was seen: "
                                 f"{proc.communicate()}")
        assert time.monotonic() < deadline, "no progress in 120 s"
        time.sleep(0.001)
    proc.send_signal(signal.SIGSTOP)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_conversion_leaves_nothing_and_rerun_is_identical(tmp_path, model, sig, capsys):
    model_path, model_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    proc = _start_and_freeze(model_path, out)
    try:
        # frozen part-way: layers are in the .partial file, the output does not exist yet
        assert os.path.exists(out + ".partial") and not os.path.exists(out)
        last = f"blocks.{N_LAYERS - 1}.fc.weight"
        assert not _layer_written(out + ".partial", last), "the conversion was already finished"
        proc.send_signal(sig)
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == \
        ["error: interrupted; no output file was left behind"], err
    _assert_clean(out)
    assert file_sha256(model_path) == model_hash

    # the rerun writes exactly the reference file
    assert cli.main(["-i", model_path, "-o", out, "--verbose", "MINIMAL"]) == 0
    assert file_sha256(out) == ref_hash
    _assert_clean_of_partials(tmp_path)


def _assert_clean_of_partials(d):
    assert not [f for f in os.listdir(d) if f.endswith(".partial")]


def test_sigkill_leaves_only_a_partial_that_the_rerun_replaces(tmp_path, model):
    """SIGKILL cannot be handled: the ``.partial`` stays (never under the output's name, so it cannot be
    mistaken for a model), and the next run deletes it and writes the identical file."""
    model_path, model_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    proc = _start_and_freeze(model_path, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert os.path.exists(out + ".partial") and not os.path.exists(out)
    convert_file(model_path, out)
    assert file_sha256(out) == ref_hash and not os.path.exists(out + ".partial")
    assert file_sha256(model_path) == model_hash


def test_check_cancel_through_the_api(tmp_path, model):
    model_path, model_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    calls = []

    def check_cancel():
        calls.append(1)
        if len(calls) > 2 * WAIT_FOR_LAYER:  # weight + bias per layer
            assert os.path.exists(out + ".partial")  # really mid-conversion
            raise ConversionCancelled("cancelled by the user")

    with pytest.raises(ConversionCancelled, match="cancelled by the user"):
        convert_file(model_path, out, check_cancel=check_cancel)
    _assert_clean(out)
    convert_file(model_path, out, check_cancel=lambda: None)
    assert file_sha256(out) == ref_hash
    assert file_sha256(model_path) == model_hash


def test_keyboard_interrupt_inside_a_layer_through_the_api(tmp_path, model, monkeypatch):
    """Ctrl-C arriving while a layer is being quantized (not between layers)."""
    model_path, _, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    real = ConversionJob.process
    seen = []

    def process(self, key, device=None):
        seen.append(key)
        if len(seen) == 7:
            raise KeyboardInterrupt
        return real(self, key, device)

    monkeypatch.setattr(ConversionJob, "process", process)
    with pytest.raises(KeyboardInterrupt):
        convert_file(model_path, out)
    _assert_clean(out)
    monkeypatch.setattr(ConversionJob, "process", real)
    convert_file(model_path, out)
    assert file_sha256(out) == ref_hash


def test_cli_cancel_exit_code(tmp_path, model, monkeypatch, capsys):
    """ConversionCancelled (what the nodes raise on /interrupt) reaching the CLI: exit 130, one line."""
    model_path, _, _ = model
    out = str(tmp_path / "out.safetensors")
    real = ConversionJob.process

    def process(self, key, device=None):
        if key.startswith("blocks.5."):
            raise ConversionCancelled("conversion cancelled")
        return real(self, key, device)

    monkeypatch.setattr(ConversionJob, "process", process)
    assert cli.main(["-i", model_path, "-o", out, "--verbose", "MINIMAL"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "error: conversion cancelled"
    _assert_clean(out)


def test_failed_verification_leaves_nothing(tmp_path, model, monkeypatch):
    """--verify re-reads every tensor against the SHA-256 taken when writing; a byte that changed on
    disk fails the run and no output appears (verification happens before the rename)."""
    model_path, model_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    from convert_to_quant.quant_core import safetensors_io

    real_finish = safetensors_io.StreamingWriter.finish

    def corrupting_finish(self, verify=None):
        def corrupt_then_verify(tmp):
            with open(tmp, "r+b") as f:  # flip one byte of the last tensor's data
                f.seek(os.path.getsize(tmp) - 1)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0xFF]))
            verify(tmp)
        return real_finish(self, corrupt_then_verify if verify else None)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "finish", corrupting_finish)
    with pytest.raises(ConvertError, match=r"verification of .*out\.safetensors\.partial failed: checksum of .* differs"):
        convert_file(model_path, out, ConvertOptions(verify=True))
    _assert_clean(out)
    monkeypatch.setattr(safetensors_io.StreamingWriter, "finish", real_finish)
    convert_file(model_path, out, ConvertOptions(verify=True))
    assert file_sha256(out) == ref_hash and file_sha256(model_path) == model_hash


def _blocked_writing_stderr(pid: int) -> bool:
    """The process's main thread sleeps in a write to a full pipe (Linux /proc)."""
    try:
        if "pipe_write" in open(f"/proc/{pid}/wchan").read():
            return True
        call = open(f"/proc/{pid}/syscall").read().split()
    except OSError:
        return False
    return call[:2] in (["1", "0x2"], ["64", "0x2"])  # write(2, ...) on x86-64 / arm64


def _signals_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["ShdPnd"], 16) != 0 or int(fields["SigPnd"], 16) != 0


def _wait_until(cond, proc, what):
    deadline = time.monotonic() + 120
    while not cond():
        assert proc.poll() is None, f"the process exited before {what}"
        assert time.monotonic() < deadline, f"not {what} after 120 s"
        time.sleep(0.001)


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="needs Linux /proc")
@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_repeated_signals_during_cleanup_still_exit_130(tmp_path, model, first):
    """Issue 14: more signals while the first one's cleanup runs. The process's stderr is a pipe this
    test keeps full, so after the first signal the process stops in the middle of its way out -- in the
    write of its ``error:`` line -- and the next signals (SIGTERM and SIGINT) provably land there. Then
    the pipe is drained and signals keep coming until the process has exited. Exit 130, that one line,
    nothing left on disk."""
    model_path, model_hash, _ = model
    out = str(tmp_path / "out.safetensors")
    r, w = os.pipe()
    proc = _start_and_freeze(model_path, out, stderr=w)
    try:
        os.set_blocking(w, False)
        junk = 0
        try:
            while True:
                junk += os.write(w, b"\n" * 4096)
        except BlockingIOError:
            pass
        os.set_blocking(w, True)  # the flag is shared with the process's end: its writes must block
        proc.send_signal(first)
    finally:
        proc.send_signal(signal.SIGCONT)
    _wait_until(lambda: _blocked_writing_stderr(proc.pid), proc, "writing to stderr")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _wait_until(lambda: not _signals_pending(proc.pid) and _blocked_writing_stderr(proc.pid), proc,
                "back in its write after the signals")
    os.close(w)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    while proc.poll() is None:  # and more, until it has exited
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
    reader.join(60)
    os.close(r)
    err = b"".join(chunks)[junk:].decode()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err == "error: interrupted; no output file was left behind\n", err
    _assert_clean(out)
    assert file_sha256(model_path) == model_hash


def test_repeated_signals_while_the_launcher_imports(tmp_path, model):
    """Signals that arrive while the CLI is still importing torch are noted, not raised inside a
    library's import; the run then stops before it reads anything: exit 130, one line, no file."""
    model_path, _, _ = model
    out = str(tmp_path / "out.safetensors")
    proc = subprocess.Popen([sys.executable, "-c",
                             "import os, signal\n"
                             "from convert_to_quant.quant_core import launcher\n"
                             "real = launcher.signal.signal\n"
                             "def hook(sig, handler):\n"  # the moment the import guard is installed ...
                             "    old = real(sig, handler)\n"
                             "    if sig == signal.SIGTERM and not getattr(hook, 'done', False):\n"
                             "        hook.done = True\n"
                             "        os.kill(os.getpid(), signal.SIGINT)\n"  # ... interrupts arrive
                             "        os.kill(os.getpid(), signal.SIGTERM)\n"
                             "    return old\n"
                             "launcher.signal.signal = hook\n"
                             f"launcher.sys.argv = ['convert_to_quant', '-i', {model_path!r}, '-o', {out!r}]\n"
                             "launcher.entry_point()\n"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err == "error: interrupted; no output file was left behind\n", err
    assert os.listdir(tmp_path) == []
