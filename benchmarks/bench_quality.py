"""Does the memory bank pay? Train a grid of Fashion-MNIST runs, bank against its no-bank control, in one run.

Every cell (N training images x batch size) trains each variant with the same seed and the same epoch budget, then
measures the learned encoder with the project's kNN protocol (weighted kNN, k = 200, tau = 0.07, cosine; gallery the
60k training images, queries the 10k test images) and a linear probe (the ``instdisc linear-probe`` defaults: L-BFGS,
whitened 1024-d encoder features, 60k train / 10k test). The untrained encoder (same arch and seed) is measured once
as the floor. Per run it also records the epoch mean losses and the training-health signals of ``metrics.jsonl``.

    python benchmarks/bench_quality.py                                  # the grid of the README (~1 h on 2 cores)
    python benchmarks/bench_quality.py --n 8000 --batch 256 --epochs 10 --variants bank,no-bank --no-linear

Variants are named sets of ``TrainConfig`` overrides on a recipe (``--recipe``, default fast; see VARIANTS); ``--set KEY=VALUE``
applies to every variant (e.g. ``--set lr=0.1``). Not part of ``make bench`` (it trains for real); the JSON goes to
``benchmarks/results/bench_quality.json`` unless ``--json-out`` says otherwise.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _machine
import numpy as np
import torch

from _quality import PROTOCOL, epoch_records, measure, parse_set, rises_twice  # noqa: F401  (re-exported)
from instdisc.data import build_dataset
from instdisc.training import TrainConfig, train
from instdisc.method import build_seeded_model

# Overrides of the recipe (--recipe, default fast). "bank" is the recipe as it is (fast: --positive view+bank);
# "no-bank" is the control: in-batch negatives only (K = 0: the bank is written but never read by the loss).
VARIANTS: dict[str, dict] = {
    "bank": {},
    "no-bank": {"nce_k": 0},
    "view-bank-negatives": {"positive": "view"},  # fresh positive vs stale bank negatives in one softmax
    "view+bank": {"positive": "view+bank"},
    "neighbour": {"positive": "neighbour", "nce_k": 0},  # NNCLR: nearest other bank row as the anchor
    "view+neighbour": {"positive": "view+neighbour", "nce_k": 0},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8000, 60000], help="training images per cell")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--epochs", type=int, nargs="+", default=None,
                    help="epochs, one per --n value (default: 10 for N <= 10k, 3 above)")
    ap.add_argument("--variants", default="bank,no-bank",
                    help=f"comma-separated, of: {', '.join(VARIANTS)}, or ad hoc KEY=VALUE[&KEY=VALUE]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--recipe", default="fast", help="the recipe the variants change (default fast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; on a machine "
                    "shared with other jobs 1 thread is often faster than 2 that wait for each other)")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    ap.add_argument("--no-untrained", action="store_true", help="skip measuring the untrained encoder")
    ap.add_argument("--work", default="/tmp/instdisc-bench-quality", help="run directories (replaced)")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_quality.json"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS and "=" not in v:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}, or give KEY=VALUE[&KEY=VALUE]")
        if v not in VARIANTS:  # an ad-hoc variant: its overrides are its name
            VARIANTS[v] = parse_set(v.split("&"))
    epochs = args.epochs or [10 if n <= 10000 else 3 for n in args.n]
    if len(epochs) != len(args.n):
        ap.error("--epochs needs one value per --n value")
    common = parse_set(args.set)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    gallery, queries = build_dataset("fashion-mnist:train"), build_dataset("fashion-mnist:test")
    base = TrainConfig.from_recipe(args.recipe, seed=args.seed, **common)
    floor = build_seeded_model(base, n_data=60000, in_channels=1, image_size=28).encoder
    untrained = {} if args.no_untrained else measure(floor, gallery, queries, not args.no_linear)
    if untrained:
            print(f"untrained encoder: kNN {untrained['knn_top1']:.2f}  linear "
              f"{untrained.get('linear_top1', float('nan')):.2f}", flush=True)

    rows = []
    work = Path(args.work)
    for n, ep in zip(args.n, epochs):
        for b in args.batch:
            for v in variants:
                out = work / f"n{n}-b{b}-{v}"
                shutil.rmtree(out, ignore_errors=True)
                cfg = TrainConfig.from_recipe(args.recipe, data="fashion-mnist:train", out=str(out), limit=n, epochs=ep,
                                              batch_size=b, seed=args.seed, log_every=10 ** 9,
                                              **{**common, **VARIANTS[v]})
                t0 = time.perf_counter()
                res = train(cfg)
                if res.interrupted:
                    print(f"interrupted by signal {res.stop_signal}: stopping the benchmark", flush=True)
                    return 128 + (res.stop_signal or 15)
                seconds = time.perf_counter() - t0
                recs = epoch_records(out)
                losses = [r["loss"] for r in recs]
                row = {"n": n, "batch": b, "epochs": ep, "recipe": args.recipe, "variant": v, "overrides": {**common, **VARIANTS[v]},
                       "nce_k": res.model.objective.k, "train_seconds": seconds, "epoch_loss": losses,
                       "loss_rises_twice": rises_twice(losses), "epochs_log": recs,
                       **measure(res.model.encoder, gallery, queries, not args.no_linear)}
                rows.append(row)
                print(f"N {n:>6} B {b:>4} {v:<20} kNN {row['knn_top1']:6.2f}  linear "
                      f"{row.get('linear_top1', float('nan')):6.2f}  losses {' '.join(f'{x:.2f}' for x in losses)}"
                      f"{'  RISES' if row['loss_rises_twice'] else ''}  ({seconds:.0f}s)", flush=True)

    print(f"\n{'N':>6} {'B':>4} {'ep':>3} {'variant':<20} {'kNN':>6} {'lin':>6} {'vs ctrl kNN':>11} {'vs ctrl lin':>11} "
          f"{'rises':>5}")
    for r in rows:
        ctrl = next((c for c in rows if (c["n"], c["batch"], c["variant"]) == (r["n"], r["batch"], "no-bank")), None)
        dk = f"{r['knn_top1'] - ctrl['knn_top1']:+.2f}" if ctrl and r is not ctrl else ""
        dl = (f"{r['linear_top1'] - ctrl['linear_top1']:+.2f}" if ctrl and r is not ctrl and "linear_top1" in r
              else "")
        print(f"{r['n']:>6} {r['batch']:>4} {r['epochs']:>3} {r['variant']:<20} {r['knn_top1']:>6.2f} "
              f"{r.get('linear_top1', float('nan')):>6.2f} {dk:>11} {dl:>11} {'yes' if r['loss_rises_twice'] else 'no':>5}")
    payload = {"machine": _machine.machine_info(), "argv": vars(args), "untrained": untrained, "rows": rows,
               "protocol": PROTOCOL}
    path = _machine.write_json(args.json_out, payload)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
