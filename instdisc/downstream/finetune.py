"""Fine-tuning: a linear predictor on top of the encoder, all of it trained with labels.

Covered by tests/test_downstream_finetune.py.

Training: SGD (momentum 0.9) with a cosine learning rate per step, cross-entropy, the InstDisc augmentation
recipe (``BatchAugment`` on in-memory data, ``train_transform`` per image for files), every random choice drawn
from generators seeded by (seed, epoch, step). The output folder is an encoder export (``encoder.pt``,
``encoder.torchscript.pt``, ``metadata.json`` with ``kind: instdisc-finetuned``) plus ``classifier.pt``, the linear
layer's state dict; so it is a MODEL for every other command, and :func:`load_finetuned` rebuilds the classifier.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..seeding import Stream, mix_seed
from ..training.batches import SeededViews
from ..errors import InstdiscError
from .linear import build_capped, check_labelled, num_classes, topk_accuracy

__all__ = ["FinetunedClassifier", "finetune", "load_finetuned", "FinetuneResult", "CLASSIFIER_FILE",
           "FINETUNED_KIND"]

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.pt"
FINETUNED_KIND = "instdisc-finetuned"


class FinetunedClassifier(nn.Module):
    """encoder (B, C, S, S) -> v (B, feature_dim) -> fc -> logits (B, n_classes)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))  # (B, n_classes)


def _batches(ds, epoch: int, batch_size: int, seed: int, augment: bool, device, workers: int):
    """Yield (x (B, C, S, S) float on device, idx (B,) long) for one epoch in a seeded order; a last batch of one
    image is dropped (BatchNorm needs two)."""
    from ..data.batch_aug import BatchAugment, batch_eval
    from ..data.dataset import take_rows
    from ..data.transforms import eval_transform, train_transform

    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, Stream.PERMUTATION)))  # (N,)
    chunks = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
    if len(chunks[-1]) < 2:
        chunks = chunks[:-1]
    if getattr(ds, "array", None) is not None:
        aug = BatchAugment(ds) if augment else None
        for s, idx in enumerate(chunks):
            x = take_rows(ds.array, idx).to(device)  # (B, C, H, W) uint8
            if aug is None:
                yield batch_eval(x, ds), idx
            else:
                g = torch.Generator(device=device).manual_seed(mix_seed(seed, epoch, s, Stream.BATCH_VIEWS))
                yield aug(x, generator=g), idx
        return
    t = train_transform(ds) if augment else eval_transform(ds)
    views = SeededViews(ds, t, seed, epoch, 1, stream=Stream.FINETUNE_VIEWS)  # image j: seed (seed, epoch, j, stream)
    loader = torch.utils.data.DataLoader(views, batch_sampler=[c.tolist() for c in chunks],
                                         num_workers=workers, pin_memory=torch.device(device).type == "cuda")
    for (x,), idx in loader:
        yield x.to(device, non_blocking=True), idx


@torch.no_grad()
def evaluate(model: FinetunedClassifier, ds, *, device, batch_size: int = 512, workers: int = 0) -> dict:
    from ..features import eval_mode, extract_features

    with eval_mode(model):
        res = extract_features(model, ds, batch_size=batch_size, device=device, workers=workers,
                               desc="finetune evaluation")  # logits (N, C)
    return topk_accuracy(torch.from_numpy(res.features), torch.from_numpy(res.labels))


