"""Tests for instdisc/knn/evaluate.py: knn_evaluate and retrieval_evaluate against a float64 brute force written
from the definitions, degenerate sizes (one query, k above the gallery, k < 5, chunks), labels and refusals."""
from __future__ import annotations

import math
import warnings
from collections import Counter

import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.knn import knn_evaluate, retrieval_evaluate

KNN_KEYS = {"top1", "top5", "nn1", "majority", "per_class", "k", "k_requested", "tau", "n_train", "n_test",
            "n_classes", "index", "gpu", "seconds"}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes: see conftest.py


# ---------------------------------------------------------------------------------------------- reference
def ref_knn_eval(train, train_labels, test, test_labels, k, tau):
    """Brute force: float64 cosine, full argsort, then the votes one neighbour at a time."""
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = test / np.linalg.norm(test, axis=1, keepdims=True)
    s = qn @ tn.T  # (Q, N)
    classes = sorted(set(train_labels.tolist()))
    k = min(k, len(train))
    res = {"top1": [], "top5": [], "nn1": [], "majority": []}
    for q in range(len(test)):
        order = sorted(range(len(train)), key=lambda j: (-s[q, j], j))[:k]
        truth = int(test_labels[q])
        score = {c: 0.0 for c in classes}
        for j in order:
            score[int(train_labels[j])] += math.exp(s[q, j] / tau)
        ranked = sorted(classes, key=lambda c: (-score[c], c))
        res["top1"].append(ranked[0] == truth)
        res["top5"].append(truth in ranked[:5] and score.get(truth, 0) > 0)
        res["nn1"].append(int(train_labels[order[0]]) == truth)
        votes = Counter(int(train_labels[j]) for j in order)
        first = {}
        for pos, j in enumerate(order):
            first.setdefault(int(train_labels[j]), pos)
        res["majority"].append(max(votes, key=lambda c: (votes[c], -first[c])) == truth)
    out = {key: float(np.mean(v)) for key, v in res.items()}
    out["per_class"] = {int(c): float(np.mean([res["top1"][i] for i in np.flatnonzero(test_labels == c)]))
                        for c in np.unique(test_labels)}
    return out, s


def ref_retrieval(q, ql, g, gl, ks, exclude_self):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T
    recall = {k: [] for k in ks}
    aps, aprs = [], []
    for i in range(len(q)):
        rows = [j for j in range(len(g)) if not (exclude_self and j == i)]
        ranking = sorted(rows, key=lambda j: (-s[i, j], j))
        rel = [gl[j] == ql[i] for j in ranking]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            recall[k].append(any(rel[:k]))
        hits, ap, apr = 0, 0.0, 0.0
        for pos, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                ap += hits / pos
                apr += hits / pos if pos <= r else 0.0
        aps.append(ap / r)
        aprs.append(apr / r)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out.update(map=float(np.mean(aps)), map_at_r=float(np.mean(aprs)), n_scored=len(aps))
    return out, s


def assert_tie_free(s, k, gap=1e-6):
    """No near-ties among each row's top k+1: float32 search must then rank exactly like float64."""
    top = -np.sort(-s, axis=1)[:, :k + 1]
    assert np.min(top[:, :-1] - top[:, 1:]) > gap


def assert_relevance_tie_free(s, ql, gl, gap=1e-6):
    """No near-tie between a relevant and an irrelevant item anywhere in a ranking: AP is then float32-exact."""
    for i in range(len(s)):
        order = np.argsort(-s[i])
        v, rel = s[i, order], gl[order] == ql[i]
        d = (v[:-1] - v[1:])[(rel[:-1] != rel[1:]) & np.isfinite(v[1:])]
        assert d.size == 0 or d.min() > gap


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(23)  # a seed whose data meet the tie-free preconditions asserted below
    label_set = np.array([3, 7, 100, 12, 55, 9, 40, 21])  # 8 classes, arbitrary ids
    centres = rng.standard_normal((8, 12))
    tr_lab = rng.integers(0, 8, 250)
    te_lab = rng.integers(0, 8, 45)
    train = centres[tr_lab] + 1.5 * rng.standard_normal((250, 12))  # overlapping classes: imperfect accuracy
    test = centres[te_lab] + 1.5 * rng.standard_normal((45, 12))
    return train.astype(np.float32), label_set[tr_lab], test.astype(np.float32), label_set[te_lab]


