"""kNN at gallery scale: build and search an IVF-PQ index of millions of 128-d vectors with instdisc.knn.

    python benchmarks/bench_knn_scale.py [--n 2000000] [--queries 10000] [--shards 0]
                                         [--json-out benchmarks/results/bench_knn_scale.json]

Data: ``--n`` unit rows drawn around ``--centres`` random unit centres (noise ``--sigma``), queries from the same
mixture, so neighbours have structure and recall means something. Rows:

- ``build``: `instdisc.knn.build_index(kind="ivfpq")` end to end (validation + normalising copy, k-means on a sample
  of ``train_size`` rows, PQ training, add): seconds and the process's peak resident memory.
- ``search k=10`` / ``search k=200`` (the InstDisc vote): seconds and queries per second.
- ``recall@10``: mean |IVF-PQ ids ∩ exact ids| / 10 over ``--exact-queries`` queries, the exact ids from an exact
  FAISS search of the whole gallery.
- ``--shards W``: the same gallery split into W strided shards, one IVF-PQ index each, searched one after another
  and merged with `instdisc.distributed.knn.merge_topk` (what ``sharded_search`` does across W ranks, here in one
  process): recall of the merged lists.

FAISS uses every GPU it sees (``use_gpu="auto"``); on this 2-core CPU box it runs on the CPU. The default
``--nlist 2048`` (library default: 4 sqrt(N) = 5657 at 2M) keeps the run near 2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

try:
    from ._machine import REPO, machine_info, write_json
except ImportError:
    from _machine import REPO, machine_info, write_json

import numpy as np

from instdisc.distributed.knn import merge_topk
from instdisc.knn.search import build_index, search


def mixture(n: int, centres: np.ndarray, sigma: float, rng: np.random.Generator, block: int = 1 << 18) -> np.ndarray:
    """n unit rows (n, D) float32 around the unit ``centres`` (C, D)."""
    c, d = centres.shape
    out = np.empty((n, d), dtype=np.float32)  # N x D
    for s in range(0, n, block):
        e = min(n, s + block)
        x = centres[rng.integers(0, c, e - s)] + sigma * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(approx[:, :k], exact)]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--exact-queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--sigma", type=float, default=0.08)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--nprobe", type=int, default=None, help="default: the library's nlist / 16")
    ap.add_argument("--pq-m", type=int, default=None, help="default: the library's (32 bytes at D = 128)")
    ap.add_argument("--shards", type=int, default=0)
    ap.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_knn_scale.json"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    gallery = mixture(args.n, centres, args.sigma, rng)  # N x D
    queries = mixture(args.queries, centres, args.sigma, rng)  # Q x D
    gen_s = time.perf_counter() - t0
    rows = []

    def row(name, **kw):
        rows.append({"row": name, **kw})
        print(f"{name:<22} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in kw.items()), flush=True)

    print(f"gallery {args.n} x {args.dim} float32 ({args.n * args.dim * 4 / 1e9:.2f} GB), {args.queries} queries, "
          f"made in {gen_s:.1f}s", flush=True)
    params = {"nlist": args.nlist}
    if args.nprobe:
        params["nprobe"] = args.nprobe
    if args.pq_m:
        params["pq_m"] = args.pq_m

    t0 = time.perf_counter()
    index = build_index(gallery, kind="ivfpq", **params)
    build_s = time.perf_counter() - t0
    row("build ivfpq", seconds=build_s, peak_rss_gb=peak_rss_gb(), gpu=index.on_gpu, **index.params)

    for k in (10, 200):
        t0 = time.perf_counter()
        _, ids = search(index, queries, k)
        dt = time.perf_counter() - t0
        row(f"search k={k}", seconds=dt, queries_per_s=args.queries / dt)
        if k == 10:
            approx10 = ids[: args.exact_queries]

    t0 = time.perf_counter()
    _, exact = search(gallery, queries[: args.exact_queries], 10)  # exact flat index of the whole gallery
    exact_s = time.perf_counter() - t0
    row("exact flat (k=10)", seconds=exact_s, queries=args.exact_queries,
        queries_per_s=args.exact_queries / exact_s)
    row("recall@10 ivfpq", recall=recall(approx10, exact))

    if args.shards > 1:
        del index
        w = args.shards
        t0 = time.perf_counter()
        shards = [build_index(gallery[r::w], kind="ivfpq", **dict(params, nlist=max(1, args.nlist // w)))
                  for r in range(w)]
        sb = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = queries[: args.exact_queries]
        cs, ci = [], []
        for r, idx in enumerate(shards):
            s, i = search(idx, q, 10)
            cs.append(s)
            ci.append(np.where(i >= 0, i * w + r, -1))  # local row -> global row of the strided shard
        _, merged = merge_topk(np.concatenate(cs, 1), np.concatenate(ci, 1), 10)
        ss = time.perf_counter() - t0
        row(f"{w} shards + merge", build_seconds=sb, search_seconds=ss, recall=recall(merged, exact))

    payload = {"benchmark": "bench_knn_scale", "args": vars(args), "generate_seconds": gen_s, "rows": rows,
               "machine": machine_info()}
    path = write_json(args.json_out, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
