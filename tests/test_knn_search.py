"""Tests for instdisc/knn/search.py: exact search against a float64 brute force, chunking, exclude_self, the k clamp,
input validation, approximate indexes (recall against exact) and the GPU code path with FAISS's GPU calls faked."""
from __future__ import annotations

import importlib
import warnings

import faiss
import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.knn.search import KnnIndex, build_index, default_nlist, iter_search, prepare_features, search

search_mod = importlib.import_module("instdisc.knn.search")  # the package re-exports a function of this name


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tiny indexes: see conftest.py


# ---------------------------------------------------------------------------------------------- reference
def ref_search(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool = False):
    """Brute force from the definition: float64 cosine, full sort by (similarity desc, gallery row asc)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T  # (Q, N) float64
    sims, ids = [], []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if not (exclude_self and j == i)]
        order = sorted(cand, key=lambda j: (-s[i, j], j))[:k]
        ids.append(order)
        sims.append(s[i, order])
    return np.array(sims), np.array(ids, dtype=np.int64), s


def assert_tie_free(s: np.ndarray, k: int, gap: float = 1e-6) -> None:
    """The precondition for comparing float32 ids with float64 ids: no near-ties among each row's top k+1."""
    top = -np.sort(-s, axis=1)[:, :k + 1]
    assert np.min(top[:, :-1] - top[:, 1:]) > gap


def clustered(n: int, d: int, n_clusters: int, rng: np.random.Generator, spread: float = 0.6):
    centers = rng.standard_normal((n_clusters, d))
    lab = rng.integers(0, n_clusters, n)
    x = centers[lab] + spread * rng.standard_normal((n, d))
    return x.astype(np.float32), lab


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((300, 24))  # float64 on purpose: the boundary converts
    q = rng.standard_normal((37, 24))
    return q, g


# ---------------------------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("chunk_size", [1, 8, 4096])
def test_flat_matches_bruteforce(data, chunk_size):
    q, g = data
    k = 10
    ref_sims, ref_ids, s = ref_search(q, g, k)
    assert_tie_free(s, k)
    sims, ids = search(g, q, k, chunk_size=chunk_size)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    assert sims.shape == ids.shape == (37, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_flat_with_all_faiss_threads(data):
    # The other tests pin FAISS to one thread (see _one_faiss_thread); the multi-threaded path must agree.
    q, g = data
    faiss.omp_set_num_threads(2)
    try:
        np.testing.assert_array_equal(search(g, q, 10, chunk_size=16)[1], ref_search(q, g, 10)[1])
    finally:
        faiss.omp_set_num_threads(1)


def test_prebuilt_index_and_method_agree(data):
    q, g = data
    knn = build_index(g)
    assert isinstance(knn, KnnIndex) and len(knn) == 300 and knn.dim == 24 and knn.kind == "flat"
    a = search(knn, q, 5)
    b = knn.search(q, 5)
    np.testing.assert_array_equal(a[1], b[1])


def test_iter_search_yields_chunks_in_order(data):
    q, g = data
    full = search(g, q, 4)
    starts = []
    for start, sims, ids in iter_search(g, q, 4, chunk_size=10):
        starts.append(start)
        np.testing.assert_array_equal(ids, full[1][start:start + ids.shape[0]])
    assert starts == [0, 10, 20, 30]  # last chunk has 7 rows


def test_scale_invariance_and_inputs_untouched(data):
    q, g = data
    g_copy, q_copy = g.copy(), q.copy()
    scaled = g * np.random.default_rng(1).uniform(0.1, 10.0, size=(300, 1))
    np.testing.assert_array_equal(search(g, q, 6)[1], search(scaled, q * 3.0, 6)[1])
    np.testing.assert_array_equal(g, g_copy)
    np.testing.assert_array_equal(q, q_copy)


def test_one_query(data):
    q, g = data
    sims, ids = search(g, q[:1], 3)
    assert sims.shape == ids.shape == (1, 3)
    np.testing.assert_array_equal(ids, ref_search(q[:1], g, 3)[1])


def test_k_larger_than_gallery_is_clamped_with_warning():
    g = np.eye(3, 4, dtype=np.float32)
    q = np.array([[1.0, 0.2, 0.1, 0.0]], dtype=np.float32)
    with pytest.warns(UserWarning, match="k=10 exceeds the 3 gallery rows"):
        sims, ids = search(g, q, 10)
    assert ids.shape == (1, 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])  # cosines 0.976 > 0.195 > 0.098


