"""Two-view input pipeline throughput: PIL transforms in DataLoader workers vs BatchAugment on batch tensors.

    python benchmarks/bench_input.py [--json-out benchmarks/results/bench_input.json]

Rows (samples/s; each sample = two augmented views, as InstDisc/positive="view" training consumes them):
  * 28 px  fashion-mnist array (synthetic 28 px data when /usr/share/datasets/fashion-mnist is absent):
    TwoView(train_transform) through a DataLoader with 0, 1, 2 workers, and BatchAugment called twice per
    uint8 batch (what a loop over ``ds.array`` does, no DataLoader).
  * 224 px a generated folder of JPEGs (~500x375, written once to a temp dir): the same DataLoader rows (decode +
    augment), and BatchAugment on pre-decoded 256x256 uint8 batches (augmentation only; decoding not included).
The main process runs torch single-threaded by default (--threads). Timing starts after the first batch (worker
start-up excluded); each row stops after --cap seconds. Runtime ~45 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

try:
    from ._machine import REPO, machine_info, write_json
except ImportError:
    from _machine import REPO, machine_info, write_json

import numpy as np
import torch
from PIL import Image

from instdisc.data import BatchAugment, TwoView, build_dataset, train_transform
from instdisc.data.dataset import IndexedDataset

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def fmnist_or_synthetic(n: int) -> IndexedDataset:
    if os.path.isdir(FMNIST_ROOT):
        return build_dataset("fashion-mnist:train", limit=n)
    g = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)  # N x 1 x 28 x 28
    return IndexedDataset(spec="synthetic-28px", labels=np.zeros(n, np.int64), classes=["0"], channels=1,
                          image_size=28, mean=(0.5,), std=(0.5,), array=array)


def make_jpeg_folder(root: str, n: int) -> str:
    """n smooth-noise JPEGs (sizes around ImageNet's 500x375) in root/c<k>/; reused when already there."""
    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return root
    rng = np.random.default_rng(0)
    for k in range(n):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        d = os.path.join(root, f"c{k % 8}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{k:05d}.jpg"), quality=90)
    open(marker, "w").close()
    return root


def time_loader(ds: IndexedDataset, batch_size: int, workers: int, cap_s: float) -> tuple[float, int]:
    """(seconds, samples) for one pass after the first batch, stopping early after ``cap_s`` seconds."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         drop_last=False)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for (v1, v2), idx, _ in it:
        n += len(idx)
        if time.perf_counter() - t0 > cap_s:
            break
    return time.perf_counter() - t0, n


def time_batch_aug(aug: BatchAugment, array: torch.Tensor, batch_size: int, cap_s: float) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    aug(array[:batch_size], g), aug(array[:batch_size], g)  # warm-up
    t0, n = time.perf_counter(), 0
    for s in range(0, len(array), batch_size):
        x = array[s:s + batch_size]  # B x C x H x W uint8
        v1, v2 = aug(x, g), aug(x, g)
        n += len(x)
        if time.perf_counter() - t0 > cap_s:
            break
    return time.perf_counter() - t0, n


def decode_to_array(ds: IndexedDataset, side: int) -> torch.Tensor:
    """Decode every file once and resize to side x side: uint8 N x 3 x side x side."""
    out = torch.empty(len(ds), 3, side, side, dtype=torch.uint8)
    for i in range(len(ds)):
        img = ds.load_image(i).resize((side, side), Image.BILINEAR)
        out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return out


def row(table: list, data: str, px: int, pipeline: str, workers, seconds: float, n: int, batch: int) -> None:
    r = {"data": data, "px": px, "pipeline": pipeline, "workers": workers, "samples": n,
         "seconds": round(seconds, 3), "samples_per_s": round(n / seconds, 1),
         "views_per_s": round(2 * n / seconds, 1), "batch_size": batch}
    table.append(r)
    print(f"{data:<22} {px:>4} {pipeline:<34} {str(workers):>7} {r['samples_per_s']:>11.1f} {r['views_per_s']:>10.1f}",
          flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_input.json"))
    p.add_argument("--n28", type=int, default=4096, help="28 px samples per measurement")
    p.add_argument("--n224", type=int, default=384, help="224 px JPEGs in the generated folder")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--cap", type=float, default=8.0, help="seconds at most per row (stops the pass early)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the main process (0 = torch default); 1 matches DataLoader workers, which "
                        "PyTorch runs single-threaded, and avoids OpenMP stalls when other work shares the cores")
    p.add_argument("--jpeg-dir", default=os.path.join(tempfile.gettempdir(), "instdisc-bench-jpegs"))
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {info['cpu_model']}, {info['cpu_cores_usable']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load {info['load_avg_1_5_15']}")
    print(f"{'data':<22} {'px':>4} {'pipeline':<34} {'workers':>7} {'samples/s':>11} {'views/s':>10}")
    table: list = []
    t_start = time.perf_counter()

    ds28 = fmnist_or_synthetic(args.n28)
    name28 = ds28.spec
    pil28 = ds28.with_transform(TwoView(train_transform(ds28)))
    for w in workers:
        row(table, name28, 28, "PIL TwoView(train_transform)", w, *time_loader(pil28, 256, w, args.cap), 256)
    aug28 = BatchAugment(ds28)
    row(table, name28, 28, "BatchAugment x2 (uint8 array)", "-",
        *time_batch_aug(aug28, ds28.array, 256, args.cap), 256)

    folder = make_jpeg_folder(os.path.join(args.jpeg_dir, str(args.n224)), args.n224)
    ds224 = build_dataset(folder, image_size=224)
    pil224 = ds224.with_transform(TwoView(train_transform(ds224)))
    for w in workers:
        row(table, "jpeg-folder", 224, "PIL TwoView(train_transform)", w, *time_loader(pil224, 64, w, args.cap), 64)
    t0 = time.perf_counter()
    arr = decode_to_array(ds224, 256)
    decode_s = time.perf_counter() - t0
    row(table, "jpeg-folder", 224, "decode+resize 256 only (no aug)", 0, decode_s, len(ds224), 1)
    aug224 = BatchAugment(ds224)
    row(table, "jpeg-folder", 224, "BatchAugment x2 (pre-decoded 256)", "-",
        *time_batch_aug(aug224, arr, 64, args.cap), 64)

    payload = {"benchmark": "bench_input", "machine": info,
               "config": {"n28": len(ds28), "n224": len(ds224), "workers": workers, "data28": name28,
                          "jpeg_dir": folder, "cap_s": args.cap, "main_threads": torch.get_num_threads()},
               "results": table, "total_seconds": round(time.perf_counter() - t_start, 1)}
    path = write_json(args.json_out, payload)
    print(f"# wrote {path} ({payload['total_seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
