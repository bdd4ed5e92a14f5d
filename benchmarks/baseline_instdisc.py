"""Baseline head written from the InstDisc paper and reference code (zhirongw/lemniscate.pytorch, NCEAverage +
NCECriterion), for benchmarks/bench_head.py. Not part of the library; not used in training.

What one step does, as the reference does it:
    1. draw K slots per sample uniformly with replacement; column 0 holds the sample's own slot (the positive):
       idx (B, K+1)
    2. gather the slots: W = bank[idx] -> B x (K+1) x D  (512 MiB at B = 256, K = 4096, D = 128, float32)
    3. s = bmm(W, f) -> B x (K+1); out = exp(s / tau); on the first call Z = mean(out) * N, then frozen; P = out / Z
    4. NCE with Pn = 1/N and eps = 1e-7:
       loss = -(1/B) [ sum_i log(P_i0 / (P_i0 + K Pn + eps)) + sum_ik log(K Pn / (P_ik + K Pn + eps)) ]
    5. autograd backward (the reference hand-writes the same gradient; autograd keeps W for the bmm backward)
    6. momentum update of the positives: v <- normalise(m v + (1 - m) f), written with index_copy_.

Differences from the reference, all in the baseline's favour: uniform indices come from torch.randint instead of an
alias-method table, and the bank update is a separate call instead of a side effect of backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BaselineNCE"]


class BaselineNCE:
    """Memory bank + NCE head of the reference implementation (per-sample negatives, frozen first-batch Z)."""

    def __init__(self, memory: torch.Tensor, *, k: int = 4096, tau: float = 0.07, m: float = 0.5,
                 eps: float = 1e-7) -> None:
        self.memory = memory  # N x D float32, not a parameter
        self.n_data = memory.shape[0]
        self.k, self.tau, self.m, self.eps = k, tau, m, eps
        self.z = None  # Z, set from the first batch

    def loss(self, f: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """f: (B, D) features with grad; y: (B,) slots. Returns the NCE loss (scalar)."""
        b, d = f.shape
        k = self.k
        idx = torch.randint(0, self.n_data, (b, k + 1), generator=generator, device=f.device)  # B x (K+1)
        idx[:, 0] = y
        w = self.memory.index_select(0, idx.view(-1)).view(b, k + 1, d)  # B x (K+1) x D
        out = torch.bmm(w, f.view(b, d, 1)).squeeze(2)  # B x (K+1)
        out = torch.exp(out / self.tau)
        if self.z is None:
            self.z = (out.mean() * self.n_data).item()
        out = out / self.z  # P
        pn = 1.0 / self.n_data
        p_pos = out[:, 0]
        p_neg = out[:, 1:]
        ln_pmt = torch.log(p_pos / (p_pos + k * pn + self.eps))
        ln_pon = torch.log((k * pn) / (p_neg + k * pn + self.eps))
        return -(ln_pmt.sum() + ln_pon.sum()) / b

    @torch.no_grad()
    def update(self, y: torch.Tensor, f: torch.Tensor) -> None:
        pos = self.memory.index_select(0, y)  # B x D
        pos.mul_(self.m).add_(f.detach(), alpha=1.0 - self.m)
        self.memory.index_copy_(0, y, F.normalize(pos, dim=1))

    def step(self, f: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> float:
        """Loss + backward + bank update; returns the loss value."""
        loss = self.loss(f, y, generator)
        loss.backward()
        self.update(y, f)
        return loss.item()
