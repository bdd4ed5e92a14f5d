"""Progress of a long pass (feature extraction, bad-image scan, listing, index building, ``prepare``): rate and ETA.
Covered by tests/test_progress_bar.py.

A pure helper fed counts: ``bar = ProgressBar(total, "features"); bar.update(b) ...; bar.close()``.

* On a terminal (stderr is a TTY) it redraws one line ``desc |#####-----| 1200/8000 15% 310 img/s ETA 22s`` at most
  every ``redraw_s``, from ``first_s`` on;
* otherwise (a log file, a pipe, CI) it logs ``desc: 1200/8000 (15%), 310 img/s, ETA 22s`` to the
  ``instdisc.progress`` logger at the first count after ``first_s`` (2 s), then every ``interval_s`` (10 s), and a
  last line when done; a pass over in less than ``first_s`` stays silent (no log noise from small passes);
* ``--quiet`` (:func:`set_quiet`) sets that logger to WARNING: no bar and no progress lines.

``total`` may be None (a listing of unknown size): count and rate, no ETA.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, TextIO

__all__ = ["ProgressBar", "format_progress", "format_eta", "set_quiet", "LOGGER"]

LOGGER = "instdisc.progress"
log = logging.getLogger(LOGGER)
_WIDTH = 24


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every progress bar and progress line."""
    log.setLevel(logging.WARNING if quiet else logging.NOTSET)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_progress(desc: str, done: int, total: int | None, elapsed: float, *, unit: str = "img",
                    bar: bool = False) -> str:
    """The text of one progress report (pure): counts, percentage, rate since the start and ETA."""
    rate = done / elapsed if elapsed > 0 else 0.0
    rate_text = f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2f} {unit}/s"
    if total is None:
        return f"{desc}: {done:,} {unit}, {rate_text}, {elapsed:.0f}s"
    frac = min(1.0, done / total) if total else 1.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    if bar:
        filled = int(round(frac * _WIDTH))
        return (f"{desc} |{'#' * filled}{'-' * (_WIDTH - filled)}| {done:,}/{total:,} {100 * frac:.0f}% "
                f"{rate_text} ETA {format_eta(eta)}")
    return f"{desc}: {done:,}/{total:,} ({100 * frac:.0f}%), {rate_text}, ETA {format_eta(eta)}"


class ProgressBar:
    """Counts work done and shows it (see the module docstring). Use as a context manager or call ``close()``."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", stream: TextIO | None = None,
                 tty: bool | None = None, interval_s: float = 10.0, redraw_s: float = 0.2, first_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total = None if total is None else int(total)
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = log.isEnabledFor(logging.INFO)
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.interval_s, self.redraw_s, self.first_s, self.clock = interval_s, redraw_s, first_s, clock
        self.done = 0
        self.t0 = self.t_last = clock()
        self.closed = False
        self.shown = 0  # bars drawn / lines logged

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close(ok=exc[0] is None)

    def text(self, bar: bool = False) -> str:
        return format_progress(self.desc, self.done, self.total, self.clock() - self.t0, unit=self.unit, bar=bar)

    def update(self, n: int = 1) -> None:
        self.set(self.done + int(n))

    def set(self, done: int) -> None:
        self.done = int(done)
        if not self.enabled or self.closed:
            return
        now = self.clock()
        if self.shown == 0:
            due = now - self.t0 >= self.first_s
        else:
            due = now - self.t_last >= (self.redraw_s if self.tty else self.interval_s)
        if not due:
            return
        if self.tty:
            self.stream.write("\r" + self.text(bar=True) + "\x1b[K")
            self.stream.flush()
        else:
            log.info("%s", self.text())
        self.shown, self.t_last = self.shown + 1, now

    def close(self, ok: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.enabled or not self.shown:
            return
        if self.tty:
            self.stream.write("\r" + self.text(bar=True) + "\x1b[K\n")
            self.stream.flush()
        else:
            elapsed = self.clock() - self.t0
            log.info("%s: %s, %s %s in %.1fs", self.desc, "done" if ok else "stopped", f"{self.done:,}", self.unit,
                     elapsed)
