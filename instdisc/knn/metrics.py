"""kNN classification and retrieval metrics, as pure functions. Covered by tests/test_knn_metrics.py.

Labels are 1-D integer arrays; -1 (`UNLABELED`) marks an item without a label, any other value must be >= 0.
Classification maps labels to class indices with ``classes = np.unique(gallery_labels)`` (so 3, 7, 100 become
0, 1, 2); a query whose label is not among the gallery's classes can never be predicted and counts as wrong.

Classification (neighbours ranked best first, ``neighbor_labels`` already mapped to class indices, -1 = no vote):
- weighted vote (InstDisc): score(c) = sum over the k neighbours n with class c of exp(s_n / tau). top-1 is the
  argmax (ties: lowest class index); top-5 is correct when the true class is among the five best classes ordered
  by (score desc, class index asc) AND has a positive score. top-5 is reported only when there are more than
  5 classes and k >= 5 (otherwise None: fewer than 5 neighbours cannot rank 5 classes).
- 1-NN: the class of the nearest neighbour.
- majority: unweighted vote count over the k neighbours; ties go to the class whose best neighbour is nearest
  (so k=1 equals 1-NN and a 1-1 split at k=2 goes to the nearer neighbour).
- per-class: weighted top-1 accuracy over the queries of each query label (keys are the original labels).

Retrieval (relevant = gallery item with the query's label; unlabeled items are never relevant). R(q) is the
number of relevant gallery items for query q (minus q itself when ``exclude_self``). Queries with R = 0 (no
label, or a label absent from the gallery) are skipped by every retrieval metric and not counted.
- recall@k: fraction of queries with at least one relevant item among their top k (the metric-learning
  "Recall@K"; it is a hit rate, not |relevant in top k| / R).
- mAP@R: mean over queries of (1/R) sum_{i=1..R} P(i) rel(i), with P(i) the precision of the top i.
- mAP: mean over queries of the average precision over the whole ranked gallery,
  AP = (1/R) sum_{j=1..R} j / rank_j, rank_j being the rank of the j-th relevant item.
  The whole-gallery ranking (`average_precisions`) orders by cosine similarity desc, ties by lower gallery row.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InstdiscError
from .search import prepare_features

__all__ = [
    "UNLABELED",
    "as_labels",
    "encode_labels",
    "weighted_knn_predict",
    "majority_vote_predict",
    "top_classes",
    "knn_classify",
    "relevant_counts",
    "recall_at_k",
    "map_at_r",
    "average_precisions",
    "mean_average_precision",
]

UNLABELED = -1
_RANK_BLOCK_ELEMS = 2 ** 25  # similarity entries per block when ranking the whole gallery (128 MiB of float32)


# ------------------------------------------------------------------------------------------------------ labels
def as_labels(labels: Any, n: int | None = None, name: str = "labels") -> np.ndarray:
    """Check labels -> int64 (n,); n=None accepts any length. None means n unlabeled items (-1)."""
    if labels is None:
        if n is None:
            raise InstdiscError(f"{name} are missing")
        return np.full(n, UNLABELED, dtype=np.int64)
    a = np.asarray(labels)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise InstdiscError(f"{name} must be integers; got dtype {a.dtype}")
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = f"({n},) to match the features" if n is not None else "(n,)"
        raise InstdiscError(f"{name} must have shape {want}; got {a.shape}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < UNLABELED:
        raise InstdiscError(f"{name} must be >= 0, or -1 for unlabeled; got {int(a.min())}")
    return a


def encode_labels(gallery_labels: np.ndarray, query_labels: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Map labels to class indices 0..C-1 with classes = sorted unique labelled gallery labels.

    Returns (classes (C,), gallery (N,), query (Q,) or None); unlabeled items and query labels that are not a
    gallery class map to -1.
    """
    g = np.asarray(gallery_labels, dtype=np.int64)
    classes = np.unique(g[g != UNLABELED])  # (C,)

    def _map(lab: np.ndarray) -> np.ndarray:
        lab = np.asarray(lab, dtype=np.int64)
        pos = np.searchsorted(classes, lab)  # (n,) candidate index
        pos_c = np.minimum(pos, max(len(classes) - 1, 0))
        hit = (pos < len(classes)) & (lab != UNLABELED)
        if len(classes):
            hit &= classes[pos_c] == lab
        return np.where(hit, pos_c, -1).astype(np.int64)

    return classes, _map(g), (None if query_labels is None else _map(query_labels))


