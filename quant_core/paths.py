"""Publishing a finished file under a user's name atomically (the ComfyUI Save node).

Names typed by a user are resolved with ``pipeline.output_path_in_folder`` (refuses ``..``, absolute
paths, NUL, symlinks leading out); ``publish_file`` then makes the file appear there in one step.
"""
from __future__ import annotations

import os

from .errors import OutputPathError


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
