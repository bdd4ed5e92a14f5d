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

__all__ = ["compare_knn", "compare_datasets", "knn_rows", "raw_pixels", "untrained_encoder", "format_table",
           "check_knn_options"]

log = logging.getLogger(__name__)


def raw_pixels(ds):
    """images -> their pixels in [0, 1], flattened (the eval transform undone)."""
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return lambda x: (x * std.to(x.device) + mean.to(x.device)).flatten(1)  # (B, C*H*W) in [0, 1]


def check_knn_options(k, tau) -> None:
    """Refuse a bad ``k`` or ``tau`` before any dataset is read or any feature extracted."""
    from .knn import check_knn_args

    check_knn_args(k, tau)


def compare_knn(run_dir, *, train: str, test: str, k: int = 200, tau: float = 0.07, device="cpu",
                data_root=None, limit: int | None = None, batch_size: int = 512) -> list[dict]:
    """Rows of {"features", "dim", "top1", "top5", "nn1", "seconds"} for learned (encoder v and embedding z),
    the untrained encoder (same arch and seed) and raw pixels, all with the same kNN protocol."""
    from .arguments import check_int

    check_knn_options(k, tau)
    check_int(limit, "--limit", 1, optional=True)
    check_int(batch_size, "--batch-size", 1)
    src = _open_run(run_dir, device)
    train_ds = build_dataset(train, data_root=data_root, limit=limit)
    test_ds = build_dataset(test, data_root=data_root)
    return compare_datasets(src, train_ds, test_ds, k=k, tau=tau, device=device, batch_size=batch_size,
                            names=(train, test))


def _open_run(run_dir, device):
    src = open_model(run_dir, device=device)
    if src.kind != "run":
        raise InstdiscError("compare needs a training run directory (it rebuilds the untrained encoder from its "
                            "config)")
    return src


def untrained_encoder(cfg, data: dict, device) -> torch.nn.Module:
    """The encoder of ``cfg`` as the run built it before its first step (same arch and seed), in eval mode;
    ``data``: the run's data record (n, channels, image_size)."""
    from .method import build_seeded_model

    model = build_seeded_model(cfg, n_data=data["n"], in_channels=data["channels"], image_size=data["image_size"])
    return model.encoder.to(device).eval()


def compare_datasets(src, train_ds, test_ds, *, k: int = 200, tau: float = 0.07, device="cpu",
                     batch_size: int = 512, names: tuple[str, str] = ("train", "test")) -> list[dict]:
    """:func:`compare_knn` on datasets already built (``src``: a run directory or an opened run)."""
    from .training.config import TrainConfig

    check_knn_options(k, tau)
    if not hasattr(src, "fn"):
        src = _open_run(src, device)
    train_ds, test_ds = src.prepare(train_ds), src.prepare(test_ds)
    cfg = TrainConfig.from_dict(src.meta["config"])
    candidates = [
        ("learned encoder (v)", src.fn("encoder")),
        ("learned embedding (z)", src.fn("embedding")),
        ("untrained encoder (v)", untrained_encoder(cfg, src.meta["data"], device)),
        ("raw pixels", raw_pixels(train_ds)),
    ]
    return knn_rows(candidates, train_ds, test_ds, k=k, tau=tau, device=device, batch_size=batch_size, names=names)


def knn_rows(candidates, train_ds, test_ds, *, k: int, tau: float, device="cpu", batch_size: int = 512,
             names: tuple[str, str] | None = ("train", "test")) -> list[dict]:
    """One row per (name, images -> features) of ``candidates``: weighted kNN of ``test_ds`` by ``train_ds``.
    ``names``: how progress names the two datasets; None: no progress bars, rows logged at debug level."""
    from .knn import knn_evaluate

    rows = []
    for name, fn in candidates:
        t0 = time.perf_counter()
        with torch.no_grad():
            a = extract_features(fn, train_ds, batch_size=batch_size, device=device,
                                 desc=names and f"{name}: features of {names[0]}")
            b = extract_features(fn, test_ds, batch_size=batch_size, device=device,
                                 desc=names and f"{name}: features of {names[1]}")
        res = knn_evaluate(a.features, a.labels, b.features, b.labels, k=k, tau=tau, quiet=names is None)
        rows.append({"features": name, "dim": int(a.features.shape[1]), "top1": res["top1"], "top5": res.get("top5"),
                     "nn1": res.get("nn1"), "seconds": time.perf_counter() - t0})
        (log.info if names else log.debug)("%s: top1 %.2f%%", name, 100 * res["top1"])
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
