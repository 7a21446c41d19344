"""Output files: one writer per output name, atomic publishing, and the test-only pause points.

**One writer per output.** Every writer of an output file ``<out>`` (a conversion, ``save_file``,
calibration statistics, the ComfyUI Save node) first takes ``OutputLock(<out>)``: an exclusive
``flock`` on ``<out>.lock``, held until the file is published (and, for a conversion, its quality
report written). A second writer of the same output -- another process, or another thread of this one
-- fails at once with ``OutputBusyError`` ("another conversion is writing <out>") and touches nothing.
Only the lock holder creates, deletes or renames ``<out>.partial``. The writer also holds a ``flock``
on its ``.partial`` for the file's whole life, and ``remove_stale`` deletes a leftover ``.partial``
only when it can take that lock, i.e. when no live process holds it (its writer was killed). The lock
file is empty; the holder removes it on release, and a lock file left by a killed process is simply
taken over (the kernel released its lock) and removed by the next writer.

**Pause points (tests only).** With ``CONVERT_TO_QUANT_TEST_PAUSE=<phase>[,<phase>...]`` in the
environment, the process stops itself with ``SIGSTOP`` the first time a writer reaches each named
phase, so a test can act (start a second writer, send a signal) at exactly that point and then resume
it with ``SIGCONT``. Phases, in order: ``lock`` (about to take the output lock), ``open`` (lock held,
``.partial`` created, header written), ``write`` (half of the tensors written), ``verify`` (every
tensor written and synced, before verification), ``rename`` (verified, before it is renamed into
place), ``report`` (model published, lock still held, before the quality report is written). Never
set it outside tests.

**Which files a run may write.** ``check_run_files``: every file a run reads (the input, LoRAs, layer-config, calibration data) and
every file it writes (the model, its temporary file, the report's JSON and Markdown, a layer-config
template) are compared once, before any work: no output may be a file the run reads -- by resolved
path and by (st_dev, st_ino), so symbolic and hard links count -- no two outputs may be one file, and
without ``overwrite`` no output may replace an existing file.

Names typed by a user are resolved with ``pipeline.output_path_in_folder`` (refuses ``..``, absolute
paths, NUL, symlinks leading out); ``publish_file`` then makes the file appear there in one step.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import ConvertError, OutputBusyError, OutputPathError

LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"
PAUSE_ENV = "CONVERT_TO_QUANT_TEST_PAUSE"
PAUSE_PHASES = ("lock", "open", "write", "verify", "rename", "report")
_paused = set()

OVERWRITE_HINT = "pass overwrite=True to replace it"


def _identity(path: str) -> Tuple[str, Optional[Tuple[int, int]]]:
    """The resolved path, and (st_dev, st_ino) of what it leads to (None when nothing is there)."""
    try:
        st = os.stat(path)
        ino = (st.st_dev, st.st_ino)
    except (OSError, ValueError):  # missing, unreadable, a NUL byte in the name
        ino = None
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        real = os.path.abspath(path)
    return real, ino


def _same(a: Tuple[str, Optional[Tuple[int, int]]], b: Tuple[str, Optional[Tuple[int, int]]]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def check_run_files(reads: Iterable[Tuple[str, Optional[str]]], writes: Sequence[Tuple[str, str, bool]],
                    overwrite: bool = False) -> None:
    """Refuse a run whose outputs would replace a file it reads, each other, or (without ``overwrite``)
    an existing file. ``reads``: ``(what, path)`` pairs (``None`` paths are skipped); ``writes``:
    ``(what, path, new)`` -- ``new=False`` for a temporary file the writer may replace anyway."""
    inputs: List[Tuple[str, str, Tuple[str, Optional[Tuple[int, int]]]]] = [
        (what, p, _identity(p)) for what, p in reads if p]
    done: List[Tuple[str, str, Tuple[str, Optional[Tuple[int, int]]]]] = []
    for what, p, new in writes:
        ident = _identity(p)
        for in_what, in_p, in_ident in inputs:
            if _same(ident, in_ident):
                named = "" if os.path.abspath(in_p) == os.path.abspath(p) else f" {in_p}"
                raise OutputPathError(f"{what} {p} is the {in_what} file{named}; refusing to overwrite the "
                                      f"{in_what} (a run never writes over a file it reads)")
        for o_what, o_p, o_ident in done:
            if _same(ident, o_ident):
                raise OutputPathError(f"{what} {p} and the {o_what} {o_p} are the same file; choose "
                                      "different paths")
        if new and not overwrite and os.path.lexists(p):
            raise OutputPathError(f"{what} {p} already exists ({OVERWRITE_HINT})")
        done.append((what, p, ident))


def lock_path(path: str) -> str:
    return os.fspath(path) + LOCK_SUFFIX


def partial_path(path: str) -> str:
    return os.fspath(path) + PARTIAL_SUFFIX


def pause_point(phase: str):
    """Test hook: stop this process (SIGSTOP) here if ``CONVERT_TO_QUANT_TEST_PAUSE`` names ``phase``;
    once per phase and process. A no-op unless that variable is set."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted or phase in _paused or phase not in wanted.split(","):
        return
    _paused.add(phase)
    os.kill(os.getpid(), signal.SIGSTOP)


