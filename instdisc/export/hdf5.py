"""Features to HDF5: streamed, chunked, resumable, self-describing; readable with plain h5py.

Covered by tests/test_export_hdf5.py.

File layout (``FEATURES_FORMAT`` 1)::

    /features        (N, D) float32 | float16, chunked (about 256 KiB per chunk), optional gzip/lzf (+ shuffle)
    /labels          (N,) int64, -1 = unlabeled
    /indices         (N,) int64, the row's index in the dataset as built from ``dataset_spec`` (+ ``dataset_limit``)
    /source_indices  (N,) int64, the row's position in the full, unfiltered source (differs after a limit)
    /paths           (N,) UTF-8 strings, only when the data are image files
    attributes: kind="instdisc-features", format_version, complete, n_written, n, dim, dtype, layer, normalised,
                arch, model_kind, model_sha256, model_path, dataset_spec, dataset_fingerprint, dataset_limit (-1: none),
                classes_json, image_size, channels, geometry_json (how a folder's size and channels were chosen,
                "null" otherwise), mean, std, batch_size, compression, instdisc_version, created, completed

Resume rule: rows are written in dataset order and ``n_written`` (rows known to be on disk) is advanced after the
rows are flushed. A file with ``complete=False`` is refused by :func:`read_features`. Running the same export again
on such a file continues it: the settings that determine the rows (model hash, dataset fingerprint, layer, dtype,
compression, ...) must match, and the work restarts at the batch boundary at or below ``n_written`` with the batch
size the file was started with, so every row is computed in the same batch as in an uninterrupted run and the
finished file is identical. ``overwrite=True`` writes a temporary file beside the target and renames it over the
target only when complete (an interrupted overwrite leaves the old file as it was). A new file is created as
``.<name>.tmp-<pid>`` and renamed once its datasets and attributes exist, so a process killed at any moment leaves
either no file or a resumable one; temporary files of killed processes are removed by the next export.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import sigterm_as_interrupt as _sigterm_as_interrupt
from ..errors import InstdiscError
from ..faultpoints import fault_point
from ..h5file import existing_target, plain, read_attrs, utf8_path
from ..version import FEATURES_FORMAT, __version__

__all__ = ["export_features", "read_features", "read_features_attrs", "model_sha256", "FeatureExportResult",
           "FEATURES_KIND", "LAYERS", "DTYPES", "COMPRESSIONS"]

log = logging.getLogger(__name__)

FEATURES_KIND = "instdisc-features"
LAYERS = ("encoder", "embedding")
DTYPES = {"float32": np.float32, "float16": np.float16}
COMPRESSIONS = ("none", "gzip", "lzf")
_CHUNK_BYTES = 1 << 18
# attributes that decide what the rows hold: a resumed export must match them all
_IDENTITY = ("format_version", "arch", "layer", "dim", "dtype", "compression", "model_sha256", "dataset_spec",
             "dataset_fingerprint", "dataset_limit", "n", "image_size")


@dataclass
class FeatureExportResult:
    path: Path
    n: int
    dim: int
    resumed_from: int  # rows already in the file when this call started (0: fresh)
    seconds: float
    rows_per_s: float  # rows computed and written by this call per second
    attrs: dict


def _h5py():
    import h5py

    return h5py


def read_features_attrs(path: str | os.PathLike) -> dict:
    """The attributes of an instdisc features file as plain python values (no data read, no completeness check)."""
    return read_attrs(path, kind=FEATURES_KIND, format_version=FEATURES_FORMAT, what="features file",
                      format_name="features")


def read_features(path: str | os.PathLike, *, allow_incomplete: bool = False):
    """(features (N, D) float32, labels (N,) int64, indices (N,) int64, attrs dict) of an exported file.

    A file whose export did not finish (``complete`` False) raises InstdiscError unless ``allow_incomplete``, in
    which case only its first ``n_written`` rows are returned.
    """
    h5py = _h5py()
    p = Path(path)
    attrs = read_features_attrs(p)
    n, done = int(attrs["n"]), int(attrs["n_written"])
    if not attrs.get("complete"):
        if not allow_incomplete:
            raise InstdiscError(f"{p} is incomplete: its export stopped after {done} of {n} rows; run the same "
                                f"export-features command again to finish it (or pass --overwrite)")
        n = done
    with h5py.File(p, "r") as f:
        for name in ("features", "labels", "indices"):
            if name not in f:
                raise InstdiscError(f"{p} has no '{name}' dataset (damaged file)")
        if f["features"].shape != (int(attrs["n"]), int(attrs["dim"])):
            raise InstdiscError(f"{p}: features shape {f['features'].shape} does not match its attributes "
                                f"n={attrs['n']}, dim={attrs['dim']} (damaged file)")
        feats = f["features"][:n].astype(np.float32, copy=False)  # (n, D)
        labels = f["labels"][:n].astype(np.int64, copy=False)  # (n,)
        indices = f["indices"][:n].astype(np.int64, copy=False)  # (n,)
    return feats, labels, indices, attrs


def model_sha256(src) -> str:
    """The hash a features file records for its model: the checkpoint file's SHA-256 for a training run, the
    exported weights' SHA-256 (metadata ``weights_sha256``) for an exported encoder."""
    from ..training.checkpoint import file_sha256, find_checkpoint

    if src.kind == "export":
        h = src.meta.get("weights_sha256") or src.meta.get("files", {}).get("encoder.pt")
        if h:
            return str(h)
        return file_sha256(Path(src.path) / "encoder.pt")
    return file_sha256(find_checkpoint(src.path))


