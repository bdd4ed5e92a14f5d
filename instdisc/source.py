"""Open "a model" however the user names it: a training run directory, a checkpoint file or an exported encoder.

Covered by tests/test_source.py.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import InstdiscError

__all__ = ["LAYERS", "ModelSource", "load_encoder", "open_model"]

LAYERS = ("encoder", "embedding")  # what a model source embeds with: the feature v, or the head's z


@dataclass
class ModelSource:
    """An encoder (and maybe its head) in eval mode with what is needed to feed it."""

    encoder: nn.Module
    head: nn.Module | None
    meta: dict  # arch, channels, image_size, mean, std, feature_dim, low_dim
    kind: str  # "run" | "export"
    path: Path
    extra: dict = field(default_factory=dict)

    def fn(self, layer: str = "encoder") -> Callable[[torch.Tensor], torch.Tensor]:
        """``encoder``: the feature v; ``embedding``: the L2-normalised head output z."""
        if layer == "encoder":
            return self.encoder
        if layer == "embedding":
            if self.head is None:
                raise InstdiscError(f"{self.path} has no projection head; use --layer encoder "
                                    f"(or export with --with-head)")
            return lambda x: self.head(self.encoder(x))
        raise InstdiscError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")

    def to(self, device) -> "ModelSource":
        self.encoder.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    def prepare(self, dataset):
        """A view of ``dataset`` that feeds this model: its normalisation, input size and (file datasets) channels."""
        want = int(self.meta["channels"])
        files = getattr(dataset, "paths", None) is not None
        if dataset.channels != want and not files:
            raise InstdiscError(f"the model takes {want}-channel images but {dataset.spec} has "
                                f"{dataset.channels}")
        ds = copy.copy(dataset)
        ds.channels = want  # files are decoded in the model's mode ("L" or "RGB") whatever was inferred
        ds.mean, ds.std = tuple(self.meta["mean"]), tuple(self.meta["std"])
        ds.image_size = int(self.meta["image_size"])
        return ds


def open_model(path: str | Path, device="cpu") -> ModelSource:
    """Open a run directory / checkpoint file (``checkpoint.pt``) or an exported encoder (``metadata.json``)."""
    p = Path(path)
    if not p.exists():
        raise InstdiscError(f"model not found: {p}")
    if p.is_dir() and (p / "metadata.json").exists():
        from .export.encoder import read_export

        encoder, head, meta = read_export(p)
        src = ModelSource(encoder, head, meta, "export", p)
    else:
        from .training.checkpoint import load_run

        cfg, model, ckpt = load_run(p)
        d = ckpt["data"]
        meta = {"arch": cfg.arch, "channels": d["channels"], "image_size": d["image_size"], "mean": d["mean"],
                "std": d["std"], "feature_dim": model.encoder.feature_dim, "low_dim": cfg.low_dim,
                "config": cfg.to_dict(), "data": d}
        src = ModelSource(model.encoder, model.head, meta, "run", p, extra={"model": model, "checkpoint": ckpt})
    src.encoder.eval()
    if src.head is not None:
        src.head.eval()
    return src.to(device)


def load_encoder(path: str | os.PathLike, *, device="cpu") -> tuple[nn.Module, "EncoderTransform"]:
    """(encoder, eval transform) from an export folder or a training run.

    The encoder is a plain ``nn.Module`` with ``feature_dim``, every parameter trainable, in eval mode (call
    ``.train()`` to fine-tune it). The transform maps a PIL image to the normalised C x S x S tensor it expects.
    """
    from .export.encoder import _eval_resize
    from .export.transform import EncoderTransform

    src = open_model(path, device=device)
    for p in src.encoder.parameters():
        p.requires_grad_(True)
    meta = dict(src.meta)
    if "eval_resize" not in meta:
        meta["eval_resize"] = _eval_resize((meta.get("data") or {}).get("spec"))
    return src.encoder, EncoderTransform.from_meta(meta)
