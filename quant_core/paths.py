"""Which files a run may write, and publishing a finished file under a user's name atomically.

``check_run_files``: every file a run reads (the input, LoRAs, layer-config, calibration data) and
every file it writes (the model, its temporary file, the report's JSON and Markdown, a layer-config
template) are compared once, before any work: no output may be a file the run reads -- by resolved
path and by (st_dev, st_ino), so symbolic and hard links count -- no two outputs may be one file, and
without ``overwrite`` no output may replace an existing file.

Names typed by a user are resolved with ``pipeline.output_path_in_folder`` (refuses ``..``, absolute
paths, NUL, symlinks leading out); ``publish_file`` then makes the file appear there in one step.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import OutputPathError

OVERWRITE_HINT = "pass overwrite=True / --overwrite to replace it"


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


def publish_file(src: str, dst: str, overwrite: bool = False) -> str:
    """Make the finished file ``src`` appear at ``dst`` atomically; ``src`` stays where it is.

    A hard link when both are on one file system (instant, no second copy on disk), else a copy to
    ``dst.partial`` that is synced and renamed. Without ``overwrite`` an existing ``dst`` is refused
    (and the link itself refuses a file that appears meanwhile); nothing partial is ever left at ``dst``.
    """
    if os.path.lexists(dst) and not overwrite:
        raise OutputPathError(f"{dst} already exists (enable overwrite to replace it)")
    if os.path.isdir(dst):
        raise OutputPathError(f"{dst} is a directory")
    tmp = dst + ".partial"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        try:
            if not overwrite:
                os.link(src, dst)
                return dst
            os.link(src, tmp)
        except FileExistsError:
            raise OutputPathError(f"{dst} appeared while saving; not overwritten") from None
        except OSError:
            _copy_synced(src, tmp)
        if not overwrite and os.path.lexists(dst):
            raise OutputPathError(f"{dst} appeared while saving; not overwritten")
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dst


def _copy_synced(src: str, dst: str, chunk: int = 64 << 20):
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while True:
            buf = fi.read(chunk)
            if not buf:
                break
            fo.write(buf)
        fo.flush()
        os.fsync(fo.fileno())