# ---------------------------------------------------------------------------------------------- knn_evaluate
@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_knn_evaluate_matches_bruteforce(labelled, chunk_size):
    train, trl, test, tel = labelled
    ref, s = ref_knn_eval(train.astype(np.float64), trl, test.astype(np.float64), tel, 20, 0.07)
    assert_tie_free(s, 20)
    out = knn_evaluate(train, trl, test, tel, k=20, tau=0.07, chunk_size=chunk_size)
    assert set(out) == KNN_KEYS
    for key in ("top1", "top5", "nn1", "majority"):
        assert out[key] == pytest.approx(ref[key], abs=1e-6), key
    assert out["per_class"] == pytest.approx(ref["per_class"], abs=1e-6)
    assert 0.2 < out["top1"] < 1.0  # neither chance nor trivial: the comparison means something
    assert (out["k"], out["k_requested"], out["tau"], out["n_train"], out["n_test"], out["n_classes"],
            out["index"], out["gpu"]) == (20, 20, 0.07, 250, 45, 8, "flat", False)
    assert out["seconds"] >= 0


def test_one_query(labelled):
    train, trl, test, tel = labelled
    out = knn_evaluate(train, trl, test[:1], tel[:1], k=10)
    ref, _ = ref_knn_eval(train.astype(np.float64), trl, test[:1].astype(np.float64), tel[:1], 10, 0.07)
    assert out["n_test"] == 1 and out["top1"] == ref["top1"] and list(out["per_class"]) == [int(tel[0])]


def test_k_above_gallery_warns_and_uses_all(labelled):
    train, trl, test, tel = labelled
    with pytest.warns(UserWarning, match="k=200 exceeds the 30 gallery rows"):
        out = knn_evaluate(train[:30], trl[:30], test, tel)  # default k=200
    assert out["k"] == 30 and out["k_requested"] == 200
    ref, _ = ref_knn_eval(train[:30].astype(np.float64), trl[:30], test.astype(np.float64), tel, 30, 0.07)
    assert out["top1"] == pytest.approx(ref["top1"])


def test_single_row_gallery():
    with pytest.warns(UserWarning):
        out = knn_evaluate(np.ones((1, 3)), np.array([4]), np.ones((2, 3)), np.array([4, 5]), k=5)
    assert out["k"] == 1 and out["top1"] == 0.5 and out["top5"] is None and out["per_class"] == {4: 1.0, 5: 0.0}


def test_small_k_has_no_top5(labelled):
    train, trl, test, tel = labelled
    assert knn_evaluate(train, trl, test, tel, k=4)["top5"] is None
    assert knn_evaluate(train, trl, test, tel, k=5)["top5"] is not None
    out = knn_evaluate(train, trl % 5, test, tel % 5, k=20)  # 5 classes
    assert out["n_classes"] == 5 and out["top5"] is None


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 32)) * 5
    lab = np.repeat(np.arange(6), 40)
    train = centres[lab] + rng.standard_normal((240, 32))
    test = centres[lab[::4]] + rng.standard_normal((60, 32))
    out = knn_evaluate(train, lab, test, lab[::4], k=30)
    assert out["top1"] == out["top5"] == out["nn1"] == out["majority"] == 1.0


@pytest.mark.parametrize("kind, params", [("ivf", {"nprobe": 6}), ("hnsw", None),
                                          ("ivfpq", {"nprobe": 6, "pq_m": 12, "pq_nbits": 5})])
def test_approximate_index_close_to_exact(labelled, kind, params):
    train, trl, test, tel = labelled
    exact = knn_evaluate(train, trl, test, tel, k=20)
    approx = knn_evaluate(train, trl, test, tel, k=20, index=kind, index_params=params)
    assert approx["index"] == kind
    assert abs(approx["top1"] - exact["top1"]) <= 0.1


def test_unlabeled_gallery_refused_before_indexing(labelled):
    train, trl, test, tel = labelled
    with pytest.raises(InstdiscError, match="all 250 gallery labels are -1"):
        knn_evaluate(train, np.full(250, -1), test, tel)
    with pytest.raises(InstdiscError, match="query labels are -1"):
        knn_evaluate(train, trl, test, np.full(45, -1))


