"""Estimate of the NCE normalising constant Z. Covered by tests/test_normaliser.py.

Z = sum_j exp(v_j . f / tau) is approximated by Monte Carlo, Z ~= N * mean(exp(l)) over the logits l = s / tau of a
batch (Wu et al. 2018, Sec. 3.2). It is kept as ``log_z`` (float64) so that small tau never overflows.

Modes:
    "first-batch": estimated once from the first observed batch, then frozen (the reference code).
    "running":     Z <- mu Z + (1 - mu) Z_batch after every observed batch (mu = momentum, default 0.99), starting
                   from the first batch's estimate; the average is of Z itself, not of log Z.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from instdisc.errors import InstdiscError

__all__ = ["NormaliserZ", "estimate_log_z", "Z_MODES"]

Z_MODES = ("first-batch", "running")


def estimate_log_z(logits: torch.Tensor | Sequence[torch.Tensor], n_data: int) -> torch.Tensor:
    """log(N * mean(exp(l))) over all entries of ``logits`` (one tensor or several, pooled) -> 0-dim float64.

    Computed as logsumexp(l) - log(count) + log(N), so exp(l) is never formed (float32, or float64 for float64
    logits).
    """
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    parts = [p.detach().reshape(-1) for p in parts if p.numel() > 0]
    if not parts:
        raise InstdiscError("cannot estimate Z from an empty set of logits")
    count = sum(p.numel() for p in parts)
    work = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    lse = torch.stack([torch.logsumexp(p.to(work), dim=0) for p in parts]).logsumexp(dim=0)  # 0-dim
    return lse.double() - math.log(count) + math.log(int(n_data))


class NormaliserZ(nn.Module):
    """Holds ``log_z``, a persistent float64 0-dim buffer (nan = not yet estimated).

    Args:
        mode: "first-batch" or "running" (see module docstring).
        momentum: mu of the running mode, in [0, 1).
    """

    log_z: torch.Tensor

    def __init__(self, mode: str = "first-batch", momentum: float = 0.99) -> None:
        super().__init__()
        if mode not in Z_MODES:
            raise InstdiscError(f"unknown z_mode {mode!r}; expected one of {', '.join(Z_MODES)}")
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise InstdiscError(f"z_momentum must be in [0, 1), got {momentum}")
        self.mode, self.momentum = mode, momentum
        self.register_buffer("log_z", torch.tensor(float("nan"), dtype=torch.float64), persistent=True)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, momentum={self.momentum}"

    @property
    def is_set(self) -> bool:
        return not bool(torch.isnan(self.log_z))

    @property
    def value(self) -> float:
        """Z as a python float (nan while unset)."""
        return float(torch.exp(self.log_z))

    @torch.no_grad()
    def observe(self, logits: torch.Tensor | Sequence[torch.Tensor], n_data: int) -> None:
        """Fold one batch of logits (already divided by tau) into the estimate.

        "first-batch": sets log_z if it is unset, otherwise does nothing (no work is done on the logits).
        "running": log Z <- log(mu Z + (1 - mu) Z_batch); the first observation sets Z = Z_batch.
        """
        if self.mode == "first-batch" and self.is_set:
            return
        batch = estimate_log_z(logits, n_data).to(self.log_z.device)
        if self.mode == "running" and self.is_set:
            mu = self.momentum
            if mu == 0.0:
                new = batch
            else:
                new = torch.logaddexp(self.log_z + math.log(mu), batch + math.log1p(-mu))
            self.log_z.copy_(new)
        else:
            self.log_z.copy_(batch)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the estimate (log_z <- nan)."""
        self.log_z.fill_(float("nan"))
