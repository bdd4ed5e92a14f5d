"""Small file datasets decoded once into memory, so that they train through BatchAugment like the named datasets.
Covered by tests/test_data_in_memory.py.

A folder or file list whose decoded images fit in ``IN_MEMORY_MAX_BYTES`` (N x C x S x S bytes, 1 GiB) is decoded
once, before training, into the view a folder's eval transform gives (the short side resized to int(S x 256/224),
the centre S x S crop, PIL bilinear): evaluating the in-memory dataset gives exactly the pixels the per-sample path
gives, and training crops (BatchAugment) are taken from that view. (``instdisc prepare`` stores the whole centre
square instead, for collections too large for memory.) Measured on a 2-core
CPU, 8,000 PNGs of 28 px: ~275 images/s through the per-sample PIL path, ~1,600 in memory. Larger collections keep
the PIL path (or ``instdisc prepare``, which makes the same rows once, on disk).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision import transforms as T

from .dataset import IndexedDataset
from .images import io_threads, open_image
from .transforms import EVAL_RESIZE_RATIO, eval_transform

__all__ = ["IN_MEMORY_MAX_BYTES", "decoded_bytes", "fits_in_memory", "decode_into_memory"]

log = logging.getLogger(__name__)

IN_MEMORY_MAX_BYTES = 1 << 30  # decoded uint8 pixels a file dataset may take in memory (1 GiB)
_CHUNK = 256


def decoded_bytes(ds: IndexedDataset) -> int:
    """Bytes of ``ds`` decoded: N x C x S x S (uint8)."""
    return len(ds) * ds.channels * ds.image_size ** 2


def fits_in_memory(ds: IndexedDataset, max_bytes: int = IN_MEMORY_MAX_BYTES) -> bool:
    """A file dataset (``paths``) small enough to decode into memory."""
    return ds.paths is not None and decoded_bytes(ds) <= max_bytes


def decode_into_memory(ds: IndexedDataset, *, workers: int | None = None) -> IndexedDataset:
    """``ds`` (files) decoded into a uint8 (N, C, S, S) array: same samples, labels, slots and normalisation; a file
    that cannot be read raises InstdiscError naming it (nothing is written anywhere)."""
    from ..progress_bar import ProgressBar

    n, c, s = len(ds), ds.channels, ds.image_size
    mode = "L" if c == 1 else "RGB"
    view_of = T.Compose([T.Resize(int(s * EVAL_RESIZE_RATIO)), T.CenterCrop(s)])  # a folder's eval geometry
    array = torch.empty((n, c, s, s), dtype=torch.uint8)  # (N, C, S, S)
    view = array.numpy()

    def run(start: int) -> int:
        stop = min(start + _CHUNK, n)
        for i in range(start, stop):
            a = np.asarray(view_of(open_image(ds.paths[i], mode)), dtype=np.uint8)  # (S, S) or (S, S, 3)
            view[i] = a[None] if c == 1 else a.transpose(2, 0, 1)
        return stop - start

    t0 = time.perf_counter()
    workers = workers if workers is not None else io_threads()
    with ProgressBar(n, "decoding into memory", unit="img") as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        for done in pool.map(run, range(0, n, _CHUNK)):
            bar.update(done)
    out = IndexedDataset(spec=ds.spec, labels=ds.labels, classes=ds.classes, channels=c, image_size=s,
                         mean=ds.mean, std=ds.std, array=array, source_indices=ds.source_indices)
    out.content_id = f"files {ds.fingerprint()} | eval view at {s}"  # the files, not the decoded pixels, name it
    out.transform = eval_transform(out)
    out.geometry = ds.geometry
    out.n_source = getattr(ds, "n_source", None)
    out.decoded_from = "files"
    seconds = time.perf_counter() - t0
    log.info("decoded %d images (%.1f MiB, bound %d MiB) into memory in %.1fs (%.0f images/s): training goes "
             "through BatchAugment; --augment pil reads the files every step instead", n, decoded_bytes(ds) / 2**20,
             IN_MEMORY_MAX_BYTES >> 20, seconds, n / max(seconds, 1e-9))
    return out
