"""Interrupt checks and progress inside one layer (optimizer loops, calibration capture).

The pipeline already takes a ``check_cancel()`` callback (ComfyUI passes
``throw_exception_if_processing_interrupted``; it raises when the user pressed Cancel) and checks it
between tensors. A single layer can run for minutes (learned rounding, GPTQ on wide layers), so the
long loops call ``checkpoint(fraction)`` as they go. That call does nothing outside a
``checkpoint_scope``; inside one it calls the scope's ``check`` (and ``progress(fraction of the
layer)``) at most once per ``interval`` seconds of wall time -- the cost in a tight loop is one clock
read. The scope lives in a context variable, so optimizers keep their signature and this module never
imports ComfyUI.

``progress_span(lo, hi)`` maps the fractions reported by an inner step (e.g. GPTQ's sweep as the first
part of learned rounding) into ``[lo, hi]`` of the enclosing step, so the layer's progress only grows.
"""
from __future__ import annotations

import contextvars
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional

INTERVAL_S = 0.05  # at most 20 checks per second: nothing next to a layer's compute


class _Scope:
    __slots__ = ("check", "progress", "interval", "last", "lo", "hi", "done")

    def __init__(self, check, progress, interval):
        self.check, self.progress, self.interval = check, progress, interval
        self.last = float("-inf")
        self.lo, self.hi = 0.0, 1.0
        self.done = 0.0  # the largest fraction reported (progress never goes back)


_scope: contextvars.ContextVar = contextvars.ContextVar("convert_to_quant_checkpoint", default=None)


def checkpoint(fraction: Optional[float] = None) -> None:
    """Check for cancellation (rate-limited) and report ``fraction`` (0..1) of the current step done.
    Raises whatever the scope's ``check`` raises."""
    s = _scope.get()
    if s is None:
        return
    now = time.monotonic()
    if now - s.last < s.interval:
        return
    s.last = now
    if s.progress is not None and fraction is not None:
        f = s.lo + (s.hi - s.lo) * min(max(float(fraction), 0.0), 1.0)
        if f > s.done:
            s.done = f
            s.progress(f)
    if s.check is not None:
        s.check()


@contextmanager
def checkpoint_scope(check: Optional[Callable[[], None]] = None,
                     progress: Optional[Callable[[float], None]] = None, interval: float = INTERVAL_S):
    """Within the block, ``checkpoint()`` calls ``check()`` and ``progress(fraction)`` (rate-limited)."""
    token = _scope.set(_Scope(check, progress, interval) if (check or progress) else None)
    try:
        yield
    finally:
        _scope.reset(token)


@contextmanager
def progress_span(lo: float, hi: float):
    """Fractions reported inside the block cover ``[lo, hi]`` of the enclosing step's fractions."""
    s = _scope.get()
    if s is None:
        yield
        return
    old = s.lo, s.hi
    s.lo, s.hi = old[0] + (old[1] - old[0]) * lo, old[0] + (old[1] - old[0]) * hi
    try:
        yield
    finally:
        s.lo, s.hi = old


def cancellable() -> bool:
    """Is a scope with an interrupt check active (so ``interruptible`` is worth its thread)?"""
    s = _scope.get()
    return s is not None and s.check is not None


def interruptible(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` for one long call that cannot check for cancellation itself (a LAPACK
    factorization of a wide Hessian on the CPU: 15 s at in = 4096 on one core). Inside a scope with a
    ``check`` it runs in a worker thread while this thread keeps checking; when the check raises, that
    is raised at once and the worker's result, when it comes, is dropped (the call itself cannot be
    stopped: it finishes in the background and frees its memory). Outside such a scope: a plain call."""
    s = _scope.get()
    if s is None or s.check is None:
        return fn(*args, **kwargs)
    box = {}
    done = threading.Event()

    def work():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name="convert_to_quant-interruptible", daemon=True).start()
    while not done.wait(s.interval):
        s.check()  # raises on cancel
    if "error" in box:
        raise box["error"]
    return box["value"]
