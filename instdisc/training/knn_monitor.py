"""InstDisc's training-time kNN monitor: the memory bank as gallery, held-out images embedded with the eval
transform, weighted kNN vote (k, exp(s / tau)). Covered by tests/test_train_loop.py; the sharded override
(:class:`instdisc.distributed.knn.DistributedKnnMonitor`) by tests/test_distributed_train.py.
"""
from __future__ import annotations

import logging

import numpy as np
import torch.nn.functional as F

from ..errors import InstdiscError
from ..features import eval_mode, extract_features

__all__ = ["KnnMonitor"]

log = logging.getLogger("instdisc.training")


class KnnMonitor:
    """Built before training starts, so a setting that cannot work is refused before any step: the held-out set is
    built at the training data's image size and channels, and only labelled bank slots and labelled held-out images
    take part (the rest are left out, with a log line saying how many).

    ``monitor(model)`` -> {"knn_top1", "knn_top5"}. A distributed run overrides :meth:`__call__` only (its bank is
    spread over the ranks)."""

    def __init__(self, cfg, train_ds, device):
        from ..data import build_dataset

        self.cfg, self.device = cfg, device
        self.train_labels = np.asarray(train_ds.labels)
        self.gallery_rows = np.flatnonzero(self.train_labels >= 0)  # (G,) bank slots that vote
        if len(self.gallery_rows) == 0:
            raise InstdiscError("--knn-every needs labels in the training data")
        if len(self.gallery_rows) < len(self.train_labels):
            log.warning("kNN monitor: %d of %d training images are unlabeled; the gallery is the %d labelled bank "
                        "slots", len(self.train_labels) - len(self.gallery_rows), len(self.train_labels),
                        len(self.gallery_rows))
        self.test_ds = build_dataset(cfg.knn_data, data_root=cfg.data_root, image_size=train_ds.image_size,
                                     channels=train_ds.channels)
        if self.test_ds.channels != train_ds.channels:
            raise InstdiscError(f"--knn-data {cfg.knn_data} has {self.test_ds.channels}-channel images but the "
                                f"training data has {train_ds.channels}")
        test_labels = np.asarray(self.test_ds.labels)
        self.query_rows = np.flatnonzero(test_labels >= 0)  # (Q,) held-out images that are scored
        if len(self.query_rows) == 0:
            raise InstdiscError(f"--knn-data {cfg.knn_data} has no labelled images (a kNN monitor needs labels)")
        if len(self.query_rows) < len(test_labels):
            log.warning("kNN monitor: %d of %d --knn-data images are unlabeled and are not scored",
                        len(test_labels) - len(self.query_rows), len(test_labels))

    def queries(self, model) -> tuple[np.ndarray, np.ndarray]:
        """The labelled held-out images' embeddings (eval mode) -> (Q, D) float32, their labels (Q,)."""
        with eval_mode(model):
            test = extract_features(model.embed, self.test_ds, device=self.device, desc="kNN monitor features")
        return test.features[self.query_rows], test.labels[self.query_rows]

    def __call__(self, model) -> dict:
        from ..knn import knn_evaluate

        q, q_labels = self.queries(model)
        bank = F.normalize(model.objective.bank.memory.float(), dim=1).cpu().numpy()[self.gallery_rows]  # (G, D)
        res = knn_evaluate(bank, self.train_labels[self.gallery_rows], q, q_labels, k=self.cfg.knn_k,
                           tau=self.cfg.nce_t)
        return {"knn_top1": res["top1"], "knn_top5": res.get("top5")}