def test_k_equal_to_gallery_does_not_warn():
    g = np.eye(3, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ids = search(g, g, 3)
    assert ids.shape == (3, 3)


# ---------------------------------------------------------------------------------------------- exclude_self
def test_exclude_self_matches_bruteforce(data):
    _, g = data
    k = 7
    ref_sims, ref_ids, s = ref_search(g, g, k, exclude_self=True)
    s = s.copy()
    np.fill_diagonal(s, -np.inf)
    assert_tie_free(s, k)
    sims, ids = search(g, g, k, exclude_self=True, chunk_size=64)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert not (ids == np.arange(300)[:, None]).any()


def test_exclude_self_with_duplicate_rows():
    # Rows 0 and 1 are identical: row 0's own id may come second behind row 1; it must still be the one dropped.
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    _, ids = search(g, g, 2, exclude_self=True)
    assert ids[0, 0] == 1 and ids[1, 0] == 0
    assert not (ids == np.arange(4)[:, None]).any()


def test_exclude_self_clamps_to_gallery_minus_one():
    g = np.eye(3, dtype=np.float32)
    with pytest.warns(UserWarning, match="using k=2"):
        _, ids = search(g, g, 5, exclude_self=True)
    assert ids.shape == (3, 2)


def test_exclude_self_needs_queries_to_be_gallery(data):
    q, g = data
    with pytest.raises(InstdiscError, match="exclude_self needs the queries to be the gallery"):
        search(g, q, 3, exclude_self=True)
    with pytest.raises(InstdiscError, match="one-row gallery"):
        search(g[:1], g[:1], 1, exclude_self=True)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise(data, bad):
    q, g = data
    g = g.copy()
    g[5, 3] = bad
    with pytest.raises(InstdiscError, match="gallery row 5 holds NaN or inf"):
        build_index(g)
    q = q.copy()
    q[2, 0] = bad
    with pytest.raises(InstdiscError, match="queries row 2 holds NaN or inf"):
        search(data[1], q, 3)


def test_float64_overflow_to_float32_inf_raises():
    with pytest.raises(InstdiscError, match="NaN or inf"):
        prepare_features(np.array([[1e39, 1.0]]))


def test_wrong_dimension_raises(data):
    q, g = data
    with pytest.raises(InstdiscError, match="queries have dimension 23 but the gallery has dimension 24"):
        search(g, q[:, :23], 3)


@pytest.mark.parametrize("x, msg", [
    (np.zeros(5), "2-D array"),
    (np.zeros((2, 3, 4)), "2-D array"),
    (np.zeros((0, 4)), "empty"),
    (np.array([[1.0, 0.0], [0.0, 0.0]]), "row 1 has zero norm"),
    (np.array([["a", "b"]]), "numeric"),
    (np.array([[True, False]]), "numeric"),
])
def test_bad_feature_arrays(x, msg):
    with pytest.raises(InstdiscError, match=msg):
        prepare_features(x, name="gallery")


def test_prepare_features_unit_rows_float32():
    x = prepare_features(np.array([[3, 4], [0, -2]]))
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-7)


@pytest.mark.parametrize("kwargs, msg", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"k": 2.0}, "k must be an integer"),
    ({"k": True}, "k must be an integer"),
    ({"k": 2, "chunk_size": 0}, "chunk_size must be an integer >= 1"),
])
def test_bad_search_arguments(data, kwargs, msg):
    q, g = data
    with pytest.raises(InstdiscError, match=msg):
        search(g, q, **kwargs)


def test_bad_index_arguments(data):
    _, g = data
    with pytest.raises(InstdiscError, match="unknown index kind 'lsh'"):
        build_index(g, kind="lsh")
    with pytest.raises(InstdiscError, match="use_gpu must be"):
        build_index(g, use_gpu="yes")
    with pytest.raises(InstdiscError, match="pq_m=5 must divide the feature dimension 24"):
        build_index(g, kind="ivfpq", pq_m=5)
    with pytest.raises(InstdiscError, match="nlist=301 exceeds the 300 gallery rows"):
        build_index(g, kind="ivf", nlist=301)
    with pytest.raises(InstdiscError, match="expected a KnnIndex"):
        search("gallery.npy", g, 3)


