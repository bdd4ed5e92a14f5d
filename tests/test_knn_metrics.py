"""Tests for instdisc/knn/metrics.py: votes and retrieval metrics against loops written from the definitions,
hand-built cases with the answers worked out, label mapping, ties and refusals."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.knn.metrics import (average_precisions, encode_labels, knn_classify, majority_vote_predict, map_at_r,
                                  mean_average_precision, recall_at_k, relevant_counts, weighted_knn_predict)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes: see conftest.py


# ---------------------------------------------------------------------------------------------- references
def ref_scores(sims, labels, n_classes, tau):
    """scores[q][c] = sum over neighbours j with label c of exp(s_j / tau), one neighbour at a time."""
    out = np.zeros((len(sims), n_classes))
    for q in range(len(sims)):
        for s, c in zip(sims[q], labels[q]):
            if c >= 0:
                out[q, c] += math.exp(float(s) / tau)
    return out


def ref_classify(sims, ids, g_labels, q_labels, tau):
    """Per-query correctness of weighted top-1/top-5, 1-NN and majority, straight from the definitions."""
    classes = sorted(set(int(v) for v in g_labels))
    res = {"top1": [], "top5": [], "nn1": [], "majority": []}
    for q in range(len(ids)):
        truth = int(q_labels[q])
        score = {c: 0.0 for c in classes}
        for s, i in zip(sims[q], ids[q]):
            score[int(g_labels[i])] += math.exp(float(s) / tau)
        ranked = sorted(classes, key=lambda c: (-score[c], classes.index(c)))
        res["top1"].append(ranked[0] == truth and score[ranked[0]] > 0)
        res["top5"].append(truth in ranked[:5] and score.get(truth, 0.0) > 0)
        res["nn1"].append(int(g_labels[ids[q][0]]) == truth)
        votes = Counter(int(g_labels[i]) for i in ids[q])
        first = {}
        for pos, i in enumerate(ids[q]):
            first.setdefault(int(g_labels[i]), pos)
        best = max(votes, key=lambda c: (votes[c], -first[c]))
        res["majority"].append(best == truth)
    return {k: float(np.mean(v)) for k, v in res.items()}


def ref_ranking(q, g, exclude_self=False):
    """Full ranking per query, float64 cosine, ties by lower gallery row; own row removed when exclude_self."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T
    out = []
    for i in range(len(q)):
        rows = [j for j in range(len(g)) if not (exclude_self and j == i)]
        out.append(sorted(rows, key=lambda j: (-s[i, j], j)))
    return np.array(out, dtype=np.int64)


def ref_ap(ranking, q_label, g_labels):
    """AP over the whole ranking and AP@R, with loops: P(i) summed at relevant positions."""
    rel = [int(g_labels[j]) == q_label and q_label != -1 for j in ranking]
    r = sum(rel)
    if r == 0:
        return None, None
    hits, ap, ap_r = 0, 0.0, 0.0
    for i, is_rel in enumerate(rel, start=1):
        if is_rel:
            hits += 1
            ap += hits / i
            if i <= r:
                ap_r += hits / i
    return ap / r, ap_r / r


# ---------------------------------------------------------------------------------------------- votes
def test_weighted_scores_match_loop():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, (30, 12)).astype(np.float32)
    labels = rng.integers(-1, 6, (30, 12))  # -1: no vote
    got = weighted_knn_predict(sims, labels, 6, tau=0.07)
    assert got.shape == (30, 6) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref_scores(sims, labels, 6, 0.07), rtol=1e-12)


def test_weighted_vote_hand_built():
    # Neighbours (best first): sim 0.9 class 0, sim 0.8 class 1, sim 0.7 class 1.
    # tau=0.1: class 0 gets e^9 = 8103.1, class 1 gets e^8 + e^7 = 2981.0 + 1096.6 = 4077.6 -> class 0 wins,
    # although class 1 has the majority of votes. tau=1: e^0.9 = 2.460 < e^0.8 + e^0.7 = 4.239 -> class 1.
    sims = np.array([[0.9, 0.8, 0.7]])
    labels = np.array([[0, 1, 1]])
    s = weighted_knn_predict(sims, labels, 2, tau=0.1)
    np.testing.assert_allclose(s, [[math.exp(9), math.exp(8) + math.exp(7)]])
    assert s.argmax() == 0
    assert weighted_knn_predict(sims, labels, 2, tau=1.0).argmax() == 1
    assert majority_vote_predict(labels, 2)[0] == 1


