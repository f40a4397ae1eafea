"""Stage messages (on stderr by default), with timings that also go into the report.

The pipeline reports progress only through a `Progress`; pass one with another `write`
(a logger's method, say) to send the lines elsewhere, or `Progress(write=lambda _: None)` for silence.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Without a terminal to redraw on, repeated progress lines of one kind are shown at most this often.
THROTTLE_SECONDS = 10.0


class Progress:
    """Prints `[elapsed] stage: message` lines to stderr and records how long each stage took."""

    def __init__(self, tty: bool | None = None, write: Callable[[str], object] | None = None) -> None:
        """`write(text)` receives the text to show, newlines included (default: sys.stderr, looked up per call)."""
        self._write = write
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        # Time per kind of inner step (e.g. "calibration pass 1/2 (ranges)"), from the step logs.
        self.steps: dict[str, float] = {}
        self.tty = (write is None and sys.stderr.isatty()) if tty is None else tty
        self._pending: str | None = None  # a thinned-out step line still to be shown
        self._open_line = False  # a redrawn terminal line written without its newline

    def write(self, text: str, newline: bool = True) -> None:
        if self._write is not None:
            self._write(text + ("\n" if newline else ""))
            return
        sys.stderr.write(text + ("\n" if newline else ""))
        sys.stderr.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def echo(self, stage: str, message: str) -> None:
        self.flush()
        self.write(self._line(stage, message))

    @contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Time a stage; its duration is added to `timings[key]`, even when the stage fails."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.flush()
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    @contextmanager
    def steps_of(self, stage: str) -> Iterator[StepLog]:
        """A `log(message)` callback for a stage's inner loops (calibration batches, per-layer work)."""
        log = StepLog(self, stage)
        try:
            yield log
        finally:
            log.close()

    def flush(self) -> None:
        """Show the last thinned-out step line, and end a redrawn terminal line."""
        if self._pending is not None:
            line, self._pending = self._pending, None
            self.write(line)
        if self._open_line:
            self.write("")
            self._open_line = False

    def _line(self, stage: str, message: str) -> str:
        return f"[{self.elapsed():6.1f}s] {stage}: {message}"


class StepLog:
    """Progress of many small steps without flooding the log.

    On a terminal each line is redrawn in place. Otherwise lines of one kind (the
    text before the first ':') are thinned out to one every few seconds, and the
    last one of each kind is always shown, so the log ends on e.g. "batch 4".
    """

    def __init__(self, progress: Progress, stage: str) -> None:
        self.progress, self.stage = progress, stage
        self.kind: str | None = None
        self.kind_start = 0.0
        self.last_shown = -float("inf")

    def __call__(self, message: str) -> None:
        p = self.progress
        now = time.perf_counter()
        kind = message.split(":", 1)[0].strip()
        if kind != self.kind:
            self._end_kind(now)
            p.flush()
            self.kind, self.kind_start, self.last_shown = kind, now, -float("inf")
        line = p._line(self.stage, message)
        if p.tty:
            p.write(f"\r\x1b[K{line}", newline=False)
            p._open_line = True
        elif now - self.last_shown >= THROTTLE_SECONDS:
            p._pending = None
            p.write(line)
            self.last_shown = now
        else:
            p._pending = line

    def close(self) -> None:
        self._end_kind(time.perf_counter())
        self.kind = None
        self.progress.flush()

    def _end_kind(self, now: float) -> None:
        if self.kind is not None:
            steps = self.progress.steps
            steps[self.kind] = steps.get(self.kind, 0.0) + now - self.kind_start
