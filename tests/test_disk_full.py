"""Issue 8: a full disk gives one clear error, removes the ``.partial`` file, leaves the input alone, and
the rerun (with space) writes the byte-identical file.

Three ways to run out of space, from most to least real:
* a real 64 KiB tmpfs mounted in a private mount namespace (``unshare -rm``; skipped with the reason
  where user namespaces are not available), once with ``posix_fallocate`` (refused up front) and once
  without it (the writes themselves hit ENOSPC part-way);
* ``RLIMIT_FSIZE`` in a subprocess (works unprivileged everywhere): the kernel refuses to grow the file;
* a fake file system in-process: ``posix_fallocate`` unsupported and ``pwrite`` raising ENOSPC after a
  number of bytes -- the failure lands in the middle of the tensor stream.
"""
import errno
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from convert_to_quant.quant_core import cli, metrics
from convert_to_quant.quant_core import safetensors_io as sio
from convert_to_quant.quant_core.errors import OutputPathError
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.safetensors_io import save_file

from helpers import file_sha256

N_LAYERS, WIDTH = 8, 256  # output ~0.5 MB: far over the 64 KiB tmpfs and the 100 kB file-size limit


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("disk_full_model")
    g = torch.Generator().manual_seed(1)
    sd = {f"layers.{i}.proj.weight": (torch.randn(WIDTH, WIDTH, generator=g) * 0.05).bfloat16()
          for i in range(N_LAYERS)}
    path = str(d / "model.safetensors")
    save_file(sd, path)
    ref = str(d / "reference.safetensors")
    convert_file(path, ref)
    return path, file_sha256(path), file_sha256(ref)


def _leftovers(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".partial") or f.startswith(".tmp-"))


# ------------------------------------------------------------------------------------------------
# a real tmpfs
# ------------------------------------------------------------------------------------------------
def _tmpfs_available():
    if not shutil.which("unshare"):
        return "the unshare tool is not installed"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


@pytest.mark.parametrize("fallocate", [True, False], ids=["fallocate", "no-fallocate"])
def test_real_tmpfs_full(tmp_path, model, fallocate):
    why = _tmpfs_available()
    if why:
        pytest.skip(why)
    model_path, model_hash, ref_hash = model
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out.safetensors"
    prelude = "" if fallocate else "import os; del os.posix_fallocate\n"  # writes then fail part-way
    code = (prelude + "import sys\nfrom convert_to_quant.quant_core.cli import main\n"
            f"sys.exit(main(['-i', {model_path!r}, '-o', {str(out)!r}, '--verbose', 'MINIMAL']))\n")
    script = tmp_path / "run.py"
    script.write_text(code)
    # inside the namespace: mount, convert, report the exit code and what is left on the tmpfs
    sh = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && "
          f"{sys.executable} {script}; echo \"rc=$?\"; ls -A {mnt}; echo end-of-listing")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", sh], capture_output=True, text=True, timeout=300)
    assert "rc=2" in r.stdout, (r.stdout, r.stderr)
    listing = r.stdout.split("rc=2", 1)[1].split("end-of-listing")[0].split()
    assert listing == [], f"left on the full tmpfs: {listing}"
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "out.safetensors" in err_lines[0] and "no space left on the device" in err_lines[0], err_lines
    assert file_sha256(model_path) == model_hash
    # rerun where there is space: the identical file
    assert convert_file(model_path, str(tmp_path / "again.safetensors")).output_path
    assert file_sha256(tmp_path / "again.safetensors") == ref_hash


# ------------------------------------------------------------------------------------------------
# RLIMIT_FSIZE (unprivileged)
# ------------------------------------------------------------------------------------------------
def test_file_size_limit_in_a_subprocess(tmp_path, model):
    model_path, model_hash, ref_hash = model
    out = tmp_path / "out.safetensors"
    limit = 100_000

    def cap():  # runs in the child before exec; Python ignores SIGXFSZ, so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "convert_to_quant", "-i", model_path, "-o", str(out)],
                       capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, r.stderr
    assert f"cannot write {out}" in err_lines[0] and "file-size limit" in err_lines[0], err_lines
    assert not out.exists() and _leftovers(tmp_path) == []
    assert file_sha256(model_path) == model_hash
    assert cli.main(["-i", model_path, "-o", str(out), "--verbose", "MINIMAL"]) == 0
    assert file_sha256(out) == ref_hash


