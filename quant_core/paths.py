"""File names typed by a user, resolved inside a folder they must not leave.

The ComfyUI Save node (and anything else that takes a name relative to a models or output folder)
uses ``resolve_inside``: a relative name made of plain path components, no ``..``, no absolute path,
no drive, no NUL, no control characters, and -- after symlinks are resolved -- still inside the
folder. Sub-folders are allowed (``wan/my_model.safetensors``).
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import OutputPathError

MAX_NAME_LEN = 1024


def resolve_inside(folder: str, name: str, suffix: Optional[str] = None) -> str:
    """Absolute path of ``name`` inside ``folder``; raises ``OutputPathError`` naming the problem.

    ``suffix`` (e.g. ``.safetensors``) is appended when the name does not already end with it.
    The folder itself must exist; missing sub-folders are allowed (the caller may create them).
    """
    if not isinstance(name, str) or not name.strip():
        raise OutputPathError("file name is empty")
    if "\x00" in name:
        raise OutputPathError("file name contains a NUL byte")
    if any(ord(c) < 32 for c in name):
        raise OutputPathError("file name contains a control character")
    if len(name) > MAX_NAME_LEN:
        raise OutputPathError(f"file name is longer than {MAX_NAME_LEN} characters")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or os.path.isabs(name) or (len(norm) > 1 and norm[1] == ":"):
        raise OutputPathError(f"file name {name!r} is absolute; give a name relative to {folder}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise OutputPathError(f"file name {name!r} contains '..'; it must stay inside {folder}")
    if not parts:
        raise OutputPathError(f"file name {name!r} names no file")
    if suffix and not parts[-1].lower().endswith(suffix.lower()):
        parts[-1] += suffix
    if parts[-1].startswith("."):
        raise OutputPathError(f"file name {name!r} starts with a dot (hidden file)")
    base = os.path.realpath(folder)
    if not os.path.isdir(base):
        raise OutputPathError(f"folder {folder} does not exist")
    path = os.path.join(base, *parts)
    # a symlinked sub-folder (or a symlink at the file name) must not lead outside the folder
    real = os.path.realpath(path)
    if os.path.commonpath([real, base]) != base:
        raise OutputPathError(f"file name {name!r} resolves to {real}, outside {folder}")
    return path


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
