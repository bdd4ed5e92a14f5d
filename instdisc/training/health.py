"""Training-health signals of a memory-bank run, measured at every epoch end. Covered by tests/test_train_health.py.

A fixed probe of P training images (the same slots all run long, drawn from the run's seed) is embedded by the
current encoder + head in eval mode, f_i (P x D, unit rows), and compared with the bank rows v_i of the same slots:

    staleness   mean_i  f_i . v_i                                  how well the stored rows still describe the images
                                                                   (1: fresh; it drops when the encoder moves faster
                                                                   than the bank is refreshed)
    stale_gap   mean_{i!=j} f_i . v_j  -  mean_{i!=j} f_i . f_j    < 0: other images' stored rows look farther from a
                                                                   query than their fresh embeddings, i.e. bank
                                                                   negatives are easier than they should be
    alignment   mean_i ||a_i - b_i||^2  (a, b: two augmented views) lower is better (Wang & Isola 2020)
    uniformity  log mean_{i<j} exp(-2 ||f_i - f_j||^2)             lower is better; rises toward 0 as embeddings
                                                                   crowd together (collapse)
    z_std       mean over the D dimensions of the std of f         1/sqrt(D) for uniform embeddings, 0 when collapsed

The probe uses its own generators, in eval mode and float32, and changes no state: a run with and without it trains
identically. :func:`health_warnings` turns the epoch history into one-line warnings naming what to try: a loss
rising two epochs in a row, embeddings crowding further, and an epoch history that shows no discrimination (gap below
NO_DISCRIMINATION_GAP or uniformity above NO_DISCRIMINATION_UNIFORMITY for NO_DISCRIMINATION_EPOCHS epochs in a row).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.batch_aug import BatchAugment, batch_eval
from ..data.dataset import take_rows
from ..data.transforms import JITTER, eval_transform, jitter_strengths, train_transform
from ..features import eval_mode
from ..seeding import Stream, mix_seed

__all__ = ["HealthProbe", "health_warnings", "PROBE_SIZE", "MIN_PROBE", "probe_size", "COLLAPSE_Z_STD", "COLLAPSE_UNIFORMITY",
           "NO_DISCRIMINATION_GAP", "NO_DISCRIMINATION_UNIFORMITY", "NO_DISCRIMINATION_EPOCHS"]

PROBE_SIZE = 1024  # images in the probe (fewer when the dataset is smaller: probe_size)
MIN_PROBE = 256


def probe_size(n: int) -> int:
    """P for a dataset of ``n`` images: a quarter of it, between MIN_PROBE and PROBE_SIZE (all of it up to 256).
    Three eval passes over P images cost about half an epoch's training when P = N; on small data, whose epochs are
    short, a probe of N / 4 keeps the epoch ends cheap (Fashion-MNIST 1k: 0.9 s an epoch end before, 100 of them)."""
    return min(n, PROBE_SIZE, max(MIN_PROBE, n // 4))
COLLAPSE_Z_STD = 0.25  # warn when z_std falls below this fraction of 1/sqrt(D)
COLLAPSE_UNIFORMITY = -0.5  # ... or uniformity rises above this (uniform on the sphere: about -3.9 at D = 128)
NO_DISCRIMINATION_GAP = 0.05  # an epoch does not discriminate: its positive/negative gap is below this
NO_DISCRIMINATION_UNIFORMITY = -0.25  # ... or its uniformity is above this (the demo's first epoch: -0.44)
NO_DISCRIMINATION_EPOCHS = 3  # warn after this many such epochs in a row (and every 5 more)


def pairwise_stats(f: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """staleness, stale_gap, uniformity and z_std of fresh embeddings f (P x D) against stored rows v (P x D)."""
    p = f.shape[0]
    ff = f @ f.T  # P x P
    fv = f @ v.T  # P x P
    off = ~torch.eye(p, dtype=torch.bool, device=f.device)  # P x P, i != j
    n_off = max(p * (p - 1), 1)
    sq = (2.0 - 2.0 * ff).clamp(min=0.0)  # ||f_i - f_j||^2 for unit rows
    iu = torch.triu_indices(p, p, offset=1, device=f.device)
    unif = torch.logsumexp(-2.0 * sq[iu[0], iu[1]], dim=0) - math.log(max(iu.shape[1], 1))
    return {"staleness": float(fv.diagonal().mean()),
            "stale_gap": float((fv[off].sum() - ff[off].sum()) / n_off),
            "uniformity": float(unif) if p > 1 else float("nan"),
            "z_std": float(f.std(dim=0).mean()) if p > 1 else float("nan")}


class HealthProbe:
    """Measures the module docstring's signals on a fixed probe of the training set.

    Args:
        ds: the training dataset (in-memory ``array`` or files with ``load_image``).
        seed: the run's seed (the probe's slots and augmentations derive from it).
        slots: (P,) slots to probe; default: probe_size(N) drawn without replacement.
        crop_min: the run's smallest crop fraction (for the two augmented views of ``alignment``).
        jitter: the run's colour jitter strength (the same views).
    """

    def __init__(self, ds, seed: int, *, slots: torch.Tensor | None = None, crop_min: float = 0.2,
                 jitter: float = JITTER, device: torch.device | str = "cpu") -> None:
        self.ds, self.seed, self.device = ds, int(seed), torch.device(device)
        if slots is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, Stream.PROBE))
            slots = torch.randperm(len(ds), generator=g)[: probe_size(len(ds))].sort().values  # (P,)
        self.slots = slots.to(torch.int64)
        self.array = getattr(ds, "array", None)
        if self.array is not None:
            self.aug = BatchAugment(ds, scale=(crop_min, 1.0), **jitter_strengths(jitter))
        else:
            self.eval_t, self.train_t = eval_transform(ds), train_transform(ds, scale=(crop_min, 1.0), jitter=jitter)

    def views(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eval view, augmented view a, augmented view b), each P x C x S x S float32 on the device."""
        idx = self.slots
        if self.array is not None:
            x = take_rows(self.array, idx).to(self.device)  # P x C x H x W uint8
            g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, Stream.PROBE_VIEWS, epoch))
            return batch_eval(x, self.ds), self.aug(x, generator=g), self.aug(x, generator=g)
        imgs = [self.ds.load_image(int(j)) for j in idx]
        with torch.random.fork_rng(devices=[]):  # PIL transforms draw from the global RNG
            torch.manual_seed(mix_seed(self.seed, Stream.PROBE_VIEWS, epoch))
            a = torch.stack([self.train_t(im) for im in imgs])
            b = torch.stack([self.train_t(im) for im in imgs])
        e = torch.stack([self.eval_t(im) for im in imgs])
        return e.to(self.device), a.to(self.device), b.to(self.device)

    @torch.no_grad()
    def __call__(self, model, epoch: int, *, rows: torch.Tensor | None = None,
                 slots: torch.Tensor | None = None) -> dict[str, float]:
        """Signals at the end of ``epoch`` (1-based). ``rows``: the probe's rows in ``model.objective.bank``
        (default: the slots themselves; a sharded bank passes its local rows and the ``slots`` it owns)."""
        if slots is not None and slots.numel() == 0:
            return {}
        keep = None if slots is None else torch.isin(self.slots, slots.to(self.slots.device))
        with eval_mode(model):
            e, a, b = self.views(epoch)
            if keep is not None:
                e, a, b = e[keep], a[keep], b[keep]
            f = F.normalize(model.embed(e).float(), dim=1)  # P x D
            za = F.normalize(model.embed(a).float(), dim=1)  # P x D
            zb = F.normalize(model.embed(b).float(), dim=1)  # P x D
        bank = model.objective.bank.memory
        r = (self.slots if keep is None else self.slots[keep]) if rows is None else rows
        v = F.normalize(bank.index_select(0, r.to(bank.device)).float(), dim=1).to(f.device)  # P x D
        out = pairwise_stats(f, v)
        out["alignment"] = float((za - zb).square().sum(dim=1).mean())
        return out


