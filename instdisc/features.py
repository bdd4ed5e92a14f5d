"""Feature extraction shared by training (bank init, kNN monitor), evaluation and export.

Covered by tests/test_features.py.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .data.transforms import eval_transform

__all__ = ["Features", "extract_features", "iter_feature_batches", "eval_mode"]

log = logging.getLogger(__name__)


@dataclass
class Features:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray    # (N,) int64, -1 = unlabeled
    indices: np.ndarray   # (N,) int64 dataset index of each row


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode inside the block; its train / eval mode as it was afterwards (also on error)."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


def _array_batches(dataset, start: int, batch_size: int, device) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    from .data.batch_aug import batch_eval
    from .data.dataset import take_rows

    n = len(dataset)
    for s in range(start, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        x = take_rows(dataset.array, idx).to(device, non_blocking=True)  # (b, C, H, W) uint8
        yield idx, batch_eval(x, dataset)


def _loader_batches(dataset, start: int, batch_size: int, device, workers: int):
    ds = dataset.with_transform(eval_transform(dataset))
    sub = torch.utils.data.Subset(ds, range(start, len(ds)))
    loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    for x, idx, _ in loader:
        yield idx.numpy(), x.to(device, non_blocking=True)


@torch.no_grad()
def iter_feature_batches(fn: Callable[[torch.Tensor], torch.Tensor], dataset, *, start: int = 0,
                         batch_size: int = 256, device="cpu", workers: int = 0, desc: str | None = None,
                         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices (b,), features (b, D) float32) for rows ``start..N-1`` in order, eval transform applied.
    ``desc``: show a progress bar / periodic progress lines under that name (:mod:`instdisc.progress_bar`)."""
    from .progress_bar import ProgressBar

    device = torch.device(device)
    if getattr(dataset, "array", None) is not None:
        batches = _array_batches(dataset, start, batch_size, device)
    else:
        batches = _loader_batches(dataset, start, batch_size, device, workers)
    if desc is None:
        for idx, x in batches:
            yield idx, fn(x).float().cpu().numpy()
        return
    with ProgressBar(len(dataset) - start, desc) as bar:
        for idx, x in batches:
            out = fn(x).float().cpu().numpy()
            bar.update(len(idx))
            yield idx, out


def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], dataset, *, batch_size: int = 256,
                     device="cpu", workers: int = 0, desc: str | None = "features") -> Features:
    """Run ``fn`` (e.g. ``model.features`` or ``model.embed``) over ``dataset``; rows placed by dataset index.
    Progress is shown under ``desc`` (None: silent)."""
    n = len(dataset)
    feats: np.ndarray | None = None
    filled = np.zeros(n, dtype=bool)
    for idx, f in iter_feature_batches(fn, dataset, batch_size=batch_size, device=device, workers=workers,
                                       desc=desc):
        if feats is None:
            feats = np.empty((n, f.shape[1]), dtype=np.float32)
        feats[idx] = f
        filled[idx] = True
    assert feats is not None and filled.all(), "feature extraction left rows unfilled"
    return Features(feats, np.asarray(dataset.labels, dtype=np.int64), np.arange(n, dtype=np.int64))
