"""Neighbours from the memory bank: the k nearest other stored rows of every slot, found with FAISS and refreshed on
a schedule. Covered by tests/test_bank_neighbours.py.

The bank stores, this module searches, the objective scores (instdisc.objective: the bank term's positive set
{i} ∪ N(i), AND, Huang et al. 2019). The table is a persistent buffer, so a checkpoint holds it and a resumed run
scores exactly the neighbours the uninterrupted run scored.

    slots      (N, k) int64: slots[i] = the k slots j != i with the largest v_i . v_j, best first (-1: none yet, or
               not selected: with ``select`` < 1 only that share of all (i, j) pairs, those of the largest cosine,
               stays in the table: AND's confidence selection, Huang et al. 2019)
    assign     (N,) int64: the cluster of every slot from spherical k-means over the bank with C clusters (PCL,
               Li et al. 2021; -1: none yet / C = 0 / not selected: with ``select`` < 1 only that share of the
               slots, those nearest their centroid, keeps a cluster); the objective's view term counts the batch's
               other samples of the same cluster as positives
    refreshes  0-dim int64: how many searches filled the table (0: never; the objective then uses no neighbour)

Search (``search_bank``): exact inner product (``IndexFlatIP``) up to ``EXACT_MAX_ROWS`` rows, IVF-Flat above
(``ivf_nlist(N)`` = sqrt(N) cells, ``IVF_NPROBE`` probed, spherical k-means on a sample drawn from a seeded generator:
a refresh searches all N rows, so its cost grows as N^1.5 rather than N^2; docs/benchmarks.md has the cost against
N); on a machine where FAISS sees a GPU the index is put on it. Each row's own slot is dropped from its answer.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from .errors import InstdiscError

__all__ = ["BankNeighbours", "search_bank", "missing_as_nan", "select_confident", "cluster_bank", "cluster_purity", "neighbour_stability", "label_agreement", "NEIGHBOUR_INDEXES",
           "EXACT_MAX_ROWS", "IVF_NPROBE", "ivf_nlist", "resolve_index_kind"]

log = logging.getLogger(__name__)

NEIGHBOUR_INDEXES = ("auto", "flat", "ivf")
_STABILITY_BLOCK_ROWS = 1 << 16  # rows compared at once (rows x k x k booleans)
EXACT_MAX_ROWS = 60_000  # "auto": exact search up to this many rows (cost against N: docs/benchmarks.md), IVF above
IVF_NPROBE = 16  # IVF cells searched per row


def ivf_nlist(n: int) -> int:
    """IVF cells for a bank of n rows: round(sqrt(n)), at least 1, at most n / 39 (39 training rows a cell)."""
    return max(1, min(int(round(n ** 0.5)), n // 39))


def resolve_index_kind(kind: str, n: int) -> str:
    """"flat" or "ivf" for a bank of ``n`` rows (``kind`` "auto": flat up to EXACT_MAX_ROWS)."""
    if kind not in NEIGHBOUR_INDEXES:
        raise InstdiscError(f"neighbour index must be one of {', '.join(NEIGHBOUR_INDEXES)}, got {kind!r}")
    if kind == "auto":
        return "flat" if n <= EXACT_MAX_ROWS else "ivf"
    return kind


def search_bank(memory: torch.Tensor, k: int, *, kind: str = "auto", seed: int = 0, with_scores: bool = False):
    """(N, k) int64: for every row of ``memory`` (N, D) the k other rows with the largest inner product, best first;
    with ``with_scores`` also their (N, k) float32 cosines (nan where the slot is -1): ``(slots, scores)``.

    Rows are unit vectors (the bank's), so inner product is cosine. ``kind``: "flat" (exact), "ivf" (approximate:
    a row the probed cells miss is replaced by the next best found; a missing tail is -1), "auto" (see
    resolve_index_kind). ``seed`` draws IVF's k-means training sample. Ties: FAISS's order."""
    from .knn.search import build_index, search

    n = memory.shape[0]
    k = int(k)
    if memory.dim() != 2 or n < 2:
        raise InstdiscError(f"the bank search needs an (N, D) bank with N >= 2, got {tuple(memory.shape)}")
    if not 1 <= k < n:
        raise InstdiscError(f"neighbours k must satisfy 1 <= k < N, got k={k} with N={n}")
    kind = resolve_index_kind(kind, n)
    x = memory.detach().float().cpu().numpy()  # (N, D) float32
    ivf = {"nlist": ivf_nlist(n), "nprobe": IVF_NPROBE} if kind == "ivf" else {}
    index = build_index(x, kind=kind, rng=np.random.default_rng(seed), **ivf)
    sims, ids = search(index, x, k, exclude_self=True)  # (N, k), (N, k)
    slots = torch.from_numpy(ids)
    return (slots, missing_as_nan(torch.from_numpy(sims), slots)) if with_scores else slots


def missing_as_nan(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``scores`` (N, k) with nan where ``slots`` is -1 (FAISS reports -inf for a neighbour it did not find)."""
    return scores.float().masked_fill(slots < 0, float("nan"))