@dataclass
class FinetuneResult:
    top1: float
    top5: float | None
    train_loss: float
    n_train: int
    n_test: int
    n_classes: int
    epochs: int
    seconds: float
    out: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def finetune(model, train: str, test: str, out, *, epochs: int = 10, lr: float = 0.05, weight_decay: float = 5e-4,
             batch_size: int = 128, momentum: float = 0.9, augment: bool = True, device="cpu", seed: int = 0,
             limit: int | None = None, data_root=None, workers: int = 0, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune ``model``'s encoder with a new linear predictor on labelled ``train``; report top-1 on ``test``
    and save the result to folder ``out`` (atomically; an existing ``out`` needs ``overwrite``). ``limit`` caps
    the size of each dataset (a fixed subset)."""
    from ..arguments import check_int
    from ..atomic_dir import atomic_directory, check_can_replace
    from ..export.encoder import _eval_resize, write_encoder_files
    from ..export.hdf5 import model_sha256
    from ..source import ModelSource, open_model

    for name, value, lo in (("epochs", epochs, 1), ("batch-size", batch_size, 2)):
        if value < lo:
            raise InstdiscError(f"--{name} must be >= {lo}, got {value}")
    if not lr > 0:
        raise InstdiscError(f"--lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise InstdiscError(f"--weight-decay must be >= 0, got {weight_decay}")
    check_int(workers, "--workers", 0)
    check_int(limit, "--limit", 1, optional=True)
    check_can_replace(out, overwrite, "output folder")
    device = torch.device(device)
    src = model if isinstance(model, ModelSource) else open_model(model, device=device)
    train_ds = src.prepare(build_capped(train, data_root=data_root, limit=limit))
    test_ds = src.prepare(build_capped(test, data_root=data_root, limit=limit))
    check_labelled(train_ds, "train")
    check_labelled(test_ds, "test")
    c = num_classes(train_ds, test_ds)
    if len(train_ds) < 2:
        raise InstdiscError(f"fine-tuning needs at least 2 training images, {train_ds.spec} has {len(train_ds)}")

    with torch.random.fork_rng(devices=[]):  # the new layer's init, without touching global RNG state
        torch.manual_seed(mix_seed(seed, 0, Stream.MODEL_INIT))
        net = FinetunedClassifier(src.encoder, c).to(device)
    t0 = time.perf_counter()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    labels = torch.from_numpy(np.asarray(train_ds.labels, dtype=np.int64))
    bs = min(batch_size, len(train_ds))
    steps_per_epoch = len(train_ds) // bs + (1 if len(train_ds) % bs >= 2 else 0)
    total = epochs * steps_per_epoch
    step, losses = 0, []
    net.train()
    for epoch in range(epochs):
        losses = []
        for x, idx in _batches(train_ds, epoch, bs, seed, augment, device, workers):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x), labels[idx].to(device))
            if not torch.isfinite(loss):
                raise InstdiscError(f"fine-tuning loss became {loss.item()} at epoch {epoch + 1}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        log.info("finetune epoch %d/%d: loss %.4f (%.1fs)", epoch + 1, epochs, float(np.mean(losses)),
                 time.perf_counter() - t0)
    net.eval()
    acc = evaluate(net, test_ds, device=device, workers=workers)
    seconds = time.perf_counter() - t0
    log.info("finetune: test top1 %.2f%% after %d epochs (%.1fs)", acc["top1"], epochs, seconds)

    settings = {"model": str(src.path), "train": train, "test": test, "epochs": epochs, "lr": lr,
                "weight_decay": weight_decay, "batch_size": bs, "momentum": momentum, "augment": augment,
                "seed": seed, "limit": limit, "device": str(device)}
    meta = {k: src.meta[k] for k in ("arch", "channels", "image_size", "mean", "std", "low_dim") if k in src.meta}
    meta.update(kind=FINETUNED_KIND, head=None, config=src.meta.get("config"), data=src.meta.get("data"),
        eval_resize=src.meta.get("eval_resize") or _eval_resize((src.meta.get("data") or {}).get("spec")),
        classifier={"file": CLASSIFIER_FILE, "n_classes": c, "classes": list(train_ds.classes)},
        finetune=settings, results={"top1": acc["top1"], "top5": acc["top5"], "train_loss": float(np.mean(losses))},
        source={"kind": src.kind, "path": str(Path(src.path).resolve()), "model_sha256": model_sha256(src)})
    fc_state = {k: v.detach().cpu().clone() for k, v in net.fc.state_dict().items()}
    with atomic_directory(out, overwrite=overwrite, what="output folder") as tmp:
        write_encoder_files(tmp, net.encoder, meta, extra={CLASSIFIER_FILE: fc_state}, formats=("torchscript",))
    return FinetuneResult(acc["top1"], acc["top5"], float(np.mean(losses)), len(train_ds), len(test_ds), c, epochs,
                          seconds, str(out), settings)


def load_finetuned(path, *, device="cpu"):
    """(FinetunedClassifier in eval mode, EncoderTransform, metadata) from a ``finetune`` output folder."""
    from ..export.encoder import _load_into, _load_state, _sha256, read_export
    from ..export.transform import EncoderTransform

    d = Path(path)
    encoder, _, meta = read_export(d)
    if meta.get("kind") != FINETUNED_KIND:
        raise InstdiscError(f"{d} is an encoder export, not a fine-tuned classifier (no {CLASSIFIER_FILE})")
    want = meta.get("files", {}).get(CLASSIFIER_FILE)
    if want and (d / CLASSIFIER_FILE).exists() and _sha256(d / CLASSIFIER_FILE) != want:
        raise InstdiscError(f"{d / CLASSIFIER_FILE} does not match the SHA-256 in metadata.json (modified or damaged)")
    net = FinetunedClassifier(encoder, int(meta["classifier"]["n_classes"]))
    _load_into(net.fc, _load_state(d / CLASSIFIER_FILE, d), d / CLASSIFIER_FILE)
    return net.to(device).eval(), EncoderTransform.from_meta(meta), meta
