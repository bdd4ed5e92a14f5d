"""Linear probe: a frozen encoder, features computed once, a linear classifier trained on them.

Covered by tests/test_downstream_linear.py.

The classifier is softmax regression with an L2 penalty ``weight_decay / 2 * ||W||^2`` on the weights (not the
bias), started from zero weights: a convex problem. Features are first centred and PCA-whitened with the train set's
covariance (eigenvalues floored at ``1e-4`` x the largest, so dead or redundant dimensions stay finite):
``preprocess="whiten"`` (default) makes the problem well conditioned, and full-batch L-BFGS then converges in
50-100 iterations (Fashion-MNIST, 60k x 256 convnet-s features: about 86% top-1, see README); ``"standardize"``
divides each dimension by its standard deviation only (several times more iterations for the same loss).
``optimizer="lbfgs"`` (default) uses a strong-Wolfe line search and ``epochs`` as its iteration cap (each
iteration is one or a few passes over the features); ``"adam"`` / ``"sgd"`` run shuffled minibatches with a cosine
learning rate for ``epochs`` epochs.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InstdiscError

__all__ = ["LinearClassifier", "check_fit_options", "fit_linear", "preprocessing", "probe_loss", "topk_accuracy",
           "linear_probe", "LinearProbeResult", "OPTIMIZERS", "PREPROCESS", "check_labelled", "num_classes",
           "build_capped"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("lbfgs", "adam", "sgd")
PREPROCESS = ("whiten", "standardize")
WHITEN_EPS = 1e-4  # eigenvalue floor, relative to the largest eigenvalue


class LinearClassifier(nn.Module):
    """``logits = W ((v - mean) @ proj) + b``; mean (D,) and proj (D, D) are buffers (saved with the state dict)."""

    def __init__(self, dim: int, n_classes: int, mean: torch.Tensor | None = None, proj: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.detach().clone().float())  # (D,)
        self.register_buffer("proj", torch.eye(dim) if proj is None else proj.detach().clone().float())  # (D, D)
        self.fc = nn.Linear(dim, n_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def transform(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.mean) @ self.proj  # (B, D)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc(self.transform(v))  # (B, n_classes)


def preprocessing(x: torch.Tensor, kind: str = "whiten", eps: float = WHITEN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), proj (D, D)) of the train features ``x`` (N, D): ``(x - mean) @ proj`` is whitened (PCA, with
    eigenvalues floored at ``eps`` x the largest) or standardised (diagonal 1 / std)."""
    if kind not in PREPROCESS:
        raise InstdiscError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got {kind!r}")
    mean = x.mean(0)  # (D,)
    xc = x - mean  # (N, D)
    if kind == "standardize":
        return mean, torch.diag(1.0 / xc.std(0, unbiased=False).clamp_min(1e-6))
    cov = (xc.double().T @ xc.double()) / max(1, len(x))  # (D, D) float64 for a stable eigendecomposition
    ev, u = torch.linalg.eigh(cov)  # ev (D,) ascending, u (D, D) columns = eigenvectors
    floor = eps * float(ev.max().clamp_min(1e-12))
    return mean, (u / (ev.clamp_min(0) + floor).sqrt()).to(x.dtype)  # (D, D)