def test_missing_neighbour_casts_no_vote():
    s = weighted_knn_predict(np.array([[0.5, -np.inf]]), np.array([[1, -1]]), 3, tau=0.5)
    np.testing.assert_allclose(s, [[0.0, math.e, 0.0]])


def test_majority_ties_go_to_nearest_class():
    # 2-2 tie between classes 2 and 0: class 2 owns the nearest neighbour, so it wins (not the lower label 0).
    assert majority_vote_predict(np.array([[2, 0, 0, 2]]), 3)[0] == 2
    assert majority_vote_predict(np.array([[1, 0]]), 2)[0] == 1  # k=2 split -> nearer neighbour
    assert majority_vote_predict(np.array([[0, 1, 1]]), 2)[0] == 1  # a real majority beats proximity
    assert majority_vote_predict(np.array([[-1, -1]]), 2)[0] == -1  # no votes at all


def test_majority_matches_loop():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (200, 6))  # small k and few classes: many ties
    got = majority_vote_predict(labels, 4)
    for row, pred in zip(labels, got):
        votes = Counter(row.tolist())
        first = {c: row.tolist().index(c) for c in votes}
        assert pred == max(votes, key=lambda c: (votes[c], -first[c]))


@pytest.mark.parametrize("tau, msg", [(0.0, "tau must be a positive"), (-1.0, "tau must be a positive"),
                                      (float("nan"), "tau must be a positive"), (1e-4, "overflows float64")])
def test_bad_tau(tau, msg):
    with pytest.raises(InstdiscError, match=msg):
        weighted_knn_predict(np.array([[0.9]]), np.array([[0]]), 1, tau=tau)


def test_vote_argument_checks():
    with pytest.raises(InstdiscError, match="same shape"):
        weighted_knn_predict(np.zeros((2, 3)), np.zeros((2, 2), dtype=int), 2)
    with pytest.raises(InstdiscError, match=r"lie in \[-1, 2\)"):
        weighted_knn_predict(np.zeros((1, 2)), np.array([[0, 2]]), 2)
    with pytest.raises(InstdiscError, match="n_classes"):
        majority_vote_predict(np.zeros((1, 2), dtype=int), 0)


# ---------------------------------------------------------------------------------------------- labels
def test_encode_labels_maps_arbitrary_ids():
    classes, g, q = encode_labels(np.array([100, 3, 7, 3]), np.array([7, 5, 100, -1]))
    np.testing.assert_array_equal(classes, [3, 7, 100])
    np.testing.assert_array_equal(g, [2, 0, 1, 0])
    np.testing.assert_array_equal(q, [1, -1, 2, -1])  # 5 is not a gallery class; -1 is unlabeled


# ---------------------------------------------------------------------------------------------- knn_classify
def test_knn_classify_matches_reference_with_mapped_labels():
    rng = np.random.default_rng(2)
    label_set = np.array([3, 7, 100, 12, 55, 9, 40])  # 7 classes, not 0..C-1
    g_labels = label_set[rng.integers(0, 7, 80)]
    q_labels = label_set[rng.integers(0, 7, 50)]
    ids = np.stack([rng.permutation(80)[:15] for _ in range(50)])  # (50, 15)
    sims = -np.sort(-rng.uniform(-1, 1, (50, 15)), axis=1)  # best first
    got = knn_classify(sims, ids, g_labels, q_labels, tau=0.07)
    ref = ref_classify(sims, ids, g_labels, q_labels, 0.07)
    for key in ("top1", "top5", "nn1", "majority"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert got["n_classes"] == 7
    assert set(got["per_class"]) <= set(label_set.tolist())
    for lab, acc in got["per_class"].items():
        rows = np.flatnonzero(q_labels == lab)
        assert acc == pytest.approx(ref_classify(sims[rows], ids[rows], g_labels, q_labels[rows], 0.07)["top1"])


def test_knn_classify_hand_built():
    # Gallery of 3: labels [10, 20, 20]. Query A (label 10) sees rows [0, 1, 2] with sims [0.9, 0.8, 0.7]:
    # weighted (tau 0.1) -> 10 (see test_weighted_vote_hand_built), 1-NN -> 10, majority -> 20.
    # Query B (label 20) sees rows [2, 1, 0] with sims [0.6, 0.5, 0.4]: every rule says 20.
    ids = np.array([[0, 1, 2], [2, 1, 0]])
    sims = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    out = knn_classify(sims, ids, np.array([10, 20, 20]), np.array([10, 20]), tau=0.1)
    assert out["top1"] == 1.0 and out["nn1"] == 1.0 and out["majority"] == 0.5
    assert out["top5"] is None  # 2 classes
    assert out["per_class"] == {10: 1.0, 20: 1.0}


def test_weighted_tie_goes_to_lowest_class():
    # Two neighbours with the same similarity, labels 7 and 3: equal scores, the lower class (3) is predicted.
    out = knn_classify(np.array([[0.5, 0.5]]), np.array([[0, 1]]), np.array([7, 3]), np.array([3]))
    assert out["top1"] == 1.0


def test_top5_needs_more_than_five_classes_and_k_at_least_5():
    rng = np.random.default_rng(3)
    g = np.arange(12) % 6  # 6 classes
    ids = np.stack([rng.permutation(12) for _ in range(4)])
    sims = -np.sort(-rng.uniform(0, 1, (4, 12)), axis=1)
    assert knn_classify(sims, ids, g, np.array([0, 1, 2, 3]))["top5"] is not None
    assert knn_classify(sims[:, :4], ids[:, :4], g, np.array([0, 1, 2, 3]))["top5"] is None  # k = 4
    assert knn_classify(sims, ids, g % 5, np.array([0, 1, 2, 3]))["top5"] is None  # 5 classes


def test_top5_ignores_classes_without_votes():
    # 7 classes, k = 5 neighbours all of class 0: the true class 1 got no vote, so it is not "in the top 5"
    # even though tie-breaking among the zero scores would list it second.
    g = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6])
    out = knn_classify(np.full((1, 5), 0.5), np.array([[0, 1, 2, 3, 4]]), g, np.array([1]))
    assert out["top5"] == 0.0


