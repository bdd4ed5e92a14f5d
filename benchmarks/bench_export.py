"""Feature export throughput: ``export_features`` (encoder + HDF5 writing) against pure encoder inference.

    python benchmarks/bench_export.py [--limit 5000] [--batch-size 256] [--repeats 5]
                                      [--json-out benchmarks/results/bench_export.json]

Same data (fashion-mnist:test, a fixed --limit subset; synthetic 28 px images when the dataset is absent), same
batch size, same encoder (an untrained convnet-s, 256-d features: training does not change the cost):
  * ``inference``: ``iter_feature_batches`` with the features thrown away (eval transform + forward pass);
  * ``hdf5 float32`` / ``hdf5 float16 + gzip`` / ``hdf5 float32 + lzf``: ``export_features`` to a temporary file.
Each row is run --repeats times, rows interleaved (so that other load on the machine hits all rows alike), and the
best run is kept. ``ratio`` = export images/s / inference images/s (1.0 = writing is free); ``+s/1k img`` = the
extra seconds per 1000 images. Because other processes on a shared machine skew whole runs, each run also times
the encoder's forward passes inside it: ``other %`` is the share of the run spent outside the encoder (eval
transform, copies, and for the export rows HDF5 writing), a within-run measure that load affects much less; the
export rows' ``other %`` minus the inference row's is the writing overhead. Runtime ~30-60 s on 2 cores
(idle: 4 rows x 5 runs of ~1.2 s; the best run is robust to other load on the machine, the mean is not).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

try:
    from ._machine import REPO, machine_info, write_json
except ImportError:
    from _machine import REPO, machine_info, write_json

import numpy as np
import torch

from instdisc.data import build_dataset
from instdisc.data.dataset import IndexedDataset
from instdisc.export.hdf5 import export_features
from instdisc.features import iter_feature_batches
from instdisc.models import build_encoder
from instdisc.source import ModelSource

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
ROWS = [("inference", None, None), ("hdf5 float32", "float32", "none"), ("hdf5 float16 + gzip", "float16", "gzip"),
        ("hdf5 float32 + lzf", "float32", "lzf")]


def dataset(limit: int) -> IndexedDataset:
    if os.path.isdir(FMNIST_ROOT):
        return build_dataset("fashion-mnist:test", limit=limit)
    g = torch.Generator().manual_seed(0)
    array = torch.randint(0, 256, (limit, 1, 28, 28), generator=g, dtype=torch.uint8)  # N x 1 x 28 x 28
    return IndexedDataset(spec="synthetic-28px", labels=np.zeros(limit, np.int64), classes=["0"], channels=1,
                          image_size=28, mean=(0.5,), std=(0.5,), array=array)


def untrained_source(ds) -> ModelSource:
    torch.manual_seed(0)
    enc = build_encoder("convnet-s", in_channels=ds.channels, image_size=ds.image_size).eval()
    meta = {"arch": "convnet-s", "channels": ds.channels, "image_size": ds.image_size, "mean": list(ds.mean),
            "std": list(ds.std), "feature_dim": enc.feature_dim, "low_dim": 128,
            "weights_sha256": "untrained-convnet-s-seed0"}
    return ModelSource(TimedEncoder(enc), None, meta, "export", Path("untrained-convnet-s"))


class TimedEncoder(torch.nn.Module):
    """The encoder, with the wall time of its forward passes accumulated in ``seconds``."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.seconds, self.feature_dim = encoder, 0.0, encoder.feature_dim

    def forward(self, x):
        t0 = time.perf_counter()
        v = self.encoder(x)  # (B, feature_dim)
        self.seconds += time.perf_counter() - t0
        return v


def time_row(src, ds, dtype, compression, batch_size: int, tmp: str) -> tuple[float, float, int]:
    """(seconds, seconds inside the encoder, file bytes) for one pass over ds."""
    timed = src.encoder
    timed.seconds = 0.0
    t0 = time.perf_counter()
    if dtype is None:
        for _ in iter_feature_batches(timed, ds, batch_size=batch_size):
            pass
        return time.perf_counter() - t0, timed.seconds, 0
    out = os.path.join(tmp, f"f-{dtype}-{compression}.h5")
    export_features(src, ds, out, dtype=dtype, compression=compression, batch_size=batch_size, overwrite=True)
    secs = time.perf_counter() - t0
    size = os.path.getsize(out)
    os.remove(out)
    return secs, timed.seconds, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_export.json"))
    args = ap.parse_args()

    ds = dataset(args.limit)
    src = untrained_source(ds)
    runs: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    other: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}  # share of each run outside the encoder
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="instdisc-bench-export-") as tmp, torch.inference_mode():
        time_row(src, ds, None, None, args.batch_size, tmp)  # warm-up (allocator, oneDNN kernels)
        for _ in range(args.repeats):
            for name, dtype, comp in ROWS:
                secs, enc_secs, size = time_row(src, ds, dtype, comp, args.batch_size, tmp)
                runs[name].append(secs)
                other[name].append(1.0 - enc_secs / secs)
                sizes[name] = size
    n = len(ds)
    best = {name: min(v) for name, v in runs.items()}
    base = best["inference"]
    rows = []
    for name, dtype, comp in ROWS:
        s = best[name]
        rows.append({"row": name, "dtype": dtype, "compression": comp, "seconds": round(s, 3),
                     "images_per_s": round(n / s, 1), "ratio_vs_inference": round(base / s, 3),
                     "overhead_s_per_1000": round((s - base) / n * 1000, 4),
                     "file_mib": round(sizes[name] / 2**20, 2) if sizes[name] else None,
                     "other_share_median": round(float(np.median(other[name])), 4),
                     "seconds_all_runs": [round(x, 3) for x in runs[name]]})
    print(f"export throughput: {n} images of {ds.spec}, batch {args.batch_size}, convnet-s untrained "
          f"({src.meta['feature_dim']}-d), best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'row':<22} {'img/s':>9} {'ratio':>7} {'+s/1k img':>10} {'other %':>8} {'file MiB':>9}")
    for r in rows:
        mib = f"{r['file_mib']:.2f}" if r["file_mib"] is not None else "-"
        print(f"{r['row']:<22} {r['images_per_s']:>9.1f} {r['ratio_vs_inference']:>7.3f} "
              f"{r['overhead_s_per_1000']:>10.4f} {100 * r['other_share_median']:>8.1f} {mib:>9}")
    path = write_json(args.json_out, {
        "benchmark": "bench_export", "machine": machine_info(),
        "config": {"data": ds.spec, "n": n, "batch_size": args.batch_size, "arch": "convnet-s (untrained)",
                   "feature_dim": src.meta["feature_dim"], "repeats": args.repeats},
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
