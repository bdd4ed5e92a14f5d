"""The supervised contrastive loss of the label oracle in bench_peers.py (a ceiling that reads the labels, never a
method). A pure function of torch only, so tests/test_bench_peers_supcon.py checks it without lightly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["supcon_loss"]


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss, L^sup_out of Khosla et al. 2020 (https://arxiv.org/abs/2004.11362).

    ``z`` (M, D): the projections of all M = 2B views of a batch (L2-normalised here); ``labels`` (M,): their
    classes. With s_ij = z_i . z_j / |z_i| |z_j| and T = ``temperature``, every view i is an anchor whose positives
    P(i) = {p != i : y_p = y_i} are all other views of its class (its own second view among them)::

        L = 1/|A| sum_{i in A} -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / T) / sum_{a != i} exp(s_ia / T) )

    the softmax running over the M - 1 other views; A is the anchors with at least one positive (every anchor when
    each image comes with two views). Raises ValueError on mismatched shapes, T <= 0, or no anchor with a positive.
    """
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"supcon_loss wants z (M, D) and labels (M,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = z.shape[0]
    z = F.normalize(z, dim=1)                                                  # (M, D)
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)                # (M, M)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))     # (M, M), i never scores itself
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)           # (M, M), -inf on the diagonal
    pos = (labels[:, None] == labels[None, :]) & ~self_mask                    # (M, M) P(i) by row
    n_pos = pos.sum(dim=1)                                                     # (M,) |P(i)|
    anchors = n_pos > 0
    if not anchors.any():
        raise ValueError("supcon_loss: no view shares its label with another view (no positives)")
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp(min=1)  # (M,)
    return per_anchor[anchors].mean()
