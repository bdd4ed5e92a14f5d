"""Large image collections: today's PIL path vs ``prepare`` vs training input from the decoded cache.

    python benchmarks/bench_folder.py [--n 5000] [--n-png 4000] [--sizes 64,96,224] [--cap 9] [--rounds 3]
                                      [--json-out benchmarks/results/bench_folder.json]

Data (generated once under --work, default $TMPDIR/instdisc-bench-folder, and reused): ``--n`` JPEGs of exactly
500x375 (ImageNet's typical size; smooth colour fields + noise, quality 90) in 10 class folders, and ``--n-png``
28x28 grayscale PNGs (a Fashion-MNIST-like folder, trained at its inferred 28 px).

Rows, in samples/s (a sample = one image; the training rows produce the two augmented views InstDisc consumes):
  (a)  pil-train       today's PIL training path: the loop's own batches (``Batches.epoch``, augment pil,
                       0 workers: full decode + two train_transform views per image)
  (a') pil-train-draft the same with JPEG draft decoding (what the PIL path does now)
  (d)  pil-decode      full decode + resize to S (the decode+resize part of (a)), one thread
  (b)  prepare-1t / prepare  ``prepare_cache`` with 1 decoding thread (on --subset images) / of the whole folder
                       with --threads-prepare decoding threads (default: all cores)
  (c)  cache-train     training input from the cache: the loop's batches for ``train cache:...`` (rows of the
                       epoch's permutation gathered from the memmap + BatchAugment twice, torch --threads)
Speed-ups reported: (c)/(a), (b 1 thread)/(d) and (b all threads)/(d). The timed rows run in --rounds interleaved
rounds (medians reported), each stopping after --cap / --rounds CPU-seconds (first batch excluded).

Rates are samples per CPU-second of this process (``time.process_time``): on a machine shared with other jobs the
wall clock measures how much CPU the scheduler gave us, not the pipeline; per CPU-second is what one dedicated core
would do (prepare with T threads: per CPU-second of all threads). Wall-clock rates are in the JSON (``*_wall``).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

try:
    from ._machine import command_line, machine_info, write_json
except ImportError:
    from _machine import command_line, machine_info, write_json

import numpy as np
import torch
from PIL import Image

from instdisc.allocator import keep_freed_memory
from instdisc.data import build_dataset
from instdisc.data.images import open_image, resize_short_side
from instdisc.data.prepare import prepare_cache
from instdisc.progress_bar import set_quiet


def make_jpegs(root: str, n: int) -> str:
    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for k in range(n):
        ph = rng.uniform(0, 6, 3)
        fx, fy = rng.uniform(15, 60, 2)
        base = np.stack([128 + 90 * np.sin(x / fx + ph[c]) * np.cos(y / fy - ph[c]) for c in range(3)], -1)
        img = (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
        d = os.path.join(root, f"c{k % 10}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"{k:05d}.jpg"), quality=90)
    open(marker, "w").close()
    return root


def make_pngs(root: str, n: int) -> str:
    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(1)
    for k in range(n):
        a = rng.integers(0, 60, (28, 28)).astype(np.uint8)
        c = k % 10
        a[2 + 2 * c: 10 + 2 * c, 6:20] = 230
        d = os.path.join(root, f"c{c}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(a, "L").save(os.path.join(d, f"{k:05d}.png"))
    open(marker, "w").close()
    return root


def time_loop_input(ds, cap: float, augment: str, batch: int = 64) -> tuple[float, float]:
    """Samples/s of the batches the training loop consumes (``Batches.epoch``: permutation, per-step seeds, two
    views, DataLoader with 0 workers on the PIL path), stopping after ``cap`` seconds (first batch excluded)."""
    from instdisc.training import TrainConfig
    from instdisc.training.batches import Batches

    cfg = TrainConfig(data=ds.spec, batch_size=batch, augment=augment, workers=0)
    b = Batches(cfg, ds, torch.device("cpu"), use_batch_aug=augment == "batch")
    it = b.epoch(0, 0)
    next(it)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for idx, views in it:
        n += len(idx)
        if time.process_time() - c0 > cap:
            break
    return _rates(n, t0, c0)


def time_decode(ds, size: int, cap: float) -> tuple[float, float]:
    mode = "L" if ds.channels == 1 else "RGB"
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for i in range(len(ds)):
        resize_short_side(open_image(ds.paths[i], mode), size)
        n += 1
        if n % 64 == 0 and time.process_time() - c0 > cap:
            break
    return _rates(n, t0, c0)


def time_prepare(ds, out: str, workers: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    res = prepare_cache(ds, out, workers=workers, overwrite=True)
    return _rates(res.n, t0, c0)


def _rates(n: int, t0: float, c0: float) -> tuple[float, float]:
    """(samples per CPU-second of this process, samples per wall-clock second)."""
    return n / max(1e-9, time.process_time() - c0), n / max(1e-9, time.perf_counter() - t0)


def _no_draft(ds):
    """A copy of ``ds`` whose ``with_draft`` is a no-op: the PIL path as it was before JPEG draft decoding."""
    out = copy.copy(ds)
    out.with_draft = lambda scale: ds.with_draft(None)
    return out


def bench_source(name: str, folder: str, sizes: list[int], work: str, args) -> list[dict]:
    """Per size: ``prepare`` of the whole folder once, then ``--rounds`` interleaved rounds of the timed rows
    (each ``--cap / --rounds`` seconds; prepare-1t on a ``--subset`` of the folder), medians reported: on a shared
    machine the load drifts, and interleaving keeps it from favouring one row."""
    rows = []
    cache_dir = os.path.join(work, "index-cache")
    for size in sizes:
        ds = build_dataset(folder, image_size=size, cache_dir=cache_dir)
        sub = build_dataset(folder, image_size=size, cache_dir=cache_dir, limit=min(args.subset, len(ds)))
        full = _no_draft(ds)
        out, out_sub = os.path.join(work, f"{name}-{size}.h5"), os.path.join(work, f"{name}-{size}-sub.h5")
        whole_cpu, whole_wall = time_prepare(ds, out, args.threads_prepare)
        cache = build_dataset(f"cache:{out}")
        slice_s = args.cap / args.rounds
        got: dict[str, list] = {k: [] for k in ("pil_train", "pil_train_draft", "pil_decode", "prepare_1t",
                                                "cache_train")}
        for _ in range(args.rounds):
            got["pil_train"].append(time_loop_input(full, slice_s, "pil"))  # today's path: full decodes
            got["pil_train_draft"].append(time_loop_input(ds, slice_s, "pil"))  # Batches turns JPEG draft on
            got["pil_decode"].append(time_decode(ds, size, slice_s))
            got["prepare_1t"].append(time_prepare(sub, out_sub, 1))
            got["cache_train"].append(time_loop_input(cache, slice_s, "batch", batch=min(256, len(cache) // 8)))
        r = {"source": name, "size": size, "channels": ds.channels, "n": len(ds), "rounds_cpu_wall": got}
        r.update({k: float(np.median([c for c, _ in v])) for k, v in got.items()})  # per CPU-second
        r.update({k + "_wall": float(np.median([w for _, w in v])) for k, v in got.items()})
        r.update(prepare=whole_cpu, prepare_wall=whole_wall, prepare_threads=args.threads_prepare,
                 cache_bytes=os.path.getsize(out))
        r["speedup_cache_vs_pil"] = r["cache_train"] / r["pil_train"]
        r["speedup_prepare_vs_decode"] = r["prepare_1t"] / r["pil_decode"]
        r["speedup_prepare_all_vs_decode"] = r["prepare"] / r["pil_decode"]
        rows.append(r)
        print(f"{name:<6} {size:>4} {r['pil_train']:>9.0f} {r['pil_train_draft']:>10.0f} {r['pil_decode']:>9.0f} "
              f"{r['prepare_1t']:>10.0f} {r['prepare']:>8.0f} {r['cache_train']:>9.0f} "
              f"{r['speedup_cache_vs_pil']:>7.1f}x {r['speedup_prepare_vs_decode']:>7.1f}x "
              f"{r['speedup_prepare_all_vs_decode']:>7.1f}x", flush=True)
        os.remove(out)
        os.remove(out_sub)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="JPEGs at 500x375 (>= 5000 for the issue's figures)")
    p.add_argument("--n-png", type=int, default=4000)
    p.add_argument("--sizes", default="64,96,224")
    p.add_argument("--cap", type=float, default=9.0, help="seconds per timed row (split over the rounds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--subset", type=int, default=600, help="images of the prepare-1t rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads for BatchAugment")
    p.add_argument("--threads-prepare", type=int, default=os.cpu_count() or 1)
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator as it is (instdisc commands keep freed memory: instdisc/allocator.py)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "instdisc-bench-folder"))
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    set_quiet(True)
    if not args.default_allocator:
        keep_freed_memory()  # as every instdisc command does; the same for every row (it is process-wide)
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    jpegs = make_jpegs(os.path.join(args.work, f"jpeg-{args.n}"), args.n)
    pngs = make_pngs(os.path.join(args.work, f"png-{args.n_png}"), args.n_png)
    print(f"data ready in {time.perf_counter() - t0:.0f}s under {args.work}")
    print(f"{'source':<6} {'px':>4} {'pil-train':>9} {'pil-draft':>10} {'pil-dec':>9} {'prepare-1t':>10} "
          f"{'prepare':>8} {'cache':>9} {'c/a':>8} {'b1/d':>8} {'b/d':>8}   (samples/s)")
    out = args.json_out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_folder.json")
    rows: list[dict] = []

    def save(done: bool) -> None:  # after every row: a long run on a busy machine keeps what it measured
        write_json(out, {"machine": machine_info(), "args": vars(args), "complete": done, "rows": rows,
                         "allocator_keeps_freed_memory": not args.default_allocator,
                         "command": command_line("bench_folder.py", args, skip=("json_out", "work"))})

    for name, folder, row_sizes in (("jpeg", jpegs, sizes), ("png", pngs, [28])):
        for size in row_sizes:
            rows += bench_source(name, folder, [size], args.work, args)
            save(False)
    save(True)
    print(f"wrote {out} ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
