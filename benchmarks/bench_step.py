"""A full training step of the demo configuration broken into its parts, each with its share of the step.

The step runs as training runs it: channels-last, bf16 autocast of encoder + head where the CPU has native bf16
(``--no-amp``: float32). Parts: data (index the uint8 array), augmentation (two views, BatchAugment), encoder
forward+backward (with the projection head), head (the objective: negatives + logits + loss, forward and backward),
optimizer step, bank update.
The parts are timed one after another inside the same step, so their sum is the step.

    python benchmarks/bench_step.py [--arch convnet-s-pool2] [--batch-size 256] [--steps 8] [--json-out PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import _machine  # noqa: F401  (puts the repo on sys.path)
import torch
import torch.nn.functional as F

from instdisc.data import BatchAugment, build_dataset
from instdisc.training import TrainConfig
from instdisc.method import build_seeded_model
from instdisc.training.precision import as_channels_last, autocast, resolve_amp, use_channels_last

PARTS = ["data", "augment", "encoder fwd+bwd", "head fwd+bwd", "optimizer", "bank update"]


def run(args) -> dict:
    torch.set_num_threads(args.threads) if args.threads else None
    ds = build_dataset(args.data, limit=args.limit)
    cfg = TrainConfig.from_recipe(args.recipe, arch=args.arch, batch_size=args.batch_size, nce_k=args.nce_k,
                                  negatives=args.negatives)
    model = build_seeded_model(cfg, n_data=len(ds), in_channels=ds.channels, image_size=ds.image_size)
    use_channels_last(model).train()  # as training does
    args.amp = resolve_amp(args.amp, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    aug = BatchAugment(ds)
    g = torch.Generator().manual_seed(0)
    times = {p: [] for p in PARTS}
    B = cfg.batch_size
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        idx = torch.randint(len(ds), (B,), generator=g)
        x = ds.array[idx]  # (B, C, H, W) uint8
        t1 = time.perf_counter()
        views = [aug(x, generator=g) for _ in range(cfg.views)]
        t2 = time.perf_counter()
        with autocast(torch.device("cpu"), args.amp):
            z = F.normalize(model.embed(as_channels_last(torch.cat(views))).float(), dim=1)  # (V*B, D) encoder + projection forward
        zd = z.detach().requires_grad_(True)
        t3 = time.perf_counter()
        if cfg.views == 2:
            z1, z2 = zd[:B], zd[B:]
            pos = {"z_pos": z2} if cfg.positive != "bank" else {}
            pos2 = {"z_pos": z1} if cfg.positive != "bank" else {}
            loss = 0.5 * (model.objective(z1, idx, generator=g, **pos)[0] + model.objective(z2, idx, generator=g, **pos2)[0])
            z_upd = F.normalize(z1.detach() + z2.detach(), dim=1)
        else:
            loss = model.objective(zd, idx, generator=g)[0]
            z_upd = zd.detach()
        loss.backward()  # head backward: d loss / d z
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        z.backward(zd.grad)  # encoder + projection backward
        t5 = time.perf_counter()
        opt.step()
        t6 = time.perf_counter()
        model.objective.update(idx, z_upd)
        t7 = time.perf_counter()
        durations = [t1 - t0, t2 - t1, (t3 - t2) + (t5 - t4), t4 - t3, t6 - t5, t7 - t6]
        if step >= args.warmup:
            for p, d in zip(PARTS, durations):
                times[p].append(d)
    med = {p: statistics.median(v) * 1000 for p, v in times.items()}
    total = sum(med.values())
    return {"config": {"arch": cfg.arch, "batch_size": B, "nce_k": cfg.nce_k, "negatives": cfg.negatives,
                       "loss": cfg.loss, "views": cfg.views, "recipe": args.recipe, "n_data": len(ds),
                       "amp": args.amp},
            "parts_ms": med, "step_ms": total, "share": {p: med[p] / total for p in PARTS},
            "images_per_s": B / (total / 1000), "head_plus_bank_share": (med["head fwd+bwd"] + med["bank update"]) / total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--arch", default="convnet-s-pool2")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--nce-k", type=int, default=4096)
    ap.add_argument("--negatives", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-amp", dest="amp", action="store_false",
                    help="float32 encoder + head (default: as training, bf16 autocast where the CPU has native bf16)")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks/results/bench_step.json"))
    args = ap.parse_args()
    res = run(args)
    print(f"training step of the demo config ({res['config']}), median of {args.steps} steps")
    print(f"{'part':<18} {'ms':>9} {'share':>7}")
    for p in PARTS:
        print(f"{p:<18} {res['parts_ms'][p]:>9.1f} {res['share'][p] * 100:>6.1f}%")
    print(f"{'step':<18} {res['step_ms']:>9.1f}   -> {res['images_per_s']:.0f} images/s; head + bank update = "
          f"{res['head_plus_bank_share'] * 100:.1f}% of the step")
    _machine.write_json(args.json_out, {"benchmark": "bench_step", "machine": _machine.machine_info(), **res})
    print(json.dumps({"step_ms": res["step_ms"], "head_plus_bank_share": res["head_plus_bank_share"]}))


if __name__ == "__main__":
    main()
