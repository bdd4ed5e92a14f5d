"""Where BatchAugment's time goes on a CPU: ms per view of a 256-image batch and the share of each step.

    python benchmarks/bench_batch_aug.py [--sizes 1x28,3x96,3x224] [--batch 256] [--rounds 9] [--threads 1]
                                         [--json-out benchmarks/results/bench_batch_aug.json]

For each C x S (random uint8 images of S x S, output S): ``--rounds`` rounds of 3 calls, median ms per call (one
view), then one more pass of ``--rounds`` calls with the module's steps wrapped in timers (each exclusive of the
others): the crop (``_sample``: grid_sample), ``to_float``, each jitter op, the luma (``rgb_to_gray``: saturation's
blend and the random grayscale), and the rest (the per-batch plan, the row gather, clamp, the grayscale copy,
normalisation, the scatter back to the input order). The timers add a little to the total. Like every instdisc
command, the process keeps freed memory (``instdisc.allocator``) unless ``--default-allocator``.
"""
from __future__ import annotations

import argparse
import statistics
import time

try:
    from ._machine import command_line, machine_info, write_json
except ImportError:
    from _machine import command_line, machine_info, write_json

import torch

from instdisc.allocator import keep_freed_memory
from instdisc.data import batch_aug as ba

_STEPS = ("crop", "to_float", "brightness", "contrast", "saturation", "hue", "luma")


def _timed(name: str, fn, acc: dict, stack: list):
    """``fn`` that adds its own time to ``acc[name]``, exclusive of the timed functions it calls."""
    def run(*a, **k):
        stack.append(0.0)  # time of the timed calls inside this one
        t0 = time.perf_counter()
        out = fn(*a, **k)
        dt = time.perf_counter() - t0
        acc[name] = acc.get(name, 0.0) + dt - stack.pop()
        if stack:
            stack[-1] += dt
        return out
    return run


def bench(c: int, s: int, batch: int, rounds: int) -> dict:
    aug = ba.BatchAugment(channels=c, image_size=s, mean=(0.5,) * c, std=(0.25,) * c)
    x = torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug(x, torch.Generator().manual_seed(0))  # warm-up
    per_call = []
    for r in range(rounds):
        g = torch.Generator().manual_seed(r)
        t0 = time.process_time()
        for _ in range(3):
            aug(x, g)
        per_call.append((time.process_time() - t0) / 3 * 1e3)
    # the same calls with every step timed: wrap the module's functions, then put them back
    acc: dict[str, float] = {}
    stack: list[float] = []
    saved = {k: getattr(ba, k) for k in ("_sample", "to_float", "_OPS", "_hue", "rgb_to_gray")}
    try:
        ba._sample = _timed("crop", saved["_sample"], acc, stack)
        ba.to_float = _timed("to_float", saved["to_float"], acc, stack)
        ba._OPS = tuple(_timed(n, f, acc, stack) for n, f in zip(_STEPS[2:6], saved["_OPS"]))
        ba._hue = _timed("hue", saved["_hue"], acc, stack)  # the op table binds _hue itself (its scratch)
        ba.rgb_to_gray = _timed("luma", saved["rgb_to_gray"], acc, stack)
        t0 = time.perf_counter()
        for r in range(rounds):
            aug(x, torch.Generator().manual_seed(r))
        total = (time.perf_counter() - t0) / rounds * 1e3
    finally:
        for k, v in saved.items():
            setattr(ba, k, v)
    steps = {k: acc.get(k, 0.0) / rounds * 1e3 for k in _STEPS}
    steps["rest"] = total - sum(v for k, v in steps.items())
    return {"channels": c, "size": s, "batch": batch, "ms_per_view": statistics.median(per_call),
            "ms_per_view_rounds": per_call, "timed_total_ms": total, "steps_ms": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1x28,3x96,3x224", help="C x S cases, comma-separated")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--default-allocator", action="store_true")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_allocator:
        keep_freed_memory()
    rows = []
    print(f"{'C x S':>7} {'ms/view':>8} " + " ".join(f"{k:>10}" for k in _STEPS + ("rest",)) + "   (ms of one view)")
    for case in args.sizes.split(","):
        c, s = (int(v) for v in case.lower().split("x"))
        r = bench(c, s, args.batch, args.rounds)
        rows.append(r)
        print(f"{case:>7} {r['ms_per_view']:>8.1f} " + " ".join(f"{r['steps_ms'][k]:>10.2f}" for k in _STEPS + ("rest",)),
              flush=True)
    print("luma: rgb_to_gray, for saturation's blend and the random grayscale (the other columns exclude it)")
    out = args.json_out or __file__.replace("bench_batch_aug.py", "results/bench_batch_aug.json")
    write_json(out, {"machine": machine_info(), "args": vars(args), "rows": rows,
                     "command": command_line("bench_batch_aug.py", args)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
