"""Cosine nearest-neighbour search over feature arrays, backed by FAISS. Covered by tests/test_knn_search.py.

Features are checked and L2-normalised once, at the boundary (`prepare_features`), into contiguous float32 copies;
every index then ranks by inner product, which on unit rows is cosine similarity.

Index kinds (`build_index(kind=...)`):
- ``"flat"``  exact `IndexFlatIP` (default).
- ``"ivf"``   IVF-Flat: k-means coarse quantizer with ``nlist`` cells (default ~4 sqrt(N)), ``nprobe`` cells searched.
- ``"hnsw"``  HNSW graph (``hnsw_m`` links per node); CPU only in FAISS.
- ``"ivfpq"`` IVF with product-quantised codes (``pq_m`` bytes per vector at 8 bits), lossy and small.
Approximate indexes are trained on a random sample of the gallery drawn with the ``rng`` argument.

On a machine where ``faiss.get_num_gpus() > 0`` the index is cloned to the GPU (all visible GPUs, as replicas, when
there are several) unless ``use_gpu=False``. Search runs over queries in chunks of ``chunk_size`` rows, so the
working memory besides the (Q, k) answer is bounded whatever the query count; `iter_search` yields the chunks for
callers that reduce them on the fly.

Results: ``sims`` (Q, k) float32 cosine similarities, best first, and ``ids`` (Q, k) int64 gallery row numbers. An
approximate index that finds fewer than k candidates fills the tail with id -1 and similarity -inf.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..errors import InstdiscError

__all__ = [
    "INDEX_KINDS",
    "KnnIndex",
    "prepare_features",
    "build_index",
    "search",
    "iter_search",
    "default_nlist",
    "default_nprobe",
]

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
GPU_MAX_K = 2048  # largest k FAISS GPU k-selection supports; larger k falls back to a CPU copy of the index
_GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # code sizes GPU IVF-PQ accepts
_NORM_BLOCK = 65536  # rows normalised per step (bounds the float64 temporaries)


def _faiss():
    import faiss  # heavy; imported where used so that `import instdisc.knn` stays cheap

    return faiss


def _check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InstdiscError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------------ features
def prepare_features(x: Any, *, name: str = "features", dim: int | None = None) -> np.ndarray:
    """Check a feature matrix and return a contiguous float32 copy with unit-L2 rows.

    x: (N, D) real array. Raises InstdiscError for a wrong rank, an empty matrix, a non-numeric dtype, a
    dimension other than ``dim``, NaN/inf entries or an all-zero row (which has no direction).
    """
    a = np.asarray(x)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InstdiscError(f"{name} must be a real numeric array; got dtype {a.dtype}")
    if a.ndim != 2:
        raise InstdiscError(f"{name} must be a 2-D array (N, D); got shape {a.shape}")
    n, d = a.shape
    if n == 0 or d == 0:
        raise InstdiscError(f"{name} is empty; got shape {a.shape}")
    if dim is not None and d != dim:
        raise InstdiscError(f"{name} have dimension {d} but the gallery has dimension {dim}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        out = np.array(a, dtype=np.float32, order="C", copy=True)  # (N, D) float32, never aliases the input
    for s in range(0, n, _NORM_BLOCK):
        block = out[s:s + _NORM_BLOCK]  # view, normalised in place
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = s + int(np.flatnonzero(~finite)[0])
            raise InstdiscError(f"{name} row {row} holds NaN or inf")
        norm = np.sqrt(np.einsum("nd,nd->n", block, block, dtype=np.float64))  # (b,) float64, no overflow
        with np.errstate(divide="ignore", over="ignore"):
            scale = (1.0 / norm).astype(np.float32)  # (b,)
        bad = ~np.isfinite(scale) | (norm == 0)
        if bad.any():
            row = s + int(np.flatnonzero(bad)[0])
            raise InstdiscError(f"{name} row {row} has zero norm; cosine similarity is undefined for it")
        block *= scale[:, None]
    return out


# ------------------------------------------------------------------------------------------------------ index
def default_nlist(n: int) -> int:
    """IVF cell count for a gallery of n rows: round(4 sqrt(n)), capped so each cell gets >= 39 training points."""
    return max(1, min(int(round(4.0 * math.sqrt(n))), n // 39))


def default_nprobe(nlist: int) -> int:
    """IVF cells searched per query: nlist / 16, at least 8 (and at most nlist)."""
    return min(nlist, max(8, int(round(nlist / 16))))


def _default_pq_m(d: int) -> int:
    """PQ sub-quantizers: the largest GPU-compatible code size dividing d and at most d / 4 (d=128 -> 32 bytes)."""
    fits = [m for m in _GPU_PQ_BYTES if d % m == 0 and m <= max(1, d // 4)]
    return max(fits) if fits else 1


@dataclass(eq=False)
class KnnIndex:
    """A searchable gallery: a FAISS inner-product index over unit rows plus how it was built.

    ``index`` is the FAISS index (a GPU index when ``on_gpu``); ``params`` holds the resolved build/search settings
    (nlist, nprobe, pq_m, pq_nbits, hnsw_m, ef_search, train_size, ...) so they can be logged with the results.
    """

    index: Any
    kind: str
    dim: int
    ntotal: int
    on_gpu: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    _gpu_resources: Any = field(default=None, repr=False)  # keeps StandardGpuResources alive with the index
    _cpu_copy: Any = field(default=None, repr=False)  # lazily made CPU clone, for k above GPU_MAX_K

    def __len__(self) -> int:
        return self.ntotal

    def search(self, queries: Any, k: int, *, chunk_size: int = 4096,
               exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Same as `search(self, queries, k, ...)`."""
        return search(self, queries, k, chunk_size=chunk_size, exclude_self=exclude_self)

    def _index_for(self, k: int) -> Any:
        if self.on_gpu and k > GPU_MAX_K:
            if self._cpu_copy is None:
                log.warning("k=%d exceeds the GPU limit %d; searching a CPU copy of the index", k, GPU_MAX_K)
                self._cpu_copy = _faiss().index_gpu_to_cpu(self.index)
            return self._cpu_copy
        return self.index

    def _search_block(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """x: (c, D) unit float32 rows -> sims (c, k) float32, ids (c, k) int64 (missing: -1, -inf)."""
        faiss = _faiss()
        index = self._index_for(k)
        if self.kind == "hnsw":
            ef = max(int(self.params["ef_search"]), k)  # efSearch below k cannot return k good neighbours
            sims, ids = index.search(x, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        else:
            sims, ids = index.search(x, k)
        sims = np.ascontiguousarray(sims, dtype=np.float32)  # (c, k)
        ids = np.ascontiguousarray(ids, dtype=np.int64)  # (c, k)
        sims[ids < 0] = -np.inf
        return sims, ids


def _resolve_gpu(use_gpu: Any) -> bool:
    if use_gpu not in ("auto", True, False):
        raise InstdiscError(f"use_gpu must be 'auto', True or False; got {use_gpu!r}")
    if use_gpu is False:
        return False
    faiss = _faiss()
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is True and n_gpu == 0:
        raise InstdiscError("use_gpu=True but FAISS sees no GPU (faiss.get_num_gpus() == 0)")
    return n_gpu > 0


def _to_gpu(cpu_index: Any, kind: str, pq_m: int | None) -> tuple[Any, Any]:
    """Clone a built CPU index to every visible GPU (replicas when several) -> (gpu_index, resources or None)."""
    faiss = _faiss()
    n_gpu = faiss.get_num_gpus()
    float16_tables = kind == "ivfpq" and pq_m is not None and pq_m > 48  # GPU PQ tables above 48 B need float16
    if n_gpu > 1:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = float16_tables
        return faiss.index_cpu_to_all_gpus(cpu_index, co=co), None
    co = faiss.GpuClonerOptions()
    co.useFloat16 = float16_tables
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, 0, cpu_index, co), res


def build_index(
    gallery: Any,
    *,
    kind: str = "flat",
    use_gpu: bool | str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    pq_nbits: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 128,
    train_size: int | None = None,
    niter: int = 10,
    rng: np.random.Generator | None = None,
) -> KnnIndex:
    """Index the rows of ``gallery`` (N, D) for cosine search.

    kind: one of INDEX_KINDS. use_gpu: "auto" (GPU when FAISS sees one), True (require one) or False.
    IVF ("ivf", "ivfpq"): nlist cells (default `default_nlist(N)`), nprobe cells searched (default
    `default_nprobe(nlist)`), k-means with niter iterations on train_size sampled rows (default
    min(N, max(40 nlist, 10000))). PQ ("ivfpq"): pq_m sub-quantizers (must divide D; default `_default_pq_m`),
    pq_nbits bits each (default 8, fewer when the training sample is too small for 2^nbits centroids).
    HNSW: hnsw_m links per node, ef_construction at build, efSearch = max(ef_search, k) at search.
    rng: numpy Generator for the training sample (default ``np.random.default_rng(0)``).
    """
    if kind not in INDEX_KINDS:
        raise InstdiscError(f"unknown index kind {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
    on_gpu = _resolve_gpu(use_gpu)
    faiss = _faiss()
    x = prepare_features(gallery, name="gallery")  # (N, D) unit rows
    n, d = x.shape
    params: dict[str, Any] = {}

    if kind == "flat":
        cpu_index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        params.update(hnsw_m=_check_int(hnsw_m, "hnsw_m", minimum=2),
                      ef_construction=_check_int(ef_construction, "ef_construction"),
                      ef_search=_check_int(ef_search, "ef_search"))
        cpu_index = faiss.index_factory(d, f"HNSW{params['hnsw_m']},Flat", faiss.METRIC_INNER_PRODUCT)
        cpu_index.hnsw.efConstruction = params["ef_construction"]
        if on_gpu:
            log.info("FAISS has no GPU HNSW; the hnsw index stays on the CPU")
            on_gpu = False
    else:  # ivf, ivfpq
        nlist = default_nlist(n) if nlist is None else _check_int(nlist, "nlist")
        if nlist > n:
            raise InstdiscError(f"nlist={nlist} exceeds the {n} gallery rows")
        nprobe = default_nprobe(nlist) if nprobe is None else min(_check_int(nprobe, "nprobe"), nlist)
        if train_size is None:
            train_size = min(n, max(40 * nlist, 10_000))
        train_size = min(_check_int(train_size, "train_size"), n)
        if train_size < nlist:
            raise InstdiscError(f"train_size={train_size} is smaller than nlist={nlist}")
        params.update(nlist=nlist, nprobe=nprobe, train_size=train_size, niter=_check_int(niter, "niter"))
        if kind == "ivf":
            key = f"IVF{nlist},Flat"
        else:
            pq_m = _default_pq_m(d) if pq_m is None else _check_int(pq_m, "pq_m")
            if d % pq_m:
                raise InstdiscError(f"pq_m={pq_m} must divide the feature dimension {d}")
            if pq_nbits is None:  # 2^nbits centroids per sub-quantizer need >= 39 training points each
                pq_nbits = int(min(8, max(1, math.floor(math.log2(max(2, train_size / 39))))))
            pq_nbits = _check_int(pq_nbits, "pq_nbits")
            if 2 ** pq_nbits > train_size:
                raise InstdiscError(f"pq_nbits={pq_nbits} needs at least {2 ** pq_nbits} training rows; "
                                    f"got train_size={train_size}")
            params.update(pq_m=pq_m, pq_nbits=pq_nbits)
            key = f"IVF{nlist},PQ{pq_m}x{pq_nbits}"
        cpu_index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
        if kind == "ivfpq":
            cpu_index.do_polysemous_training = False  # only for Hamming-filtered search, which we do not use; slow
            cpu_index.pq.cp.min_points_per_centroid = 1  # warned about below, once, instead of per sub-quantizer
            if train_size < 39 * 2 ** pq_nbits:
                log.warning("ivfpq: %d training rows for 2^%d centroids per sub-quantizer (39 per centroid "
                            "advised); the codes will be coarse", train_size, pq_nbits)
        ivf = faiss.extract_index_ivf(cpu_index)
        ivf.cp.niter = params["niter"]
        ivf.cp.spherical = True  # unit centroids: cells follow the cosine geometry
        ivf.cp.min_points_per_centroid = 1  # we chose train_size; no FAISS warning for small galleries
        clustering_index = None
        if on_gpu:  # k-means assignment on the GPU(s); the coarse quantizer itself stays a CPU index
            clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))  # referenced until trained
            ivf.clustering_index = clustering_index
        gen = rng if rng is not None else np.random.default_rng(0)
        rows = np.sort(gen.choice(n, size=train_size, replace=False)) if train_size < n else slice(None)
        t0 = time.perf_counter()
        cpu_index.train(np.ascontiguousarray(x[rows]))  # (train_size, D)
        log.info("%s index: k-means of %d cells on %d rows in %.1fs", kind, nlist, train_size,
                 time.perf_counter() - t0)
        if clustering_index is not None:
            ivf.clustering_index = None
            del clustering_index
        ivf.nprobe = nprobe

    _add_rows(cpu_index, x, kind)
    index, res = cpu_index, None
    if on_gpu:
        try:
            index, res = _to_gpu(cpu_index, kind, params.get("pq_m"))
        except RuntimeError as e:
            if use_gpu is True:
                raise InstdiscError(f"cannot put the {kind} index on the GPU: {str(e).splitlines()[0]}") from e
            log.warning("cannot put the %s index on the GPU (%s); searching on the CPU", kind,
                        str(e).splitlines()[0])
            on_gpu = False
    log.debug("built %s index: n=%d d=%d gpu=%s %s", kind, n, d, on_gpu, params)
    return KnnIndex(index=index, kind=kind, dim=d, ntotal=n, on_gpu=on_gpu, params=params, _gpu_resources=res)


