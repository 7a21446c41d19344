"""Safetensors reading and streaming writing, with the header validated before anything else.

Reading: ``SafetensorsReader`` parses and checks the whole header (size, JSON, dtypes, shapes,
offsets tiling the data section exactly) before it reads a single tensor, then reads one tensor at a
time with ``pread`` into memory it owns. The input file is opened read-only and never modified.
We never unpickle anything: ``.ckpt/.pt/.bin/.pth`` inputs are refused.

Writing: ``StreamingWriter`` takes the full list of output tensors (key, dtype, shape) up front -- the
conversion plan knows it before quantizing anything -- computes the header, reserves the file, then
accepts tensors in any order and writes each at its offset. Peak memory is one tensor. The writer
holds the output's lock (``paths.OutputLock``: one writer per output name, a second one fails with
``OutputBusyError``) and a lock on its own ``<out>.partial``; the partial file is verified and renamed
into place atomically only when every tensor was written and synced, and only while that name still
holds the writer's own file (checked through its open descriptor). On any error or cancel the partial
file is removed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import ConvertError, OutputPathError, SafetensorsFormatError, UnsupportedInputError
from .paths import (OutputLock, note_published, partial_path, pause_point, remove_stale, rename_into_place,
                    same_file)

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_BYTES = 2 ** 62  # beyond any real tensor; keeps torch's int64 size arithmetic from overflowing
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype_name: str
    shape: Tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _reject_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise SafetensorsFormatError(f"header has the key {k!r} twice")
        seen[k] = v
    return seen


def parse_header(raw: bytes, data_size: int, where: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Validate a header's JSON against the size of the data section; return tensors and metadata."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsFormatError(f"{where}: header is not UTF-8 ({e})") from None
    if not text.lstrip().startswith("{"):
        raise SafetensorsFormatError(f"{where}: header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except SafetensorsFormatError as e:
        raise SafetensorsFormatError(f"{where}: {e}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise SafetensorsFormatError(f"{where}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in metadata.items()):
        raise SafetensorsFormatError(f"{where}: __metadata__ must map strings to strings")
    infos: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsFormatError(f"{at}: entry is not an object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise SafetensorsFormatError(f"{at}: unknown dtype {dtype_name!r} "
                                         f"(known: {', '.join(sorted(DTYPES))})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise SafetensorsFormatError(f"{at}: shape must be a list of at most 8 non-negative ints, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise SafetensorsFormatError(f"{at}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise SafetensorsFormatError(
                f"{at}: data ends at byte {end} but the data section has only {data_size} bytes "
                "(file truncated or offsets out of range)")
        expected = math.prod(shape) * itemsize(DTYPES[dtype_name])
        if expected != end - begin:
            raise SafetensorsFormatError(
                f"{at}: {dtype_name} {shape} needs {expected} bytes but its offsets span {end - begin}")
        # zero-size tensors carry no bytes, so the byte check above cannot bound their other dims;
        # torch still multiplies every dim when it allocates, so refuse shapes it cannot even describe
        if math.prod(max(d, 1) for d in shape) * itemsize(DTYPES[dtype_name]) >= MAX_TENSOR_BYTES:
            raise SafetensorsFormatError(f"{at}: shape {shape} is impossibly large (over 2**62 bytes "
                                         "even ignoring its zero dims); refusing to allocate it")
        infos[name] = TensorInfo(name, dtype_name, tuple(shape), begin, end)
    # the tensors must tile the data section exactly: no overlap, no hole, nothing after
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin < pos:
            raise SafetensorsFormatError(f"{where}: tensor {info.name!r} overlaps the previous tensor "
                                         f"(starts at {info.begin}, previous ends at {pos})")
        if info.begin > pos:
            raise SafetensorsFormatError(f"{where}: hole in the data section before tensor {info.name!r} "
                                         f"(bytes {pos}..{info.begin} belong to no tensor)")
        pos = info.end
    if pos != data_size:
        raise SafetensorsFormatError(f"{where}: {data_size - pos} bytes after the last tensor "
                                     "(file has trailing data or the header is incomplete)")
    return infos, metadata


def check_input_path(path: str) -> str:
    """Refuse what we will not read: missing files, directories, pickle checkpoints."""
    p = os.fspath(path)
    if "\x00" in p:
        raise UnsupportedInputError(f"input path contains a NUL byte: {p!r}")
    if p.lower().endswith(PICKLE_SUFFIXES):
        raise UnsupportedInputError(
            f"{p}: pickle checkpoints (.ckpt/.pt/.pth/.bin) can execute code when loaded and are not "
            "read. Convert it to .safetensors first with a tool you trust.")
    if not os.path.exists(p):
        raise UnsupportedInputError(f"{p}: no such file")
    if not os.path.isfile(p):
        raise UnsupportedInputError(f"{p}: not a regular file")
    return p


class TensorIndex:
    """Key access over ``self.infos`` (name -> ``TensorInfo``), shared by the reader and the views over it."""

    infos: Dict[str, "TensorInfo"]

    def keys(self) -> List[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def info(self, key: str) -> "TensorInfo":
        return self.infos[key]


class SafetensorsReader(TensorIndex):
    """Lazy, validated reader. Use as a context manager; ``get(key)`` returns an owned tensor."""

    def __init__(self, path: str):
        self.path = check_input_path(path)
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise UnsupportedInputError(f"{self.path}: cannot open for reading: {e.strerror}") from None
        try:
            self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse(self):
        size = os.fstat(self._fd).st_size
        where = self.path
        if size < 8:
            raise SafetensorsFormatError(f"{where}: file is {size} bytes; a safetensors file needs at "
                                         "least 8 (truncated or not safetensors)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > size - 8:
            raise SafetensorsFormatError(f"{where}: header length {n} goes beyond the end of the file "
                                         f"({size} bytes): truncated or not a safetensors file")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"{where}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        if n < 2:
            raise SafetensorsFormatError(f"{where}: header length {n} is too small for a JSON object")
        raw = os.pread(self._fd, n, 8)
        self.header_size = n
        self.data_start = 8 + n
        self.file_size = size
        self.infos, self.metadata = parse_header(raw, size - self.data_start, where)

    # --- access (keys / in / info: TensorIndex) -------------------------------------------------
    def get(self, key: str, pin: bool = False) -> torch.Tensor:
        """The tensor, in memory it owns. ``pin=True`` reads straight into page-locked memory (CUDA's
        caching host allocator), so the copy to the GPU runs at full bus speed and asynchronously."""
        info = self.infos[key]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if pin:
            pinned = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
            buf = pinned.numpy()
            view = memoryview(buf).cast("B")
        else:
            pinned = None
            buf = bytearray(info.nbytes)
            view = memoryview(buf)
        pos, off = 0, self.data_start + info.begin
        while pos < info.nbytes:
            n = os.preadv(self._fd, [view[pos:]], off + pos)
            if n <= 0:
                raise SafetensorsFormatError(f"{self.path}: tensor {key!r}: file ended while reading "
                                             "(it changed size after it was opened?)")
            pos += n
        if pinned is not None:
            return pinned.view(info.dtype).reshape(info.shape)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def iter_chunks(self, key: str, chunk_bytes: int = 64 << 20):
        """The tensor's bytes in pieces of at most ``chunk_bytes`` (one reused buffer: yield a view,
        consume it before asking for the next one), so a pass-through tensor of any size is copied
        or hashed in bounded memory."""
        info = self.infos[key]
        buf = bytearray(min(max(info.nbytes, 1), chunk_bytes))
        view = memoryview(buf)
        pos, off = 0, self.data_start + info.begin
        while pos < info.nbytes:
            n = min(len(buf), info.nbytes - pos)
            got = os.preadv(self._fd, [view[:n]], off + pos)
            if got <= 0:
                raise SafetensorsFormatError(f"{self.path}: tensor {key!r}: file ended while reading "
                                             "(it changed size after it was opened?)")
            yield view[:got]
            pos += got

    def get_raw(self, key: str) -> bytes:
        info = self.infos[key]
        return os.pread(self._fd, info.nbytes, self.data_start + info.begin)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    with SafetensorsReader(path) as r:
        return dict(r.infos), dict(r.metadata)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputEntry:
    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def layout_entries(entries: Sequence[OutputEntry]) -> List[Tuple[OutputEntry, int]]:
    """File order: larger item sizes first so every tensor starts aligned to its item size
    (the official safetensors writer does the same); stable within a size."""
    order = sorted(range(len(entries)), key=lambda i: (-itemsize(entries[i].dtype), i))
    placed, pos = [], 0
    for i in order:
        placed.append((entries[i], pos))
        pos += entries[i].nbytes
    return placed


def build_header(entries: Sequence[OutputEntry], metadata: Optional[Dict[str, str]]) -> Tuple[bytes, Dict[str, int], int]:
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConvertError(f"internal error: output plan has duplicate keys {dup[:5]}")
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets: Dict[str, int] = {}
    total = 0
    for entry, off in layout_entries(entries):
        if entry.dtype not in DTYPE_NAMES:
            raise ConvertError(f"cannot store dtype {entry.dtype} in safetensors ({entry.key})")
        header[entry.key] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [off, off + entry.nbytes]}
        offsets[entry.key] = off
        total = max(total, off + entry.nbytes)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return raw, offsets, total


class StreamingWriter:
    """Write a safetensors file whose tensor list is known before any data exists.

    ``write(key, tensor)`` may be called in any order; ``finish()`` checks every tensor was written,
    syncs and atomically renames ``<path>.partial`` to ``path``. ``abort()`` (or leaving the
    ``with`` block by an exception) removes the partial file. ``checksums`` holds a SHA-256 of each
    tensor's bytes as written, for verification.

    ``lock``: the output's ``OutputLock``, already held by the caller (a conversion holds it until its
    report is written too); without it the writer takes the lock itself and releases it when it is done.

    ``header_reserve``: spare bytes (spaces, which the format allows after the header JSON) so that
    ``set_metadata`` can record values known only once the data is written (calibration token counts).
    """

    def __init__(self, path: str, entries: Sequence[OutputEntry], metadata: Optional[Dict[str, str]] = None,
                 overwrite: bool = False, preallocate: bool = True, checksums: bool = True,
                 lock: Optional[OutputLock] = None, header_reserve: int = 0):
        self.path = os.fspath(path)
        self.tmp = partial_path(self.path)
        self.entries = {e.key: e for e in entries}
        raw, self.offsets, self.data_size = build_header(list(entries), metadata)
        raw += b" " * ((max(0, int(header_reserve)) + 7) // 8 * 8)
        self._header_len = len(raw)
        self.data_start = 8 + len(raw)
        self.written: Dict[str, bool] = {}
        self.checksums: Dict[str, str] = {}
        self.hash_tensors = checksums  # SHA-256 of every tensor as written (for --verify)
        self.overwrite = overwrite
        self.published = False
        self._fd = None
        self._own_lock = None
        self._pause_after = max(1, len(self.entries) // 2)  # the test pause point "write"
        if os.path.exists(self.path) and not overwrite:
            raise OutputPathError(f"{self.path} already exists (pass overwrite=True to replace it)")
        if lock is None:
            lock = self._own_lock = OutputLock(self.path).acquire()
        elif not lock.held or lock.path != os.path.abspath(self.path):
            raise ConvertError(f"internal error: writing {self.path} without holding its lock")
        try:
            # under the lock: no other writer of this output runs, so these checks stay true
            if os.path.exists(self.path) and not overwrite:
                raise OutputPathError(f"{self.path} already exists (pass overwrite=True to replace it)")
            remove_stale(self.tmp)  # a partial of a killed run; one a live process holds is refused
            try:
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputPathError(f"cannot create {self.tmp}: {e.strerror}") from None
            try:  # held for the file's whole life: remove_stale never takes a file a live writer holds
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise OutputPathError(f"cannot lock {self.tmp}: {e.strerror}") from None
            total = self.data_start + self.data_size
            if preallocate and total > 0 and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._fd, 0, total)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise OutputPathError(_disk_full_message(self.path, total, e.errno)) from None
                    os.ftruncate(self._fd, total)  # filesystem without fallocate
            else:
                os.ftruncate(self._fd, total)
            self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)
            pause_point("open")
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, data, offset: int):
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            try:
                n = os.pwrite(self._fd, view[pos:], offset + pos)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise OutputPathError(_disk_full_message(self.path, self.data_start + self.data_size,
                                                             e.errno)) from None
                raise OutputPathError(f"writing {self.tmp} failed: {e.strerror}") from None
            pos += n

    def _check_entry(self, key: str, dtype: torch.dtype, shape) -> None:
        entry = self.entries.get(key)
        if entry is None:
            raise ConvertError(f"internal error: {key!r} is not in the output plan")
        if key in self.written:
            raise ConvertError(f"internal error: {key!r} written twice")
        if dtype != entry.dtype or tuple(shape) != tuple(entry.shape):
            raise ConvertError(f"internal error: {key!r} planned as {entry.dtype} {list(entry.shape)}, "
                               f"got {dtype} {list(shape)}")
        if self._fd is None:
            raise ConvertError(f"internal error: {self.tmp} is closed")

    def _written(self, key: str, digest: Optional[str]) -> None:
        if digest is not None:
            self.checksums[key] = digest
        self.written[key] = True
        if len(self.written) == self._pause_after:
            pause_point("write")

    def write(self, key: str, tensor: torch.Tensor):
        self._check_entry(key, tensor.dtype, tensor.shape)
        data = tensor_bytes(tensor)
        self._pwrite(data, self.data_start + self.offsets[key])
        self._written(key, hashlib.sha256(data).hexdigest() if self.hash_tensors else None)

    def write_chunks(self, key: str, dtype: torch.dtype, shape, chunks: Iterable[bytes]):
        """Write tensor ``key`` from consecutive byte chunks (a pass-through tensor streamed from the
        input: memory stays at one chunk); same bytes and checksum as ``write`` of the whole tensor."""
        self._check_entry(key, dtype, shape)
        h = hashlib.sha256() if self.hash_tensors else None
        at, end = self.data_start + self.offsets[key], self.data_start + self.offsets[key] + self.entries[key].nbytes
        for chunk in chunks:
            if at + len(chunk) > end:
                raise ConvertError(f"internal error: {key!r} streamed past its planned size")
            self._pwrite(chunk, at)
            if h is not None:
                h.update(chunk)
            at += len(chunk)
        if at != end:
            raise ConvertError(f"internal error: {key!r} streamed {at - end} bytes short of its planned size")
        self._written(key, h.hexdigest() if h is not None else None)

    def missing(self) -> List[str]:
        return [k for k in self.entries if k not in self.written]

    def set_metadata(self, metadata: Optional[Dict[str, str]]):
        """Replace the header's ``__metadata__`` before ``finish``; the new header must fit the space of
        the old one (see ``header_reserve``): the tensors do not move."""
        if self._fd is None:
            raise ConvertError(f"internal error: {self.tmp} is closed")
        raw, offsets, _ = build_header(list(self.entries.values()), metadata)
        if len(raw) > self._header_len or offsets != self.offsets:
            raise ConvertError(f"internal error: the new metadata of {self.path} does not fit its reserved header")
        raw += b" " * (self._header_len - len(raw))
        self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)

    def _check_own(self):
        if not same_file(self._fd, self.tmp):
            raise OutputPathError(f"{self.tmp} was removed or replaced by another process while it was "
                                  f"written; {self.path} was not written")

    def finish(self, verify: Optional[Callable[[str], None]] = None) -> str:
        """Sync, optionally ``verify(partial_path)`` (raise to refuse the file), then rename into place.
        Verifying before the rename means a file that fails verification never appears as the output.
        The file verified and renamed is this writer's own: the name must still lead to the file open
        as its descriptor (kept open, and locked, until the rename is done)."""
        missing = self.missing()
        if missing:
            self.abort()
            raise ConvertError(f"internal error: {len(missing)} planned tensors were never written, "
                               f"e.g. {missing[:3]}")
        try:
            os.fsync(self._fd)
        except OSError as e:
            self.abort()
            raise OutputPathError(f"syncing {self.tmp} failed: {e.strerror}") from None
        try:
            pause_point("verify")
            self._check_own()
            if verify is not None:
                verify(self.tmp)
            pause_point("rename")
            self._check_own()
            try:
                rename_into_place(self.tmp, self.path, self.overwrite)
            except OSError as e:
                raise OutputPathError(f"cannot move {self.tmp} to {self.path}: {e.strerror}") from None
        except BaseException as e:
            if same_file(self._fd, self.path):  # published just before an interrupt landed
                self.published = True
                note_published(e, self.path)
            self.abort()
            raise
        self.published = True
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        fd, self._fd = self._fd, None
        os.close(fd)
        self._release_own_lock()
        return self.path

    def abort(self):
        """Remove the partial file (only while its name still leads to this writer's own file) and
        release the lock if the writer took it itself."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if same_file(fd, self.tmp):
                    os.unlink(self.tmp)
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        self._release_own_lock()

    def _release_own_lock(self):
        lock, self._own_lock = self._own_lock, None
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif self._fd is not None:
            self.finish()
        return False

    def __del__(self):
        try:
            if getattr(self, "_fd", None) is not None or getattr(self, "_own_lock", None) is not None:
                self.abort()
        except Exception:
            pass


def _disk_full_message(path: str, total: int, err: int = errno.ENOSPC) -> str:
    size = f"{total / 1e9:.2f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"
    why = {errno.EFBIG: "the file is larger than the file system or the process's file-size limit allows",
           errno.EDQUOT: "the disk quota is exceeded"}.get(err, "no space left on the device")
    return (f"cannot write {path} ({size}): {why}; nothing was written -- free some space or "
            "choose another output folder")


def _fsync_dir(d: str):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None,
              overwrite: bool = True) -> str:
    """Write a dict of tensors (small files: tests, calibration statistics, LoRAs we make)."""
    entries = [OutputEntry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(path, entries, metadata, overwrite=overwrite, preallocate=False) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return path


def load_file(path: str) -> Dict[str, torch.Tensor]:
    with SafetensorsReader(path) as r:
        return {k: r.get(k) for k in r.keys()}