def _require_labelled(labels: np.ndarray, what: str) -> None:
    n_unl = int(np.count_nonzero(labels == UNLABELED))
    if n_unl == labels.shape[0]:
        raise InstdiscError(f"kNN classification needs {what} labels; all {n_unl} {what} labels are -1 (unlabeled)")
    if n_unl:
        raise InstdiscError(f"kNN classification needs every {what} item labelled; "
                            f"{n_unl} of {labels.shape[0]} {what} labels are -1 (unlabeled)")


# ------------------------------------------------------------------------------------------------------ votes
def _check_votes(neighbor_labels: Any, n_classes: Any, sims: Any = None) -> tuple[np.ndarray, int]:
    nl = np.asarray(neighbor_labels)
    if nl.ndim != 2 or not np.issubdtype(nl.dtype, np.integer):
        raise InstdiscError(f"neighbor_labels must be a 2-D integer array (Q, k); got {nl.dtype} {nl.shape}")
    if sims is not None and np.shape(sims) != nl.shape:
        raise InstdiscError(f"sims {np.shape(sims)} and neighbor_labels {nl.shape} must have the same shape (Q, k)")
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise InstdiscError(f"n_classes must be an integer >= 1; got {n_classes!r}")
    if nl.size and (nl.min() < -1 or nl.max() >= n_classes):
        raise InstdiscError(f"neighbor_labels must lie in [-1, {n_classes}); got [{nl.min()}, {nl.max()}]")
    return nl.astype(np.int64, copy=False), int(n_classes)


def weighted_knn_predict(sims: Any, neighbor_labels: Any, n_classes: int, tau: float = 0.07) -> np.ndarray:
    """InstDisc weighted vote: scores[q, c] = sum_j [label_qj == c] exp(sims_qj / tau), float64 (Q, C).

    sims, neighbor_labels: (Q, k); labels are class indices, -1 = no vote (unlabeled or missing neighbour).
    """
    nl, c = _check_votes(neighbor_labels, n_classes, sims)
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not (0 < tau < np.inf):
        raise InstdiscError(f"tau must be a positive finite number; got {tau!r}")
    s = np.asarray(sims, dtype=np.float64)  # (Q, k)
    if np.isnan(s).any():
        raise InstdiscError("sims hold NaN")
    q = nl.shape[0]
    with np.errstate(over="ignore"):  # overflow is reported below
        w = np.exp(s / tau)  # (Q, k) vote weights; a -inf similarity (missing neighbour) weighs 0
    w[nl < 0] = 0.0
    if not np.isfinite(w).all():
        raise InstdiscError(f"tau={tau} is too small for these similarities: exp(s / tau) overflows float64")
    flat = np.arange(q, dtype=np.int64)[:, None] * c + np.maximum(nl, 0)  # (Q, k) cell of (query, class)
    return np.bincount(flat.ravel(), weights=w.ravel(), minlength=q * c).reshape(q, c)  # (Q, C)


def majority_vote_predict(neighbor_labels: Any, n_classes: int) -> np.ndarray:
    """Unweighted majority class per query -> (Q,) int64; ties go to the class with the nearest neighbour.

    neighbor_labels: (Q, k) class indices, best first; -1 = no vote. A query with no votes predicts -1.
    """
    nl, c = _check_votes(neighbor_labels, n_classes)
    q, k = nl.shape
    valid = nl >= 0
    rows = np.broadcast_to(np.arange(q, dtype=np.int64)[:, None], nl.shape)
    counts = np.bincount((rows * c + nl)[valid], minlength=q * c).reshape(q, c)  # (Q, C) votes
    first = np.full((q, c), k, dtype=np.int64)  # (Q, C) rank of each class's nearest neighbour (k = none)
    for j in range(k - 1, -1, -1):  # nearer ranks overwrite farther ones
        m = valid[:, j]
        first[np.flatnonzero(m), nl[m, j]] = j
    key = counts * (k + 1) + (k - first)  # more votes first, then the nearer best neighbour
    pred = key.argmax(axis=1)
    pred[counts.max(axis=1, initial=0) == 0] = -1
    return pred.astype(np.int64)


