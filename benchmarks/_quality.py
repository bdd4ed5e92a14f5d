"""Shared helpers of the quality benchmarks (bench_quality.py, bench_peers.py): one evaluation protocol, read a run.

``measure(encoder, gallery, queries, linear) -> dict``: weighted kNN (k = 200, tau = 0.07, cosine) and optionally the
linear probe, on the encoder's features; ``parse_set`` reads KEY=VALUE overrides; ``epoch_records`` reads the epoch
records of a run's metrics.jsonl; ``rises_twice`` flags a loss curve that rose two epochs in a row.
"""
from __future__ import annotations

import json
from pathlib import Path

import _machine  # noqa: F401  (puts the repo on sys.path)
import torch

from instdisc.downstream.linear import fit_linear, topk_accuracy
from instdisc.features import extract_features
from instdisc.knn import knn_evaluate

__all__ = ["PROTOCOL", "measure", "parse_set", "epoch_records", "rises_twice"]

PROTOCOL = ("kNN k=200 tau=0.07 cosine on encoder features, gallery 60k train, queries 10k test; "
            "linear probe L-BFGS on whitened encoder features")


def parse_set(items: list[str]) -> dict:
    """``["lr=0.1", "head=mlp"]`` -> ``{"lr": 0.1, "head": "mlp"}``: each value read as JSON, else kept as text."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def epoch_records(run_dir: Path) -> list[dict]:
    """The ``"type": "epoch"`` records of ``run_dir/metrics.jsonl``, in order."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "epoch":
            rows.append(rec)
    return rows


def rises_twice(losses: list[float]) -> bool:
    """True when the epoch mean loss rose two epochs in a row somewhere."""
    return any(losses[i] > losses[i - 1] and losses[i + 1] > losses[i] for i in range(1, len(losses) - 1))


def measure(encoder: torch.nn.Module, gallery, queries, linear: bool) -> dict:
    """kNN top-1 / top-5 (and the linear probe's top-1 when ``linear``) in percent, on ``encoder``'s features of the
    labelled datasets ``gallery`` (kNN gallery, probe training set) and ``queries`` (kNN queries, probe test set).
    Leaves ``encoder`` in eval mode."""
    encoder.eval()
    with torch.no_grad():
        a = extract_features(encoder, gallery, batch_size=512)
        b = extract_features(encoder, queries, batch_size=512)
    res = knn_evaluate(a.features, a.labels, b.features, b.labels, k=200, tau=0.07)
    out = {"knn_top1": 100 * res["top1"], "knn_top5": 100 * res["top5"]}
    if linear:
        xa, ya = torch.from_numpy(a.features), torch.from_numpy(a.labels)
        clf = fit_linear(xa, ya, int(ya.max()) + 1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out["linear_top1"] = topk_accuracy(clf(torch.from_numpy(b.features)), torch.from_numpy(b.labels))["top1"]
    return out
