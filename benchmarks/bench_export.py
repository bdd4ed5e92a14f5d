"""Feature export throughput: ``export_features`` (encoder + HDF5 writing) against pure encoder inference; then the
deploy formats: ONNX Runtime inference against eager PyTorch, and the export time of each format.

    python benchmarks/bench_export.py [--limit 5000] [--batch-size 256] [--repeats 5]
                                      [--deploy-archs convnet-s,timm:resnet10t] [--deploy-only]
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

Deploy part (each --deploy-archs encoder untrained, seeded, in eval mode; CPU): ``eager`` = the torch module under
``torch.inference_mode`` and ``onnxruntime`` = the exported ``encoder.onnx`` in an ONNX Runtime CPU session with as
many intra-op threads as torch uses, on the same normalised batches (--batch-size images of the same data), best
of --repeats passes over the data, interleaved; then ``write_encoder_files`` with no format (state dict + reload +
parity: the base) and with each format alone, each best of --repeats after a warm-up round: the format's seconds
are that run minus the base (writer + checker).
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


def deploy_rows(ds, arch: str, batch_size: int, repeats: int, tmp: str) -> dict:
    """ONNX Runtime vs eager images/s, and export seconds per format, for one untrained encoder."""
    import onnxruntime as ort

    from instdisc.data import batch_eval
    from instdisc.export.encoder import FORMATS, write_encoder_files

    torch.manual_seed(0)
    enc = build_encoder(arch, in_channels=ds.channels, image_size=ds.image_size).eval()
    meta = {"arch": arch, "channels": ds.channels, "image_size": ds.image_size, "mean": list(ds.mean),
            "std": list(ds.std), "low_dim": 128, "head": None}
    times: dict = {}
    for r in range(repeats + 1):  # round 0: warm-up (imports, first-call costs), not timed
        for fmt in [None, *FORMATS]:
            folder = Path(tmp) / f"deploy-{arch.replace(':', '-')}-{fmt}-{r}"
            folder.mkdir()
            t0 = time.perf_counter()
            write_encoder_files(folder, enc, meta, formats=() if fmt is None else (fmt,))
            if r:
                times[fmt] = min(times.get(fmt, float("inf")), time.perf_counter() - t0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(Path(tmp) / f"deploy-{arch.replace(':', '-')}-onnx-1" / "encoder.onnx"), opts,
                                providers=["CPUExecutionProvider"])
    batches = [batch_eval(ds.array[i:i + batch_size], ds) for i in range(0, len(ds), batch_size)]  # (B, C, S, S)
    arrays = [b.numpy() for b in batches]
    runs = {"eager": [], "onnxruntime": []}
    with torch.inference_mode():
        enc(batches[0])
        sess.run(None, {"image": arrays[0]})  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                enc(b)
            runs["eager"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for a in arrays:
                sess.run(None, {"image": a})
            runs["onnxruntime"].append(time.perf_counter() - t0)
    n = len(ds)
    best = {k: min(v) for k, v in runs.items()}
    return {"arch": arch, "feature_dim": enc.feature_dim, "eager_images_per_s": round(n / best["eager"], 1),
            "onnxruntime_images_per_s": round(n / best["onnxruntime"], 1),
            "onnxruntime_speedup": round(best["eager"] / best["onnxruntime"], 3),
            "export_base_s": round(times[None], 3),
            "export_s": {f: round(times[f] - times[None], 3) for f in FORMATS},
            "seconds_all_runs": {k: [round(x, 3) for x in v] for k, v in runs.items()}}


def print_deploy(rows: list[dict], n: int, batch_size: int, repeats: int) -> None:
    print(f"deploy formats: {n} images, batch {batch_size}, CPU, torch threads {torch.get_num_threads()}, best of "
          f"{repeats}; export seconds: format alone minus the base (state dict + reload + parity)")
    print(f"{'encoder':<16} {'eager img/s':>12} {'ORT img/s':>10} {'ORT/eager':>10} {'base s':>7} "
          f"{'torchscript s':>14} {'safetensors s':>14} {'onnx s':>7}")
    for r in rows:
        e = r["export_s"]
        print(f"{r['arch']:<16} {r['eager_images_per_s']:>12.1f} {r['onnxruntime_images_per_s']:>10.1f} "
              f"{r['onnxruntime_speedup']:>10.2f} {r['export_base_s']:>7.2f} {e['torchscript']:>14.2f} "
              f"{e['safetensors']:>14.2f} {e['onnx']:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--deploy-archs", default="convnet-s,timm:resnet10t",
                    help="encoders of the deploy part (comma-separated; empty: skip it)")
    ap.add_argument("--deploy-only", action="store_true", help="only the deploy part (ONNX Runtime, export times)")
    ap.add_argument("--json-out", default=str(REPO / "benchmarks" / "results" / "bench_export.json"))
    args = ap.parse_args()

    ds = dataset(args.limit)
    deploy = []
    if args.deploy_archs:
        with tempfile.TemporaryDirectory(prefix="instdisc-bench-deploy-") as tmp:
            deploy = [deploy_rows(ds, a, args.batch_size, args.repeats, tmp) for a in args.deploy_archs.split(",")]
        print_deploy(deploy, len(ds), args.batch_size, args.repeats)
    if args.deploy_only:
        path = write_json(args.json_out.replace(".json", "_deploy.json"), {
            "benchmark": "bench_export (deploy)", "machine": machine_info(),
            "config": {"data": ds.spec, "n": len(ds), "batch_size": args.batch_size, "repeats": args.repeats},
            "deploy": deploy})
        print(f"wrote {path}")
        return
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
        "rows": rows, "deploy": deploy})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
