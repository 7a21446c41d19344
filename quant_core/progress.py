"""The command line's progress display: a tqdm bar on a terminal, plain periodic lines elsewhere.

A log file or a pipe gets no carriage-return frames: one line per tenth of the layers (and the last),
``progress: 7/18 layers (single_blocks.0.linear2)``. Nothing at all below NORMAL verbosity.
"""
from __future__ import annotations

import sys

from .errors import display_name, terminal_text


class ProgressBar:
    def __new__(cls, console, stream=None):
        if console.level < 1:
            return None
        return super().__new__(cls)

    def __init__(self, console, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = -1  # the last tenth written as a plain line

    def _tqdm(self, total: int):
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="layer", dynamic_ncols=True, leave=False, file=self.stream)
        return self.bar

    def _line(self, done: int, total: int, name: str):
        tenth = done * 10 // max(total, 1)
        if tenth > self.shown:
            self.shown = tenth
            print(f"progress: {done}/{total} layers ({terminal_text(display_name(name))[-60:]})",
                  file=self.stream, flush=True)

    def update(self, done: int, total: int, name: str):
        if not self.tty:
            return self._line(done, total, name)
        bar = self._tqdm(total)
        bar.set_postfix_str(terminal_text(display_name(name))[-40:], refresh=False)
        bar.update(done - bar.n)

    def inside(self, done: float, total: int, name: str):
        """Progress inside a long layer (optimizer iterations): the share of the layer done."""
        if not self.tty:
            return
        self._tqdm(total).set_postfix_str(f"{terminal_text(display_name(name))[-40:]} "
                                          f"{100 * (done - int(done)):.0f}%")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def print_result(res, console) -> None:
    """What a finished conversion prints: the report's summary, the written file, the report files."""
    for line in res.report.summary_lines():
        console(line)
    console(f"wrote {res.output_path}")
    for p in res.report_paths:
        console(f"report: {p}")