def top_classes(scores: np.ndarray, n: int) -> np.ndarray:
    """(Q, C) scores -> (Q, min(n, C)) class indices by (score desc, class index asc)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :n]


def _classify_block(sims: np.ndarray, neighbor_labels: np.ndarray, query_idx: np.ndarray, n_classes: int,
                    tau: float, want_top5: bool) -> dict[str, np.ndarray | None]:
    """Per-query correctness (bool (Q,)) of the weighted top-1/top-5, 1-NN and majority predictions."""
    known = query_idx >= 0  # (Q,) a query whose class is absent from the gallery is always wrong
    scores = weighted_knn_predict(sims, neighbor_labels, n_classes, tau)  # (Q, C)
    pred = scores.argmax(axis=1)
    pred[scores.max(axis=1) <= 0] = -1
    out: dict[str, np.ndarray | None] = {"top1": known & (pred == query_idx), "top5": None}
    if want_top5:
        t5 = top_classes(scores, 5)  # (Q, 5)
        hit = (t5 == query_idx[:, None]) & (np.take_along_axis(scores, t5, axis=1) > 0)
        out["top5"] = known & hit.any(axis=1)
    out["nn1"] = known & (neighbor_labels[:, 0] == query_idx)
    out["majority"] = known & (majority_vote_predict(neighbor_labels, n_classes) == query_idx)
    return out


def _summarise(correct: dict[str, np.ndarray | None], query_labels: np.ndarray) -> dict[str, Any]:
    """Fractions correct, and weighted top-1 per original query label."""
    out: dict[str, Any] = {name: (None if v is None else float(np.mean(v))) for name, v in correct.items()}
    labels, inverse = np.unique(query_labels, return_inverse=True)
    hits = np.bincount(inverse, weights=correct["top1"].astype(np.float64), minlength=len(labels))
    totals = np.bincount(inverse, minlength=len(labels))
    out["per_class"] = {int(lab): float(h / t) for lab, h, t in zip(labels, hits, totals)}
    return out


def knn_classify(sims: Any, ids: Any, gallery_labels: Any, query_labels: Any, *, tau: float = 0.07
                 ) -> dict[str, Any]:
    """Classify queries from their neighbours (the output of `search`).

    sims, ids: (Q, k) best first (id -1 = no neighbour); gallery_labels (N,); query_labels (Q,).
    Returns {"top1", "top5" (None unless C > 5 and k >= 5), "nn1", "majority", "per_class" {label: top1},
    "n_classes"}; accuracies are fractions in [0, 1]. Refuses (InstdiscError) unlabeled gallery or query items.
    """
    ids_a = np.asarray(ids)
    if ids_a.ndim != 2 or ids_a.shape[1] == 0 or not np.issubdtype(ids_a.dtype, np.integer):
        raise InstdiscError(f"ids must be a 2-D integer array (Q, k) with k >= 1; got {ids_a.dtype} {ids_a.shape}")
    q, k = ids_a.shape
    g = as_labels(gallery_labels, None, "gallery_labels")
    n = g.shape[0]
    ql = as_labels(query_labels, q, "query_labels")
    if ids_a.size and (ids_a.min() < -1 or ids_a.max() >= n):
        raise InstdiscError(f"ids must lie in [-1, {n}) for a gallery of {n} labels; "
                            f"got [{ids_a.min()}, {ids_a.max()}]")
    _require_labelled(g, "gallery")
    _require_labelled(ql, "query")
    classes, g_idx, q_idx = encode_labels(g, ql)
    nl = np.where(ids_a >= 0, g_idx[np.maximum(ids_a, 0)], -1)  # (Q, k) neighbour classes
    correct = _classify_block(np.asarray(sims), nl, q_idx, len(classes), tau, len(classes) > 5 and k >= 5)
    out = _summarise(correct, ql)
    out["n_classes"] = len(classes)
    return out


# ------------------------------------------------------------------------------------------------------ retrieval
def relevant_counts(query_labels: Any, gallery_labels: Any, *, exclude_self: bool = False) -> np.ndarray:
    """R per query -> (Q,) int64: gallery items sharing the query's label (0 for unlabeled queries).

    exclude_self: the queries are the gallery (query i is gallery row i), so each query's own row is not counted.
    """
    g = as_labels(gallery_labels, None, "gallery_labels")
    q = as_labels(query_labels, None, "query_labels")
    if exclude_self and not np.array_equal(q, g):
        raise InstdiscError("exclude_self needs the queries to be the gallery: query and gallery labels differ")
    labelled = g[g != UNLABELED]
    classes, counts = np.unique(labelled, return_counts=True)
    pos = np.minimum(np.searchsorted(classes, q), max(len(classes) - 1, 0))
    r = np.zeros(q.shape[0], dtype=np.int64)
    if len(classes):
        hit = (classes[pos] == q) & (q != UNLABELED)
        r[hit] = counts[pos[hit]] - (1 if exclude_self else 0)
    return r


def _relevance(ids: Any, q: np.ndarray, g: np.ndarray, exclude_self: bool) -> np.ndarray:
    """(Q, k) bool: ids[q, j] is a labelled gallery row with the query's label (and not the query itself)."""
    ids_a = np.asarray(ids)
    if ids_a.ndim != 2 or ids_a.shape[0] != q.shape[0] or not np.issubdtype(ids_a.dtype, np.integer):
        raise InstdiscError(f"ids must be a 2-D integer array with one row per query ({q.shape[0]}); "
                            f"got {ids_a.dtype} {ids_a.shape}")
    if ids_a.size and (ids_a.min() < -1 or ids_a.max() >= g.shape[0]):
        raise InstdiscError(f"ids must lie in [-1, {g.shape[0]}); got [{ids_a.min()}, {ids_a.max()}]")
    lab = np.where(ids_a >= 0, g[np.maximum(ids_a, 0)], UNLABELED)  # (Q, k)
    rel = (lab == q[:, None]) & (lab != UNLABELED)
    if exclude_self:
        rel &= ids_a != np.arange(q.shape[0])[:, None]
    return rel