def test_unseen_test_labels_count_as_wrong(labelled):
    train, trl, test, tel = labelled
    tel2 = tel.copy()
    tel2[:5] = 999  # not a train class
    base = knn_evaluate(train, trl, test, tel, k=20)
    out = knn_evaluate(train, trl, test, tel2, k=20)
    assert out["per_class"][999] == 0.0
    ref, _ = ref_knn_eval(train.astype(np.float64), trl, test.astype(np.float64), tel2, 20, 0.07)
    assert out["top1"] == pytest.approx(ref["top1"]) and out["top1"] <= base["top1"]


@pytest.mark.parametrize("mutate, msg", [
    (lambda tr, te: (np.where(np.arange(tr.size).reshape(tr.shape) == 7, np.nan, tr), te), "gallery row 0"),
    (lambda tr, te: (tr, te[:, :5]), "dimension 5 but the gallery has dimension 12"),
    (lambda tr, te: (tr, te[0]), "2-D array"),
])
def test_bad_features(labelled, mutate, msg):
    train, trl, test, tel = labelled
    tr, te = mutate(train, test)
    with pytest.raises(InstdiscError, match=msg):
        knn_evaluate(tr, trl, te, tel[:len(te)] if np.ndim(te) == 2 else tel[:1])


def test_bad_arguments(labelled):
    train, trl, test, tel = labelled
    with pytest.raises(InstdiscError, match="train_labels must have shape"):
        knn_evaluate(train, trl[:-1], test, tel)
    with pytest.raises(InstdiscError, match="tau must be a positive"):
        knn_evaluate(train, trl, test, tel, tau=0)
    with pytest.raises(InstdiscError, match="k must be an integer"):
        knn_evaluate(train, trl, test, tel, k=0)
    with pytest.raises(InstdiscError, match="unknown index kind"):
        knn_evaluate(train, trl, test, tel, index="annoy")


# ---------------------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("exclude_self", [False, True])
def test_retrieval_evaluate_matches_bruteforce(labelled, exclude_self):
    train, trl, test, tel = labelled
    q, ql = (train, trl) if exclude_self else (test, tel)
    ref, s = ref_retrieval(q.astype(np.float64), ql, train.astype(np.float64), trl, (1, 5, 10), exclude_self)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    assert_tie_free(s, 10)
    assert_relevance_tie_free(s, ql, trl)
    out = retrieval_evaluate(q, ql, train, trl, exclude_self=exclude_self, chunk_size=16)
    for key in ("recall@1", "recall@5", "recall@10", "map", "map_at_r"):
        assert out[key] == pytest.approx(ref[key], abs=1e-6), key
    assert out["n_scored"] == ref["n_scored"] and out["exclude_self"] is exclude_self
    assert set(out) == {"recall@1", "recall@5", "recall@10", "map_at_r", "map", "ks", "n_query", "n_gallery",
                        "n_scored", "exclude_self", "index", "gpu", "seconds"}


def test_retrieval_one_query_and_tiny_gallery():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    gl = np.array([1, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ks beyond the gallery are not a misuse here: no warning
        out = retrieval_evaluate(np.array([[0.6, 0.8]]), np.array([2]), g, gl)
    # ranking: row 2 (cos 0.96), row 1 (0.8), row 0 (0.6); both relevant rows come first -> all metrics 1.
    assert out["recall@1"] == out["recall@10"] == out["map"] == out["map_at_r"] == 1.0
    assert out["n_query"] == 1 and out["n_gallery"] == 3


def test_retrieval_without_labels_still_searches(labelled):
    train, _, test, _ = labelled
    with pytest.warns(UserWarning, match="retrieval metrics are None"):
        out = retrieval_evaluate(test, None, train, np.full(250, -1))
    assert out["recall@1"] is None and out["map"] is None and out["n_scored"] == 0


def test_retrieval_ranking_off_and_ks(labelled):
    train, trl, test, tel = labelled
    out = retrieval_evaluate(test, tel, train, trl, ks=(3, 1), ranking=False, index="hnsw")
    assert out["ks"] == [1, 3] and out["map"] is None and out["recall@3"] >= out["recall@1"]


def test_retrieval_exclude_self_needs_same_set(labelled):
    train, trl, test, tel = labelled
    with pytest.raises(InstdiscError, match="features differ"):
        retrieval_evaluate(test, tel, train, trl, exclude_self=True)
    with pytest.raises(InstdiscError, match="labels differ"):
        retrieval_evaluate(train, np.roll(trl, 1), train, trl, exclude_self=True)