def _validate(layer: str, dtype: str, compression: str, batch_size: int) -> None:
    if layer not in LAYERS:
        raise InstdiscError(f"--layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    if dtype not in DTYPES:
        raise InstdiscError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise InstdiscError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if batch_size < 1:
        raise InstdiscError(f"--batch-size must be >= 1, got {batch_size}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _create(path: Path, n: int, dim: int, dtype: str, compression: str, has_paths: bool, attrs: dict):
    h5py = _h5py()
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    rows = int(min(n, max(1, _CHUNK_BYTES // (dim * itemsize))))
    comp = {} if compression == "none" else {"compression": compression, "shuffle": True}
    if compression == "gzip":
        comp["compression_opts"] = 4
    f = h5py.File(path, "w")
    try:
        f.create_dataset("features", shape=(n, dim), dtype=DTYPES[dtype], chunks=(rows, dim), **comp)
        vec = dict(chunks=(int(min(n, 1 << 16)),), **comp)
        for name in ("labels", "indices", "source_indices"):
            f.create_dataset(name, shape=(n,), dtype=np.int64, **vec)
        if has_paths:
            f.create_dataset("paths", shape=(n,), dtype=h5py.string_dtype("utf-8"),
                             chunks=(int(min(n, 4096)),), **comp)
        for k, v in attrs.items():
            f.attrs[k] = v
        f.flush()
    except BaseException:
        f.close()
        path.unlink(missing_ok=True)
        raise
    return f


def _resume_mismatch(old: dict, new: dict) -> str | None:
    for k in _IDENTITY:
        if old.get(k) != new.get(k):
            return f"{k} is {new.get(k)!r} now but {old.get(k)!r} in the file"
    return None


def export_features(model, data, out: str | os.PathLike, *, layer: str = "encoder", dtype: str = "float32",
                    compression: str = "none", batch_size: int = 256, device="cpu", workers: int = 0,
                    data_root=None, limit: int | None = None, overwrite: bool = False,
                    on_batch: Callable[[int, int], None] | None = None,
                    flush_every_s: float = 2.0) -> FeatureExportResult:
    """Compute features of ``data`` with ``model`` and stream them into the HDF5 file ``out``.

    ``model``: a run folder, checkpoint file or export folder (or an opened :class:`~instdisc.source.ModelSource`).
    ``data``: a dataset spec (or an IndexedDataset). ``layer``: ``encoder`` (feature v) or ``embedding`` (the
    L2-normalised head output z; needs a head). An incomplete ``out`` from an earlier call with the same settings is
    continued (see the module docstring); a complete one is refused unless ``overwrite``. ``on_batch(rows_done, n)``
    is called after each batch is written.
    """
    import torch

    from ..data import build_dataset
    from ..features import iter_feature_batches
    from ..source import ModelSource, open_model

    from ..arguments import check_int

    _validate(layer, dtype, compression, batch_size)
    check_int(workers, "--workers", 0)
    check_int(limit, "--limit", 1, optional=True)
    out = Path(out)
    from ..atomic_dir import clean_stale_siblings

    clean_stale_siblings(out)  # temp files of killed exports
    # attributes of an existing target; fail fast, before opening the model and the data
    old = existing_target(out, read_features_attrs, overwrite=overwrite, what="features file",
                          complete="a complete export")
    src = model if isinstance(model, ModelSource) else open_model(model, device=device)
    fn = src.fn(layer)  # InstdiscError for "embedding" without a head
    ds = build_dataset(data, data_root=data_root, limit=limit) if isinstance(data, str) else data
    ds = src.prepare(ds)
    n = len(ds)
    dim = int(src.meta["feature_dim"] if layer == "encoder" else src.meta["low_dim"])
    attrs = {
        "kind": FEATURES_KIND, "format_version": FEATURES_FORMAT, "arch": str(src.meta["arch"]), "layer": layer,
        "dim": dim, "n": n, "dtype": dtype, "normalised": layer == "embedding", "compression": compression,
        "model_kind": src.kind, "model_sha256": model_sha256(src), "model_path": str(Path(src.path).resolve()),
        "dataset_spec": str(ds.spec), "dataset_fingerprint": ds.fingerprint(),
        "dataset_limit": int(limit) if limit is not None else -1, "classes_json": json.dumps(list(ds.classes)),
        "image_size": int(ds.image_size), "channels": int(ds.channels),
        "geometry_json": json.dumps(getattr(ds, "geometry", None)), "mean": np.asarray(ds.mean, dtype=np.float64),
        "std": np.asarray(ds.std, dtype=np.float64), "batch_size": int(batch_size),
        "instdisc_version": __version__, "created": _now(), "completed": "", "complete": False, "n_written": 0,
    }

    # Where to write: fresh file in place, resume in place, or a temporary file that replaces the target at the end.
    target, start, resumed = out, 0, 0
    if old is not None and not overwrite:  # incomplete (complete ones were refused above): continue it
        why = _resume_mismatch(old, {k: plain(v) for k, v in attrs.items()})
        if why:
            raise InstdiscError(f"cannot resume the incomplete {out}: {why}; pass --overwrite to start over")
        batch_size = int(old["batch_size"])
        resumed = int(old["n_written"])
        start = (resumed // batch_size) * batch_size  # same batch grid as an uninterrupted run
    elif out.exists():  # overwrite: the old file stays until the new one is complete
        target = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    from ..atomic import check_free_space, check_writable_dir

    check_writable_dir(out.parent)
    if not resumed:
        check_free_space(out.parent, n * dim * np.dtype(DTYPES[dtype]).itemsize + n * 24)

    h5py = _h5py()
    if resumed:
        f = h5py.File(target, "r+")
        log.info("resuming %s: %d of %d rows were written; continuing at row %d (batch size %d)", out, resumed, n,
                 start, batch_size)
    elif target == out:  # a new file appears under its name only with its datasets and attributes in place
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        _create(tmp, n, dim, dtype, compression, ds.paths is not None, attrs).close()
        os.replace(tmp, out)
        f = h5py.File(out, "r+")
    else:
        f = _create(target, n, dim, dtype, compression, ds.paths is not None, attrs)
    paths = ds.paths
    labels_all = np.asarray(ds.labels, dtype=np.int64)
    src_idx_all = np.asarray(getattr(ds, "source_indices", np.arange(n)), dtype=np.int64)
    np_dtype = DTYPES[dtype]
    done, computed = start, 0
    fresh_in_place = not resumed and target == out
    t0 = last_flush = last_log = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            fd, lab, ind, sind = f["features"], f["labels"], f["indices"], f["source_indices"]
            pth = f["paths"] if "paths" in f else None
            for idx, feats in iter_feature_batches(fn, ds, start=start, batch_size=batch_size,
                                                   device=torch.device(device), workers=workers,
                                                   desc=f"export-features {out.name}"):
                s, e = int(idx[0]), int(idx[-1]) + 1  # idx (b,) consecutive rows s..e-1
                if s != done or e - s != len(idx):
                    raise RuntimeError(f"feature batches out of order: got rows {s}..{e - 1}, expected {done}")
                if feats.shape[1] != dim:
                    raise InstdiscError(f"the model gives {feats.shape[1]}-d features but its metadata says {dim}")
                with np.errstate(over="ignore"):
                    rows = feats.astype(np_dtype, copy=False)  # (b, D)
                if not np.isfinite(rows).all():
                    hint = "; use --dtype float32" if dtype == "float16" and np.isfinite(feats).all() else ""
                    raise InstdiscError(f"non-finite features in rows {s}..{e - 1} (max |v| "
                                        f"{np.abs(feats).max():.3g}){hint}")
                fd[s:e] = rows
                lab[s:e] = labels_all[s:e]
                ind[s:e] = np.arange(s, e, dtype=np.int64)
                sind[s:e] = src_idx_all[s:e]
                if pth is not None:
                    pth[s:e] = np.array([utf8_path(paths[i]) for i in range(s, e)], dtype=object)
                done, computed = e, computed + (e - s)
                now = time.perf_counter()
                if now - last_flush >= flush_every_s:
                    f.flush()  # rows reach the file before the counter says they are there
                    f.attrs["n_written"] = done
                    f.flush()
                    fault_point("hdf5.flush", rows=done)  # test-only (instdisc.faultpoints): kill after a flush
                    last_flush = now
                if now - last_log >= 10:
                    log.info("export %s: %d/%d rows, %.0f rows/s", out, done, n, computed / (now - t0))
                    last_log = now
                if on_batch is not None:
                    on_batch(done, n)
            if done != n:
                raise RuntimeError(f"feature extraction stopped at row {done} of {n}")
            f.flush()
            f.attrs["n_written"] = n
            f.attrs["completed"] = _now()
            f.attrs["complete"] = True
            f.flush()
            final_attrs = {k: plain(v) for k, v in f.attrs.items()}
            f.close()
    except BaseException:
        try:
            if f.id.valid:
                f.flush()
                f.attrs["n_written"] = done
                f.close()
        finally:
            if target != out or (fresh_in_place and done == 0):
                target.unlink(missing_ok=True)  # an interrupted overwrite leaves the old file untouched
            elif done < n:
                log.warning("export of %s stopped after %d of %d rows; run the same command again to continue",
                            out, done, n)
        raise
    if target != out:
        os.replace(target, out)
    secs = time.perf_counter() - t0
    log.info("wrote %s: %d x %d %s features (%s layer)%s in %.1fs", out, n, dim, dtype, layer,
             f", resumed at row {start}" if resumed else "", secs)
    return FeatureExportResult(out, n, dim, resumed, secs, computed / secs if secs > 0 else float("inf"),
                               final_attrs)
