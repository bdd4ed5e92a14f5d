"""instdisc.mining: a finished run's bank searched for every slot's neighbours, against a float64 loop from the
definition; the file's contents, atomicity and refusals."""
import h5py
import numpy as np
import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.bank_neighbours import missing_as_nan, search_bank
from instdisc.mining import MINE_KIND, mine_bank, read_bank_neighbours, run_labels
from instdisc.training.checkpoint import load_run


def naive_neighbours(memory: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From the definition, float64: for every row the k other rows of largest cosine, best first."""
    x = memory.astype(np.float64)
    n = x.shape[0]
    ids, sims = np.zeros((n, k), dtype=np.int64), np.zeros((n, k))
    for i in range(n):
        s = [(float(np.dot(x[i], x[j])), j) for j in range(n) if j != i]
        s.sort(key=lambda t: -t[0])
        ids[i] = [j for _, j in s[:k]]
        sims[i] = [v for v, _ in s[:k]]
    return ids, sims


def test_scores_hand_built():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # unit rows
    slots, got = search_bank(m, 2, kind="flat", with_scores=True)
    assert slots.tolist() == [[2, 1], [2, 0], [1, 0]]
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.8, 0.6]]))
    # a neighbour IVF did not find (-1, FAISS's -inf) has no score
    masked = missing_as_nan(torch.tensor([[0.6, 0.0], [0.8, float("-inf")]]), torch.tensor([[2, 1], [1, -1]]))
    torch.testing.assert_close(masked, torch.tensor([[0.6, 0.0], [0.8, float("nan")]]), equal_nan=True)


def test_mine_bank_matches_the_definition(run, tmp_path):
    run_dir, root = run
    _, model, ckpt = load_run(run_dir)
    memory = model.objective.bank.memory.numpy()  # (N, D)
    res = mine_bank(run_dir, tmp_path / "nb.h5", k=5, clusters=4, index="flat")
    got = read_bank_neighbours(tmp_path / "nb.h5")
    ids, sims = naive_neighbours(memory, 5)
    assert got["neighbours"].shape == (res.n, 5) == (memory.shape[0], 5)
    np.testing.assert_allclose(got["similarities"], sims, rtol=0, atol=1e-5)
    # the same sets where the cosines are not tied (ties may come in either order)
    gaps = np.diff(sims, axis=1)
    untied = np.all(np.abs(gaps) > 1e-6, axis=1)
    assert untied.mean() > 0.5
    np.testing.assert_array_equal(got["neighbours"][untied], ids[untied])
    assert got["clusters"].shape == (res.n,) and set(np.unique(got["clusters"])) <= set(range(4))
    a = got["attrs"]
    assert a["kind"] == MINE_KIND and a["k"] == 5 and a["index"] == "flat" and a["clusters"] == 4
    assert a["step"] == ckpt["step"] and "label_agreement" not in a
    assert not list(tmp_path.glob(".nb.h5.tmp-*"))


def test_label_agreement_from_the_definition(run, tmp_path):
    run_dir, root = run
    labels = run_labels(run_dir, data_root=root)
    assert labels is not None and labels.shape[0] == 32
    res = mine_bank(run_dir, tmp_path / "nb.h5", k=3, clusters=2, labels=labels)
    nb = read_bank_neighbours(tmp_path / "nb.h5")["neighbours"]
    want = np.mean([labels[j] == labels[i] for i in range(nb.shape[0]) for j in nb[i]])
    assert res.label_agreement == pytest.approx(want)
    assert 0 <= res.cluster_purity <= 1
    with h5py.File(tmp_path / "nb.h5") as f:
        assert f.attrs["label_agreement"] == pytest.approx(want)


def test_ivf_search(run, tmp_path):
    run_dir, _ = run
    res = mine_bank(run_dir, tmp_path / "nb.h5", k=2, index="ivf")
    got = read_bank_neighbours(tmp_path / "nb.h5")
    assert res.index == "ivf" and got["neighbours"].shape == (32, 2)
    assert not np.any(got["neighbours"] == np.arange(32)[:, None])  # never itself


def test_refusals_leave_the_old_file(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "nb.h5"
    mine_bank(run_dir, out, k=2)
    before = out.read_bytes()
    with pytest.raises(InstdiscError, match="exists; pass --overwrite"):
        mine_bank(run_dir, out, k=3)
    with pytest.raises(InstdiscError, match="--k must satisfy"):
        mine_bank(run_dir, out, k=32, overwrite=True)
    with pytest.raises(InstdiscError, match="--clusters must be 0 \\(none\\) or >= 2, got 1"):
        mine_bank(run_dir, out, k=2, clusters=1, overwrite=True)
    with pytest.raises(InstdiscError, match="--clusters must satisfy 2 <= C <= N = 32"):
        mine_bank(run_dir, out, k=2, clusters=33, overwrite=True)
    with pytest.raises(InstdiscError, match="--k must be >= 1, got 0"):
        mine_bank(run_dir, out, k=0, overwrite=True)
    with pytest.raises(InstdiscError, match="labels for a bank of 32"):
        mine_bank(run_dir, out, k=2, labels=np.zeros(5), overwrite=True)
    assert out.read_bytes() == before
    mine_bank(run_dir, out, k=3, overwrite=True)
    assert read_bank_neighbours(out)["attrs"]["k"] == 3
    with pytest.raises(InstdiscError, match="folder of --out does not exist"):
        mine_bank(run_dir, tmp_path / "no" / "nb.h5")


def test_not_a_bank_neighbours_file(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["kind"] = "something"
    with pytest.raises(InstdiscError, match="not an instdisc bank-neighbours file"):
        read_bank_neighbours(tmp_path / "x.h5")
