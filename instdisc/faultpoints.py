"""Test-only fault injection: stop the process with SIGKILL at a named event, so crash tests hit each case every time.

TEST-ONLY. Nothing here is meant for real runs; with the variables below unset (the normal case) :func:`fault_point`
returns at once and no result changes. Even when set, the hooks only kill the process or sleep; they never change
what is computed or written before that moment. Documented in docs/reliability.md ("Test-only fault injection");
covered by tests/test_faultpoints.py (and used by tests/test_fault_kill*.py, tests/test_fault_signals.py).

Environment (read once per process, at the first event; a forked child reads it again):

``INSTDISC_TEST_KILL_AT="EVENT[:N]"``
    SIGKILL this process at the N-th hit of EVENT (default N=1). For an event that carries its own ordinal (``index``:
    ``train.step`` passes the global step just trained) N is that ordinal instead of a count of hits.
``INSTDISC_TEST_KILL_LOG=PATH``
    Before the kill, append one JSON line to PATH: ``{"event", "index", "pid", **ctx}``, so a test can assert which
    event the kill hit.
``INSTDISC_TEST_STEP_SLEEP=SECONDS``
    Sleep this long at every ``train.step`` event (slow steps, so a signal sent after step k lands before the run ends).

Events (where :func:`fault_point` is called):

* ``train.before_first_checkpoint``: a new run wrote ``config.json`` (and initialised its bank), no checkpoint yet.
* ``train.step`` (index = global step): step s is trained and logged, its checkpoint not yet written.
* ``checkpoint.temp_partial``: the middle of writing the temp checkpoint: part of its bytes written and fsynced.
* ``checkpoint.temp_written``: the temp checkpoint is complete and fsynced; the rename onto ``checkpoint.pt`` has
  not happened.
* ``hdf5.flush``: ``export-features`` flushed its rows and then ``n_written`` to the file (ctx ``rows``).
* ``prepare.flush``: ``prepare`` flushed a chunk of decoded images and then ``n_written`` (ctx ``rows``).
* ``atomic_dir.temp_complete``: an output folder (e.g. ``export-encoder``) is complete and fsynced beside its final
  name, not yet renamed; ``atomic_dir.old_moved``: the old folder of an ``--overwrite`` was moved aside, the new one
  not yet renamed into place.
"""
from __future__ import annotations

import json
import os
import signal
import time

__all__ = ["fault_point", "parse_kill_at", "ENV_KILL_AT", "ENV_KILL_LOG", "ENV_STEP_SLEEP"]

ENV_KILL_AT = "INSTDISC_TEST_KILL_AT"
ENV_KILL_LOG = "INSTDISC_TEST_KILL_LOG"
ENV_STEP_SLEEP = "INSTDISC_TEST_STEP_SLEEP"


class _State:
    def __init__(self, environ):
        self.pid = os.getpid()
        spec = environ.get(ENV_KILL_AT, "").strip()
        self.kill_event, self.kill_n = parse_kill_at(spec) if spec else (None, 0)
        self.log_path = environ.get(ENV_KILL_LOG) or None
        sleep = environ.get(ENV_STEP_SLEEP, "").strip()
        self.step_sleep = float(sleep) if sleep else 0.0
        if self.step_sleep < 0:
            raise ValueError(f"{ENV_STEP_SLEEP} must be >= 0 seconds, got {sleep!r}")
        self.active = self.kill_event is not None or self.step_sleep > 0
        self.hits: dict[str, int] = {}


_state: _State | None = None  # None: not read yet in this process


def parse_kill_at(spec: str) -> tuple[str, int]:
    """``"EVENT[:N]"`` -> (EVENT, N); N >= 1, default 1. ValueError for anything else."""
    name, sep, n = spec.strip().partition(":")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"{ENV_KILL_AT}: expected EVENT[:N], got {spec!r}")
    if not sep:
        return name, 1
    try:
        count = int(n)
    except ValueError:
        raise ValueError(f"{ENV_KILL_AT}: N in EVENT:N must be an integer, got {spec!r}") from None
    if count < 1:
        raise ValueError(f"{ENV_KILL_AT}: N in EVENT:N must be >= 1, got {spec!r}")
    return name, count


def _reset() -> None:
    """Forget the settings and hit counts (for this module's own tests)."""
    global _state
    _state = None


def fault_point(name: str, *, index: int | None = None, file=None, **ctx) -> None:
    """TEST-ONLY: an event named ``name`` happened; SIGKILL this process here if ``INSTDISC_TEST_KILL_AT`` names it.

    ``index``: the event's own ordinal (``train.step``: the global step); otherwise hits are counted per process.
    ``file``: an open file being written, flushed and fsynced before the kill (so its partial content is on disk).
    ``ctx``: plain values recorded in the kill log. A no-op when the variables are unset.
    """
    global _state
    st = _state
    if st is None or st.pid != os.getpid():  # first call, or a forked child: its own environment and hit counts
        st = _state = _State(os.environ)
    if not st.active:
        return
    if st.step_sleep and name == "train.step":
        time.sleep(st.step_sleep)
    if name != st.kill_event:
        return
    if index is None:
        index = st.hits.get(name, 0) + 1
        st.hits[name] = index
    if index != st.kill_n:
        return
    if file is not None:
        file.flush()
        os.fsync(file.fileno())
    if st.log_path:
        record = {"event": name, "index": index, "pid": os.getpid(),
                  **{k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in ctx.items()}}
        fd = os.open(st.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
