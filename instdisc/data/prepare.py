"""``instdisc prepare``: decode a folder or file list once into an image cache (format: :mod:`instdisc.data.cache`).
Covered by tests/test_data_prepare.py.

* Rows are the samples of ``build_dataset(DATA, image_size=S, channels=C, skip_bad_images=...)``: same order,
  labels and slots as training from the folder itself. Size and channels are inferred as for the folder
  (:mod:`instdisc.data.geometry`) unless given. Each image is stored as :data:`~instdisc.data.images.RESIZE_RULE`.
* Memory stays bounded whatever N is: images are decoded ``chunk_rows`` at a time (about 64 MiB) by a thread pool
  and written into the file's contiguous images array; nothing holds more than one chunk.
* Atomic and resumable, as ``export-features``: a new file appears under its name only with its datasets and
  attributes in place (``.<name>.tmp-<pid>`` renamed), ``n_written`` advances after each chunk is flushed, and
  running the same command on an incomplete file continues at the chunk boundary at or below ``n_written`` (the
  source fingerprint, size, channels and rule must match); decoding is deterministic, so the finished file holds
  the same rows as an uninterrupted run. ``overwrite`` builds beside the target and renames it when complete.
* Bad images: the bad-image scan runs first, as for training (``skip_bad_images`` drops them and the cache records
  them in ``skipped_json``; otherwise the command stops before decoding anything). A file that becomes unreadable
  while decoding stops the run with a one-line error; what was written stays and a re-run continues.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import sigterm_as_interrupt as _sigterm_as_interrupt
from ..errors import InstdiscError
from ..faultpoints import fault_point
from ..h5file import existing_target, utf8_path
from ..version import __version__
from .cache import CACHE_FORMAT, CACHE_KIND, read_cache_attrs
from .images import RESIZE_RULE, decode_square

__all__ = ["prepare_cache", "PrepareResult"]

log = logging.getLogger(__name__)

_CHUNK_BYTES = 64 << 20
# attributes that decide the rows: a resumed prepare must match them all
_IDENTITY = ("format_version", "n", "channels", "image_size", "resize_rule", "source_fingerprint", "chunk_rows")


@dataclass
class PrepareResult:
    path: Path
    n: int
    channels: int
    image_size: int
    resumed_from: int  # rows already in the file when this call started (0: fresh)
    seconds: float
    images_per_s: float  # images decoded by this call per second
    skipped: int  # bad images left out


def _chunk_rows(c: int, s: int, n: int) -> int:
    return int(max(1, min(n, _CHUNK_BYTES // (c * s * s))))


def _create(path: Path, n: int, c: int, s: int, ds, attrs: dict) -> None:
    """A complete skeleton: images allocated (contiguous, never filled), labels / indices / paths written."""
    import h5py

    with h5py.File(path, "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the offset exists from the start: memory-mappable
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # no pass of zeros over N x C x S x S bytes
        dcpl.set_obj_track_times(False)  # no creation / modification times: a re-run ends byte-identical
        h5py.h5d.create(f.id, b"images", h5py.h5t.NATIVE_UINT8, h5py.h5s.create_simple((n, c, s, s)), dcpl=dcpl)
        f.create_dataset("labels", data=np.asarray(ds.labels, dtype=np.int64))
        f.create_dataset("source_indices", data=np.asarray(ds.source_indices, dtype=np.int64))
        names = f.create_dataset("paths", shape=(n,), dtype=h5py.string_dtype("utf-8"))
        for a in range(0, n, 65536):  # bounded memory for millions of names
            names[a:min(n, a + 65536)] = np.array([utf8_path(ds.paths[i]) for i in range(a, min(n, a + 65536))],
                                                  dtype=object)
        for k, v in attrs.items():
            f.attrs[k] = v


def _decode_block(ds, rows: range, c: int, s: int, pool) -> np.ndarray:
    """Rows ``rows`` decoded and resized -> (b, C, S, S) uint8."""
    mode = "L" if c == 1 else "RGB"

    def one(i: int) -> np.ndarray:
        a = np.asarray(decode_square(ds.paths[i], mode, s), dtype=np.uint8)  # S x S or S x S x 3
        return a[None] if c == 1 else a.transpose(2, 0, 1)

    out = np.empty((len(rows), c, s, s), dtype=np.uint8)
    for k, a in enumerate(pool.map(one, rows) if pool is not None else map(one, rows)):
        out[k] = a
    return out


def prepare_cache(data, out: str | os.PathLike, *, image_size: int | None = None, channels: int | None = None,
                  data_root=None, limit: int | None = None, skip_bad_images: bool = False, overwrite: bool = False,
                  workers: int | None = None, index_cache: str | os.PathLike | None = None,
                  chunk_rows: int | None = None) -> PrepareResult:
    """Decode the folder / file list ``data`` (a spec or an IndexedDataset of files) into the cache ``out``.

    ``workers``: decoding threads (default: the CPU count; PIL releases the GIL while decoding). ``chunk_rows``:
    rows decoded and written at a time (default about 64 MiB of pixels). See the module docstring.
    """
    from ..arguments import check_int
    from ..atomic import check_free_space, check_writable_dir
    from ..atomic_dir import clean_stale_siblings
    from ..progress_bar import ProgressBar
    from .spec import build_dataset

    check_int(workers, "--workers", 1, optional=True)  # before the source is listed or scanned
    check_int(chunk_rows, "--chunk-rows", 1, optional=True)
    check_int(limit, "--limit", 1, optional=True)
    check_int(image_size, "--image-size", 1, optional=True)
    out = Path(out)
    clean_stale_siblings(out)
    old = existing_target(out, read_cache_attrs, overwrite=overwrite, what="image cache", complete="a complete cache")
    if isinstance(data, str):
        ds = build_dataset(data, data_root=data_root, limit=limit, skip_bad_images=skip_bad_images,
                           image_size=image_size, channels=channels, cache_dir=index_cache)
    else:
        ds = data
    if ds.paths is None:
        raise InstdiscError(f"{ds.spec} is already an in-memory dataset; prepare decodes folders and file lists")
    n, c, s = len(ds), int(ds.channels), int(ds.image_size)
    rows_per_chunk = int(chunk_rows) if chunk_rows else _chunk_rows(c, s, n)
    n_source = int(getattr(ds, "n_source", None) or len(ds))  # files listed before bad ones were dropped
    attrs = {
        "kind": CACHE_KIND, "format_version": CACHE_FORMAT, "n": n, "channels": c, "image_size": s,
        "resize_rule": RESIZE_RULE, "source_spec": str(ds.spec), "source_fingerprint": ds.fingerprint(),
        "classes_json": json.dumps(list(ds.classes)), "mean": np.asarray(ds.mean, dtype=np.float64),
        "std": np.asarray(ds.std, dtype=np.float64), "geometry_json": json.dumps(ds.geometry),
        "skipped_json": json.dumps(np.setdiff1d(np.arange(n_source), ds.source_indices).tolist()
                                   if limit is None else []),  # source positions of skipped bad images
        "chunk_rows": rows_per_chunk, "instdisc_version": __version__, "complete": False, "n_written": 0,
    }
    target, start = out, 0
    if old is not None and not overwrite:  # incomplete: continue it
        for k in _IDENTITY:
            if old.get(k) != attrs[k]:
                raise InstdiscError(f"cannot resume the incomplete {out}: {k} is {attrs[k]!r} now but {old.get(k)!r} "
                                    f"in the file; pass --overwrite to start over")
        start = (int(old["n_written"]) // rows_per_chunk) * rows_per_chunk
        log.info("resuming %s: %d of %d images were written; continuing at row %d", out, old["n_written"], n, start)
    else:
        check_writable_dir(out.parent)
        check_free_space(out.parent, n * c * s * s + n * 300 + (1 << 20))
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            _create(tmp, n, c, s, ds, attrs)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if out.exists():  # overwrite: the old file stays until the new one is complete
            target = tmp
        else:
            os.replace(tmp, out)
    log.info("prepare %s -> %s: %d images, %d channel(s), %d px (%s)", ds.spec, out, n, c, s, RESIZE_RULE)
    import h5py

    workers = int(workers) if workers is not None else (os.cpu_count() or 1)
    done = start
    t0 = time.perf_counter()
    f = h5py.File(target, "r+")
    try:
        with _sigterm_as_interrupt(), ProgressBar(n - start, f"prepare {out.name}") as bar, \
                (ThreadPoolExecutor(max_workers=workers) if workers > 1 else contextlib.nullcontext()) as pool:
            images = f["images"]
            for a in range(start, n, rows_per_chunk):
                rows = range(a, min(n, a + rows_per_chunk))
                images[rows.start:rows.stop] = _decode_block(ds, rows, c, s, pool)  # (b, C, S, S)
                f.flush()  # the rows reach the file before the counter says they are there
                f.attrs["n_written"] = rows.stop
                f.flush()
                fault_point("prepare.flush", rows=rows.stop)  # test-only (instdisc.faultpoints): kill after a flush
                done = rows.stop
                bar.update(len(rows))
            f.attrs["complete"] = True
            f.close()
    except InstdiscError as e:
        _close(f, done)
        if target != out:
            target.unlink(missing_ok=True)
            raise
        raise InstdiscError(f"{str(e).splitlines()[0]}; {done} of {n} images are in {out}: restore the file and run "
                            f"the same command again to continue (or --skip-bad-images with --overwrite)") from None
    except BaseException:
        _close(f, done)
        if target != out:
            target.unlink(missing_ok=True)  # an interrupted overwrite leaves the old file as it was
        elif done < n:
            log.warning("prepare of %s stopped after %d of %d images; run the same command again to continue", out,
                        done, n)
        raise
    if target != out:
        os.replace(target, out)
    secs = time.perf_counter() - t0
    skipped = len(json.loads(attrs["skipped_json"]))
    log.info("wrote %s: %d x %d x %d x %d uint8 in %.1fs (%.0f images/s)%s", out, n, c, s, s, secs,
             (n - start) / secs if secs > 0 else float("inf"), f", resumed at row {start}" if start else "")
    return PrepareResult(out, n, c, s, start, secs, (n - start) / secs if secs > 0 else float("inf"), skipped)


def _close(f, done: int) -> None:
    try:
        if f.id.valid:
            f.flush()
            f.attrs["n_written"] = done
            f.close()
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        log.debug("closing the cache after an error: %s", e)
