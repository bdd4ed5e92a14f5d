"""Collectives used by the sharded bank and the distributed loop. Covered by tests/test_distributed_train.py.

All functions act on the default process group and must be called by every rank in the same order. The autograd
ones carry gradients back to the rank a row came from:

    gather_with_grad(x)       (B, ...) -> (W*B, ...) rank-major; backward sums every rank's gradient of the
                               gathered rows and returns this rank's slice (reduce-scatter on NCCL, all-reduce + slice
                               elsewhere: gloo has no reduce-scatter).
    all_reduce_with_grad(x)   sum over ranks; backward is again the sum over ranks of the gradients.

With DDP every rank's loss is the mean over its own B samples and DDP averages parameter gradients over the W ranks,
so the gradient of the global-batch mean (1/W) sum_r L_r reaches every rank exactly once through these functions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["is_active", "world_size", "rank", "gather_with_grad", "all_reduce_with_grad", "all_gather_tensor",
           "all_reduce_", "gather_rows_to_main"]


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def _uses_nccl() -> bool:
    return dist.get_backend() == "nccl"


# torch >= 2.10 names the tensor-to-tensor collectives *_single (the *_tensor names warn); older ones lack them
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on every rank (same shape) -> (W*B, ...) rank-major, no gradient."""
    x = x.contiguous()
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x)
    return out


def all_reduce_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``x``."""
    dist.all_reduce(x)
    return x


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102 - see gather_with_grad
        ctx.b = x.shape[0]
        return all_gather_tensor(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        grad = grad.contiguous()
        b, r = ctx.b, rank()
        if _uses_nccl():
            out = torch.empty((b, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_flat(out, grad)
            return out
        total = all_reduce_(grad.clone())  # (W*B, ...) summed over ranks
        return total[r * b:(r + 1) * b].clone()


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D102 - see all_reduce_with_grad
        return all_reduce_(x.detach().clone())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        return all_reduce_(grad.contiguous().clone())


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...) rows of every rank, rank-major, differentiable w.r.t. every rank's ``x``.

    Every rank must pass the same shape (the loop keeps the per-rank batch fixed)."""
    return _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable (each rank's gradient is the sum of every rank's gradient)."""
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def gather_rows_to_main(local: torch.Tensor, rows_max: int, *, chunk_rows: int = 1 << 16) -> torch.Tensor | None:
    """Collect every rank's ``local`` (n_r, D) rows on rank 0 -> CPU (W, rows_max, D) zero-padded, None elsewhere.

    Moves at most ``chunk_rows`` rows per rank at a time, so the device never holds more than W chunks (a bank of
    10M x 128 float32 is 5 GB; it is assembled in host memory on rank 0 only)."""
    w, r = world_size(), rank()
    d = local.shape[1]
    out = torch.zeros((w, rows_max, d), dtype=local.dtype) if r == 0 else None  # CPU, W x rows_max x D
    for s in range(0, rows_max, chunk_rows):
        e = min(rows_max, s + chunk_rows)
        part = torch.zeros((e - s, d), dtype=local.dtype, device=local.device)
        have = max(0, min(e, local.shape[0]) - s)
        if have:
            part[:have] = local[s:s + have]
        bufs = [torch.empty_like(part) for _ in range(w)] if r == 0 else None
        dist.gather(part, bufs, dst=0)
        if r == 0:
            for q in range(w):
                out[q, s:e] = bufs[q].cpu()
    return out
