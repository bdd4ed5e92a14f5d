"""``make bench``: every benchmark in its quick setting, one after another, in at most ~10 minutes on 2 CPU cores.

Each script prints its own table and writes its JSON under benchmarks/results/; this runner prints how long each
took and writes benchmarks/results/run_all.json. The long versions (full kNN grid with 1M galleries, the 2M-vector
IVF-PQ scale test) are run by hand: see the README's benchmark section.
"""
from __future__ import annotations

import subprocess
import sys
import time

import _machine

SUITE = [
    ("head", ["bench_head.py"]),
    ("step", ["bench_step.py", "--steps", "6"]),
    ("precision", ["bench_precision.py", "--reps", "5"]),
    ("roofline", ["bench_roofline.py", "--repeats", "3", "--warmup", "1", "--matmul-n", "1024"]),  # emulated bf16: 2 s a call
    ("input", ["bench_input.py", "--n28", "2048", "--n224", "128", "--cap", "5"]),
    ("batch_aug", ["bench_batch_aug.py", "--rounds", "5"]),
    ("index", ["bench_index.py"]),
    ("knn", ["bench_knn.py", "--quick", "--approx", "ivf,ivfpq"]),
    ("export", ["bench_export.py", "--limit", "5000"]),
    ("folder", ["bench_folder.py", "--n", "5000", "--n-png", "2000", "--cap", "4"]),  # data generated once, reused
]


def main() -> int:
    here = _machine.REPO / "benchmarks"
    rows, failed = [], 0
    for name, argv in SUITE:
        print(f"\n=== {name}: {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(here / argv[0]), *argv[1:]], cwd=_machine.REPO)
        rows.append({"benchmark": name, "argv": argv, "seconds": time.perf_counter() - t0, "exit_code": rc})
        failed += rc != 0
    print(f"\n{'benchmark':<10} {'seconds':>8} {'status':>7}")
    for r in rows:
        print(f"{r['benchmark']:<10} {r['seconds']:>8.1f} {'ok' if r['exit_code'] == 0 else 'FAILED':>7}")
    print(f"{'total':<10} {sum(r['seconds'] for r in rows):>8.1f}")
    _machine.write_json(here / "results" / "run_all.json", {"machine": _machine.machine_info(), "runs": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
