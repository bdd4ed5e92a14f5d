"""Independent references for the tests: features and kNN / retrieval metrics written from their definitions in
plain torch / numpy float64, without the library's feature extraction, model loading or search code.

Definitions (as documented in instdisc/knn/metrics.py):
- cosine similarity of L2-normalised rows; the k nearest gallery rows of a query, best first;
- weighted vote: score(c) = sum over the k neighbours of class c of exp(s / tau); top-1 = argmax, ties to the
  lowest class index; a query whose score is all zero predicts nothing;
- top-5: the true class is among the five best classes by (score desc, class asc) and has a positive score;
- 1-NN: the class of the nearest neighbour; majority: most votes, ties to the class whose best neighbour is nearest;
- recall@k: fraction of queries with at least one same-label item among their k nearest;
- AP@R: (1/R) sum_{i<=R} P(i) rel(i); AP: (1/R) sum_j j / rank_j over the whole ranking (ties: lower row first).
"""
from __future__ import annotations

import numpy as np
import torch


def load_parts(run_dir):
    """(config dict, encoder, head) of a run's checkpoint, rebuilt from the registry and the saved state, eval mode."""
    from instdisc.models import ProjectionHead, build_encoder

    ckpt = torch.load(f"{run_dir}/checkpoint.pt", map_location="cpu", weights_only=False)
    cfg, data, state = ckpt["config"], ckpt["data"], ckpt["model"]
    enc = build_encoder(cfg["arch"], in_channels=data["channels"], image_size=data["image_size"])
    enc.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    head = ProjectionHead(enc.feature_dim, cfg["low_dim"], kind=cfg["head"])
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    return ckpt, enc.eval(), head.eval()


