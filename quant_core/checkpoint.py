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
import time
from contextlib import contextmanager
from typing import Callable, Optional

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
