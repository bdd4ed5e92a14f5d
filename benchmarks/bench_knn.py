"""kNN search speed: FAISS exact vs a chunked torch matmul + topk baseline, and approximate FAISS indexes.

    python benchmarks/bench_knn.py [--quick] [--defaults] [--json-out benchmarks/results/bench_knn.json]

Data: a Gaussian mixture on the unit sphere (``--points-per-cluster`` points around each random unit centre, noise
``--sigma`` relative to the centre's length, rows L2-normalised), queries drawn from the same mixture, so that
nearest neighbours have structure and approximate recall means something.

Rows:
- ``faiss-flat``: `instdisc.knn.search` end to end (validation + normalising copy + IndexFlatIP + chunked search).
- ``torch-mm-topk``: the DINO kNN loop (``eval_knn.py``): ``torch.mm(test_chunk, train_T)`` then ``topk(k)`` over
  ``Q // 100`` query rows at a time, on the same unit rows (no validation, no copy).
- ``ivf`` / ``hnsw`` / ``ivfpq`` on the largest gallery: build seconds, search seconds, speed-up of the search over
  exact FAISS, and recall@k = mean |approx ids ∩ exact ids| / k. By default they use cheaper build settings than the
  library defaults so that the script fits in about 4 minutes on 2 cores (``--nlist``, ``--hnsw-m``; printed with
  the table); ``--defaults`` uses the library defaults (nlist = 4 sqrt(N), HNSW M = 32), much slower to build on CPU.
``--quick``: 1000 queries and galleries of 60k and 200k (stated in the output).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

try:
    from ._machine import REPO, machine_info, write_json
except ImportError:
    try:
        from _machine import REPO, machine_info, write_json
    except ImportError:  # local fallback when benchmarks/_machine.py is absent
        import json
        import platform
        from pathlib import Path

        REPO = Path(__file__).resolve().parent.parent
        sys.path.insert(0, str(REPO))

        def machine_info() -> dict:
            return {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_cores": os.cpu_count(), "load_avg_1_5_15": list(os.getloadavg())}

        def write_json(path, payload) -> Path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2) + "\n")
            return path

import numpy as np
import torch

from instdisc.knn.search import build_index, search


def make_mixture(n: int, centres: np.ndarray, sigma: float, rng: np.random.Generator,
                 block: int = 131072) -> np.ndarray:
    """n unit rows (n, D) float32 drawn around the given unit centres (C, D)."""
    c, d = centres.shape
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, block):
        b = min(block, n - s)
        x = rng.standard_normal((b, d), dtype=np.float32)  # (b, D)
        x *= np.float32(sigma / np.sqrt(d))
        x += centres[rng.integers(0, c, b)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + b] = x
    return out


def torch_knn(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """DINO-style baseline: train features stored transposed (D, N), one mm + topk per query chunk."""
    train_t = torch.from_numpy(gallery).t().contiguous()  # (D, N)
    test = torch.from_numpy(queries)  # (Q, D)
    sims = torch.empty(len(queries), k)
    ids = torch.empty(len(queries), k, dtype=torch.long)
    for s in range(0, len(queries), chunk):
        sim = torch.mm(test[s:s + chunk], train_t)  # (c, N)
        v, i = sim.topk(k, dim=1, largest=True, sorted=True)  # (c, k)
        sims[s:s + chunk], ids[s:s + chunk] = v, i
    return sims.numpy(), ids.numpy()


def overlap(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |ids ∩ exact| / k (ids unique per row; -1 placeholders never match)."""
    q, k = exact.shape
    a = np.where(ids >= 0, ids, -1 - np.arange(ids.shape[1]))  # distinct negatives for missing entries
    both = np.sort(np.concatenate([a, exact], axis=1), axis=1)  # (Q, 2k)
    return float(np.mean((both[:, 1:] == both[:, :-1]).sum(axis=1) / k))