def test_use_gpu_true_without_gpu_raises(data, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(InstdiscError, match="use_gpu=True but FAISS sees no GPU"):
        build_index(data[1], use_gpu=True)


# ---------------------------------------------------------------------------------------------- approximate
@pytest.fixture(scope="module")
def clustered_set():
    rng = np.random.default_rng(3)
    g, _ = clustered(4000, 32, 40, rng, spread=0.45)
    q, _ = clustered(200, 32, 40, np.random.default_rng(4), spread=0.45)
    exact = search(g, q, 10)[1]
    return g, q, exact


@pytest.mark.parametrize("kind, min_recall", [("ivf", 0.93), ("hnsw", 0.93), ("ivfpq", 0.5)])  # PQ is lossy
def test_approximate_recall_against_exact(clustered_set, kind, min_recall):
    g, q, exact = clustered_set
    knn = build_index(g, kind=kind)
    assert knn.kind == kind and knn.ntotal == 4000
    _, ids = search(knn, q, 10, chunk_size=64)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= min_recall, (kind, recall)


def test_approximate_defaults_recorded(clustered_set):
    g, _, _ = clustered_set
    knn = build_index(g, kind="ivfpq")
    assert knn.params["nlist"] == default_nlist(4000) == 102  # min(round(4 sqrt(4000)) = 253, 4000 // 39)
    assert knn.params["pq_m"] == 8 and knn.params["pq_nbits"] == 6  # 32 / 4; log2(4000 / 39) = 6.7
    assert knn.params["nprobe"] == 8  # max(8, 102 / 16)
    assert build_index(g, kind="hnsw", hnsw_m=8).params["hnsw_m"] == 8


def test_missing_neighbours_are_marked():
    # nprobe=1 cell of 5 cannot supply 150 neighbours: the tail is id -1 with similarity -inf.
    rng = np.random.default_rng(0)
    g, _ = clustered(200, 8, 5, rng)
    knn = build_index(g, kind="ivf", nlist=5, nprobe=1)
    sims, ids = search(knn, g[:20], 150)
    missing = ids == -1
    assert missing.any()
    assert np.all(np.isneginf(sims[missing])) and np.all(np.isfinite(sims[~missing]))
    for row in ids:
        found = row[row >= 0]
        assert len(set(found)) == len(found)


# ---------------------------------------------------------------------------------------------- GPU path (faked)
class _Opts:
    useFloat16 = False


def test_multi_gpu_path_clones_to_all_gpus(data, monkeypatch):
    calls = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", _Opts)

    def to_all(index, co=None, ngpu=-1):
        calls.append(type(index).__name__)
        return index  # stands in for an IndexReplicas over 2 GPUs

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index)
    q, g = data
    knn = build_index(g)
    assert knn.on_gpu and calls == ["IndexFlatIP"]
    np.testing.assert_array_equal(search(knn, q, 4)[1], ref_search(q, g, 4)[1])
    knn_ivf = build_index(g, kind="ivf", nlist=4)  # k-means on the (fake) GPU flat index, then cloned
    assert knn_ivf.on_gpu and calls[1:] == ["IndexFlatIP", "IndexIVFFlat"]
    hnsw = build_index(g, kind="hnsw")  # no GPU HNSW in FAISS: stays on the CPU
    assert not hnsw.on_gpu


def test_single_gpu_path_and_large_k_fallback(data, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuClonerOptions", _Opts)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res")
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index, co=None: index)
    back = []
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: back.append(1) or index)
    monkeypatch.setattr(search_mod, "GPU_MAX_K", 5)
    q, g = data
    knn = build_index(g, use_gpu=True)
    assert knn.on_gpu and knn._gpu_resources == "res"
    search(knn, q, 5)
    assert back == []
    _, ids = search(knn, q, 6)  # above the GPU k limit: searched on a CPU copy
    assert back == [1]
    np.testing.assert_array_equal(ids, ref_search(q, g, 6)[1])


def test_gpu_clone_failure(data, monkeypatch):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuClonerOptions", _Opts)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res")

    def fail(*a, **kw):
        raise RuntimeError("Error in GpuIndexIVFPQ: bytes per code 7 not supported\nmore")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fail)
    g = data[1]
    assert not build_index(g, use_gpu="auto").on_gpu  # falls back to the CPU with a logged warning
    with pytest.raises(InstdiscError, match="cannot put the flat index on the GPU: .*not supported$"):
        build_index(g, use_gpu=True)
    assert not build_index(g, use_gpu=False).on_gpu