def _num(record: dict, key: str) -> float:
    """record[key] as a float; nan when absent or null (metrics.jsonl writes non-finite numbers as null)."""
    value = record.get(key)
    return float("nan") if value is None else float(value)


def health_warnings(history: list[dict], dim: int) -> list[str]:
    """One-line warnings about the newest epoch record of ``history`` (epoch records, oldest first)."""
    if not history:
        return []
    out = []
    last = history[-1]
    losses = [_num(h, "loss") for h in history[-3:]]
    if len(losses) == 3 and losses[0] < losses[1] < losses[2]:
        out.append(f"the epoch mean loss rose two epochs in a row ({losses[0]:.3f} -> {losses[1]:.3f} -> "
                   f"{losses[2]:.3f}); compare with the same run without bank negatives (--nce-k 0), try a lower "
                   f"--lr, or the default --positive view+bank if bank negatives share a softmax with fresh ones")
    z_std, unif = _num(last, "z_std"), _num(last, "uniformity")
    prev = _num(history[-2], "uniformity") if len(history) > 1 else float("nan")
    crowded = (math.isfinite(z_std) and z_std < COLLAPSE_Z_STD / math.sqrt(dim)) or (
        math.isfinite(unif) and unif > COLLAPSE_UNIFORMITY)
    # an untrained encoder's embeddings are crowded too: warn only while they crowd further (uniformity rising)
    if crowded and math.isfinite(unif) and math.isfinite(prev) and unif > prev:
        out.append(f"the embeddings are collapsing (z_std {z_std:.4f}, uniformity {unif:.3f}; uniform: "
                   f"{1 / math.sqrt(dim):.4f}, about -3.9): try a lower --lr, a higher --nce-t, or more negatives")
    streak = _no_discrimination_streak(history)
    if streak >= NO_DISCRIMINATION_EPOCHS and (streak - NO_DISCRIMINATION_EPOCHS) % 5 == 0:
        out.append(f"the run does not discriminate between images: for {streak} epochs the positive/negative gap "
                   f"stayed below {NO_DISCRIMINATION_GAP} or uniformity above {NO_DISCRIMINATION_UNIFORMITY} (now gap "
                   f"{_num(last, 'gap'):.3f}, uniformity {unif:.3f}); try a lower --lr, a smaller --batch-size, "
                   f"stronger augmentations (a smaller --crop-min), or check that the images differ from each other")
    return out


def _no_discrimination_streak(history: list[dict]) -> int:
    """Epochs at the end of ``history`` in a row whose gap or uniformity shows no discrimination."""
    streak = 0
    for record in reversed(history):
        gap, unif = _num(record, "gap"), _num(record, "uniformity")
        if not ((math.isfinite(gap) and gap < NO_DISCRIMINATION_GAP) or
                (math.isfinite(unif) and unif > NO_DISCRIMINATION_UNIFORMITY)):
            break
        streak += 1
    return streak
