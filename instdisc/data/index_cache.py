"""On-disk cache of file listings and bad-image scans. Covered by tests/test_data_folder.py.

One ``.npz`` per indexed source (folder or file list) in ``cache_dir``, named by a hash of the source's real path.
It holds a JSON ``meta`` record plus numpy arrays, is read with ``allow_pickle=False`` and written atomically (temp
file + ``os.replace``). Any problem reading it means "no cache": the caller rebuilds.

Staleness is decided from directory mtimes (see :func:`is_racy`): a directory's mtime changes whenever an entry is
added, removed or renamed in it, so comparing the mtimes of every indexed directory is enough to notice new, deleted
or renamed images without listing millions of files.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write

__all__ = ["CACHE_FORMAT", "RACY_NS", "cache_path", "read_cache", "write_cache", "is_racy", "now_ns"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# An mtime this close to the moment it was recorded may hide a later change made within the same timestamp tick
# (filesystems store mtimes at 1 ns .. 2 s granularity); such entries are never trusted ("racy", as in git).
RACY_NS = 2_000_000_000


def now_ns() -> int:
    return time.time_ns()


def is_racy(mtime_ns: int, recorded_at_ns: int) -> bool:
    return mtime_ns >= recorded_at_ns - RACY_NS


def cache_path(cache_dir: str | os.PathLike, kind: str, source: str) -> Path:
    key = hashlib.sha1(os.path.realpath(source).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-{key}.npz"


def read_cache(path: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(meta, arrays) or None when absent, unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8", "surrogateescape"))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        log.warning("ignoring unreadable index cache %s: %s", path, e)
        return None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return None
    return meta, arrays


def write_cache(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> bool:
    """Write atomically; a cache that cannot be written only costs speed, so failures are logged, not raised."""
    meta = dict(meta, format=CACHE_FORMAT)
    blob = np.frombuffer(json.dumps(meta).encode("utf-8", "surrogateescape"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, meta=blob, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(buf.getbuffer()))
    except OSError as e:
        log.warning("cannot write index cache %s: %s", path, e)
        return False
    return True
