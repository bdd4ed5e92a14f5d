"""Does the run learn? The verdict at the end of every training. Covered by tests/test_train_verdict.py.

With labels (on all or part of the data): weighted kNN top-1 (k = 200, or the gallery's size when smaller; vote
exp(s / 0.07), cosine: the protocol of ``instdisc compare``, through its code, :func:`instdisc.compare.knn_rows`)
of three feature sets on a fixed held-out slice of the training data: ``knn_learned`` (the run's encoder v), ``knn_untrained`` (the same encoder
before its first step: same arch and seed) and ``knn_raw`` (the pixels in [0, 1]). The slice is drawn from the
run's seed (:data:`Stream.VERDICT`): Q = min(1000, L / 5) labelled images as queries (L / 2 when L <= 5000: on
small data a fifth is too few queries to tell a few points apart), the next min(4000, L - Q) labelled images as the
gallery (L: labelled images), so its cost is bounded whatever the dataset's size (two forward passes over at most
5000 images).

Without labels: the health signals (instdisc.training.health) of the learned and the untrained embedding on the
run's health probe: alignment, uniformity and the positive/negative gap (mean cosine of two views of the same
image minus that of two views of different images).

The verdict says "learned", "did not beat the untrained encoder" or "did not beat raw pixels", with what to try. A
difference counts when it exceeds one standard error of the learned accuracy on the Q queries (at least half a
point); without labels, the gap must grow by GAP_MARGIN and uniformity must fall.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..compare import knn_rows, raw_pixels, untrained_encoder
from ..data.subset import rows_of
from ..features import eval_mode
from ..method import build_seeded_model
from ..seeding import Stream, mix_seed
from .health import pairwise_stats

__all__ = ["held_out_slice", "labelled_verdict", "unlabelled_verdict", "run_verdict", "verdict_line",
           "LEARNED", "NOT_UNTRAINED", "NOT_RAW", "MAX_QUERIES", "MAX_GALLERY", "VERDICT_K", "VERDICT_TAU"]

log = logging.getLogger("instdisc.training")

LEARNED = "learned"
NOT_UNTRAINED = "did not beat the untrained encoder"
NOT_RAW = "did not beat raw pixels"
MAX_QUERIES = 1000  # held-out queries of the slice
MAX_GALLERY = 4000  # gallery of the slice
MIN_LABELLED = 20  # fewer labelled images: the verdict uses the health signals
SMALL_LABELLED = 5000  # up to this many labelled images, half are queries (more queries: a smaller margin)
VERDICT_K, VERDICT_TAU = 200, 0.07  # instdisc compare's defaults
MIN_MARGIN = 0.005  # half a point of kNN accuracy
GAP_MARGIN = 0.05  # without labels: the positive/negative gap must grow by this much

_ADVICE = {
    NOT_UNTRAINED: "try more epochs (--epochs), a smaller --batch-size, a lower --lr, or --recipe paper; the health "
                   "warnings above say more",
    NOT_RAW: "try more epochs (--epochs), a smaller --batch-size, or another --arch; on tiny images a smaller "
             "--crop-min keeps more of each image out of the crop",
    LEARNED: "",
}


def held_out_slice(labels, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(gallery rows (G,), query rows (Q,)) of the verdict's slice, both sorted and disjoint, drawn from ``seed``
    among the labelled rows (label >= 0); None when fewer than MIN_LABELLED rows or one class are labelled."""
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels >= 0)  # (L,)
    if len(labelled) < MIN_LABELLED or len(np.unique(labels[labelled])) < 2:
        return None
    g = torch.Generator().manual_seed(mix_seed(int(seed), Stream.VERDICT))
    order = labelled[torch.randperm(len(labelled), generator=g).numpy()]  # (L,)
    q = min(MAX_QUERIES, len(labelled) // 5 if len(labelled) > SMALL_LABELLED else len(labelled) // 2)
    return np.sort(order[q:q + MAX_GALLERY]), np.sort(order[:q])


def _decide_knn(learned: float, untrained: float, raw: float, n_queries: int) -> tuple[str, float]:
    margin = max(MIN_MARGIN, math.sqrt(learned * (1 - learned) / max(n_queries, 1)))
    if learned <= untrained + margin:
        return NOT_UNTRAINED, margin
    if learned <= raw + margin:
        return NOT_RAW, margin
    return LEARNED, margin


def labelled_verdict(model, untrained: torch.nn.Module, ds, gallery: np.ndarray, queries: np.ndarray, *,
                     device="cpu", batch_size: int = 512) -> dict:
    """kNN of the learned encoder (``model.encoder``), the ``untrained`` encoder and raw pixels: ``queries`` rows
    of ``ds`` against its ``gallery`` rows."""
    g_ds, q_ds = rows_of(ds, gallery), rows_of(ds, queries)
    k = min(VERDICT_K, len(gallery))
    with eval_mode(model):
        rows = knn_rows([("learned encoder (v)", model.encoder), ("untrained encoder (v)", untrained),
                         ("raw pixels", raw_pixels(g_ds))], g_ds, q_ds, k=k, tau=VERDICT_TAU, device=device,
                        batch_size=batch_size, names=None)
    learned, untrained_top1, raw = (r["top1"] for r in rows)
    verdict, margin = _decide_knn(learned, untrained_top1, raw, len(queries))
    return {"verdict": verdict, "knn_learned": learned, "knn_untrained": untrained_top1, "knn_raw": raw,
            "n_queries": int(len(queries)), "n_gallery": int(len(gallery)), "k": k, "tau": VERDICT_TAU,
            "margin": margin}


@torch.no_grad()
def embedding_signals(model, views: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """alignment, uniformity and gap of ``model.embed`` on the probe's (eval view, view a, view b), each
    P x C x S x S."""
    e, a, b = views
    with eval_mode(model):
        f = F.normalize(model.embed(e).float(), dim=1)  # P x D
        za = F.normalize(model.embed(a).float(), dim=1)  # P x D
        zb = F.normalize(model.embed(b).float(), dim=1)  # P x D
    p = za.shape[0]
    s = za @ zb.T  # P x P: cosine of view a of i with view b of j
    pos = s.diagonal().mean()
    neg = (s.sum() - s.diagonal().sum()) / max(p * (p - 1), 1)
    return {"alignment": float((za - zb).square().sum(dim=1).mean()),
            "uniformity": pairwise_stats(f, f)["uniformity"], "gap": float(pos - neg)}


def unlabelled_verdict(model, untrained_model, probe, epoch: int) -> dict:
    """The health signals of the learned and the untrained embedding on ``probe`` (a HealthProbe)."""
    views = probe.views(epoch)
    mine, base = embedding_signals(model, views), embedding_signals(untrained_model, views)
    better = mine["gap"] > base["gap"] + GAP_MARGIN and mine["uniformity"] < base["uniformity"]
    out = {"verdict": LEARNED if better else NOT_UNTRAINED, "n_probe": int(views[0].shape[0])}
    for key in ("alignment", "uniformity", "gap"):
        out[f"{key}_learned"], out[f"{key}_untrained"] = mine[key], base[key]
    return out


def run_verdict(model, cfg, ds, probe, data_info: dict, *, device, epoch: int) -> dict:
    """The record ``{"type": "verdict", ...}`` of a run that ended (``model``: its trained model, ``cfg`` its
    config, ``ds`` its dataset, ``probe`` its HealthProbe, ``data_info`` its data record)."""
    t0 = time.perf_counter()
    split = held_out_slice(ds.labels, cfg.seed)
    if split is not None:
        untrained = untrained_encoder(cfg, data_info, device)
        record = labelled_verdict(model, untrained, ds, *split, device=device)
    else:
        base = build_seeded_model(cfg, n_data=data_info["n"], in_channels=data_info["channels"],
                                  image_size=data_info["image_size"]).to(device)
        record = unlabelled_verdict(model, base, probe, epoch)
    record["advice"] = _ADVICE[record["verdict"]]
    return {"type": "verdict", "epoch": epoch, **record, "seconds": time.perf_counter() - t0}


def verdict_line(record: dict) -> str:
    """One line saying what the verdict found and what to try."""
    v = record["verdict"]
    if "knn_learned" in record:
        numbers = (f"kNN top-1 on {record['n_queries']} held-out training images (gallery {record['n_gallery']}): "
                   f"learned {100 * record['knn_learned']:.2f}%, untrained {100 * record['knn_untrained']:.2f}%, "
                   f"raw pixels {100 * record['knn_raw']:.2f}%")
    else:
        numbers = (f"no labels; on {record['n_probe']} probe images, learned vs untrained: positive/negative gap "
                   f"{record['gap_learned']:.3f} vs {record['gap_untrained']:.3f}, uniformity "
                   f"{record['uniformity_learned']:.2f} vs {record['uniformity_untrained']:.2f}, alignment "
                   f"{record['alignment_learned']:.3f} vs {record['alignment_untrained']:.3f}")
    advice = f"; {record['advice']}" if record.get("advice") else ""
    return f"verdict: {v} ({numbers}, {record['seconds']:.1f}s){advice}"
