"""Datasets given as a text file of image paths. Covered by tests/test_data_filelist.py.

One image per line: ``PATH`` or ``PATH<TAB>LABEL`` or ``PATH,LABEL``. Relative paths are relative to the list's
folder. LABEL is an integer class index (``-1`` = unlabeled) or a class name; when any label is not an integer all
labels are read as names and numbered in sorted order. Blank lines and lines starting with ``#`` are skipped, and so
is a ``path,label``-style header. A line whose whole text ends in an image suffix is a path even if it contains commas.

With ``cache_dir`` the result of a full bad-image scan is remembered while the list file is unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InstdiscError
from .images import BadImage, is_image_name
from .index_cache import cache_path, is_racy, now_ns, read_cache, write_cache
from .paths import PathTable

__all__ = ["FileList", "read_filelist", "save_scan"]

_HEADER_WORDS = {"path", "file", "filename", "file_name", "filepath", "image", "img", "image_path", "name"}


@dataclass
class FileList:
    source: str
    paths: PathTable
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    signature: dict  # list file mtime_ns, size, read_at_ns
    bad: list[BadImage] | None = None
    cache_file: str | None = None


def _split_line(line: str) -> tuple[str, str | None]:
    if is_image_name(line.strip().strip("\"'")):
        return line, None
    sep = "\t" if "\t" in line else ","
    if sep not in line:
        return line, None
    path, label = line.rsplit(sep, 1)
    return path, label


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _parse(list_path: str, text: str) -> tuple[list[str], np.ndarray, list[str]]:
    base = os.path.dirname(os.path.abspath(list_path))
    paths: list[str] = []
    raw_labels: list[str | None] = []
    first = True
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, label = _split_line(line)
        path = path.strip().strip("\"'")
        label = None if label is None else (label.strip().strip("\"'") or None)
        if first and path.lower() in _HEADER_WORDS and (label is None or _parse_int(label) is None):
            first = False
            continue
        first = False
        if not path:
            raise InstdiscError(f"empty path on line {lineno} of {list_path}")
        path = os.path.expanduser(path)
        paths.append(path if os.path.isabs(path) else os.path.join(base, path))
        raw_labels.append(label)
    if not paths:
        raise InstdiscError(f"file list has no image paths: {list_path}")
    given = [lab for lab in raw_labels if lab is not None]
    ints = [_parse_int(lab) for lab in given]
    if all(v is not None for v in ints):  # integer labels (or none at all)
        values = iter(ints)
        labels = np.array([-1 if lab is None else next(values) for lab in raw_labels], dtype=np.int64)  # (N,)
        if (labels < -1).any():
            raise InstdiscError(f"negative label {labels.min()} in {list_path} (use -1 for unlabeled)")
        classes = [str(k) for k in range(int(labels.max()) + 1)]
    else:  # class names
        classes = sorted(set(given))
        pos = {c: k for k, c in enumerate(classes)}
        labels = np.array([-1 if lab is None else pos[lab] for lab in raw_labels], dtype=np.int64)  # (N,)
    return paths, labels, classes


def _table(paths: list[str], base: str) -> PathTable:
    """Store names relative to the list's folder when they all live under it (smaller), else absolute."""
    prefix = base.rstrip(os.sep) + os.sep
    if all(p.startswith(prefix) for p in paths):
        return PathTable.from_names(base, [p[len(prefix):] for p in paths])
    return PathTable.from_names("", paths)


def read_filelist(list_path: str, *, cache_dir: str | None = None) -> FileList:
    if not os.path.isfile(list_path):
        raise InstdiscError(f"file list not found: {list_path}")
    list_path = os.path.abspath(list_path)
    read_at = now_ns()
    try:
        st = os.stat(list_path)
        with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise InstdiscError(f"cannot read file list {list_path}: {e.strerror or e}") from None
    paths, labels, classes = _parse(list_path, text)
    signature = {"mtime_ns": st.st_mtime_ns, "size": st.st_size, "read_at_ns": read_at}
    out = FileList(list_path, _table(paths, os.path.dirname(list_path)), labels, classes, signature)
    if cache_dir is not None:
        cfile = cache_path(cache_dir, "filelist", list_path)
        out.cache_file = str(cfile)
        cached = read_cache(cfile)
        if cached is not None:
            meta = cached[0]
            old = meta.get("signature", {})
            fresh = (meta.get("kind") == "filelist" and meta.get("n") == len(paths)
                     and old.get("mtime_ns") == st.st_mtime_ns and old.get("size") == st.st_size
                     and not is_racy(st.st_mtime_ns, old.get("read_at_ns", 0)))
            if fresh and meta.get("bad") is not None:
                out.bad = [BadImage(int(i), out.paths[int(i)], str(r)) for i, r in meta["bad"]]
    return out


def save_scan(fl: FileList, bad: list[BadImage]) -> None:
    """Remember a full scan's result in the cache (keyed by the list file's path, mtime and size)."""
    fl.bad = list(bad)
    if fl.cache_file is not None:
        write_cache(Path(fl.cache_file), {"kind": "filelist", "source": fl.source, "n": len(fl.paths),
                                          "signature": fl.signature, "bad": [[b.index, b.reason] for b in bad]}, {})
