"""instdisc.data.subset: rows of a dataset, in memory and as files."""
import numpy as np
import torch

from instdisc.data.dataset import IndexedDataset
from instdisc.data.subset import rows_of


def _array_ds(n=7):
    arr = torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 2, 2)  # (n, 1, 2, 2): row i holds 4i .. 4i+3
    return IndexedDataset(spec="t", labels=np.arange(n) % 3, classes=["a", "b", "c"], channels=1, image_size=2,
                          mean=[0.5], std=[0.25], array=arr)


def test_rows_of_array_keeps_order_labels_and_normalisation():
    ds = _array_ds()
    ds.eval_crop = 0.875
    sub = rows_of(ds, [5, 0, 3])
    assert len(sub) == 3 and torch.equal(sub.array, ds.array[[5, 0, 3]])
    assert sub.labels.tolist() == [2, 0, 0] and sub.source_indices.tolist() == [5, 0, 3]
    assert (sub.mean, sub.std, sub.image_size, sub.eval_crop) == (ds.mean, ds.std, 2, 0.875)


def test_rows_of_files_and_one_row():
    ds = IndexedDataset(spec="f", labels=[0, 1, -1], classes=["a", "b"], channels=3, image_size=8,
                        mean=[0, 0, 0], std=[1, 1, 1], paths=["a.png", "b.png", "c.png"])
    sub = rows_of(ds, np.array([2]))
    assert list(sub.paths) == ["c.png"] and sub.labels.tolist() == [-1] and sub.array is None
