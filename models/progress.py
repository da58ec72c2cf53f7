"""A dependency-free progress bar for long preparation steps (written to stderr)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress("download", total) as p: p.advance(n)``; total None: a spinner."""

    def __init__(self, label: str, total: float | None = None, unit: str = "",
                 stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self._stream = stream if stream is not None else sys.stderr
        self._last_draw = 0.0
        self._start = time.monotonic()

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and self.total is not None:
            self.done = self.total
        self._draw(force=True)
        self._stream.write("\n")
        self._stream.flush()

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        elapsed = now - self._start
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = (f"\r{self.label:<28} [{bar:<30}] {frac * 100:5.1f}% "
                    f"{_human(self.done)}/{_human(self.total)}{self.unit} {elapsed:5.1f}s")
        else:
            text = f"\r{self.label:<28} {_human(self.done)}{self.unit} {elapsed:5.1f}s"
        self._stream.write(text)
        self._stream.flush()


def _human(value: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}T"
