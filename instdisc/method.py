"""The InstDisc model: encoder -> projection head -> objective (memory bank + loss). Covered by tests/test_method.py."""
from __future__ import annotations

import torch
from torch import nn

from .bank import auto_k
from .models import ProjectionHead, build_encoder
from .objective import Objective

__all__ = ["InstDiscModel", "build_model", "resolved_k"]

_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InstDiscModel(nn.Module):
    """Holds the three parts; the training loop calls them explicitly (no hidden state changes in forward)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.objective = objective

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, feature_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, low_dim) unit rows


def resolved_k(cfg, n_data: int) -> int:
    """cfg.nce_k, or the automatic K when it was not given (see TrainConfig.resolve_for_data)."""
    return cfg.nce_k if cfg.nce_k is not None else auto_k(n_data)


def build_model(cfg, *, n_data: int, in_channels: int, image_size: int,
                generator: torch.Generator | None = None) -> InstDiscModel:
    """Build encoder, head and objective from a :class:`~instdisc.training.config.TrainConfig`."""
    encoder = build_encoder(cfg.arch, in_channels=in_channels, image_size=image_size)
    head = ProjectionHead(encoder.feature_dim, cfg.low_dim, kind=cfg.head)
    objective = Objective(n_data, cfg.low_dim, k=resolved_k(cfg, n_data), tau=cfg.nce_t, m=cfg.nce_m, loss=cfg.loss,
                          negatives=cfg.negatives, positive=cfg.positive, in_batch=cfg.in_batch,
                          z_mode=cfg.z_mode, bank_weight=cfg.bank_weight, bank_dtype=_BANK_DTYPES[cfg.bank_dtype], generator=generator)
    return InstDiscModel(encoder, head, objective)