def _add_rows(cpu_index, x: np.ndarray, kind: str, chunk: int = 1 << 16) -> None:
    """``cpu_index.add(x)`` in row chunks with a progress bar (HNSW: one call, its graph depends on the batching)."""
    from ..progress_bar import ProgressBar

    n = x.shape[0]
    with ProgressBar(n, f"{kind} index of {n:,} rows", unit="rows") as bar:
        if kind == "hnsw":
            cpu_index.add(x)
            bar.update(n)
            return
        for s in range(0, n, chunk):
            cpu_index.add(x[s:s + chunk])  # (c, D)
            bar.update(min(chunk, n - s))


# ------------------------------------------------------------------------------------------------------ search
def _plan(index_or_gallery: Any, queries: Any, k: Any, chunk_size: Any,
          exclude_self: bool) -> tuple[KnnIndex, np.ndarray, int, int]:
    """Validate everything up front (so errors and warnings come at the call, not at the first chunk)."""
    k = _check_int(k, "k")
    chunk_size = _check_int(chunk_size, "chunk_size")
    if isinstance(index_or_gallery, KnnIndex):
        knn = index_or_gallery
    elif isinstance(index_or_gallery, np.ndarray) or isinstance(index_or_gallery, (list, tuple)):
        knn = build_index(index_or_gallery, kind="flat")
    else:
        raise InstdiscError(f"expected a KnnIndex or a (N, D) gallery array; got {type(index_or_gallery).__name__}")
    q = prepare_features(queries, name="queries", dim=knn.dim)  # (Q, D) unit rows
    available = knn.ntotal
    if exclude_self:
        if q.shape[0] != knn.ntotal:
            raise InstdiscError(f"exclude_self needs the queries to be the gallery (query i = gallery row i); "
                                f"got {q.shape[0]} queries for {knn.ntotal} gallery rows")
        available -= 1
        if available == 0:
            raise InstdiscError("exclude_self with a one-row gallery leaves no neighbours to return")
    if k > available:
        warnings.warn(f"k={k} exceeds the {available} gallery rows available; using k={available}", stacklevel=3)
        k = available
    return knn, q, k, chunk_size