def probe_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy + weight_decay / 2 * ||W||^2 (a pure function of its arguments)."""
    return F.cross_entropy(logits, y) + 0.5 * weight_decay * weight.pow(2).sum()


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict[str, float | None]:
    """{"top1": %, "top5": %, ...}; None for k larger than the number of classes."""
    out: dict[str, float | None] = {}
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = pred == y.view(-1, 1)  # (N, kmax)
    for k in ks:
        out[f"top{k}"] = None if k > logits.shape[1] else float(hit[:, :k].any(1).float().mean() * 100)
    return out


def check_fit_options(*, optimizer: str, epochs: int, lr: float | None, weight_decay: float, batch_size: int,
                      preprocess: str) -> float:
    """The classifier's settings checked (before any feature is extracted); returns the learning rate to use."""
    if optimizer not in OPTIMIZERS:
        raise InstdiscError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if preprocess not in PREPROCESS:
        raise InstdiscError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    if epochs < 1:
        raise InstdiscError(f"--epochs must be >= 1, got {epochs}")
    if weight_decay < 0:
        raise InstdiscError(f"--weight-decay must be >= 0, got {weight_decay}")
    if batch_size < 1:
        raise InstdiscError(f"--batch-size must be >= 1, got {batch_size}")
    lr = {"lbfgs": 1.0, "adam": 1e-3, "sgd": 0.1}[optimizer] if lr is None else float(lr)
    if not lr > 0:
        raise InstdiscError(f"--lr must be > 0, got {lr}")
    return lr


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, optimizer: str = "lbfgs", epochs: int = 100,
               lr: float | None = None, weight_decay: float = 1e-4, batch_size: int = 1024,
               preprocess: str = "whiten", generator: torch.Generator | None = None) -> LinearClassifier:
    """Train a :class:`LinearClassifier` on features ``x`` (N, D) float32 and labels ``y`` (N,) long in
    ``[0, n_classes)``, on ``x``'s device. ``lr`` defaults: lbfgs 1.0, adam 1e-3, sgd 0.1."""
    lr = check_fit_options(optimizer=optimizer, epochs=epochs, lr=lr, weight_decay=weight_decay,
                           batch_size=batch_size, preprocess=preprocess)
    x = x.float()
    n, d = x.shape
    if y.shape != (n,) or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise InstdiscError(f"labels must be (N,) in [0, {n_classes}), got shape {tuple(y.shape)} and range "
                            f"[{int(y.min())}, {int(y.max())}]")
    mean, proj = preprocessing(x, preprocess)
    clf = LinearClassifier(d, n_classes, mean, proj).to(x.device)
    with torch.no_grad():
        xs = clf.transform(x).contiguous()  # (N, D) preprocessed once
    w, b = clf.fc.weight, clf.fc.bias
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = probe_loss(F.linear(xs, w, b), y, w, weight_decay)
            loss.backward()
            return loss

        opt.step(closure)
        return clf.eval()
    bs = min(batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = epochs * steps_per_epoch
    opt = (torch.optim.Adam([w, b], lr=lr) if optimizer == "adam"
           else torch.optim.SGD([w, b], lr=lr, momentum=0.9, nesterov=True))
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(x.device)  # (N,)
        for s in range(0, n, bs):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[s:s + bs]
            loss = probe_loss(F.linear(xs[idx], w, b), y[idx], w, weight_decay)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return clf.eval()


def check_labelled(ds, role: str) -> None:
    labels = np.asarray(ds.labels)
    if (labels < 0).any():
        raise InstdiscError(f"{role} dataset {ds.spec} has {int((labels < 0).sum())} unlabeled images (label -1); "
                            f"a classifier needs labels")


def build_capped(spec: str, *, data_root=None, limit: int | None = None):
    """``build_dataset(spec)`` with ``limit`` as a cap: a dataset smaller than ``limit`` is used whole."""
    from ..data import build_dataset

    ds = build_dataset(spec, data_root=data_root)
    if limit is not None and limit < len(ds):
        ds = build_dataset(spec, data_root=data_root, limit=limit)
    return ds


def num_classes(train_ds, test_ds) -> int:
    """Classes of a train/test pair; their class names must agree when both have them."""
    if train_ds.classes and test_ds.classes and list(train_ds.classes) != list(test_ds.classes):
        raise InstdiscError(f"train and test datasets name different classes ({len(train_ds.classes)} in "
                            f"{train_ds.spec}, {len(test_ds.classes)} in {test_ds.spec})")
    return int(max(len(train_ds.classes), np.max(train_ds.labels) + 1, np.max(test_ds.labels) + 1))


@dataclass
class LinearProbeResult:
    top1: float
    top5: float | None
    train_top1: float
    n_train: int
    n_test: int
    dim: int
    n_classes: int
    seconds_features: float
    seconds_train: float
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_probe(model, train: str, test: str, *, layer: str = "encoder", optimizer: str = "lbfgs",
                 epochs: int = 100, lr: float | None = None, weight_decay: float = 1e-4, batch_size: int = 1024,
                 preprocess: str = "whiten",
                 device="cpu", limit: int | None = None, data_root=None, seed: int = 0,
                 feature_batch_size: int = 512, workers: int = 0) -> LinearProbeResult:
    """Linear-probe accuracy (%) of ``model`` (run folder, checkpoint or export) from ``train`` to ``test``.

    ``limit`` takes a fixed subset of N images of each dataset larger than N. The encoder is frozen and in eval mode.
    """
    from ..arguments import check_int
    from ..features import extract_features
    from ..source import ModelSource, open_model

    check_fit_options(optimizer=optimizer, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                      preprocess=preprocess)  # before any image is read
    check_int(feature_batch_size, "feature_batch_size", 1)
    check_int(workers, "--workers", 0)
    check_int(limit, "--limit", 1, optional=True)
    device = torch.device(device)
    src = model if isinstance(model, ModelSource) else open_model(model, device=device)
    fn = src.fn(layer)
    train_ds = src.prepare(build_capped(train, data_root=data_root, limit=limit))
    test_ds = src.prepare(build_capped(test, data_root=data_root, limit=limit))
    check_labelled(train_ds, "train")
    check_labelled(test_ds, "test")
    c = num_classes(train_ds, test_ds)
    t0 = time.perf_counter()
    a = extract_features(fn, train_ds, batch_size=feature_batch_size, device=device, workers=workers,
                         desc="linear-probe train features")
    b = extract_features(fn, test_ds, batch_size=feature_batch_size, device=device, workers=workers,
                         desc="linear-probe test features")
    t_feat = time.perf_counter() - t0
    log.info("features: %d train + %d test x %d in %.1fs", len(a.labels), len(b.labels), a.features.shape[1], t_feat)
    xa = torch.from_numpy(a.features).to(device)  # (N, D)
    ya = torch.from_numpy(a.labels).to(device)  # (N,)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    clf = fit_linear(xa, ya, c, optimizer=optimizer, epochs=epochs, lr=lr, weight_decay=weight_decay,
                     batch_size=batch_size, preprocess=preprocess, generator=g)
    t_train = time.perf_counter() - t0
    with torch.no_grad():
        train_acc = topk_accuracy(clf(xa), ya, ks=(1,))["top1"]
        test_acc = topk_accuracy(clf(torch.from_numpy(b.features).to(device)), torch.from_numpy(b.labels).to(device))
    log.info("linear probe (%s, %d epochs): train top1 %.2f%%, test top1 %.2f%% (%.1fs)", optimizer, epochs,
             train_acc, test_acc["top1"], t_train)
    settings = {"model": str(src.path), "layer": layer, "train": train, "test": test, "optimizer": optimizer,
                "preprocess": preprocess, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                "batch_size": batch_size, "limit": limit, "seed": seed, "device": str(device)}
    return LinearProbeResult(test_acc["top1"], test_acc["top5"], train_acc, len(a.labels), len(b.labels),
                             int(a.features.shape[1]), c, t_feat, t_train, settings)
