"""kNN and retrieval benchmarks on models or feature files: what ``instdisc knn`` runs.

Covered by tests/test_evaluation.py.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import build_dataset
from .errors import InstdiscError
from .features import Features, extract_features
from .source import ModelSource, open_model

__all__ = ["is_feature_file", "features_for", "knn_benchmark", "format_knn"]

log = logging.getLogger(__name__)

_H5_SUFFIXES = (".h5", ".hdf5")


def is_feature_file(spec: str | None) -> bool:
    """An HDF5 path that is not an image cache (``cache:PATH`` or a file whose kind says image cache)."""
    if spec is None or not str(spec).lower().endswith(_H5_SUFFIXES) or str(spec).lower().startswith("cache:"):
        return False
    from .data.cache import is_image_cache

    return not is_image_cache(spec)


def features_for(spec: str, src: ModelSource | None, *, layer: str = "encoder", device="cpu", data_root=None,
                 limit: int | None = None, batch_size: int = 256, workers: int = 0) -> Features:
    """Features of ``spec``: read from an HDF5 feature file, or computed by ``src`` with the eval transform."""
    if is_feature_file(spec):
        from .export.hdf5 import read_features

        feats, labels, indices, _ = read_features(spec)
        if limit is not None:
            feats, labels, indices = feats[:limit], labels[:limit], indices[:limit]
        return Features(feats, labels, indices)
    if src is None:
        raise InstdiscError(f"{spec} is a dataset, so a MODEL (run directory or exported encoder) is needed to "
                            f"compute its features")
    ds = src.prepare(build_dataset(spec, data_root=data_root, limit=limit))
    with torch.no_grad():
        return extract_features(src.fn(layer), ds, batch_size=batch_size, device=device, workers=workers,
                                desc=f"features of {spec}")


def _bank_features(src: ModelSource, train_spec: str, *, data_root=None, limit=None) -> Features:
    """InstDisc's monitor: the training memory bank as the gallery, labels from the training data."""
    if src.kind != "run":
        raise InstdiscError("--use-bank needs a training run directory (an exported encoder has no memory bank)")
    bank = src.extra["model"].objective.bank.memory.float()  # (N, D)
    ds = build_dataset(train_spec, data_root=data_root, limit=limit)
    if len(ds) != bank.shape[0]:
        raise InstdiscError(f"--use-bank: the memory bank has {bank.shape[0]} slots but {train_spec} has {len(ds)} "
                            f"images; give the training data (and --limit) the run was trained on")
    feats = F.normalize(bank, dim=1).cpu().numpy()
    return Features(feats, np.asarray(ds.labels, dtype=np.int64), np.arange(len(ds), dtype=np.int64))


def knn_benchmark(model: str | Path | None, *, train: str, test: str, k: int = 200, tau: float = 0.07,
                  index: str = "flat", layer: str = "encoder", use_bank: bool = False, retrieval: bool = False,
                  device="cpu", data_root=None, limit: int | None = None, batch_size: int = 256,
                  workers: int = 0) -> dict:
    """Weighted kNN (InstDisc protocol) of ``test`` against ``train``; optionally retrieval metrics too.

    ``train`` / ``test`` are dataset specs (features computed by ``model``) or HDF5 feature files.
    Returns knn_evaluate's dict (+ ``retrieval`` when asked, + ``feature_seconds``).
    """
    from .arguments import check_choice, check_int
    from .knn import INDEX_KINDS, check_knn_args, knn_evaluate, retrieval_evaluate

    check_knn_args(k, tau)  # every setting that needs no data, before any feature is extracted
    check_choice(index, "--index", INDEX_KINDS)
    check_int(batch_size, "--batch-size", 1)
    check_int(workers, "--workers", 0)
    check_int(limit, "--limit", 1, optional=True)
    t0 = time.perf_counter()
    needs_model = use_bank or not (is_feature_file(train) and is_feature_file(test))
    src = open_model(model, device=device) if (model is not None and needs_model) else None
    if needs_model and src is None:
        raise InstdiscError("a MODEL (run directory or exported encoder) is needed unless --train and --test are "
                            "both HDF5 feature files")
    if use_bank:
        if layer != "embedding":
            log.info("--use-bank: the bank holds embeddings z, so the test features use --layer embedding")
        layer = "embedding"
        gallery = _bank_features(src, train, data_root=data_root, limit=limit)
    else:
        gallery = features_for(train, src, layer=layer, device=device, data_root=data_root, limit=limit,
                               batch_size=batch_size, workers=workers)
    queries = features_for(test, src, layer=layer, device=device, data_root=data_root, batch_size=batch_size,
                           workers=workers)
    if gallery.features.shape[1] != queries.features.shape[1]:
        raise InstdiscError(f"feature dimensions differ: train has {gallery.features.shape[1]}, test has "
                            f"{queries.features.shape[1]}")
    feature_seconds = time.perf_counter() - t0
    res = knn_evaluate(gallery.features, gallery.labels, queries.features, queries.labels, k=k, tau=tau, index=index)
    res["feature_seconds"] = feature_seconds
    res["source"] = "bank" if use_bank else layer
    if retrieval:
        res["retrieval"] = retrieval_evaluate(queries.features, queries.labels, gallery.features, gallery.labels,
                                              index=index)
    return res


def format_knn(res: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [f"kNN on {res['n_test']} queries against {res['n_train']} gallery items "
             f"(k={res['k']}, tau={res['tau']}, index={res['index']}, features: {res['source']})",
             f"  weighted kNN top-1  {pct(res['top1'])}",
             f"  weighted kNN top-5  {pct(res['top5'])}",
             f"  1-NN                {pct(res['nn1'])}",
             f"  majority kNN        {pct(res['majority'])}"]
    per = res.get("per_class") or {}
    if per:
        lines.append("  per class: " + "  ".join(f"{c}:{100 * v:.1f}" for c, v in sorted(per.items())))
    r = res.get("retrieval")
    if r:
        keys = [key for key in r if key.startswith("recall@")]
        lines.append("  retrieval: " + "  ".join(f"{key} {pct(r[key])}" for key in keys)
                     + f"  mAP@R {pct(r['map_at_r'])}  mAP {pct(r['map'])}")
    lines.append(f"  {res['feature_seconds']:.1f}s features, {res['seconds']:.1f}s search")
    return "\n".join(lines)
