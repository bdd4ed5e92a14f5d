"""Benchmark of the InstDisc head: sample negatives + logits + loss + backward + bank update.

Ours (instdisc.objective.Objective, shared and per-sample negatives, NCE and InfoNCE) against the reference-style
baseline (benchmarks/baseline_instdisc.py: B x (K+1) x D gather, bmm, exp / Z, NCE with eps, autograd).

    python benchmarks/bench_head.py                       # full grid, table, writes benchmarks/results/bench_head.json
    python benchmarks/bench_head.py --N 50000 --D 128 --B 256 --K 4096 --negatives shared --json
        # one config; the last stdout line is one JSON object (ms_per_step, peak_mib, baseline_*, ratio, ...)

Time: median wall-clock ms per step. Every head (ours and the baseline) first runs one untimed warm-up step (which
also sets Z); then the heads run in interleaved rounds, one timed step each per round, so that all of them see the
same machine load (the number of rounds is --reps, or what fits in --budget seconds, 3..15). The input z is a fixed
(B, D) leaf with requires_grad; the encoder is not part of the head.

Memory (peak_mib): the peak of live torch tensor allocations during ONE step, above the level at the start of the
step (bank, inputs and parameters excluded), read from torch.profiler's allocation events (profile_memory=True):
the events are sorted by time and summed, and the running maximum is the peak. This counts every tensor the step
allocates (gathered rows, logits, autograd's saved tensors, gradients) but not the scratch space of BLAS/oneDNN or
the Python heap; both implementations are measured the same way.

ratio = baseline ms / ours ms (speed-up, > 1 is faster); mem_ratio = ours peak / baseline peak. The rows also carry
cpu_ms_per_step (median CPU time of this process per step, all threads; the table's "cpu x" is the CPU-time
speed-up).

Busy machines: with several torch threads every parallel op waits for its slowest thread, and a core shared with
another job delays that thread by a scheduler time slice, so a head made of many small ops (ours) is penalised far
more than one made of a few huge ones (the baseline). When the load average exceeds the core count, measure with
--threads 1 (the JSON records torch_threads and the load averages); CPU time is then a load-robust check too.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.baseline_instdisc import BaselineNCE  # noqa: E402
from instdisc.objective import Objective  # noqa: E402

GRID_N = (50_000, 1_281_167)
GRID_K = (1024, 4096, 16384)
METHODS = (("shared", "nce"), ("shared", "infonce"), ("per-sample", "nce"), ("per-sample", "infonce"))
RESULTS = ROOT / "benchmarks" / "results" / "bench_head.json"


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------
def peak_alloc_mib(step) -> float:
    """Peak of live torch allocations during ``step()`` above the level at its start, in MiB (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def time_interleaved(steps: dict, *, reps: int | None, budget_s: float) -> tuple[dict, dict]:
    """Warm each step up once, then run rounds of one timed step of every head in turn (so that all heads see the
    same machine load); ``reps`` rounds, or as many as fit in ``budget_s`` (3..15).

    Returns (wall ms, CPU ms) per step per head; CPU ms is this process's CPU time (all threads), which other
    processes competing for the cores inflate much less than wall time."""
    t0 = time.perf_counter()
    for step in steps.values():
        step()
    warm = time.perf_counter() - t0
    n = reps if reps is not None else max(3, min(15, int(budget_s / max(warm, 1e-4))))
    wall: dict = {name: [] for name in steps}
    cpu: dict = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return wall, cpu


def random_unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# the two heads as step closures
# ---------------------------------------------------------------------------------------------------------------
def ours_step(obj: Objective, z: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
    def step():
        z.grad = None
        loss, _stats = obj(z, idx, generator=gen)  # stats forces the host sync a training loop has
        loss.backward()
        obj.update(idx, z)
    return step


def baseline_step(base: BaselineNCE, z: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
    def step():
        z.grad = None
        base.step(z, idx, gen)  # float(loss) syncs like ours
    return step


def bench_config(objs: list[Objective], memory: torch.Tensor, *, n: int, d: int, b: int, k: int, seed: int,
                 reps: int | None, budget_s: float) -> list[dict]:
    """Time our heads (each with its k set to ``k``) and the baseline (on ``memory``) interleaved; then measure the
    peak memory of one step of each. One result row per objective."""
    gen = torch.Generator().manual_seed(seed)
    z = random_unit(b, d, gen).requires_grad_()
    idx = torch.randperm(n, generator=gen)[:b]
    steps = {}
    for i, obj in enumerate(objs):
        obj.k = k  # the bank and Z do not depend on k; rebuilding a 1.28M bank per K costs seconds
        obj.z.reset()  # the first (untimed) step sets Z, as in training
        steps[i] = ours_step(obj, z, idx, gen)
    base = BaselineNCE(memory, k=k, tau=objs[0].tau, m=objs[0].m)
    steps["baseline"] = baseline_step(base, z, idx, gen)
    times, cpu = time_interleaved(steps, reps=reps, budget_s=budget_s)
    peaks = {name: peak_alloc_mib(step) for name, step in steps.items()}
    base_ms = statistics.median(times["baseline"])
    rows = []
    for i, obj in enumerate(objs):
        ms = statistics.median(times[i])
        rows.append({"N": n, "D": d, "B": b, "K": k, "negatives": obj.negatives, "loss": obj.loss_name,
                     "ms_per_step": ms, "peak_mib": peaks[i], "baseline_ms_per_step": base_ms,
                     "baseline_peak_mib": peaks["baseline"], "ratio": base_ms / ms,
                     "mem_ratio": peaks[i] / peaks["baseline"], "reps": len(times[i]),
                     "cpu_ms_per_step": statistics.median(cpu[i]),
                     "baseline_cpu_ms_per_step": statistics.median(cpu["baseline"]),
                     "ms_all": [round(t, 2) for t in times[i]],
                     "baseline_ms_all": [round(t, 2) for t in times["baseline"]]})
    return rows


def make_objective(n: int, d: int, k: int, negatives: str, loss: str, seed: int) -> Objective:
    return Objective(n, d, k=k, negatives=negatives, loss=loss, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# machine info / JSON (benchmarks/_machine.py when present)
# ---------------------------------------------------------------------------------------------------------------
def _machine_info() -> dict:
    try:
        from benchmarks._machine import machine_info
        return machine_info()
    except ImportError:
        return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                "processor": platform.processor(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "source": "bench_head fallback (no benchmarks/_machine.py)"}


def _write_json(path: Path, payload: dict) -> None:
    try:
        from benchmarks._machine import write_json
    except ImportError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
        return
    write_json(path, payload)


# ---------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------
def run_one(args) -> dict:
    obj = make_objective(args.N, args.D, args.K, args.negatives, args.loss, args.seed)
    memory = obj.bank.memory.clone()
    row = bench_config([obj], memory, n=args.N, d=args.D, b=args.B, k=args.K, seed=args.seed, reps=args.reps,
                       budget_s=args.budget)[0]
    row["threads"] = torch.get_num_threads()
    row["loadavg"] = _loadavg()
    return row


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages (other processes competing for the cores skew every timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_grid(args) -> dict:
    rows = []
    t_start = time.perf_counter()
    load_start = _loadavg()
    for n in GRID_N:
        objs = [make_objective(n, args.D, max(GRID_K), negatives, loss, args.seed) for negatives, loss in METHODS]
        memory = objs[0].bank.memory.clone()  # the baseline's own bank, same rows
        for k in GRID_K:
            for row in bench_config(objs, memory, n=n, d=args.D, b=args.B, k=k, seed=args.seed, reps=args.reps,
                                    budget_s=args.budget):
                rows.append(row)
                print(_format_row(row), flush=True)
        del objs, memory
        gc.collect()
    payload = {"benchmark": "bench_head", "machine": _machine_info(), "D": args.D, "B": args.B,
               "torch_threads": torch.get_num_threads(), "loadavg_start": load_start, "loadavg_end": _loadavg(),
               "time_method": "median wall ms per step; heads timed in interleaved rounds after one warm-up step; "
                              "cpu_ms_per_step: median process CPU time per step",
               "peak_mib_method": "torch.profiler allocation events: peak of live tensor bytes above the step start",
               "ratio_definition": "baseline_ms_per_step / ms_per_step (speed-up)",
               "seconds": time.perf_counter() - t_start, "results": rows}
    _write_json(Path(args.out), payload)
    return payload


HEADER = (f"{'N':>9} {'K':>6} {'negatives':>10} {'loss':>7} | {'ours ms':>8} {'base ms':>8} {'x faster':>8} | "
          f"{'cpu x':>6} | {'ours MiB':>8} {'base MiB':>8} {'mem':>6}")


def _format_row(r: dict) -> str:
    cpu_ratio = r["baseline_cpu_ms_per_step"] / r["cpu_ms_per_step"]
    return (f"{r['N']:>9} {r['K']:>6} {r['negatives']:>10} {r['loss']:>7} | {r['ms_per_step']:>8.1f} "
            f"{r['baseline_ms_per_step']:>8.1f} {r['ratio']:>8.1f} | {cpu_ratio:>6.1f} | {r['peak_mib']:>8.1f} "
            f"{r['baseline_peak_mib']:>8.1f} {r['mem_ratio']:>6.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, help="bank size (with --K: one config)")
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--K", type=int, help="negatives per sample (with --N: one config)")
    p.add_argument("--negatives", choices=("shared", "per-sample"), default="per-sample")
    p.add_argument("--loss", choices=("nce", "infonce"), default="nce")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default: auto, 3..15 within --budget)")
    p.add_argument("--budget", type=float, default=4.0,
                   help="seconds of timed rounds per config when --reps is auto (at least 3 rounds)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--out", default=str(RESULTS), help="grid results file")
    args = p.parse_args(argv)
    if (args.N is None) != (args.K is None):
        p.error("--N and --K go together (or leave both out for the full grid)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.N is not None:
        row = run_one(args)
        if args.json:
            print(json.dumps(row))
        else:
            print(HEADER)
            print(_format_row(row))
        return 0
    print(f"D={args.D} B={args.B} torch threads={torch.get_num_threads()}")
    print(HEADER)
    payload = run_grid(args)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    if args.json:
        print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
