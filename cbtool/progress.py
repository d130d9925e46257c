"""The one place progress bars are made: a tqdm bar on a terminal, and elsewhere (a log file, a pipe, CI) a plain
line every few percent, as timm's training loggers print, instead of a frame per update."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LINE_EVERY_PERCENT = 5
LINE_EVERY_UPDATES = 100  # when the total is unknown (a streamed dataset)


def progress_bar(total: int | None, *, desc: str, unit: str, initial: int = 0, leave: bool = True,
                 file: TextIO | None = None) -> Any:
    """A bar with tqdm's ``update``, ``set_postfix``, ``write`` and ``close``: tqdm when ``file`` (stderr) is a
    terminal, else ``LineProgress``."""
    file = file or sys.stderr
    if _is_terminal(file):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=file, dynamic_ncols=True)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, file=file)


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream
        return False


class LineProgress:
    """``desc: 35/700 step (5%), 12s, loss=1.2``: one line per ``LINE_EVERY_PERCENT`` of ``total`` and at the end."""

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0, file: TextIO) -> None:
        self.total, self.desc, self.unit, self.n, self.file = total, desc, unit, initial, file
        self.postfix: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.shown = self._mark(initial)
        self.closed = False

    def _mark(self, n: int) -> int:
        """Which line ``n`` updates falls in: whole steps of LINE_EVERY_PERCENT, or of LINE_EVERY_UPDATES."""
        if self.total:
            return n * 100 // (self.total * LINE_EVERY_PERCENT) if n < self.total else 100 // LINE_EVERY_PERCENT + 1
        return n // LINE_EVERY_UPDATES

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self._mark(self.n)
        if mark != self.shown:
            self.shown = mark
            self._line()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        if not self.closed and self.total and self.n < self.total and self.n > 0:
            self._line()  # where it stopped early
        self.closed = True

    def _line(self) -> None:
        count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self.unit}"
        extra = "".join(f", {key}={value}" for key, value in self.postfix.items())
        print(f"{self.desc}: {count}, {time.perf_counter() - self.started:.0f}s{extra}", file=self.file, flush=True)
