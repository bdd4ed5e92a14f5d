"""Index a directory of images: class sub-folders (labels = position in sorted folder names) or a flat folder
(labels -1). Covered by tests/test_data_folder.py.

Listing uses ``os.scandir`` only (the directory entry type comes from ``readdir``; no ``stat`` per file and no image
is opened), so millions of files index in seconds. With ``cache_dir`` the index is stored once (see
:mod:`instdisc.data.index_cache`) and reused while the mtime of every indexed directory is unchanged.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InstdiscError
from .images import IMG_EXTENSIONS, BadImage
from .index_cache import cache_path, is_racy, now_ns, read_cache, write_cache
from .paths import PathTable

__all__ = ["FolderIndex", "index_folder", "save_scan"]

log = logging.getLogger(__name__)


@dataclass
class FolderIndex:
    root: str
    paths: PathTable  # names relative to root, "class/sub/file.jpg"
    labels: np.ndarray  # (N,) int64, -1 for a flat folder
    classes: list[str]
    dir_mtimes: dict[str, int]  # relative dir ("" = root) -> st_mtime_ns when listed
    listed_at_ns: int
    bad: list[BadImage] | None = None  # result of a full bad-image scan, when one is cached
    from_cache: bool = False
    cache_file: str | None = None
    ignored: dict = field(default_factory=dict)


def _scan_dir(abs_dir: str) -> tuple[list[str], list[str]]:
    """(image file names, sub-directory names), both sorted; hidden entries skipped."""
    files, dirs = [], []
    with os.scandir(abs_dir) as it:
        for e in it:
            name = e.name
            if name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks; d_type answers without a stat on most filesystems
            except OSError:
                continue
            if is_dir:
                dirs.append(name)
            elif name.lower().endswith(IMG_EXTENSIONS):
                files.append(name)
    files.sort()
    dirs.sort()
    return files, dirs


def _walk(root: str, rel: str, names: list[str], dir_mtimes: dict[str, int], seen: set, bar=None) -> None:
    """Append the images under ``root/rel`` (recursively, files before sub-folders) to ``names``."""
    stack = [rel]
    while stack:
        rel = stack.pop()
        abs_dir = os.path.join(root, rel) if rel else root
        st = os.stat(abs_dir)
        if (st.st_dev, st.st_ino) in seen:  # symlink loop
            continue
        seen.add((st.st_dev, st.st_ino))
        dir_mtimes[rel] = st.st_mtime_ns  # recorded BEFORE listing, so a later change always shows
        files, dirs = _scan_dir(abs_dir)
        prefix = rel + os.sep if rel else ""
        names.extend(prefix + f for f in files)
        stack.extend(prefix + d for d in reversed(dirs))
        if bar is not None:
            bar.set(len(names))


def _list_folder(root: str) -> FolderIndex:
    t0 = time.perf_counter()
    listed_at = now_ns()
    root_st = os.stat(root)
    top_files, top_dirs = _scan_dir(root)
    dir_mtimes = {"": root_st.st_mtime_ns}
    seen = {(root_st.st_dev, root_st.st_ino)}
    names: list[str] = []
    counts: list[int] = []
    from ..progress_bar import ProgressBar

    with ProgressBar(None, f"listing {root}", unit="files") as bar:
        for d in top_dirs:
            before = len(names)
            _walk(root, d, names, dir_mtimes, seen, bar)
            counts.append(len(names) - before)
    ignored = {}
    if names:  # class sub-folders
        classes = list(top_dirs)
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)  # (N,)
        if top_files:
            ignored["top_level_images"] = len(top_files)
        empty = [c for c, k in zip(classes, counts) if k == 0]
        if empty:
            ignored["empty_classes"] = empty
    else:  # flat folder of images
        if top_dirs:
            ignored["empty_subfolders"] = len(top_dirs)
        names, classes = list(top_files), []
        labels = np.full(len(names), -1, dtype=np.int64)  # (N,)
    log.info("listed %d images in %d folders under %s in %.2f s", len(names), len(dir_mtimes), root,
             time.perf_counter() - t0)
    return FolderIndex(root, PathTable.from_names(root, names), labels, classes, dir_mtimes, listed_at,
                       ignored=ignored)


def _warn_ignored(root: str, ignored: dict) -> None:
    if ignored.get("top_level_images"):
        log.warning("ignoring %d images directly in %s (it has class sub-folders)", ignored["top_level_images"], root)
    if ignored.get("empty_classes"):
        empty = ignored["empty_classes"]
        log.warning("%d class folders in %s hold no images, e.g. %s", len(empty), root, empty[0])


def _cache_is_fresh(root: str, meta: dict) -> bool:
    if meta.get("kind") != "folder" or meta.get("root") != os.path.realpath(root):
        return False
    listed_at = meta["listed_at_ns"]
    for rel, mtime in meta["dir_mtimes"].items():
        if is_racy(mtime, listed_at):
            return False
        try:
            if os.stat(os.path.join(root, rel) if rel else root).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _from_cache(root: str, meta: dict, arrays: dict, path: str) -> FolderIndex:
    paths = PathTable(root, arrays["blob"], arrays["offsets"])
    labels = arrays["labels"]
    if len(labels) != len(paths) or len(paths) != meta["n"]:
        raise ValueError("inconsistent index cache")
    bad = None
    if meta.get("bad") is not None:
        bad = [BadImage(int(i), paths[int(i)], str(r)) for i, r in meta["bad"]]
    return FolderIndex(root, paths, labels, list(meta["classes"]), dict(meta["dir_mtimes"]), meta["listed_at_ns"],
                       bad=bad, from_cache=True, cache_file=path, ignored=meta.get("ignored", {}))


def _meta(index: FolderIndex) -> dict:
    return {"kind": "folder", "root": os.path.realpath(index.root), "n": len(index.paths), "classes": index.classes,
            "dir_mtimes": index.dir_mtimes, "listed_at_ns": index.listed_at_ns, "ignored": index.ignored,
            "bad": None if index.bad is None else [[b.index, b.reason] for b in index.bad]}


def _save(index: FolderIndex, path) -> None:
    if write_cache(path, _meta(index), {"blob": index.paths.blob, "offsets": index.paths.offsets,
                                        "labels": index.labels}):
        index.cache_file = str(path)


def index_folder(root: str, *, cache_dir: str | None = None) -> FolderIndex:
    """List ``root`` (from the cache in ``cache_dir`` when it is still fresh)."""
    if not os.path.isdir(root):
        raise InstdiscError(f"image folder not found: {root}")
    root = os.path.abspath(root)
    path = cache_path(cache_dir, "folder", root) if cache_dir is not None else None
    if path is not None:
        cached = read_cache(path)
        if cached is not None and _cache_is_fresh(root, cached[0]):
            try:
                index = _from_cache(root, cached[0], cached[1], str(path))
                log.info("folder index of %s loaded from %s (%d images)", root, path, len(index.paths))
                _warn_ignored(root, index.ignored)
                return index
            except (KeyError, ValueError, TypeError, IndexError) as e:
                log.warning("ignoring bad index cache %s: %s", path, e)
    try:
        index = _list_folder(root)
    except PermissionError as e:
        raise InstdiscError(f"cannot list image folder {e.filename or root}: permission denied") from None
    except OSError as e:
        raise InstdiscError(f"cannot list image folder {e.filename or root}: {e.strerror or e}") from None
    _warn_ignored(root, index.ignored)
    if path is not None and len(index.paths):
        _save(index, path)
    return index


def save_scan(index: FolderIndex, bad: list[BadImage]) -> None:
    """Remember the result of a full bad-image scan in the cache (when the index came from / went to one)."""
    index.bad = list(bad)
    if index.cache_file is not None:
        _save(index, Path(index.cache_file))
