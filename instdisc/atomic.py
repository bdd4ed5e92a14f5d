"""Write files so that a crash never leaves a half-written file under its final name.

Covered by tests/test_atomic.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

from .errors import InstdiscError
from .faultpoints import fault_point

__all__ = ["fsync_dir", "atomic_write", "atomic_torch_save", "atomic_write_text", "check_free_space", "check_writable_dir",
           "pid_alive", "remove_stale_temps"]

_TMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>" beside the target


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[io.BufferedWriter], None], *,
                 event: str | None = None) -> None:
    """Call ``write_fn(f)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    ``event``: test-only name prefix of this write's fault points (see :mod:`instdisc.faultpoints`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        if event:  # test-only fault point: the temp file is complete and fsynced, not yet renamed
            fault_point(f"{event}.temp_written", path=str(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path: str | os.PathLike, *, event: str | None = None) -> None:
    """``torch.save`` through :func:`atomic_write`; checks free space first. ``event``: as in :func:`atomic_write`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    check_free_space(Path(path).parent, len(data))

    def write(f):
        half = len(data) // 2
        f.write(data[:half])
        if event:  # test-only fault point: the temp file is half written (and fsynced)
            fault_point(f"{event}.temp_partial", file=f, path=f.name, bytes_written=half, bytes_total=len(data))
        f.write(data[half:])

    atomic_write(path, write, event=event)


def check_free_space(directory: str | os.PathLike, nbytes: int, margin: float = 1.1) -> None:
    """Raise InstdiscError when ``directory`` has less than ``nbytes * margin`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < nbytes * margin:
        raise InstdiscError(
            f"not enough free disk in {directory}: need {nbytes * margin / 2**20:.1f} MiB, have {free / 2**20:.1f} MiB")


def check_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that files can be created in it.

    The check creates and removes a probe file, so the file system itself answers (``os.access`` answers for the real
    user id from permission bits and flags, and can be wrong where the server decides, e.g. root-squashed NFS).
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstdiscError(f"cannot create output directory {d}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".instdisc-write-probe-", dir=d)
    except OSError as e:
        raise InstdiscError(f"output directory is not writable: {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return d


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files that :func:`atomic_write` left in ``directory`` when its process was killed.

    A temp file is ``.<name>.tmp-<pid>``; it is stale when no process ``<pid>`` runs (a live writer's file is kept).
    Returns the removed paths.
    """
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        name, mark, pid = p.name.rpartition(_TMP_MARK)
        if not (mark and name.startswith(".") and pid.isdigit() and p.is_file()):
            continue
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process we may not signal counts as alive; so does this
    one)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt (main thread only), so a resumable writer can write its counter and close its
    file before the process ends (``export-features``, ``prepare``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
