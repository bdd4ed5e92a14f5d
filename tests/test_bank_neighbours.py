"""Tests for instdisc/bank_neighbours.py: the FAISS search of the bank against a float64 brute force, the IVF path,
the stability and label-agreement monitors from hand-built tables, the table's state and validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instdisc.bank_neighbours import (EXACT_MAX_ROWS, BankNeighbours, cluster_bank, cluster_purity, label_agreement,
                                      neighbour_stability, resolve_index_kind, search_bank, select_confident)
from instdisc.errors import InstdiscError


def _bank(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)  # n x d


def brute_force_py(memory: torch.Tensor, k: int) -> list[list[int]]:
    """From the definition, in float64 python: the k other rows with the largest inner product, best first."""
    rows = memory.double().tolist()
    out = []
    for i, a in enumerate(rows):
        sims = [(sum(x * y for x, y in zip(a, b)), j) for j, b in enumerate(rows) if j != i]
        sims.sort(key=lambda t: (-t[0], t[1]))
        out.append([j for _, j in sims[:k]])
    return out


@pytest.mark.parametrize("n,k", [(2, 1), (7, 3), (60, 5), (60, 59)])
def test_flat_search_equals_brute_force(n, k):
    memory = _bank(n, seed=n)
    got = search_bank(memory, k, kind="flat")
    assert got.dtype == torch.int64 and tuple(got.shape) == (n, k)
    assert got.tolist() == brute_force_py(memory, k)  # random rows: no ties


def test_hand_built_neighbours():
    # four unit rows on a circle at 0, 10, 90 and 185 degrees: 0 and 10 are each other's nearest, 90 is nearer to
    # 10 (80 degrees) than to 0 (90), and 185 is nearest to 90 (95 degrees; 175 to both 0 and 10)
    ang = torch.tensor([0.0, 10.0, 90.0, 185.0]) * math.pi / 180
    memory = torch.stack([ang.cos(), ang.sin()], dim=1)
    assert search_bank(memory, 1, kind="flat").view(-1).tolist() == [1, 0, 1, 2]


def test_ivf_search_finds_the_exact_neighbours_on_clustered_data():
    # 40 tight clusters of 50 rows: the probed cells hold every true neighbour
    centres = _bank(40, d=16, seed=1)
    noise = 0.05 * torch.randn(40, 50, 16, generator=torch.Generator().manual_seed(2))
    memory = F.normalize((centres[:, None, :] + noise).reshape(-1, 16), dim=1)  # 2000 x 16
    exact = search_bank(memory, 5, kind="flat")
    approx = search_bank(memory, 5, kind="ivf", seed=0)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact.tolist(), approx.tolist())])
    assert recall > 0.95
    assert torch.equal(approx, search_bank(memory, 5, kind="ivf", seed=0))  # seeded: the same table again
    assert not (approx == torch.arange(2000)[:, None]).any()  # never a row's own slot


def test_auto_kind_is_exact_up_to_the_bound():
    assert resolve_index_kind("auto", EXACT_MAX_ROWS) == "flat"
    assert resolve_index_kind("auto", EXACT_MAX_ROWS + 1) == "ivf"
    assert resolve_index_kind("ivf", 10) == "ivf"
    with pytest.raises(InstdiscError, match="neighbour index must be one of auto, flat, ivf, got 'hnsw'"):
        resolve_index_kind("hnsw", 10)


def test_stability_hand_built():
    old = torch.tensor([[1, 2], [0, 2], [-1, -1]])
    new = torch.tensor([[2, 3], [2, 0], [0, 1]])
    # old holds 4 pairs (row 2 none): row 0 keeps 2 of {1, 2}, row 1 keeps both (order does not matter) -> 3 / 4
    assert neighbour_stability(old, new) == pytest.approx(3 / 4)
    assert neighbour_stability(torch.tensor([[1, 2], [0, 2]]), torch.tensor([[2, 0], [0, 1]])) == pytest.approx(
        (0.5 + 0.5) / 2)  # full tables: the mean over rows of |old_i ∩ new_i| / k
    assert math.isnan(neighbour_stability(torch.full((2, 2), -1), new[:2]))  # no pair to keep
    with pytest.raises(InstdiscError, match="differ in shape"):
        neighbour_stability(old, new[:, :1])


def test_label_agreement_hand_built():
    slots = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]])
    labels = np.array([0, 0, 1, -1])  # slot 3 is unlabelled: its row and its appearances as a neighbour skip
    # row 0: (1 same, 2 other); row 1: (0 same, 2 other); row 2: (0 other, 1 other) -> 2 of 6 agree
    assert label_agreement(slots, labels) == pytest.approx(2 / 6)
    assert math.isnan(label_agreement(slots, np.full(4, -1)))
    assert math.isnan(label_agreement(slots, np.zeros(3)))  # labels of another dataset size


def test_table_state_refresh_and_validation():
    nb = BankNeighbours(30, 4)
    assert not nb.ready and (nb.slots == -1).all()
    memory = _bank(30, seed=3)
    first = nb.refresh(memory)
    assert nb.ready and int(nb.refreshes) == 1 and math.isnan(first["neighbour_stability"])
    assert nb.slots.tolist() == brute_force_py(memory, 4)
    assert nb.of(torch.tensor([5, 0])).tolist() == [nb.slots[5].tolist(), nb.slots[0].tolist()]
    moved = nb.refresh(_bank(30, seed=4))
    assert 0.0 <= moved["neighbour_stability"] < 1.0 and int(nb.refreshes) == 2
    assert set(nb.state_dict()) == {"slots", "assign", "refreshes"}
    with pytest.raises(InstdiscError, match=r"whole \(30, D\) bank"):
        nb.refresh(memory[:10])
    with pytest.raises(InstdiscError, match="1 <= k < N"):
        BankNeighbours(5, 5)
    with pytest.raises(InstdiscError, match="N >= 2"):
        search_bank(torch.ones(1, 3), 1)


def test_cluster_bank_recovers_separated_clusters_and_is_seeded():
    centres = torch.eye(16)[:4]  # four orthogonal directions, 30 rows each
    noise = 0.02 * torch.randn(4, 30, 16, generator=torch.Generator().manual_seed(0))
    memory = F.normalize((centres[:, None, :] + noise).reshape(-1, 16), dim=1)  # 120 x 16
    assign = cluster_bank(memory, 4, seed=3)
    truth = torch.arange(4).repeat_interleave(30)
    assert cluster_purity(assign, truth.numpy()) == 1.0  # every cluster one direction
    assert len(set(assign.tolist())) == 4
    assert torch.equal(assign, cluster_bank(memory, 4, seed=3))
    with pytest.raises(InstdiscError, match="2 <= C <= N"):
        cluster_bank(memory, 1)


def test_cluster_purity_hand_built():
    assign = torch.tensor([0, 0, 0, 1, 1, -1])
    labels = np.array([2, 2, 5, 7, -1, 3])
    # cluster 0: labels 2, 2, 5 -> 2 of 3; cluster 1: label 7 (the -1 row skips) -> 1 of 1; slot 5 has no cluster
    assert cluster_purity(assign, labels) == pytest.approx(3 / 4)
    assert math.isnan(cluster_purity(assign, np.full(6, -1)))


def test_clusters_refresh_and_set_clusters():
    nb = BankNeighbours(40, 0, clusters=5)
    stats = nb.refresh(_bank(40, seed=1))
    assert nb.ready and ((nb.assign >= 0) & (nb.assign < 5)).all() and math.isnan(stats["neighbour_stability"])
    nb.set_clusters(torch.arange(40) % 2)
    assert nb.assign.tolist() == [i % 2 for i in range(40)]
    with pytest.raises(InstdiscError, match=r"\(40,\) cluster ids"):
        nb.set_clusters(torch.zeros(3))
    with pytest.raises(InstdiscError, match="needs neighbours k >= 1 or clusters"):
        BankNeighbours(40, 0)


def test_cluster_selection_keeps_the_members_nearest_their_centroid():
    """Three clusters around e0, e1, e2 in 8-D, members e_c ± a e_5 and e_c ± b e_6 (normalised), so each centroid
    is e_c exactly and a member's cosine to it is 1 / sqrt(1 + a^2): with select 0.5 the six members of the
    smaller offsets (a = 0.1, 0.2, 0.3 against b = 0.5, 0.6, 0.7) keep their cluster, the other six get -1."""
    rows, near = [], []
    for c, (a, b) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.3, 0.7)]):
        for off, sign, is_near in [(a, 1, True), (a, -1, True), (b, 1, False), (b, -1, False)]:
            v = torch.zeros(8, dtype=torch.float64)
            v[c], v[5 if is_near else 6] = 1.0, sign * off
            rows.append(v / v.norm())
            near.append(is_near)
    memory = torch.stack(rows).float()  # 12 x 8
    full, scores = cluster_bank(memory, 3, seed=0, with_scores=True)
    assert [len(set(full[i:i + 4].tolist())) for i in (0, 4, 8)] == [1, 1, 1] and len(set(full.tolist())) == 3
    want = [1.0 / math.sqrt(1 + x * x) for x in (0.1, 0.1, 0.5, 0.5, 0.2, 0.2, 0.6, 0.6, 0.3, 0.3, 0.7, 0.7)]
    torch.testing.assert_close(scores.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-6)
    nb = BankNeighbours(12, 0, clusters=3, select=0.5)
    stats = nb.refresh(memory)
    assert nb.assign.tolist() == [int(full[i]) if near[i] else -1 for i in range(12)]
    assert stats["cluster_selected"] == 0.5


def select_confident_py(slots, scores, fraction):
    """From the definition: keep the round(fraction x found) found pairs of the largest score (ties: row-major
    order), -1 elsewhere."""
    pairs = [(scores[i][j], i * len(slots[0]) + j) for i in range(len(slots)) for j in range(len(slots[0]))
             if slots[i][j] >= 0]
    pairs.sort(key=lambda t: (-t[0], t[1]))
    keep = {p for _, p in pairs[:int(round(fraction * len(pairs)))]}
    return [[slots[i][j] if i * len(slots[0]) + j in keep else -1 for j in range(len(slots[0]))]
            for i in range(len(slots))]


def test_select_confident_hand_built():
    slots = torch.tensor([[1, 2], [0, 2], [1, -1]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.5], [0.7, float("nan")]])
    # 5 pairs found; 0.6 of them -> the 3 of the largest cosine: 0.9, 0.8, 0.7
    assert select_confident(slots, scores, 0.6).tolist() == [[1, -1], [0, -1], [1, -1]]
    assert select_confident(slots, scores, 1.0).tolist() == slots.tolist()
    assert select_confident(slots, scores, 0.2).tolist() == [[1, -1], [-1, -1], [-1, -1]]
    ties = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.0]])  # equal scores: the table's row-major order decides
    assert select_confident(slots, ties, 0.6).tolist() == [[1, 2], [0, -1], [-1, -1]]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InstdiscError, match=r"neighbour selection must be in \(0, 1\]"):
            select_confident(slots, scores, bad)


@pytest.mark.parametrize("fraction", [0.1, 0.37, 0.5, 1.0])
def test_refresh_with_selection_keeps_the_most_similar_pairs(fraction):
    """BankNeighbours(select=f): the float64 brute-force table, then the share f of its pairs of the largest
    cosine (select_confident_py), against the FAISS path."""
    memory = _bank(40, seed=7)
    nb = BankNeighbours(40, 5, select=fraction)
    stats = nb.refresh(memory)
    table = brute_force_py(memory, 5)
    mem = memory.double()
    scores = [[float(mem[i] @ mem[j]) for j in row] for i, row in enumerate(table)]
    assert nb.slots.tolist() == select_confident_py(table, scores, fraction)
    assert stats["neighbour_selected"] == pytest.approx(round(fraction * 200) / 200)
    with pytest.raises(InstdiscError, match=r"neighbour selection must be in \(0, 1\]"):
        BankNeighbours(40, 5, select=0.0)
