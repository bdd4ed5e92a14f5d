"""kNN over a gallery split across ranks: every rank searches its shard, the per-shard top-k lists are merged.
Covered by tests/test_distributed.py (merge) and tests/test_distributed_train.py (monitor vs the gathered bank).

``merge_topk`` is pure numpy. ``sharded_search`` is a collective: each rank searches its own rows with
:func:`instdisc.knn.build_index` (any index kind, FAISS on the rank's GPU when it has one), maps the hits to global
row numbers and the (Q, k) lists are all-gathered in query chunks, so no rank ever holds the whole gallery and the
traffic is W x Q x k (not the gallery). With exact ("flat") shards the merged lists equal an exact search of the
whole gallery (up to the order of equal similarities).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InstdiscError
from ..knn import build_index, knn_classify, prepare_features, search
from ..training.knn_monitor import KnnMonitor
from . import comm

__all__ = ["merge_topk", "sharded_search", "DistributedKnnMonitor"]


def merge_topk(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge candidate lists: sims, ids (Q, M) (several shards' lists side by side; id -1 = none) -> the best k
    (Q, k) by similarity, ties broken by the smaller global id; missing entries are (-inf, -1) at the end."""
    sims = np.asarray(sims, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if sims.shape != ids.shape or sims.ndim != 2:
        raise InstdiscError(f"merge_topk needs sims and ids of the same (Q, M) shape, got {sims.shape} and {ids.shape}")
    if not 1 <= k <= sims.shape[1]:
        raise InstdiscError(f"k={k} must be in [1, {sims.shape[1]}] (the candidates per query)")
    key = np.where(ids < 0, np.inf, -sims.astype(np.float64))  # (Q, M) ascending = best first; missing last
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), key), axis=1)[:, :k]  # (Q, k)
    out_s = np.take_along_axis(sims, order, axis=1)
    out_i = np.take_along_axis(ids, order, axis=1)
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def _torch_topk(gallery: torch.Tensor, block: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of unit rows ``block`` (c, D) in unit rows ``gallery`` (n, D), on their device."""
    s = block @ gallery.T  # c x n
    top = torch.topk(s, k, dim=1)  # sorted, best first
    return top.values.float().cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)


def sharded_search(local_gallery, local_ids, queries, k: int, *, device=None, index: str = "flat",
                   index_params: dict | None = None, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of ``queries`` (Q, D), the same on every rank, in the gallery whose rows are spread
    over the ranks: this rank holds ``local_gallery`` (n_r, D) with global row numbers ``local_ids`` (n_r,).

    index "flat" (default): exact, a matmul + top-k in torch on ``device`` (the rank's GPU under NCCL, else CPU).
    Other kinds: a FAISS index of the shard (:func:`instdisc.knn.build_index`, CPU unless ``index_params`` says
    ``use_gpu``; one rank should not clone its index to every GPU of the node).
    Returns sims (Q, k) float32 and GLOBAL ids (Q, k) int64 on every rank; k is clamped to the gallery size."""
    local_ids = np.asarray(local_ids, dtype=np.int64)
    n_local = int(np.shape(local_gallery)[0])
    if local_ids.shape != (n_local,):
        raise InstdiscError(f"local_ids must be ({n_local},), got {local_ids.shape}")
    counts = comm.all_gather_tensor(torch.tensor([n_local], dtype=torch.int64, device=device)).tolist()
    k = min(int(k), int(sum(counts)))
    k_local = min(k, n_local)
    q = prepare_features(queries, name="queries")  # (Q, D) unit rows
    sims = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    ids = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
    gal = idx = None
    if k_local and index == "flat":
        gal = torch.from_numpy(prepare_features(local_gallery, name="gallery")).to(device)  # n_r x D
    elif k_local:
        idx = build_index(local_gallery, kind=index, **{"use_gpu": False, **(index_params or {})})
    for s in range(0, q.shape[0], chunk_size):
        block = q[s:s + chunk_size]  # (c, D)
        ls = np.full((block.shape[0], k), -np.inf, dtype=np.float32)  # (c, k) this shard's hits, padded
        li = np.full((block.shape[0], k), -1, dtype=np.int64)
        if k_local:
            hs, hi = (_torch_topk(gal, torch.from_numpy(block).to(device), k_local) if gal is not None
                      else search(idx, block, k_local))  # (c, k_local), local rows
            ls[:, :k_local] = hs
            li[:, :k_local] = np.where(hi >= 0, local_ids[np.maximum(hi, 0)], -1)
        every_s = comm.all_gather_tensor(torch.from_numpy(ls).to(device)[None]).cpu().numpy()  # (W, c, k)
        every_i = comm.all_gather_tensor(torch.from_numpy(li).to(device)[None]).cpu().numpy()
        cs = np.concatenate(list(every_s), axis=1)  # (c, W*k)
        ci = np.concatenate(list(every_i), axis=1)
        sims[s:s + block.shape[0]], ids[s:s + block.shape[0]] = merge_topk(cs, ci, k)
    return sims, ids


class DistributedKnnMonitor(KnnMonitor):
    """The training-time kNN monitor (bank as gallery) when the bank is sharded: every rank embeds the held-out set
    (small) and searches its own bank rows; the merged neighbours vote (InstDisc: k, exp(s / tau)). A collective."""

    def __init__(self, cfg, train_ds, device, partition):
        super().__init__(cfg, train_ds, device)
        self.partition = partition

    def __call__(self, model) -> dict:
        q, q_labels = self.queries(model)
        shard = F.normalize(model.objective.bank.memory.float(), dim=1).cpu().numpy()  # (n_r, D)
        owned = self.partition.owned().numpy()  # (n_r,) global slots
        keep = self.train_labels[owned] >= 0  # (n_r,) labelled slots only vote
        coll = self.device if self.device.type == "cuda" else None
        sims, ids = sharded_search(shard[keep], owned[keep], q, self.cfg.knn_k, device=coll)
        res = knn_classify(sims, ids, self.train_labels, q_labels, tau=self.cfg.nce_t)
        return {"knn_top1": res["top1"], "knn_top5": res.get("top5")}