def eval_inputs(ds, mean=None, std=None) -> torch.Tensor:
    """The eval-transformed images of an in-memory dataset at its native size: (uint8 / 255 - mean) / std,
    float32 (N, C, H, W)."""
    mean = torch.tensor(ds.mean if mean is None else mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(ds.std if std is None else std, dtype=torch.float32).view(1, -1, 1, 1)
    assert ds.array is not None and ds.array.shape[2] == ds.image_size, "in-memory data at its native size only"
    return (ds.array.to(torch.float32) / 255.0 - mean) / std


@torch.no_grad()
def encode(fn, x: torch.Tensor, batch: int = 1) -> np.ndarray:
    """``fn`` over ``x`` in a plain loop of ``batch``-row slices -> float64 (N, D)."""
    return np.concatenate([fn(x[s:s + batch]).double().numpy() for s in range(0, len(x), batch)])


def unit(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def neighbours(gallery, queries, k: int):
    """(sims (Q, k), ids (Q, k)): the k most cosine-similar gallery rows of each query, best first (ties: lower row)."""
    s = unit(queries) @ unit(gallery).T  # (Q, N) float64
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, axis=1), ids


def weighted_knn(gallery, g_labels, queries, q_labels, *, k: int, tau: float) -> dict:
    """Weighted kNN, 1-NN, majority and top-5 from the definitions above, with the counts of correct queries."""
    g_labels, q_labels = np.asarray(g_labels), np.asarray(q_labels)
    classes = np.unique(g_labels)
    k = min(k, len(g_labels))
    sims, ids = neighbours(gallery, queries, k)
    nl = np.searchsorted(classes, g_labels[ids])  # (Q, k) class index of each neighbour
    truth = np.array([np.searchsorted(classes, y) if y in classes else -1 for y in q_labels])
    n = len(q_labels)
    top1 = top5 = nn1 = majority = 0
    per_class_hits: dict[int, list[bool]] = {}
    for q in range(n):
        score = np.zeros(len(classes))
        count = np.zeros(len(classes), dtype=np.int64)
        nearest = np.full(len(classes), k)
        for j in range(k):
            c = nl[q, j]
            score[c] += np.exp(sims[q, j] / tau)
            count[c] += 1
            nearest[c] = min(nearest[c], j)
        best = max(range(len(classes)), key=lambda c: (score[c], -c))  # ties: lowest class index
        hit = truth[q] >= 0 and score.max() > 0 and best == truth[q]
        top1 += hit
        per_class_hits.setdefault(int(q_labels[q]), []).append(bool(hit))
        order = sorted(range(len(classes)), key=lambda c: (-score[c], c))[:5]
        top5 += truth[q] >= 0 and truth[q] in order and score[truth[q]] > 0
        nn1 += nl[q, 0] == truth[q]
        maj = max(range(len(classes)), key=lambda c: (count[c], -nearest[c]))
        majority += maj == truth[q]
    return {"top1": top1 / n, "top5": top5 / n if (len(classes) > 5 and k >= 5) else None, "nn1": nn1 / n,
            "majority": majority / n, "top1_count": int(top1), "n": n, "k": k,
            "per_class": {c: float(np.mean(h)) for c, h in per_class_hits.items()}}


def retrieval(queries, q_labels, gallery, g_labels, ks=(1, 5, 10)) -> dict:
    """recall@k, mAP@R and mAP (label-as-relevance) of queries against a gallery, over the queries with R > 0."""
    q_labels, g_labels = np.asarray(q_labels), np.asarray(g_labels)
    _, order = neighbours(gallery, queries, len(g_labels))  # (Q, N) the whole ranking
    rel = g_labels[order] == q_labels[:, None]  # (Q, N)
    out = {f"recall@{k}": [] for k in ks}
    ap_r, ap = [], []
    for q in range(len(q_labels)):
        r = int(rel[q].sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(rel[q, :k].any())
        prec = np.cumsum(rel[q]) / np.arange(1, len(g_labels) + 1)
        ap_r.append(float((prec[:r] * rel[q, :r]).sum() / r))
        ranks = np.flatnonzero(rel[q]) + 1
        ap.append(float(np.mean(np.arange(1, r + 1) / ranks)))
    res = {key: float(np.mean(v)) for key, v in out.items()}
    res.update(map_at_r=float(np.mean(ap_r)), map=float(np.mean(ap)))
    return res


def label_margin(gallery, g_labels, queries) -> float:
    """The smallest similarity difference, over queries, between two gallery items of different labels. Above
    float32 rounding (~1e-7) every kNN and retrieval result is well posed: a float32 search and this float64
    reference cannot order such items differently (same-label ties change nothing)."""
    g_labels = np.asarray(g_labels)
    s = unit(queries) @ unit(gallery).T  # (Q, N)
    other = g_labels[:, None] != g_labels[None, :]  # (N, N)
    return float(min(np.abs(row[:, None] - row[None, :])[other].min() for row in s))


def knn_margins(gallery, g_labels, queries, *, k: int, tau: float) -> tuple[float, float]:
    """How far the weighted kNN of each query is from a tie, the smallest over queries: (a) the similarity gap at the
    top-k boundary between items of different labels (a float32 search cannot swap such items when it is above
    float32 rounding; swapping same-label items changes a score by a rounding-sized amount only), and (b) the
    relative gap between the best and the second class score (a prediction cannot flip when it is far above
    float32 rounding)."""
    g_labels = np.asarray(g_labels)
    s = unit(queries) @ unit(gallery).T  # (Q, N)
    order = np.argsort(-s, axis=1, kind="stable")
    boundary, score_gap = np.inf, np.inf
    for row, idx in zip(s, order):
        sims, labels = row[idx], g_labels[idx]
        for i in range(k):
            outside = np.flatnonzero(labels[k:] != labels[i])
            if len(outside):
                boundary = min(boundary, sims[i] - sims[k + outside[0]])
        scores = np.sort([np.exp(sims[:k][labels[:k] == c] / tau).sum() for c in np.unique(labels[:k])])[::-1]
        if len(scores) > 1:
            score_gap = min(score_gap, (scores[0] - scores[1]) / scores[0])
    return float(boundary), float(score_gap)
