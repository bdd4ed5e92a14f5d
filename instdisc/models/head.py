"""Projection head: encoder feature v -> L2-normalised embedding z. Covered by tests/test_models.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InstdiscError

__all__ = ["ProjectionHead", "HEADS"]

HEADS = ("linear", "mlp")


class ProjectionHead(nn.Module):
    """``linear`` (InstDisc: one Linear, e.g. 2048 -> 128) or ``mlp`` (Linear-BN-ReLU-Linear); output unit rows."""

    def __init__(self, in_dim: int, low_dim: int = 128, kind: str = "linear", hidden_dim: int | None = None):
        super().__init__()
        if low_dim < 1:
            raise InstdiscError(f"low_dim must be positive, got {low_dim}")
        if kind == "linear":
            self.net = nn.Linear(in_dim, low_dim)
        elif kind == "mlp":
            h = hidden_dim or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, low_dim))
        else:
            raise InstdiscError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        self.kind = kind
        self.low_dim = low_dim

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(v), dim=1)  # (B, low_dim), unit rows
