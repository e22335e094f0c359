"""A progress line for long operations: rows done, rate and time left, on a terminal only.

On a terminal the line is rewritten in place (``\\r``) at most a few times a
second; piped or redirected, nothing is written, so that a log or a script
reading the command's output sees only its results.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_INTERVAL = 0.2  # seconds between redraws


class ProgressLine:
    """``rotated 1,200 of 5,000 values (2,310/s, 2 s left)`` on ``stream`` if it is a terminal."""

    def __init__(self, verb: str, noun: str, total: int | None, stream: TextIO | None = None):
        self.verb = verb
        self.noun = noun
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.shown = _is_terminal(self.stream)
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0

    def update(self, done: int, *, force: bool = False) -> None:
        """Redraw with ``done`` rows done (throttled unless ``force``)."""
        if not self.shown:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < _INTERVAL:
            return
        self._drawn_at = now
        line = self.describe(done, now - self.started)
        padding = " " * max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write(f"\r{line}{padding}")
        self.stream.flush()

    def describe(self, done: int, elapsed: float) -> str:
        """The line's text after ``elapsed`` seconds with ``done`` rows done."""
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f" of {self.total:,}" if self.total is not None else ""
        parts = [f"{rate:,.0f}/s"]
        if self.total is not None and rate > 0 and done <= self.total:
            parts.append(f"{(self.total - done) / rate:,.0f} s left")
        return f"{self.verb} {done:,}{of} {self.noun} ({', '.join(parts)})"

    def interrupt(self) -> None:
        """End the line drawn so far, so that other output starts on a line of its own
        (the next :meth:`update` draws a new line)."""
        if self.shown and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def finish(self, done: int) -> None:
        """Draw the final count and end the line (the summary follows on a line of its own)."""
        if not self.shown:
            return
        self.update(done, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