def timed(fn, *args, **kwargs):
    """-> (result, wall seconds); the process CPU seconds of the call go to timed.cpu (all threads summed)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    timed.cpu = time.process_time() - c0
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--galleries", default="60000,1000000", help="comma-separated gallery sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--points-per-cluster", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=1.0, help="noise norm relative to the centre norm")
    p.add_argument("--approx", default="ivf,hnsw,ivfpq", help="approximate kinds on the largest gallery ('' = none)")
    p.add_argument("--nlist", type=int, default=1024, help="IVF cells (library default: 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default: library nlist / 16)")
    p.add_argument("--hnsw-m", type=int, default=16, help="HNSW links per node (library default 32)")
    p.add_argument("--defaults", action="store_true", help="approximate indexes with the library defaults")
    p.add_argument("--quick", action="store_true", help="1000 queries, galleries 60k and 200k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_knn.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.galleries = 1000, "60000,200000"
    sizes = [int(s) for s in args.galleries.split(",") if s]
    kinds = [s for s in args.approx.split(",") if s]
    t_start = time.perf_counter()
    info = machine_info()
    import faiss

    info.update(faiss=faiss.__version__, faiss_threads=faiss.omp_get_max_threads(), numpy=np.__version__,
                faiss_gpus=faiss.get_num_gpus())
    print(f"# {info.get('cpu_model', '?')}, {info.get('cpu_cores_usable', info.get('cpu_cores'))} cores, "
          f"load {info.get('load_avg_1_5_15')}, faiss {faiss.__version__} ({faiss.get_num_gpus()} GPU), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# Q={args.queries}{' (--quick)' if args.quick else ''}, D={args.dim}, k={args.k}, galleries "
          f"{', '.join(f'{n:,}' for n in sizes)}; mixture: {args.points_per_cluster} points per cluster, "
          f"sigma {args.sigma}")

    rng = np.random.default_rng(args.seed)
    n_max = max(sizes)
    centres = rng.standard_normal((max(1, n_max // args.points_per_cluster), args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    (gallery_all, t_gen) = timed(make_mixture, n_max, centres, args.sigma, rng)
    queries = make_mixture(args.queries, centres, args.sigma, rng)
    print(f"# data generated in {t_gen:.1f} s")

    rows: list[dict] = []
    header = (f"{'gallery':>9} {'method':<14} {'build s':>8} {'search s':>9} {'search cpu s':>12} {'vs exact':>9} "
              f"{'recall@' + str(args.k):>11}  note")
    print(header)
    print("-" * len(header))

    def report(row: dict) -> None:
        rows.append(row)
        ratio = row.get("speedup_vs_exact")
        rec = row.get("recall")
        print(f"{row['gallery']:>9,} {row['method']:<14} {row.get('build_seconds', 0.0):>8.2f} "
              f"{row['search_seconds']:>9.2f} {row['search_cpu_seconds']:>12.1f} "
              f"{'' if ratio is None else f'{ratio:.2f}x':>9} "
              f"{'' if rec is None else f'{rec:.4f}':>11}  {row.get('note', '')}", flush=True)

    exact_ids = exact_search_s = None
    for n in sizes:
        gallery = gallery_all[:n]  # a prefix of the mixture (clusters drawn uniformly, so also a mixture)
        knn, t_build = timed(build_index, gallery, kind="flat", use_gpu=False)
        (sims_f, ids_f), t_search = timed(search, knn, queries, args.k)
        cpu_f = timed.cpu
        chunk = max(1, args.queries // 100)
        (sims_t, ids_t), t_torch = timed(torch_knn, gallery, queries, args.k, chunk)
        cpu_t = timed.cpu
        total_f = t_build + t_search
        ratio = total_f / t_torch  # faiss (build + search) over torch
        report({"gallery": n, "method": "faiss-flat", "build_seconds": t_build, "search_seconds": t_search,
                "search_cpu_seconds": cpu_f, "total_seconds": total_f, "faiss_over_torch": ratio,
                "note": f"faiss/torch = {ratio:.2f}"})
        report({"gallery": n, "method": "torch-mm-topk", "build_seconds": 0.0, "search_seconds": t_torch,
                "search_cpu_seconds": cpu_t, "total_seconds": t_torch, "faiss_over_torch": ratio,
                "recall": overlap(ids_t, ids_f),
                "note": f"chunk {chunk} rows (DINO); recall = agreement with faiss, "
                        f"max |sim diff| {float(np.abs(sims_t - sims_f).max()):.1e}"})
        del knn
        if n == n_max:
            exact_ids, exact_search_s = ids_f, t_search

    n = n_max
    for kind in kinds:
        if args.defaults:
            params: dict = {}
        elif kind in ("ivf", "ivfpq"):
            params = {"nlist": args.nlist}
            if args.nprobe is not None:
                params["nprobe"] = args.nprobe
        else:
            params = {"hnsw_m": args.hnsw_m}
        knn, t_build = timed(build_index, gallery_all, kind=kind, use_gpu=False, **params)
        (_, ids_a), t_search = timed(search, knn, queries, args.k)
        report({"gallery": n, "method": kind, "build_seconds": t_build, "search_seconds": t_search,
                "search_cpu_seconds": timed.cpu, "total_seconds": t_build + t_search, "speedup_vs_exact": exact_search_s / t_search,
                "recall": overlap(ids_a, exact_ids), "params": knn.params,
                "note": " ".join(f"{a}={b}" for a, b in knn.params.items())})
        del knn

    total = time.perf_counter() - t_start
    payload = {
        "benchmark": "bench_knn",
        "machine": info,
        "config": {"queries": args.queries, "galleries": sizes, "dim": args.dim, "k": args.k, "quick": args.quick,
                   "points_per_cluster": args.points_per_cluster, "sigma": args.sigma, "seed": args.seed,
                   "approx_params": "library defaults" if args.defaults else
                   {"nlist": args.nlist, "nprobe": args.nprobe, "hnsw_m": args.hnsw_m},
                   "torch_chunk_rows": max(1, args.queries // 100)},
        "rows": rows,
        "load_avg_end": list(os.getloadavg()),
        "total_seconds": round(total, 1),
    }
    path = write_json(args.json_out, payload)
    print(f"# total {total:.0f} s, load at end {[round(v, 2) for v in os.getloadavg()]}; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