def test_unseen_query_label_counts_as_wrong():
    g = np.array([3, 7, 7])
    out = knn_classify(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([[1, 0], [1, 0]]), g, np.array([7, 100]))
    assert out["top1"] == 0.5 and out["nn1"] == 0.5 and out["majority"] == 0.5
    assert out["per_class"] == {7: 1.0, 100: 0.0}


def test_unlabeled_gallery_or_queries_refused():
    sims, ids = np.array([[0.9]]), np.array([[0]])
    with pytest.raises(InstdiscError, match="all 2 gallery labels are -1"):
        knn_classify(sims, ids, np.array([-1, -1]), np.array([0]))
    with pytest.raises(InstdiscError, match="1 of 2 gallery labels are -1"):
        knn_classify(sims, ids, np.array([0, -1]), np.array([0]))
    with pytest.raises(InstdiscError, match="all 1 query labels are -1"):
        knn_classify(sims, ids, np.array([0, 1]), np.array([-1]))


@pytest.mark.parametrize("labels, msg", [(np.array([0.0, 1.0]), "integers"), (np.array([0, -2]), ">= 0, or -1"),
                                         (np.array([[0, 1]]), "shape"), (np.array([True, False]), "integers")])
def test_bad_labels(labels, msg):
    with pytest.raises(InstdiscError, match=msg):
        knn_classify(np.array([[0.9]]), np.array([[0]]), labels, np.array([0]))


def test_ids_out_of_range():
    with pytest.raises(InstdiscError, match=r"ids must lie in \[-1, 2\)"):
        knn_classify(np.array([[0.9]]), np.array([[2]]), np.array([0, 1]), np.array([0]))


# ---------------------------------------------------------------------------------------------- retrieval
def hand_case():
    """Query (label A=0) at angle 0; gallery row r at angle theta_r. Ranking by angle: rows [1, 0, 3, 2, 4].

    Labels by row: [A, B, A, B, A] -> relevance along the ranking [0, 1, 0, 1, 1], R = 3.
    AP   = (1/3) (1/2 + 2/4 + 3/5) = 0.5333...   (relevant items at ranks 2, 4, 5)
    AP@R = (1/3) (1/2)            = 0.1666...   (only rank 2 is within the top R = 3)
    first relevant at rank 2 -> recall@1 = 0, recall@2 = 1.
    """
    angles = np.radians([20, 10, 40, 30, 50])
    g = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    q = np.array([[1.0, 0.0]])
    return q, np.array([0]), g, np.array([0, 1, 0, 1, 0])


def test_hand_built_average_precision():
    q, ql, g, gl = hand_case()
    ap = average_precisions(q, ql, g, gl)
    assert ap["ap"][0] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    assert ap["ap_at_r"][0] == pytest.approx((1 / 2) / 3)
    assert ap["n_relevant"][0] == 3
    ids = np.array([[1, 0, 3, 2, 4]])
    assert map_at_r(ids, ql, gl) == pytest.approx(1 / 6)
    assert recall_at_k(ids, ql, gl, ks=(1, 2)) == {1: 0.0, 2: 1.0}


