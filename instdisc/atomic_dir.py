"""Build an output directory beside its final name and rename it into place: complete or absent.

Covered by tests/test_atomic_dir.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .atomic import check_writable_dir, fsync_dir, pid_alive
from .errors import InstdiscError
from .faultpoints import fault_point

__all__ = ["atomic_directory", "check_can_replace", "clean_stale_siblings"]

log = logging.getLogger(__name__)


def clean_stale_siblings(out: str | os.PathLike) -> None:
    """Tidy what a killed writer of ``out`` left beside it: ``.<name>.tmp-<pid>`` (removed) and
    ``.<name>.old-<pid>`` (the previous output, moved aside just before the final rename: put back when ``out`` is
    missing, else removed), for pids that are no longer running. Writers that are alive are left alone."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    for entry in sorted(parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            log.warning("restoring %s from %s (a replacement was interrupted)", out, entry.name)
            os.replace(entry, out)
            continue
        log.info("removing %s left by an interrupted write (pid %s)", entry, m.group(2))
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_can_replace(out: str | os.PathLike, overwrite: bool, what: str = "output") -> Path:
    """Refuse an existing ``out`` unless ``overwrite``; check that its parent folder can be written."""
    out = Path(out)
    clean_stale_siblings(out)
    if out.exists() and not overwrite:
        raise InstdiscError(f"{what} {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise InstdiscError(f"{what} {out} exists and is not a directory")
    check_writable_dir(out.parent)
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; when the block ends without error it becomes ``out``.

    An existing ``out`` is refused unless ``overwrite``; with it, the old folder stays in place until the new one
    is complete, is then moved aside, and is deleted after the rename. On error the temporary folder is removed;
    what a killed process left (its temporary folder, or an old folder moved aside) is tidied by the next call.
    """
    out = check_can_replace(out, overwrite, what)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        fault_point("atomic_dir.temp_complete", path=str(tmp))  # test-only (instdisc.faultpoints): before rename
        old = None
        if out.exists():
            if not overwrite:  # appeared while we were writing
                raise InstdiscError(f"{what} {out} appeared while writing; pass --overwrite to replace it")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            fault_point("atomic_dir.old_moved", path=str(old))  # test-only: old folder aside, new one not in place
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:  # put the previous output back
                os.replace(old, out)
            raise
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
