"""What instdisc's two resumable HDF5 files (``export-features`` features, ``prepare`` image caches) share: their
attributes read as plain python, checked for kind and format, and the rules for an existing target. Covered by
tests/test_export_hdf5.py and tests/test_data_cache.py / tests/test_data_prepare.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InstdiscError

__all__ = ["plain", "read_attrs", "existing_target", "utf8_path"]


def plain(v):
    """h5py attribute value -> plain python (str, bool, int, float, list)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | os.PathLike, *, kind: str, format_version: int, what: str, format_name: str,
               hint: str = "") -> dict:
    """The attributes of the instdisc file ``path`` of ``kind`` (``what`` names it in errors, ``hint`` says how to
    make one); InstdiscError when it is missing, not HDF5, of another kind or of another format version."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise InstdiscError(f"{what} not found: {p}")
    try:
        with h5py.File(p, "r") as f:
            attrs = {k: plain(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise InstdiscError(f"{p} is not a readable HDF5 file ({str(e).splitlines()[0][:160]})") from None
    if attrs.get("kind") != kind:
        raise InstdiscError(f"{p} is an HDF5 file but not an instdisc {what} (attribute kind is "
                            f"{attrs.get('kind')!r}){hint}")
    if attrs.get("format_version") != format_version:
        raise InstdiscError(f"{p} has {format_name} format {attrs.get('format_version')}, this instdisc reads "
                            f"{format_version}")
    return attrs


def existing_target(out: Path, read, *, overwrite: bool, what: str, complete: str) -> dict | None:
    """The attributes of an existing output ``out`` (``read``: its ``read_attrs``), or None when there is none or
    it is not one of ours and ``overwrite`` replaces it. Refuses a folder, a file of another kind without
    ``overwrite``, and a complete one without ``overwrite`` (``complete`` names it: "a complete export")."""
    if not out.exists():
        return None
    if not out.is_file():
        raise InstdiscError(f"{out} exists and is not a file; choose another --out")
    try:
        old = read(out)
    except InstdiscError:
        if not overwrite:
            raise InstdiscError(f"{out} exists and is not an instdisc {what}; pass --overwrite to replace it") from None
        return None
    if old.get("complete") and not overwrite:
        raise InstdiscError(f"{out} already exists ({complete}); pass --overwrite to replace it")
    return old


def utf8_path(p: str) -> str:
    """A path as valid UTF-8 for an HDF5 string dataset: undecodable bytes in file names (surrogate escapes) become
    backslash escapes."""
    try:
        p.encode("utf-8")
        return p
    except UnicodeEncodeError:
        return p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