def same_file(fd: int, path: str) -> bool:
    """True while ``path`` names the file open as ``fd`` (not another file put under that name)."""
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def busy_message(path: str) -> str:
    return (f"another conversion is writing {path} (it holds {lock_path(path)}); nothing was written -- "
            "wait for it to finish or choose another output name")


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class OutputLock:
    """The exclusive right to write ``path`` (and its ``.partial``): a ``flock`` on ``<path>.lock``.

    ``acquire()`` never waits: when another live writer holds it, ``OutputBusyError``. Not re-entrant
    (a second ``OutputLock`` of the same path in the same process is refused too)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        self.lock_file = lock_path(self.path)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            raise ConvertError(f"internal error: the lock of {self.path} was taken twice")
        pause_point("lock")
        what = f"{self.lock_file} (the lock file for the output)"
        for _ in range(1000):
            try:
                fd = os.open(self.lock_file, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise OutputPathError(f"{what} is a symbolic link; remove it or choose another "
                                          "output name") from None
                if e.errno == errno.EISDIR:
                    raise OutputPathError(f"{what} is a directory; remove it or choose another output "
                                          "name") from None
                raise OutputPathError(f"cannot create {what}: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OutputPathError(f"{what} is not a regular file; remove it or choose another "
                                          "output name")
                if st.st_size != 0:  # our lock files are always empty: this is someone's data
                    raise OutputPathError(f"{what} exists and is not an (empty) lock file; remove it or "
                                          "choose another output name")
                if not _try_flock(fd):
                    raise OutputBusyError(busy_message(self.path))
            except OSError as e:
                os.close(fd)
                raise OutputPathError(f"cannot lock {what}: {e.strerror}") from None
            except BaseException:
                os.close(fd)
                raise
            if same_file(fd, self.lock_file):
                self._fd = fd
                return self
            os.close(fd)  # its holder released it (and removed the name) between our open and flock
        raise OutputBusyError(busy_message(self.path))

    def release(self):
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if same_file(fd, self.lock_file):
                os.unlink(self.lock_file)  # while still holding it: whoever opened it retries
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire() if not self.held else self

    def __exit__(self, *exc):
        self.release()
        return False


def remove_stale(path: str):
    """Delete a temporary file left by a writer that no longer runs. A regular file is deleted only
    when its ``flock`` can be taken (a live writer holds it for the file's whole life): one that a live
    process holds gives ``OutputBusyError`` and stays. A directory is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{path} (the temporary file for the output) is a directory; remove it or "
                              "choose another output name")
    if not stat.S_ISREG(st.st_mode):  # a symlink, FIFO...: never a file of ours; drop the name only
        _unlink_quietly(path)
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputPathError(f"cannot remove the stale temporary file {path}: {e.strerror}") from None
    try:
        if not _try_flock(fd):
            raise OutputBusyError(f"{path} is still being written by another process (it holds a lock on "
                                  "it); it was not removed and nothing was written -- wait for that "
                                  "conversion to finish")
        if same_file(fd, path):
            os.unlink(path)
    except OSError as e:
        raise OutputPathError(f"cannot remove the stale temporary file {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _unlink_quietly(path: str):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def note_published(exc: BaseException, path: str):
    """Mark an exception (an interrupt) that arrived after ``path`` was published, so that what is
    said about it stays true (the CLI: "interrupted after <out> was written")."""
    try:
        exc.output_published = path
    except Exception:
        pass


def publish_file(src: str, dst: str, overwrite: bool = False, lock: "OutputLock" = None) -> str:
    """Make the finished file ``src`` appear at ``dst`` atomically; ``src`` stays where it is.

    Under ``dst``'s ``OutputLock`` (taken here unless ``lock`` holds it): a hard link when both are on
    one file system (instant, no second copy on disk), else a copy to ``dst.partial`` that is synced
    and renamed. Without ``overwrite`` an existing ``dst`` is refused (and the link itself refuses a
    file that appears meanwhile); nothing partial is ever left at ``dst``.
    """
    if os.path.lexists(dst) and not overwrite:
        raise OutputPathError(f"{dst} already exists (enable overwrite to replace it)")
    if os.path.isdir(dst):
        raise OutputPathError(f"{dst} is a directory")
    own = None
    if lock is None:
        lock = own = OutputLock(dst).acquire()
    elif not lock.held or lock.path != os.path.abspath(dst):
        raise ConvertError(f"internal error: publishing {dst} without holding its lock")
    try:
        _publish_locked(src, dst, overwrite)
    finally:
        if own is not None:
            own.release()
    return dst


def _publish_locked(src: str, dst: str, overwrite: bool):
    if os.path.lexists(dst) and not overwrite:
        raise OutputPathError(f"{dst} already exists (enable overwrite to replace it)")
    if not overwrite:
        try:
            os.link(src, dst)  # one atomic step that also refuses a file that appeared meanwhile
            return
        except FileExistsError:
            raise OutputPathError(f"{dst} appeared while saving; not overwritten") from None
        except OSError:
            pass  # another file system, or one without hard links: a synced copy below
    tmp = partial_path(dst)
    remove_stale(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            _copy_synced(src, tmp)
        pause_point("rename")
        rename_into_place(tmp, dst, overwrite, "saving")
    except BaseException:
        _unlink_quietly(tmp)  # ours: only the lock holder creates it
        raise


def rename_into_place(tmp: str, dst: str, overwrite: bool, doing: str = "converting"):
    """Move the finished ``tmp`` to ``dst``. With ``overwrite`` an atomic ``os.replace``; without, a hard
    link (which fails on an existing ``dst``, so a file that appeared meanwhile is never replaced) and
    then removal of ``tmp``; on a file system without hard links, a check and ``os.replace``."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise OutputPathError(f"{dst} appeared while {doing}; not overwritten") from None
    except OSError:
        if os.path.lexists(dst):
            raise OutputPathError(f"{dst} appeared while {doing}; not overwritten") from None
        os.replace(tmp, dst)
        return
    os.unlink(tmp)


def _copy_synced(src: str, dst: str, chunk: int = 64 << 20):
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(src, "rb") as fi, os.fdopen(os.dup(fd), "wb") as fo:
            while True:
                buf = fi.read(chunk)
                if not buf:
                    break
                fo.write(buf)
            fo.flush()
            os.fsync(fo.fileno())
    except BaseException:
        _unlink_quietly(dst)
        raise
    finally:
        os.close(fd)
