"""The CUDA paths end to end, in under 5 minutes on one GPU, as one table.

    python benchmarks/bench_gpu.py [--json-out PATH]

Rows: memory bank on the GPU (shared and per-sample heads at N = 1.28M, K = 4096), bf16 autocast training steps of
ResNet-18 / convnet-s, FAISS GPU flat index vs CPU flat index (Q = 10k, N = 1M, k = 200), a short real training run
(Fashion-MNIST subset, AMP) with a kNN check; then bench_roofline.py's tables on the GPU: the measured bf16 / float32
matmul and conv limits, the demo step's achieved rate per part and where its time goes (--skip-roofline: left out);
then bench_encoder_variants.py's table on the GPU: the demo step eager against torch.compile, cold compile apart,
which decides whether ``instdisc train --compile auto`` turns on for CUDA (--skip-compile: left out).
Without CUDA it says so and exits with status 0, printing nothing else: it never fakes a figure.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import _machine
import torch
import torch.nn.functional as F


def _timed(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def head_rows(dev) -> list[dict]:
    from instdisc.objective import Objective

    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for negatives in ("shared", "per-sample"):
        obj = Objective(1_281_167, 128, k=4096, loss="nce", negatives=negatives, positive="bank").to(dev)
        z = F.normalize(torch.randn(256, 128, device=dev), dim=1).requires_grad_(True)
        idx = torch.randint(1_281_167, (256,), device=dev)

        def step():
            loss, _ = obj(z, idx, generator=g)
            loss.backward()
            obj.update(idx, z.detach())

        torch.cuda.reset_peak_memory_stats()
        ms = _timed(step)
        rows.append({"what": f"head NCE {negatives}, N=1.28M K=4096 B=256 (bank on GPU)", "ms": ms,
                     "peak_mib": torch.cuda.max_memory_allocated() / 2**20})
    return rows


def amp_rows(dev) -> list[dict]:
    from instdisc.models import build_encoder

    rows = []
    for arch, size in (("resnet18", 96), ("convnet-s", 28)):
        enc = build_encoder(arch, in_channels=3 if arch == "resnet18" else 1, image_size=size).to(dev)
        x = torch.randn(256, enc.net.conv1.in_channels if arch == "resnet18" else 1, size, size, device=dev)
        opt = torch.optim.SGD(enc.parameters(), lr=0.01)
        for amp in (False, True):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    y = enc(x)
                y.float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = _timed(step, reps=10)
            rows.append({"what": f"{arch} {size}px fwd+bwd B=256, {'bf16 autocast' if amp else 'fp32'}", "ms": ms,
                         "images_per_s": 256 / ms * 1000})
    return rows


def faiss_rows() -> list[dict]:
    import faiss
    import numpy as np

    from instdisc.knn import build_index, search

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((1_000_000, 128), dtype=np.float32)
    queries = rng.standard_normal((10_000, 128), dtype=np.float32)
    rows = []
    for use_gpu in (True, False):
        if use_gpu and faiss.get_num_gpus() == 0:
            rows.append({"what": "faiss GPU flat: faiss sees no GPU (CPU-only faiss build?)"})
            continue
        t0 = time.perf_counter()
        index = build_index(gallery, kind="flat", use_gpu=use_gpu)
        search(index, queries, 200)
        rows.append({"what": f"faiss flat {'GPU' if use_gpu else 'CPU'}: Q=10k N=1M k=200 (build+search)",
                     "ms": (time.perf_counter() - t0) * 1000, "on_gpu": index.on_gpu})
    return rows


def train_rows(dev) -> list[dict]:
    from instdisc import TrainConfig, build_dataset, extract_features, knn_evaluate, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_recipe("fast", data="fashion-mnist:train", out=f"{tmp}/run", limit=20000, epochs=2,
                                      device="cuda", log_every=10**9)
        t0 = time.perf_counter()
        res = train(cfg)
        seconds = time.perf_counter() - t0
        model = res.model.eval()
        tr = build_dataset("fashion-mnist:train", limit=20000)
        te = build_dataset("fashion-mnist:test")
        a = extract_features(model.encoder, tr, device=dev)
        b = extract_features(model.encoder, te, device=dev)
        knn = knn_evaluate(a.features, a.labels, b.features, b.labels, k=200, tau=0.07)
    return [{"what": "train fast recipe, fashion-mnist 20k x 2 epochs, AMP, bank on GPU", "ms": seconds * 1000,
             "images_per_s": 2 * 20000 / seconds, "knn_top1": knn["top1"], "bank_device": str(
                 model.objective.bank.memory.device)}]


def roofline(dev) -> dict:
    """bench_roofline.py's measurement on ``dev`` (limits, the demo step's parts, the profile), its tables printed;
    the module is imported only here."""
    import bench_roofline

    res = bench_roofline.run(dev)
    print("\n" + bench_roofline.format_tables(res))
    return res


def compile_variants(dev) -> dict:
    """bench_encoder_variants.py on ``dev``: the demo step eager (channels-last, NCHW) against torch.compile (default,
    max-autotune), cold compile apart: the measurement that decides whether ``--compile auto`` turns on for CUDA."""
    import argparse as _argparse

    import bench_encoder_variants

    args = _argparse.Namespace(rounds=9, batch_size=256, variants=["eager", "contiguous", "compile", "compile-max"])
    res = bench_encoder_variants.run(args, dev)
    print("\n" + bench_encoder_variants.table(res))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks/results/bench_gpu.json"))
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    dev = torch.device("cuda")
    rows = head_rows(dev) + amp_rows(dev) + faiss_rows() + ([] if args.skip_train else train_rows(dev))
    name = torch.cuda.get_device_name(0)
    print(f"CUDA paths on {name} (torch {torch.__version__})")
    for r in rows:
        extras = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "what")
        print(f"{r['what']:<72} {extras}")
    roof = None if args.skip_roofline else roofline(dev)
    comp = None if args.skip_compile else compile_variants(dev)
    _machine.write_json(args.json_out, {"benchmark": "bench_gpu", "gpu": name, "machine": _machine.machine_info(),
                                        "rows": rows, **({"roofline": roof} if roof is not None else {}),
                                        **({"compile": comp} if comp is not None else {})})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
