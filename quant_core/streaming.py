"""Streaming I/O: a bounded read-ahead thread (``Prefetcher``) and a bounded write-behind thread
(``WriteBehind``) overlap reading, GPU work and writing (``--low-memory`` turns both off). Split out of
``memory.py``; ``docs/SCALE.md`` has the measurements."""
from __future__ import annotations

import collections
import threading
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

from .errors import ConvertError


class Prefetcher:
    """Yield ``(key, read(key))`` in order while a background thread reads ahead, holding at most
    ``max_bytes`` of tensors not yet taken (always at least one) and, with ``max_items``, at most that
    many tensors. ``pread`` releases the GIL, so reading overlaps the caller's GPU work.
    ``max_bytes=0``: no thread, read on demand.

    ``keys`` may be any iterable, also one that decides the next key only when asked (the multi-rank
    work queue claims a layer there): the thread asks for the next key only once it may read it."""

    _END = object()

    def __init__(self, read: Callable[[str], torch.Tensor], keys: Iterable[str], sizes: Dict[str, int],
                 max_bytes: int, max_items: Optional[int] = None):
        self.read, self.sizes, self.max_bytes = read, sizes, max_bytes
        self.keys = keys if not isinstance(keys, (list, tuple)) else list(keys)
        self.max_items = max_items if max_items is not None else 1 << 62
        self._cv = threading.Condition()
        self._ready: "collections.deque" = collections.deque()
        self._held = 0
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        small = isinstance(self.keys, list) and len(self.keys) <= 1
        if max_bytes > 0 and not small:
            self._thread = threading.Thread(target=self._loop, name="ctq-prefetch", daemon=True)
            self._thread.start()

    def _room(self) -> bool:
        return len(self._ready) < self.max_items and not (self._held > 0 and self._held >= self.max_bytes)

    def _loop(self):
        try:
            it = iter(self.keys)
            while True:
                with self._cv:  # wait for room before asking for the next key (it may claim work)
                    while not self._stop and self._ready and not self._room():
                        self._cv.wait()
                    if self._stop:
                        return
                k = next(it, self._END)
                if k is self._END:
                    break
                size = self.sizes.get(k, 0)
                with self._cv:
                    while not self._stop and self._held > 0 and self._held + size > self.max_bytes:
                        self._cv.wait()
                    if self._stop:
                        return
                t = self.read(k)
                with self._cv:
                    self._ready.append((k, t, None))
                    self._held += size
                    self._cv.notify_all()
            with self._cv:
                self._ready.append((self._END, None, None))
                self._cv.notify_all()
        except BaseException as e:  # handed to the consumer
            with self._cv:
                self._ready.append((None, None, e))
                self._cv.notify_all()

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        if self._thread is None:
            for k in self.keys:
                yield k, self.read(k)
            return
        while True:
            with self._cv:
                while not self._ready:
                    self._cv.wait(0.5)
                key, t, err = self._ready.popleft()
                if err is not None:
                    raise err
                if key is self._END:
                    return
                self._held -= self.sizes.get(key, 0)
                self._cv.notify_all()
            yield key, t

    def close(self):
        if self._thread is not None:
            with self._cv:
                self._stop = True
                self._ready.clear()
                self._cv.notify_all()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class WriteBehind:
    """Write ``{key: tensor}`` batches with ``writer.write`` on a background thread (``pwrite`` and the
    SHA-256 release the GIL), holding at most ``max_bytes`` not yet written (always at least one batch).
    A write error is raised in the caller at the next ``put``/``flush``. Thread-safe ``put``.
    ``max_bytes=0``: write synchronously."""

    def __init__(self, writer, max_bytes: int):
        self.writer, self.max_bytes = writer, max_bytes
        self._cv = threading.Condition()
        self._queue: "collections.deque" = collections.deque()
        self._held = 0
        self._busy = False
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.bytes_written = 0
        if max_bytes > 0:
            self._thread = threading.Thread(target=self._loop, name="ctq-write", daemon=True)
            self._thread.start()

    @staticmethod
    def _size(tensors: Dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def put(self, tensors: Dict[str, torch.Tensor]):
        if not tensors:
            return
        size = self._size(tensors)
        if self._thread is None:
            for k, v in tensors.items():
                self.writer.write(k, v)
            self.bytes_written += size
            return
        with self._cv:
            while (self._error is None and not self._stop and self._held > 0
                   and self._held + size > self.max_bytes):
                self._cv.wait(0.5)
            self._raise_error()
            if self._stop:
                raise ConvertError("internal error: write after the writer was closed")
            self._queue.append((tensors, size))
            self._held += size
            self._cv.notify_all()

    def _raise_error(self):
        if self._error is not None:
            err, self._error = self._error, None
            self._stop = True
            raise err

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                if self._stop:  # aborted: drop what is left
                    self._queue.clear()
                    return
                tensors, size = self._queue.popleft()
                self._busy = True
            try:
                for k, v in tensors.items():
                    self.writer.write(k, v)
            except BaseException as e:
                with self._cv:
                    self._error = e
                    self._queue.clear()
                    self._held = 0
                    self._busy = False
                    self._cv.notify_all()
                return
            with self._cv:
                self._held -= size
                self.bytes_written += size
                self._busy = False
                self._cv.notify_all()

    def flush(self):
        """Wait until everything put so far is written; raise a write error."""
        if self._thread is None:
            return
        with self._cv:
            while (self._queue or self._busy) and self._error is None:
                self._cv.wait(0.5)
            self._raise_error()

    def close(self, abort: bool = False):
        if self._thread is None:
            return
        if not abort:
            try:
                self.flush()
            except BaseException:
                self.close(abort=True)
                raise
        with self._cv:
            if abort:
                self._queue.clear()
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        self._thread = None
        if not abort:
            with self._cv:
                self._raise_error()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(abort=exc_type is not None)
        return False
