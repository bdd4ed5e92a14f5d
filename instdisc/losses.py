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

softplus(t) = max(t, 0) + log1p(exp(-|t|)) is summed by ``_SoftplusSum``: log1p(y) = log(u) * y / (u - 1) with
u = fl(1 + y) (accurate to a few ulps, Goldberg 1991), because this build's log1p/softplus kernels are not vectorised
and cost twice as much on the (B, K) negatives; the gradient is sigmoid(t), recomputed from the saved input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from instdisc.errors import InstdiscError

__all__ = ["nce_loss", "info_nce_loss", "full_softmax_loss", "softplus_sum"]


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
    pos_term = softplus_sum(pos_logit, c, -1.0)  # sum_i softplus(c - l_pos) = -sum_i log(P_pos / (P_pos + K Pn))
    neg_term = softplus_sum(neg_logit, c, 1.0)  # sum_ik softplus(l_k - c) = -sum_ik log(K Pn / (P_k + K Pn))
    return (pos_term + neg_term) / batch


def softplus_sum(x: torch.Tensor, shift: float | torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """sum(softplus(sign * (x - shift))) -> 0-dim tensor, with autograd w.r.t. x (and shift if it is a tensor).

    sign is +1 or -1. Computed in x's dtype (float32 at least); see the module docstring for the log1p form."""
    if sign not in (1.0, -1.0):
        raise InstdiscError(f"softplus_sum sign must be +1 or -1, got {sign}")
    if not isinstance(shift, torch.Tensor):
        shift = torch.tensor(float(shift), dtype=x.dtype, device=x.device)
    return _SoftplusSum.apply(x, shift, float(sign))


class _SoftplusSum(torch.autograd.Function):
    """sum softplus(t), t = sign * (x - shift); d/dx = sign * sigmoid(t). Saves x and shift only."""

    @staticmethod
    def forward(ctx, x, shift, sign):  # noqa: D102 - see class docstring
        ctx.save_for_backward(x, shift)
        ctx.sign = sign
        t = _shifted(x, shift, sign)  # new tensor
        y = t.abs().neg_().exp_()  # exp(-|t|) in (0, 1]
        u = y + 1.0  # fl(1 + y)
        log_u = torch.log(u)
        u.sub_(1.0)  # fl(1 + y) - 1: 0 only where y < 2^-24, where log1p(y) = y to float precision
        log1p_y = torch.where(u == 0, y, log_u.mul_(y).div_(u))
        return t.clamp_(min=0).sum() + log1p_y.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, shift = ctx.saved_tensors
        g = _shifted(x, shift, ctx.sign).sigmoid_().mul_(grad * ctx.sign)  # d/dx, dtype of t
        grad_x = g.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_shift = (-g.sum()).to(shift.dtype).reshape(shift.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_shift, None


def _shifted(x: torch.Tensor, shift: torch.Tensor, sign: float) -> torch.Tensor:
    work = torch.promote_types(x.dtype, torch.float32)
    t = x.to(work) - shift.to(work)  # always a new tensor
    return t.neg_() if sign < 0 else t


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
