"""kNN classification and retrieval evaluation on feature arrays. Covered by tests/test_knn_evaluate.py.

`knn_evaluate` is the InstDisc protocol (cosine similarity, k = 200 neighbours voting with weight exp(s / tau),
tau = 0.07) plus 1-NN, majority vote and per-class accuracy; it streams the queries in chunks, so its memory does
not grow with the number of test items. `retrieval_evaluate` reports recall@k from the chosen index and mAP@R /
mAP from an exact ranking of the whole gallery. The metric definitions are in `instdisc.knn.metrics`.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import InstdiscError
from .metrics import (_check_ks, _classify_block, _require_labelled, _summarise, as_labels, average_precisions,
                      encode_labels, recall_at_k, relevant_counts)
from .search import _check_int, build_index, iter_search, search

__all__ = ["knn_evaluate", "retrieval_evaluate", "check_knn_args"]

log = logging.getLogger(__name__)


def _n_rows(feats: Any, name: str) -> int:
    shape = np.shape(feats)
    if len(shape) != 2:
        raise InstdiscError(f"{name} must be a 2-D array (N, D); got shape {shape}")
    return int(shape[0])


def check_knn_args(k: Any, tau: Any) -> tuple[int, float]:
    """(k, tau) checked as :func:`knn_evaluate` checks them; callers use it to refuse before extracting features."""
    return _check_int(k, "k"), _check_tau(tau)


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not (0 < tau < np.inf):
        raise InstdiscError(f"tau must be a positive finite number; got {tau!r}")
    return float(tau)


def knn_evaluate(
    train_feats: Any,
    train_labels: Any,
    test_feats: Any,
    test_labels: Any,
    *,
    k: int = 200,
    tau: float = 0.07,
    index: str = "flat",
    chunk_size: int = 4096,
    use_gpu: bool | str = "auto",
    index_params: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Weighted kNN classification of test features by train features (InstDisc protocol).

    train_feats (N, D), train_labels (N,), test_feats (Q, D), test_labels (Q,); labels are any integers >= 0
    (mapped by np.unique over train labels). k above N is clamped with a warning. index: "flat" (exact) or an
    approximate kind with `index_params` passed to `build_index`. ``quiet``: the summary line at debug level.
    Returns {"top1", "top5" (None when <= 5 classes or k < 5), "nn1", "majority", "per_class" {label: top1},
    "k" (used), "k_requested", "tau", "n_train", "n_test", "n_classes", "index", "gpu", "seconds"};
    accuracies are fractions in [0, 1].
    """
    t0 = time.perf_counter()
    tau = _check_tau(tau)
    g = as_labels(train_labels, _n_rows(train_feats, "train_feats"), "train_labels")
    ql = as_labels(test_labels, _n_rows(test_feats, "test_feats"), "test_labels")
    _require_labelled(g, "gallery")  # before any index is built
    _require_labelled(ql, "query")
    classes, g_idx, q_idx = encode_labels(g, ql)
    knn = build_index(train_feats, kind=index, use_gpu=use_gpu, **(index_params or {}))
    chunks = iter_search(knn, test_feats, k, chunk_size=chunk_size)  # validates and clamps k now
    parts: list[dict[str, np.ndarray | None]] = []
    k_used = None
    for start, sims, ids in chunks:  # sims, ids: (c, k)
        k_used = ids.shape[1]
        nl = np.where(ids >= 0, g_idx[np.maximum(ids, 0)], -1)  # (c, k) neighbour classes
        want_top5 = len(classes) > 5 and k_used >= 5
        parts.append(_classify_block(sims, nl, q_idx[start:start + ids.shape[0]], len(classes), tau, want_top5))
    correct = {name: (None if parts[0][name] is None else np.concatenate([p[name] for p in parts]))
               for name in parts[0]}
    out = _summarise(correct, ql)
    out.update(k=k_used, k_requested=int(k), tau=tau, n_train=len(g), n_test=len(ql), n_classes=len(classes),
               index=knn.kind, gpu=knn.on_gpu, seconds=time.perf_counter() - t0)
    (log.debug if quiet else log.info)(
        "kNN k=%d tau=%g: top1 %.4f top5 %s (%d train, %d test, %.1fs)", k_used, tau, out["top1"],
        "n/a" if out["top5"] is None else f"{out['top5']:.4f}", len(g), len(ql), out["seconds"])
    return out


def retrieval_evaluate(
    query_feats: Any,
    query_labels: Any,
    gallery_feats: Any,
    gallery_labels: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    index: str = "flat",
    chunk_size: int = 4096,
    use_gpu: bool | str = "auto",
    index_params: dict[str, Any] | None = None,
    ranking: bool = True,
) -> dict[str, Any]:
    """Label-as-relevance retrieval metrics of queries against a gallery.

    exclude_self: the queries are the gallery (same array and labels); each query's own row is not retrieved and
    not counted as relevant. recall@k uses `index` (k beyond the gallery = recall over the whole gallery);
    mAP@R and mAP rank the whole gallery exactly (cost O(Q N log N); ranking=False skips them and sets None).
    Labels may be None or -1 (unlabeled): with no scorable query (R = 0 for all) every metric is None and a
    warning is issued, the search itself still runs.
    Returns {"recall@<k>" for k in ks, "map_at_r", "map", "ks", "n_query", "n_gallery", "n_scored",
    "exclude_self", "index", "gpu", "seconds"}.
    """
    t0 = time.perf_counter()
    ks = _check_ks(ks)
    nq = _n_rows(query_feats, "query_feats")
    n = _n_rows(gallery_feats, "gallery_feats")
    ql = as_labels(query_labels, nq, "query_labels")
    gl = as_labels(gallery_labels, n, "gallery_labels")
    if exclude_self:
        same = query_feats is gallery_feats or (np.shape(query_feats) == np.shape(gallery_feats)
                                                and np.array_equal(np.asarray(query_feats), np.asarray(gallery_feats)))
        if not same:
            raise InstdiscError("exclude_self needs the queries to be the gallery; query and gallery features differ")
        if not np.array_equal(ql, gl):
            raise InstdiscError("exclude_self needs the queries to be the gallery; query and gallery labels differ")
    r = relevant_counts(ql, gl, exclude_self=exclude_self)  # (Q,)
    n_scored = int(np.count_nonzero(r))
    knn = build_index(gallery_feats, kind=index, use_gpu=use_gpu, **(index_params or {}))
    available = n - (1 if exclude_self else 0)
    k_search = max(1, min(ks[-1], available))  # recall@k beyond the gallery is over the whole gallery
    _, ids = search(knn, query_feats, k_search, chunk_size=chunk_size, exclude_self=exclude_self)  # (Q, k)
    out: dict[str, Any] = {f"recall@{k}": None for k in ks}
    out.update(map_at_r=None, map=None)
    if n_scored == 0:
        warnings.warn("no query has a relevant gallery item (labels missing or disjoint); retrieval metrics are "
                      "None", stacklevel=2)
    else:
        for k, v in recall_at_k(ids, ql, gl, ks, exclude_self=exclude_self).items():
            out[f"recall@{k}"] = v
        if ranking:
            ap = average_precisions(query_feats, ql, gallery_feats, gl, exclude_self=exclude_self)
            out["map_at_r"] = float(np.nanmean(ap["ap_at_r"]))
            out["map"] = float(np.nanmean(ap["ap"]))
    out.update(ks=list(ks), n_query=nq, n_gallery=n, n_scored=n_scored, exclude_self=bool(exclude_self),
               index=knn.kind, gpu=knn.on_gpu, seconds=time.perf_counter() - t0)
    return out