def _drop_self(sims: np.ndarray, ids: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sims, ids: (c, k+1); self_ids: (c,). Drop each row's own id, or its last column when the id is absent."""
    c, k1 = ids.shape
    hit = ids == self_ids[:, None]  # (c, k+1)
    drop = np.where(hit.any(axis=1), hit.argmax(axis=1), k1 - 1)  # (c,) column to remove
    keep = np.ones((c, k1), dtype=bool)
    keep[np.arange(c), drop] = False
    return sims[keep].reshape(c, k1 - 1), ids[keep].reshape(c, k1 - 1)


def _chunks(knn: KnnIndex, q: np.ndarray, k: int, chunk_size: int,
            exclude_self: bool) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, q.shape[0], chunk_size):
        x = q[start:start + chunk_size]  # (c, D) contiguous view
        if exclude_self:
            sims, ids = knn._search_block(x, k + 1)  # (c, k+1)
            sims, ids = _drop_self(sims, ids, np.arange(start, start + x.shape[0], dtype=np.int64))
        else:
            sims, ids = knn._search_block(x, k)  # (c, k)
        yield start, sims, ids


def iter_search(index_or_gallery: Any, queries: Any, k: int, *, chunk_size: int = 4096,
                exclude_self: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Like `search` but yields ``(start, sims (c, k), ids (c, k))`` per chunk of query rows [start, start + c).

    Validation, the k clamp warning and any index build happen at the call, before the first chunk.
    """
    knn, q, k, chunk_size = _plan(index_or_gallery, queries, k, chunk_size, exclude_self)
    return _chunks(knn, q, k, chunk_size, exclude_self)


def search(index_or_gallery: Any, queries: Any, k: int, *, chunk_size: int = 4096,
           exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each query row.

    index_or_gallery: a `KnnIndex`, or a (N, D) gallery array (an exact flat index is built for it).
    queries: (Q, D). k: neighbours per query; k above the gallery size is clamped with a warning.
    exclude_self: the queries are the gallery (query i is gallery row i); search k+1 and drop each query's own
    row (or the last column when an approximate index misses it), so every row has k other neighbours.
    Returns sims (Q, k) float32 best first and ids (Q, k) int64 gallery rows (-1 / -inf where none was found).
    """
    knn, q, k, chunk_size = _plan(index_or_gallery, queries, k, chunk_size, exclude_self)
    sims = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    ids = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
    for start, s, i in _chunks(knn, q, k, chunk_size, exclude_self):
        sims[start:start + s.shape[0]] = s
        ids[start:start + s.shape[0]] = i
    return sims, ids
