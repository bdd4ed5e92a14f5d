"""A dataset restricted to some of its rows. Covered by tests/test_data_subset.py."""
from __future__ import annotations

import numpy as np

from .dataset import IndexedDataset, take_rows

__all__ = ["rows_of"]


def rows_of(ds: IndexedDataset, rows) -> IndexedDataset:
    """An IndexedDataset of rows ``rows`` (R,) of ``ds``, in that order: same classes, normalisation, image size and
    evaluation crop; an in-memory ``ds`` gives an in-memory copy of the rows, a file ``ds`` the rows' paths."""
    rows = np.asarray(rows, dtype=np.int64)  # (R,)
    kw = dict(spec=ds.spec, labels=np.asarray(ds.labels)[rows], classes=ds.classes, channels=ds.channels,
              image_size=ds.image_size, mean=ds.mean, std=ds.std,
              source_indices=np.asarray(ds.source_indices)[rows])
    if ds.array is not None:
        out = IndexedDataset(array=take_rows(ds.array, rows), **kw)  # (R, C, H, W) uint8
    else:
        paths = ds.paths.subset(rows) if hasattr(ds.paths, "subset") else [ds.paths[int(i)] for i in rows]
        out = IndexedDataset(paths=paths, **kw)
        out.draft_scale = ds.draft_scale
    out.eval_crop = getattr(ds, "eval_crop", None)
    return out