def _check_selection(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], or the error naming it."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise InstdiscError(f"neighbour selection must be in (0, 1], got {fraction}")
    return fraction


def select_confident(slots: torch.Tensor, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``slots`` (N, k) with every pair outside the ``fraction`` of found pairs (slot >= 0) of the largest ``scores``
    (N, k cosines) set to -1: round(fraction x found) pairs are kept, ties broken by table order (row-major).
    AND's idea (Huang et al. 2019): the neighbourhoods the bank is most sure of first."""
    fraction = _check_selection(fraction)
    found = slots >= 0  # N x k
    keep_n = int(round(fraction * int(found.sum())))
    flat = scores.double().masked_fill(~found, -float("inf")).flatten()  # N*k
    order = torch.sort(flat, descending=True, stable=True).indices[:keep_n]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    return slots.masked_fill(~keep.view_as(slots), -1)


def cluster_bank(memory: torch.Tensor, c: int, *, seed: int = 0, niter: int = 20, with_scores: bool = False):
    """(N,) int64 cluster of every row of ``memory`` (N, D) from spherical k-means with ``c`` clusters (FAISS,
    ``niter`` iterations, seeded initialisation); each row goes to the centroid with the largest inner product.
    With ``with_scores`` also that (N,) float32 inner product (the row against its unit centroid): ``(assign,
    scores)``."""
    import faiss

    n, c = memory.shape[0], int(c)
    if not 2 <= c <= n:
        raise InstdiscError(f"clusters C must satisfy 2 <= C <= N, got C={c} with N={n}")
    x = np.ascontiguousarray(memory.detach().float().cpu().numpy())  # (N, D) float32
    km = faiss.Kmeans(x.shape[1], c, niter=int(niter), seed=int(seed) % (2 ** 31), spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-n // c)), verbose=False)
    km.train(x)
    sims, ids = km.index.search(x, 1)  # (N, 1), (N, 1)
    assign = torch.from_numpy(ids[:, 0].astype(np.int64))
    return (assign, torch.from_numpy(sims[:, 0].astype(np.float32))) if with_scores else assign


def neighbour_stability(old: torch.Tensor, new: torch.Tensor) -> float:
    """Share of the (slot, neighbour) pairs of ``old`` that ``new`` still holds: sum_i |old_i ∩ new_i| / |old|
    (1 = none lost; with full tables the mean over rows of |old_i ∩ new_i| / k). old, new: (N, k) slots; -1 entries
    are no pair (never counted, never matched); nan when ``old`` holds none."""
    if old.shape != new.shape:
        raise InstdiscError(f"neighbour tables differ in shape: {tuple(old.shape)} vs {tuple(new.shape)}")
    kept = 0
    for s in range(0, old.shape[0], _STABILITY_BLOCK_ROWS):
        a, b = old[s:s + _STABILITY_BLOCK_ROWS], new[s:s + _STABILITY_BLOCK_ROWS]
        same = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)  # rows x k x k
        kept += int(same.any(dim=2).sum())
    present = int((old >= 0).sum())
    return kept / present if present else float("nan")


def label_agreement(slots: torch.Tensor, labels) -> float:
    """Share of (slot, neighbour) pairs whose labels agree, over slots with a label (label >= 0) and neighbours
    with one; nan without any. A monitor only: training never reads labels."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
    if lab.numel() != slots.shape[0]:
        return float("nan")
    nb = slots.clamp(min=0)
    nb_lab = lab[nb]  # N x k
    valid = (lab[:, None] >= 0) & (nb_lab >= 0) & (slots >= 0)  # N x k
    if not bool(valid.any()):
        return float("nan")
    return float(((nb_lab == lab[:, None]) & valid).sum()) / float(valid.sum())


def cluster_purity(assign: torch.Tensor, labels) -> float:
    """Share of labelled slots whose label is their cluster's most common label (a monitor only); nan without
    labels or clusters."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
    keep = (lab >= 0) & (assign >= 0) if lab.numel() == assign.numel() else None
    if keep is None or not bool(keep.any()):
        return float("nan")
    a, y = assign[keep], lab[keep]
    counts = torch.zeros(int(a.max()) + 1, int(y.max()) + 1, dtype=torch.int64)  # C x classes
    counts.index_put_((a, y), torch.ones_like(a), accumulate=True)
    return float(counts.max(dim=1).values.sum()) / float(a.numel())


class BankNeighbours(nn.Module):
    """The (N, k) neighbour table of a bank (see the module docstring).

    Args:
        n_data: N, bank slots (the GLOBAL count in a distributed run: every process holds the whole table).
        k: neighbours per slot, 0 <= k < N (0: no neighbour table, clusters only).
        index: "auto" | "flat" | "ivf" (see search_bank).
        clusters: C, k-means clusters over the bank at every refresh (0: none; else 2 <= C <= N).
        select: share of the table's (slot, neighbour) pairs kept at each refresh, those of the largest cosine,
            and share of the slots kept in a cluster, those nearest their centroid (select_confident; 1: all).
    """

    slots: torch.Tensor
    assign: torch.Tensor
    refreshes: torch.Tensor

    def __init__(self, n_data: int, k: int, *, index: str = "auto", clusters: int = 0, select: float = 1.0) -> None:
        super().__init__()
        n_data, k, clusters = int(n_data), int(k), int(clusters)
        if not 0 <= k < n_data:
            raise InstdiscError(f"neighbours k must satisfy 1 <= k < N, got k={k} with N={n_data}")
        if clusters and not 2 <= clusters <= n_data:
            raise InstdiscError(f"clusters C must satisfy 2 <= C <= N, got C={clusters} with N={n_data}")
        if not (k or clusters):
            raise InstdiscError("BankNeighbours needs neighbours k >= 1 or clusters C >= 2")
        select = _check_selection(select)
        resolve_index_kind(index, n_data)
        self.n_data, self.k, self.index, self.clusters, self.select = n_data, k, index, clusters, select
        self.register_buffer("slots", torch.full((n_data, k), -1, dtype=torch.int64), persistent=True)  # N x k
        self.register_buffer("assign", torch.full((n_data,), -1, dtype=torch.int64), persistent=True)  # N
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64), persistent=True)

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, k={self.k}, clusters={self.clusters}, index={self.index!r}, "
                f"select={self.select}, refreshes={int(self.refreshes)}")

    @property
    def ready(self) -> bool:
        """True once a search has filled the table."""
        return bool(self.refreshes > 0)

    def of(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, k) neighbour slots of the slots ``idx`` (B,); -1 where there is none."""
        return self.slots.index_select(0, idx.to(self.slots.device))

    @torch.no_grad()
    def set_clusters(self, assign: torch.Tensor) -> None:
        """Replace the (N,) cluster assignment (the label oracle of the benchmarks sets the true labels here)."""
        assign = torch.as_tensor(assign, dtype=torch.int64)
        if tuple(assign.shape) != (self.n_data,):
            raise InstdiscError(f"set_clusters expects ({self.n_data},) cluster ids, got {tuple(assign.shape)}")
        self.assign.copy_(assign.to(self.assign.device))

    @torch.no_grad()
    def refresh(self, memory: torch.Tensor, *, seed: int = 0) -> dict:
        """Search the whole bank ``memory`` (N, D, global slot order) and replace the table. Returns
        {"neighbour_stability": share of neighbours kept (nan at the first search), "neighbour_seconds": search
        time, "neighbour_index": "flat" | "ivf", and with k > 0 "neighbour_selected": share of the table's pairs
        that hold a neighbour}."""
        if tuple(memory.shape[:1]) != (self.n_data,):
            raise InstdiscError(f"refresh expects the whole ({self.n_data}, D) bank, got {tuple(memory.shape)}")
        t0 = time.perf_counter()
        stats = {"neighbour_stability": float("nan")}
        if self.k:
            new, scores = search_bank(memory, self.k, kind=self.index, seed=seed, with_scores=True)  # N x k, N x k
            if self.select < 1.0:
                new = select_confident(new, scores, self.select)
            new = new.to(self.slots.device)
            stats["neighbour_selected"] = float((new >= 0).float().mean())
            if self.ready:
                stats["neighbour_stability"] = neighbour_stability(self.slots, new)
            self.slots.copy_(new)
        if self.clusters:
            assign, scores = cluster_bank(memory, self.clusters, seed=seed, with_scores=True)  # N, N
            if self.select < 1.0:  # the members nearest their centroid stay, the others join no cluster (-1)
                assign = select_confident(assign[:, None], scores[:, None], self.select)[:, 0]
            self.assign.copy_(assign.to(self.assign.device))
            stats["cluster_selected"] = float((assign >= 0).float().mean())
        self.refreshes += 1
        return {**stats, "neighbour_seconds": time.perf_counter() - t0,
                "neighbour_index": resolve_index_kind(self.index, self.n_data)}
