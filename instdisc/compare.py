"""The demo's table: weighted kNN of learned features vs the same encoder untrained vs raw pixels.

Covered by tests/test_compare.py.
"""
from __future__ import annotations

import logging
import time

import torch

from .data import build_dataset
from .errors import InstdiscError
from .features import extract_features
from .source import open_model

__all__ = ["compare_knn", "format_table"]

log = logging.getLogger(__name__)


def _raw_pixels(ds):
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return lambda x: (x * std.to(x.device) + mean.to(x.device)).flatten(1)  # (B, C*H*W) in [0, 1]


def compare_knn(run_dir, *, train: str, test: str, k: int = 200, tau: float = 0.07, device="cpu",
                data_root=None, limit: int | None = None, batch_size: int = 512) -> list[dict]:
    """Rows of {"features", "dim", "top1", "top5", "nn1", "seconds"} for learned (encoder v and embedding z),
    the untrained encoder (same arch and seed) and raw pixels, all with the same kNN protocol."""
    from .knn import knn_evaluate
    from .training.config import TrainConfig
    from .method import build_seeded_model

    src = open_model(run_dir, device=device)
    if src.kind != "run":
        raise InstdiscError("compare needs a training run directory (it rebuilds the untrained encoder from its config)")
    train_ds = src.prepare(build_dataset(train, data_root=data_root, limit=limit))
    test_ds = src.prepare(build_dataset(test, data_root=data_root))
    cfg = TrainConfig.from_dict(src.meta["config"])
    d = src.meta["data"]
    untrained = build_seeded_model(cfg, n_data=d["n"], in_channels=d["channels"], image_size=d["image_size"])
    untrained.to(device).eval()
    candidates = [
        ("learned encoder (v)", src.fn("encoder")),
        ("learned embedding (z)", src.fn("embedding")),
        ("untrained encoder (v)", untrained.encoder),
        ("raw pixels", _raw_pixels(train_ds)),
    ]
    rows = []
    for name, fn in candidates:
        t0 = time.perf_counter()
        with torch.no_grad():
            a = extract_features(fn, train_ds, batch_size=batch_size, device=device, desc=f"{name}: features of {train}")
            b = extract_features(fn, test_ds, batch_size=batch_size, device=device, desc=f"{name}: features of {test}")
        res = knn_evaluate(a.features, a.labels, b.features, b.labels, k=k, tau=tau)
        rows.append({"features": name, "dim": int(a.features.shape[1]), "top1": res["top1"], "top5": res.get("top5"),
                     "nn1": res.get("nn1"), "seconds": time.perf_counter() - t0})
        log.info("%s: top1 %.2f%%", name, 100 * res["top1"])
    return rows


def format_table(rows: list[dict], k: int, tau: float) -> str:
    head = f"weighted kNN (k={k}, tau={tau}, cosine, vote exp(s/tau)), accuracy in %"
    lines = [head, f"{'features':<24} {'dim':>5} {'top-1':>7} {'top-5':>7} {'1-NN':>7}"]

    def pct(v):
        return f"{100 * v:.2f}" if v is not None else "-"

    for r in rows:
        lines.append(f"{r['features']:<24} {r['dim']:>5} {pct(r['top1']):>7} {pct(r.get('top5')):>7} "
                     f"{pct(r.get('nn1')):>7}")
    return "\n".join(lines)
