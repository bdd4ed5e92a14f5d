"""Decoded-image caches (written by ``instdisc prepare``, :mod:`instdisc.data.prepare`): the format and the reader.
Covered by tests/test_data_cache.py.

One HDF5 file (``CACHE_FORMAT`` 1)::

    /images          (N, C, S, S) uint8, CONTIGUOUS layout, allocated when the file is created: its bytes sit at
                     one offset of the file, so readers memory-map them (``np.memmap``) and never load them whole
    /labels          (N,) int64, -1 = unlabeled
    /source_indices  (N,) int64, each row's position in the full listing of the source folder / list
    /paths           (N,) UTF-8, the source file of each row
    attributes: kind="instdisc-image-cache", format_version, complete, n_written, n, channels, image_size,
                resize_rule, source_spec, source_fingerprint, classes_json, mean, std, geometry_json, skipped_json,
                chunk_rows, instdisc_version

A cache is a dataset spec everywhere (``cache:PATH``, or any existing ``.h5`` / ``.hdf5`` file that is an image
cache): an in-memory-style :class:`IndexedDataset` whose ``array`` is the memory map, so training takes the
``BatchAugment`` path and feature extraction the batched one. Rows are slots: row i of the cache is sample i of the
folder as built with the same size, channels and bad-image handling.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InstdiscError
from ..h5file import plain, read_attrs
from .dataset import IndexedDataset, limit_indices

__all__ = ["CACHE_KIND", "CACHE_FORMAT", "EVAL_CROP", "is_image_cache", "read_cache_attrs", "open_cache"]

CACHE_KIND = "instdisc-image-cache"
CACHE_FORMAT = 1
EVAL_CROP = 224 / 256  # evaluation sees the centre of a cached square, the fraction a folder's eval transform keeps


def is_image_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is an HDF5 file whose ``kind`` attribute says image cache (nothing else is read)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return plain(f.attrs.get("kind")) == CACHE_KIND
    except (OSError, ValueError):
        return False


def read_cache_attrs(path: str | os.PathLike) -> dict:
    """The attributes of an image cache as plain python values; InstdiscError when it is none."""
    return read_attrs(path, kind=CACHE_KIND, format_version=CACHE_FORMAT, what="image cache",
                      format_name="image-cache", hint="; make one with instdisc prepare")


def open_cache(path: str | os.PathLike, *, spec: str | None = None, limit: int | None = None,
               image_size: int | None = None, channels: int | None = None) -> IndexedDataset:
    """The cache at ``path`` as a dataset over a memory map of its images (``limit``: a fixed subset of rows, the
    same rule as for other datasets, copied into memory). ``image_size``: the side the model sees (default the
    cached side; another side is a resize of each batch). ``channels`` must match the cache's when given."""
    import h5py

    p = Path(path)
    attrs = read_cache_attrs(p)
    n, c, s = int(attrs["n"]), int(attrs["channels"]), int(attrs["image_size"])
    if not attrs.get("complete"):
        raise InstdiscError(f"{p} is incomplete ({attrs.get('n_written')} of {n} images); run the same instdisc "
                            f"prepare command again to finish it")
    if channels is not None and channels != c:
        raise InstdiscError(f"{p} holds {c}-channel images, not {channels}; prepare another cache with --channels")
    with h5py.File(p, "r") as f:
        d = f["images"]
        if d.shape != (n, c, s, s) or d.dtype != np.uint8 or d.chunks is not None:
            raise InstdiscError(f"{p}: images {d.shape} {d.dtype} do not match n={n}, channels={c}, size={s} "
                                f"(damaged file)")
        offset = d.id.get_offset()
        labels = f["labels"][:].astype(np.int64)  # (N,)
        source_indices = f["source_indices"][:].astype(np.int64)  # (N,)
    if offset is None:
        raise InstdiscError(f"{p}: the images were never written (damaged file)")
    # copy-on-write map: writable for torch, the file is never changed, pages are loaded on demand
    mm = np.memmap(p, dtype=np.uint8, mode="c", offset=offset, shape=(n, c, s, s))
    text = spec or f"cache:{p}"
    rows = limit_indices(n, limit, text)
    array = torch.from_numpy(mm) if limit is None else torch.from_numpy(np.ascontiguousarray(mm[rows]))
    classes = json.loads(attrs.get("classes_json") or "[]")
    ds = IndexedDataset(spec=text, labels=labels[rows], classes=classes, channels=c, image_size=image_size or s,
                        mean=tuple(attrs["mean"]), std=tuple(attrs["std"]), array=array,
                        source_indices=source_indices[rows])
    h = hashlib.sha1(f"{attrs['source_fingerprint']}|{attrs['resize_rule']}|{s}|{c}".encode())
    if limit is not None:
        h.update(rows.tobytes())
    ds.content_id = h.hexdigest()
    ds.memmapped = limit is None
    ds.mmap = mm if limit is None else None  # (N, C, S, S) np.memmap that ``array`` views
    ds.eval_crop = EVAL_CROP
    from .transforms import eval_transform

    ds.transform = eval_transform(ds)
    ds.cache_path = str(p)
    ds.geometry = json.loads(attrs.get("geometry_json") or "null")
    return ds
