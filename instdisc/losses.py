"""Instance-discrimination losses as pure functions of logits. Covered by tests/test_losses.py.

Every function takes logits that are ALREADY divided by the temperature tau (s / tau, s = cosine similarity) and
returns a scalar, the mean over the batch.

NCE (Wu et al. 2018, eq. 5-7). With P(j|f) = exp(s_j / tau) / Z and the uniform noise Pn = 1/N, a sample is "data"
with probability h(P) = P / (P + K Pn); the loss is

    loss = -(1/B) sum_i [ log h(P_i,pos) + sum_k log(1 - h(P_i,k)) ]
         = -(1/B) sum_i [ log(P_pos / (P_pos + K Pn)) + sum_k log(K Pn / (P_k + K Pn)) ].

With c = log(K Pn) + log Z = log K - log N + log Z it is computed exactly, in log space:

    log(P / (P + K Pn))   = -softplus(c - l)
    log(K Pn / (P + K Pn)) = -softplus(l - c)

The reference code (lemniscate.pytorch, NCECriterion) adds eps = 1e-7 to both denominators; we use the exact form.
The two differ by less than eps / (P + K Pn) relative, and the log-space form neither overflows exp(l) for small
tau nor loses the positive term when P << K Pn.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from instdisc.errors import InstdiscError

__all__ = ["nce_loss", "info_nce_loss", "full_softmax_loss"]


def nce_loss(pos_logit: torch.Tensor, neg_logit: torch.Tensor, log_z: float | torch.Tensor,
             n_data: int) -> torch.Tensor:
    """InstDisc NCE loss with uniform noise Pn = 1/N.

    Args:
        pos_logit: (B,) positive logits s_pos / tau.
        neg_logit: (B, K) logits s_k / tau of the K noise samples (K = neg_logit.shape[1] >= 1).
        log_z: log of the normalising constant Z (float or 0-dim tensor; must be finite).
        n_data: N, the number of bank slots (defines Pn = 1/N).

    Returns:
        scalar: -(1/B) sum_i [log(P_pos / (P_pos + K Pn)) + sum_k log(K Pn / (P_k + K Pn))], P = exp(logit) / Z.
    """
    _check_pos_neg(pos_logit, neg_logit)
    k = neg_logit.shape[1]
    if k < 1:
        raise InstdiscError(f"nce_loss needs at least one negative, got neg_logit of shape {tuple(neg_logit.shape)}")
    if int(n_data) < 1:
        raise InstdiscError(f"n_data must be >= 1, got {n_data}")
    log_kpn = math.log(k) - math.log(int(n_data))  # log(K Pn)
    if isinstance(log_z, torch.Tensor):
        c = log_z.to(device=neg_logit.device, dtype=neg_logit.dtype) + log_kpn  # log(K Pn Z), 0-dim
    else:
        c = float(log_z) + log_kpn
    batch = pos_logit.shape[0]
    pos_term = F.softplus(c - pos_logit).sum()  # -sum_i log(P_pos / (P_pos + K Pn))
    neg_term = F.softplus(neg_logit - c).sum()  # -sum_ik log(K Pn / (P_k + K Pn))
    return (pos_term + neg_term) / batch


def info_nce_loss(pos_logit: torch.Tensor, neg_logit: torch.Tensor) -> torch.Tensor:
    """Softmax cross entropy with the positive at column 0 of [pos | neg] (InfoNCE, Oord et al. 2018).

    Args:
        pos_logit: (B,) positive logits.
        neg_logit: (B, K') negative logits (bank negatives, optionally followed by in-batch columns; entries equal
            to -inf are masked out).

    Returns:
        scalar: (1/B) sum_i [logsumexp(pos_i, neg_i1..neg_iK') - pos_i].
    """
    _check_pos_neg(pos_logit, neg_logit)
    if neg_logit.shape[1] == 0:
        lse = pos_logit
    else:
        lse = torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=1))  # (B,), no (B, K'+1) concat
    return (lse - pos_logit).mean()


def full_softmax_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Non-parametric softmax over all N slots (reference ``LinearAverage``): cross entropy of (B, N) logits
    against each sample's own slot ``idx`` (B,)."""
    if logits.dim() != 2 or idx.dim() != 1 or idx.shape[0] != logits.shape[0]:
        raise InstdiscError(f"full_softmax_loss expects logits (B, N) and idx (B,), got {tuple(logits.shape)} "
                            f"and {tuple(idx.shape)}")
    return F.cross_entropy(logits, idx)


def _check_pos_neg(pos_logit: torch.Tensor, neg_logit: torch.Tensor) -> None:
    if pos_logit.dim() != 1 or neg_logit.dim() != 2 or neg_logit.shape[0] != pos_logit.shape[0]:
        raise InstdiscError(f"expected pos_logit (B,) and neg_logit (B, K), got {tuple(pos_logit.shape)} "
                            f"and {tuple(neg_logit.shape)}")