def _scored(r: np.ndarray) -> np.ndarray:
    scored = r > 0
    if not scored.any():
        raise InstdiscError("no query has a relevant gallery item (labels all -1, or no label shared with the "
                            "gallery); retrieval metrics are undefined")
    return scored


def recall_at_k(ids: Any, query_labels: Any, gallery_labels: Any, ks: Sequence[int] = (1, 5, 10), *,
                exclude_self: bool = False) -> dict[int, float]:
    """Recall@k = fraction of scored queries (R > 0) with a relevant item among their first k neighbours.

    ids: (Q, kmax) from `search`. A k above kmax is allowed only when ids already rank the whole available gallery
    (then recall@k is the recall over the whole gallery). Returns {k: recall}.
    """
    ks = _check_ks(ks)
    g = as_labels(gallery_labels, None, "gallery_labels")
    q = as_labels(query_labels, np.shape(ids)[0] if np.ndim(ids) == 2 else None, "query_labels")
    r = relevant_counts(q, g, exclude_self=exclude_self)
    rel = _relevance(ids, q, g, exclude_self)  # (Q, kmax)
    ncols = rel.shape[1]
    available = g.shape[0] - (1 if exclude_self else 0)
    if ks[-1] > ncols and ncols < available:
        raise InstdiscError(f"recall@{ks[-1]} needs {ks[-1]} neighbours per query; ids has {ncols} columns")
    scored = _scored(r)
    first_hit = np.where(rel.any(axis=1), rel.argmax(axis=1), ncols)  # (Q,) 0-based rank of the first hit
    return {k: float(np.mean(first_hit[scored] < k)) for k in ks}


def _check_ks(ks: Any) -> tuple[int, ...]:
    try:
        vals = tuple(ks)
    except TypeError:
        vals = (ks,)
    if not vals or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in vals):
        raise InstdiscError(f"ks must be positive integers; got {ks!r}")
    return tuple(sorted({int(k) for k in vals}))


def map_at_r(ids: Any, query_labels: Any, gallery_labels: Any, *, exclude_self: bool = False) -> float:
    """mAP@R over scored queries: mean of (1/R) sum_{i=1..R} P(i) rel(i). ids (Q, kmax) need kmax >= max R."""
    g = as_labels(gallery_labels, None, "gallery_labels")
    q = as_labels(query_labels, np.shape(ids)[0] if np.ndim(ids) == 2 else None, "query_labels")
    r = relevant_counts(q, g, exclude_self=exclude_self)  # (Q,)
    rel = _relevance(ids, q, g, exclude_self)  # (Q, kmax)
    scored = _scored(r)
    kmax = rel.shape[1]
    if r.max() > kmax:
        raise InstdiscError(f"map_at_r needs R={int(r.max())} neighbours per query (the largest relevant set); "
                            f"ids has {kmax} columns")
    rel = rel[scored]
    r = r[scored]
    i = np.arange(1, kmax + 1)  # (kmax,) ranks
    precision = np.cumsum(rel, axis=1) / i  # (Qs, kmax) P(i)
    in_r = i[None, :] <= r[:, None]  # (Qs, kmax)
    return float(np.mean((precision * rel * in_r).sum(axis=1) / r))


