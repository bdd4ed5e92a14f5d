"""Encoder + head forward and backward in four numeric formats / layouts, interleaved in one run.

float32 (the naive baseline), float32 channels-last, bf16 autocast, bf16 autocast + channels-last (what training
uses on a CPU with native bf16, see instdisc/training/precision.py). Each repetition runs every variant once, so
load from other processes hits them alike; the table shows medians and the ratio to float32.

    python benchmarks/bench_precision.py [--arch convnet-s-pool2] [--batch 512] [--reps 8] [--json-out PATH]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import _machine  # noqa: F401  (puts the repo on sys.path)
import torch

from instdisc.training import TrainConfig
from instdisc.method import build_seeded_model
from instdisc.training.precision import as_channels_last, autocast, cpu_has_native_bf16, use_channels_last


def run(args) -> dict:
    cfg = TrainConfig.from_recipe("fast", arch=args.arch)
    base = build_seeded_model(cfg, n_data=60000, in_channels=args.channels, image_size=args.size).train()
    cl = use_channels_last(copy.deepcopy(base))
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(0))
    variants = {"float32": (base, x, False), "float32 channels-last": (cl, as_channels_last(x), False),
                "bf16 autocast": (base, x, True), "bf16 + channels-last": (cl, as_channels_last(x), True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    dev = torch.device("cpu")
    for rep in range(args.warmup + args.reps):
        for name, (model, xx, amp) in variants.items():
            t = time.perf_counter()
            with autocast(dev, amp):
                z = model.embed(xx)  # (B, low_dim)
            z.float().square().mean().backward()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "ms": med[k] * 1000, "images_per_s": args.batch / med[k],
             "speedup": med["float32"] / med[k]} for k in variants]
    return {"config": {"arch": args.arch, "batch": args.batch, "size": args.size, "channels": args.channels,
                       "reps": args.reps, "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads()},
            "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="convnet-s-pool2")
    ap.add_argument("--batch", type=int, default=512, help="images per forward (the demo step: 2 views x 256)")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks/results/bench_precision.json"))
    args = ap.parse_args()
    res = run(args)
    c = res["config"]
    print(f"{c['arch']} forward + backward, batch {c['batch']} x {c['channels']}x{c['size']}x{c['size']}, "
          f"median of {c['reps']} interleaved reps, {c['threads']} threads, native bf16: {c['native_bf16']}")
    print(f"{'variant':<24} {'ms':>8} {'img/s':>8} {'vs float32':>11}")
    for r in res["rows"]:
        print(f"{r['variant']:<24} {r['ms']:>8.1f} {r['images_per_s']:>8.0f} {r['speedup']:>10.2f}x")
    _machine.write_json(args.json_out, {"benchmark": "bench_precision", "machine": _machine.machine_info(), **res})


if __name__ == "__main__":
    main()
