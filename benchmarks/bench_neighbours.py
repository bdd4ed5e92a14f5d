"""What a bank-neighbour refresh costs against the bank size N: FAISS exact (flat) against IVF.

    python benchmarks/bench_neighbours.py                              # N = 60k, 1M, 10M (~5 min, 6 GB at 10M)
    python benchmarks/bench_neighbours.py --sizes 60000 --queries 60000   # the whole 60k refresh, measured

A refresh (instdisc.bank_neighbours.search_bank) finds the k = 5 nearest other rows of EVERY bank row. The bank is
random unit vectors (D = 128), which is the worst case for IVF's recall (no clusters) and a fair one for time. Where
searching all N rows would take too long, ``--queries`` rows are searched and the time is scaled to N (search time
is linear in the number of queries); the index build (IVF: k-means on ``40 nlist`` rows, then adding N rows) is
measured in full. Recall@k of IVF against the exact answer is measured on the searched rows, up to ``--recall-max``
rows. Not part of ``make bench`` at the default sizes; the JSON goes to benchmarks/results/bench_neighbours.json.
"""
from __future__ import annotations

import argparse
import time

import _machine
import numpy as np
import torch

from instdisc.bank_neighbours import IVF_NPROBE, ivf_nlist
from instdisc.knn.search import build_index, search


def random_bank(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) float32 unit rows, drawn in chunks (the 10M bank is 5 GB)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 20):
        block = rng.standard_normal((min(1 << 20, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + block.shape[0]] = block
    return out


def time_refresh(x: np.ndarray, kind: str, k: int, n_queries: int, seed: int) -> dict:
    n = x.shape[0]
    params = {"nlist": ivf_nlist(n), "nprobe": IVF_NPROBE} if kind == "ivf" else {}
    t0 = time.perf_counter()
    index = build_index(x, kind=kind, rng=np.random.default_rng(seed), **params)
    build = time.perf_counter() - t0
    q = x[:n_queries]
    t0 = time.perf_counter()
    _, ids = search(index, q, k + 1)  # (q, k+1): the row itself comes first (exclude_self needs all N queries)
    per_query = (time.perf_counter() - t0) / n_queries
    return {"kind": kind, "build_s": build, "search_s_per_row": per_query, "refresh_s": build + per_query * n,
            "queries_timed": n_queries, "ids": ids, **params}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000, 10_000_000])
    ap.add_argument("--queries", type=int, default=20_000, help="rows searched per size (time scaled to N)")
    ap.add_argument("--flat-max", type=int, default=1_000_000, help="largest N timed with the exact index")
    ap.add_argument("--recall-max", type=int, default=5_000, help="rows whose IVF recall is measured")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_neighbours.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        x = random_bank(n, args.dim, args.seed)
        nq = min(n, args.queries)
        found = {}
        for kind in ("flat", "ivf"):
            if kind == "flat" and n > args.flat_max:
                continue
            r = time_refresh(x, kind, args.k, nq, args.seed)
            found[kind] = r.pop("ids")
            rows.append({"n": n, **r})
            print(f"N {n:>10,} {kind:<4} build {r['build_s']:8.2f}s  search {1e6 * r['search_s_per_row']:9.1f} us/row"
                  f"  refresh {r['refresh_s']:10.1f}s  ({nq:,} rows timed)", flush=True)
        if "flat" in found and "ivf" in found:
            m = min(nq, args.recall_max)
            a, b = found["flat"][:m, 1:], found["ivf"][:m, 1:]
            recall = float(np.mean([len(set(u) & set(v)) / args.k for u, v in zip(a, b)]))
            rows[-1]["recall_at_k"] = recall
            print(f"N {n:>10,} ivf recall@{args.k} vs exact {recall:.3f} on {m:,} random rows (worst case)")
        del x
    print(f"\n| N | index | build s | search µs/row | refresh s | recall@{args.k} |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        rec = f"{r['recall_at_k']:.3f}" if "recall_at_k" in r else ""
        print(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {1e6 * r['search_s_per_row']:.1f} | "
              f"{r['refresh_s']:.1f} | {rec} |")
    path = _machine.write_json(args.json_out, {"machine": _machine.machine_info(), "argv": vars(args), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