def _ap_of_row(row: np.ndarray, row_sorted: np.ndarray, rel: np.ndarray) -> tuple[float, float]:
    """AP and AP@R of one query. row: (N,) similarities; row_sorted: row ascending; rel: (R,) ascending rows.

    rank of a relevant row g = 1 + #{rows with a higher similarity} + #{rows with an equal one and a lower index}.
    """
    n, r = row.shape[0], rel.shape[0]
    s = row[rel]  # (R,)
    order = np.argsort(-s, kind="stable")  # relevant rows in ranking order (equal sims: lower row first)
    s, rel = s[order], rel[order]
    s_asc = s[::-1].copy()  # ascending keys search faster
    right = np.searchsorted(row_sorted, s_asc, side="right")[::-1]  # (R,) rows with sim <= s
    left = np.searchsorted(row_sorted, s_asc, side="left")[::-1]  # (R,) rows with sim < s
    rank = n - right + 1  # 1 + rows with a strictly higher similarity
    tied = np.flatnonzero(right - left > 1)  # float32 ties are common at N ~ 1e4+: count the lower rows
    if tied.size:
        cand = np.flatnonzero(np.isin(row, s[tied]))  # (m,) every row holding one of the tied values
        values, group = np.unique(row[cand], return_inverse=True)  # group: which tied value each row holds
        keys = np.sort(group.astype(np.int64) * n + cand)  # (m,) ordered by (value, row)
        starts = np.searchsorted(keys, np.arange(len(values), dtype=np.int64) * n)  # first key of each value
        g_t = np.searchsorted(values, s[tied])  # value group of each tied relevant row
        rank[tied] += np.searchsorted(keys, g_t * n + rel[tied]) - starts[g_t]  # equal value, lower row
    precision = np.arange(1, r + 1) / rank  # (R,) precision at the j-th relevant item
    return float(precision.sum() / r), float(precision[rank <= r].sum() / r)


def average_precisions(query_feats: Any, query_labels: Any, gallery_feats: Any, gallery_labels: Any, *,
                       exclude_self: bool = False) -> dict[str, np.ndarray]:
    """Per-query AP over the whole ranked gallery, and AP@R, from exact cosine similarities.

    Works in blocks of query rows (about 128 MiB of similarities at a time) and sorts each row once, so a
    10k x 60k evaluation needs no (Q, N) matrix. Returns {"ap": (Q,), "ap_at_r": (Q,), "n_relevant": (Q,)};
    unscored queries (R = 0) hold NaN.
    """
    g = prepare_features(gallery_feats, name="gallery")  # (N, D)
    x = prepare_features(query_feats, name="queries", dim=g.shape[1])  # (Q, D)
    n, nq = g.shape[0], x.shape[0]
    gl = as_labels(gallery_labels, n, "gallery_labels")
    ql = as_labels(query_labels, nq, "query_labels")
    if exclude_self and nq != n:
        raise InstdiscError(f"exclude_self needs the queries to be the gallery; got {nq} queries for {n} rows")
    r = relevant_counts(ql, gl, exclude_self=exclude_self)  # (Q,)
    order = np.argsort(gl, kind="stable")  # gallery rows grouped by label, ascending within a label
    labels_sorted = gl[order]
    members = {int(lab): order[lo:hi] for lab, lo, hi in zip(*_runs(labels_sorted))}
    ap = np.full(nq, np.nan)
    ap_r = np.full(nq, np.nan)
    block = max(1, min(nq, _RANK_BLOCK_ELEMS // n))
    for start in range(0, nq, block):
        todo = np.flatnonzero(r[start:start + block] > 0)  # rows of this block that are scored
        if not todo.size:
            continue
        sims = x[start + todo] @ g.T  # (b, N) float32 cosine similarities
        if exclude_self:
            sims[np.arange(todo.size), start + todo] = -np.inf  # own row ranks last and is not relevant
        sims_sorted = np.sort(sims, axis=1)  # (b, N) ascending
        for b, t in enumerate(todo):
            qi = start + t
            rel = members[int(ql[qi])]
            if exclude_self:
                rel = rel[rel != qi]
            ap[qi], ap_r[qi] = _ap_of_row(sims[b], sims_sorted[b], rel)
    return {"ap": ap, "ap_at_r": ap_r, "n_relevant": r}


def _runs(sorted_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values in a sorted array -> (values, starts, ends)."""
    vals, starts = np.unique(sorted_labels, return_index=True)
    ends = np.append(starts[1:], sorted_labels.shape[0])
    return vals, starts, ends


def mean_average_precision(query_feats: Any, query_labels: Any, gallery_feats: Any, gallery_labels: Any, *,
                           exclude_self: bool = False) -> float:
    """mAP over the whole ranked gallery (exact cosine ranking), averaged over scored queries."""
    ap = average_precisions(query_feats, query_labels, gallery_feats, gallery_labels, exclude_self=exclude_self)
    _scored(ap["n_relevant"])
    return float(np.nanmean(ap["ap"]))