# ------------------------------------------------------------------------------------------------
# a fake file system: ENOSPC part-way through the tensor stream
# ------------------------------------------------------------------------------------------------
class FakeFullDisk:
    """``posix_fallocate`` unsupported (as on some network file systems) and ``pwrite`` failing with
    ENOSPC once ``capacity`` bytes were written."""

    def __init__(self, monkeypatch, capacity):
        self.capacity, self.written, self.failed = capacity, 0, 0
        self.real_pwrite = os.pwrite

        def fallocate(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        def pwrite(fd, data, offset):
            n = len(memoryview(data).cast("B"))
            if self.written + n > self.capacity:
                self.failed += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += n
            return self.real_pwrite(fd, data, offset)

        monkeypatch.setattr(sio.os, "posix_fallocate", fallocate)
        monkeypatch.setattr(sio.os, "pwrite", pwrite)


def test_enospc_mid_stream_through_the_api(tmp_path, model, monkeypatch):
    model_path, model_hash, ref_hash = model
    out = tmp_path / "out.safetensors"
    disk = FakeFullDisk(monkeypatch, capacity=300_000)  # the header and about half the layers fit
    with pytest.raises(OutputPathError, match=rf"cannot write {out} \(0\.5 MB\): no space left on the device; "
                                              "nothing was written"):
        convert_file(model_path, str(out))
    assert disk.failed == 1 and disk.written > 100_000  # it really failed part-way
    assert not out.exists() and _leftovers(tmp_path) == []
    assert file_sha256(model_path) == model_hash
    monkeypatch.undo()
    convert_file(model_path, str(out))
    assert file_sha256(out) == ref_hash


def test_enospc_mid_stream_through_the_cli(tmp_path, model, monkeypatch, capsys):
    model_path, _, ref_hash = model
    out = tmp_path / "out.safetensors"
    FakeFullDisk(monkeypatch, capacity=200_000)
    assert cli.main(["-i", model_path, "-o", str(out), "--verbose", "MINIMAL"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "no space left on the device" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and _leftovers(tmp_path) == []


def test_enospc_while_writing_the_report(tmp_path, model, monkeypatch):
    """The model is complete and verified when the report is written; a full disk then is a clear error
    that says so, and the report's temporary file is removed."""
    model_path, _, ref_hash = model
    out = tmp_path / "out.safetensors"
    real_fdopen = metrics.os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "fdopen", lambda fd, *a, **k: FullFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(OutputPathError, match=r"out\.safetensors was written, but the quality report .*report\.json "
                                              r"could not be: No space left on device"):
        convert_file(model_path, str(out), ConvertOptions(report_path=str(tmp_path / "report.json")))
    assert _leftovers(tmp_path) == [] and not (tmp_path / "report.json").exists()
    assert file_sha256(out) == ref_hash  # complete and correct


def test_fallocate_enospc_is_refused_before_any_tensor(tmp_path, model, monkeypatch):
    """Where ``posix_fallocate`` works, a disk without room is refused before a single tensor is read."""
    model_path, _, _ = model
    out = tmp_path / "out.safetensors"

    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    reads = []
    real_get = sio.SafetensorsReader.get
    monkeypatch.setattr(sio.os, "posix_fallocate", fallocate)
    monkeypatch.setattr(sio.SafetensorsReader, "get", lambda self, k: reads.append(k) or real_get(self, k))
    with pytest.raises(OutputPathError, match="no space left on the device"):
        convert_file(model_path, str(out))
    assert reads == [] and not out.exists() and _leftovers(tmp_path) == []