@pytest.mark.parametrize("exclude_self", [False, True])
def test_retrieval_metrics_match_reference(exclude_self):
    rng = np.random.default_rng(4)
    g = rng.standard_normal((120, 6))
    gl = rng.integers(0, 5, 120)
    gl[:4] = -1  # a few unlabeled gallery rows: never relevant
    if exclude_self:
        q, ql = g, gl
    else:
        q, ql = rng.standard_normal((40, 6)), rng.integers(0, 6, 40)  # label 5 is absent: skipped
    ranking = ref_ranking(q, g, exclude_self)
    refs = [ref_ap(r, int(lab), gl) for r, lab in zip(ranking, ql)]
    scored = [i for i, (a, _) in enumerate(refs) if a is not None]
    ap = average_precisions(q, ql, g, gl, exclude_self=exclude_self)
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(ap["ap"])), scored)
    for i in scored:
        assert ap["ap"][i] == pytest.approx(refs[i][0], abs=1e-12)
        assert ap["ap_at_r"][i] == pytest.approx(refs[i][1], abs=1e-12)
    assert mean_average_precision(q, ql, g, gl, exclude_self=exclude_self) == pytest.approx(
        np.mean([refs[i][0] for i in scored]), abs=1e-12)
    assert map_at_r(ranking, ql, gl, exclude_self=exclude_self) == pytest.approx(
        np.mean([refs[i][1] for i in scored]), abs=1e-12)
    rec = recall_at_k(ranking[:, :10], ql, gl, ks=(1, 5, 10), exclude_self=exclude_self)
    for k, v in rec.items():
        hits = [any(gl[j] == ql[i] for j in ranking[i, :k]) for i in scored]
        assert v == pytest.approx(np.mean(hits), abs=1e-12)


def test_average_precision_with_exact_ties():
    # +-1 vectors in 16-D: after normalising, every cosine is a multiple of 1/8, exact in float32 and float64,
    # so many similarities tie exactly; the ranking breaks ties by lower gallery row.
    rng = np.random.default_rng(5)
    g = rng.choice([-1.0, 1.0], size=(60, 16))
    g[10] = g[3]  # duplicate rows tie as well
    gl = rng.integers(0, 3, 60)
    q, ql = rng.choice([-1.0, 1.0], size=(15, 16)), rng.integers(0, 3, 15)
    ranking = ref_ranking(q, g)
    ap = average_precisions(q, ql, g, gl)
    for i in range(15):
        a, r = ref_ap(ranking[i], int(ql[i]), gl)
        assert ap["ap"][i] == pytest.approx(a, abs=1e-12)
        assert ap["ap_at_r"][i] == pytest.approx(r, abs=1e-12)


def test_relevant_counts():
    gl = np.array([0, 0, 1, -1, 2])
    np.testing.assert_array_equal(relevant_counts(np.array([0, 1, 5, -1]), gl), [2, 1, 0, 0])
    np.testing.assert_array_equal(relevant_counts(gl, gl, exclude_self=True), [1, 1, 0, 0, 0])
    with pytest.raises(InstdiscError, match="labels differ"):
        relevant_counts(np.array([0, 0, 1, -1, 1]), gl, exclude_self=True)


def test_retrieval_refusals():
    gl = np.array([0, 1, 1])
    ids = np.array([[1, 2]])
    with pytest.raises(InstdiscError, match="no query has a relevant gallery item"):
        recall_at_k(ids, np.array([-1]), gl, ks=(1,))
    with pytest.raises(InstdiscError, match="no query has a relevant gallery item"):
        map_at_r(ids, np.array([0]), np.array([-1, -1, -1]))
    with pytest.raises(InstdiscError, match="recall@5 needs 5 neighbours"):
        recall_at_k(ids, np.array([1]), gl, ks=(1, 5))
    assert recall_at_k(np.array([[0, 2, 1]]), np.array([1]), gl, ks=(1, 5)) == {1: 0.0, 5: 1.0}  # whole gallery
    with pytest.raises(InstdiscError, match="map_at_r needs R=2 neighbours"):
        map_at_r(np.array([[1]]), np.array([1]), gl)
    with pytest.raises(InstdiscError, match="ks must be positive"):
        recall_at_k(ids, np.array([1]), gl, ks=(0,))
