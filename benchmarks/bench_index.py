"""Folder index speed: list a 200k-file image folder cold, and load the index from the cache.

    python benchmarks/bench_index.py [--files 200000] [--json-out benchmarks/results/bench_index.json]

The folder (``--classes`` class folders of empty ``.jpg`` files; listing never opens files, so empty files are
enough) is written once under the temp dir and reused by later runs. Its directory mtimes are set 1 h back so the
cache may trust them (fresh mtimes are never trusted, see instdisc/data/index_cache.py). "Cold" means no index cache;
the OS page cache is warm (dropping it needs root), so a first listing on a cold disk or network filesystem is slower.
Reference row: torchvision's ``make_dataset`` (what ``ImageFolder`` runs at start-up).

Also times the bad-image check (instdisc.data.images.find_bad_images: header + JPEG end marker, threaded) on
``--scan-files`` real ~500x375 JPEGs against fully decoding each. Runtime ~20 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

try:
    from ._machine import REPO, machine_info, write_json
except ImportError:
    from _machine import REPO, machine_info, write_json

import numpy as np
from PIL import Image

from instdisc.data.folder import index_folder
from instdisc.data.images import IMG_EXTENSIONS, find_bad_images


def make_folder(root: str, n_files: int, n_classes: int) -> float:
    """Create the folder unless a previous run finished it; seconds spent creating (0 when reused)."""
    marker = os.path.join(root, f".complete-{n_files}-{n_classes}")
    if os.path.exists(marker):
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    per_class = -(-n_files // n_classes)
    made = 0
    for c in range(n_classes):
        d = os.path.join(root, f"n{c:08d}")
        os.makedirs(d)
        for k in range(min(per_class, n_files - made)):
            os.close(os.open(os.path.join(d, f"n{c:08d}_{k:06d}.JPEG"), os.O_CREAT | os.O_WRONLY, 0o644))
        made += min(per_class, n_files - made)
    old = time.time() - 3600
    for d in [root] + [os.path.join(root, e) for e in os.listdir(root)]:
        os.utime(d, (old, old))
    open(marker, "w").close()
    os.utime(root, (old, old))  # the marker touched the root
    return time.perf_counter() - t0


def make_jpegs(root: str, n: int) -> list[str]:
    """n smooth-noise JPEGs of ImageNet-like size, written once."""
    marker = os.path.join(root, f".complete-{n}")
    paths = [os.path.join(root, f"{k:05d}.jpg") for k in range(n)]
    if not os.path.exists(marker):
        os.makedirs(root, exist_ok=True)
        rng = np.random.default_rng(0)
        for p in paths:
            w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p, quality=90)
        open(marker, "w").close()
    return paths


def decode_all(paths: list[str]) -> int:
    for p in paths:
        with Image.open(p) as img:
            img.load()
    return len(paths)


def timed(fn, repeat: int) -> tuple[float, object]:
    """(best seconds of ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scan-files", type=int, default=1000, help="real JPEGs for the bad-image check timing")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "instdisc-bench-index"))
    p.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_index.json"))
    args = p.parse_args(argv)
    info = machine_info()
    print(f"# {info['cpu_model']}, {info['cpu_cores_usable']} cores, load {info['load_avg_1_5_15']}")
    root = os.path.join(args.dir, f"{args.files}-{args.classes}")
    t_start = time.perf_counter()
    made_s = make_folder(root, args.files, args.classes)
    cache = tempfile.mkdtemp(prefix="instdisc-index-cache-")
    rows = []

    def add(what: str, seconds: float, n: int, note: str = "") -> None:
        rows.append({"what": what, "seconds": round(seconds, 4), "files": n,
                     "files_per_s": round(n / seconds) if seconds > 0 else None, "note": note})
        print(f"{what:<40} {seconds * 1e3:>10.1f} ms {n / seconds if seconds else 0:>14,.0f} files/s  {note}",
              flush=True)

    try:
        print(f"{'step':<40} {'time':>13} {'rate':>22}")
        if made_s:
            add("create folder (one-off)", made_s, args.files)
        cold_s, idx = timed(lambda: index_folder(root), args.repeat)
        n = len(idx.paths)
        add("index, no cache (scandir)", cold_s, n, f"{len(idx.classes)} classes")
        write_s, _ = timed(lambda: (shutil.rmtree(cache), index_folder(root, cache_dir=cache))[1], 1)
        cache_file = os.path.join(cache, os.listdir(cache)[0])
        add("index + write cache", write_s, n, f"cache {os.path.getsize(cache_file) / 2**20:.1f} MiB")
        warm_s, warm = timed(lambda: index_folder(root, cache_dir=cache), args.repeat)
        assert warm.from_cache and len(warm.paths) == n
        add("index from cache (stat dirs + load)", warm_s, n, f"{len(warm.dir_mtimes)} dir stats")
        try:
            from torchvision.datasets.folder import find_classes, make_dataset
            classes, class_to_idx = find_classes(root)
            tv_s, tv = timed(lambda: make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS), 1)
            add("torchvision make_dataset (reference)", tv_s, len(tv), "os.walk + per-file checks")
        except ImportError:
            pass
        if args.scan_files:
            jpegs = make_jpegs(os.path.join(args.dir, f"jpegs-{args.scan_files}"), args.scan_files)
            for workers in (1, 4):
                scan_s, bad = timed(lambda: find_bad_images(jpegs, workers=workers), 1)
                assert not bad
                add(f"bad-image check, {workers} thread(s)", scan_s, len(jpegs), "header + JPEG EOI marker")
            full_s, _ = timed(lambda: decode_all(jpegs), 1)
            add("full decode, 1 thread (reference)", full_s, len(jpegs), "Image.load() per file")
        paths_bytes = idx.paths.blob.nbytes + idx.paths.offsets.nbytes
        list_bytes = sys.getsizeof(list(range(n))) + sum(sys.getsizeof(p) for p in idx.paths)
        print(f"# path storage: PathTable {paths_bytes / 2**20:.1f} MiB vs list[str] {list_bytes / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    payload = {"benchmark": "bench_index", "machine": info,
               "config": {"files": n, "classes": args.classes, "repeat": args.repeat, "dir": root,
                          "page_cache": "warm"},
               "results": rows, "path_storage_bytes": {"path_table": paths_bytes, "list_of_str": list_bytes},
               "total_seconds": round(time.perf_counter() - t_start, 1)}
    path = write_json(args.json_out, payload)
    print(f"# wrote {path} ({payload['total_seconds']} s)")
    return payload


if __name__ == "__main__":
    main()
