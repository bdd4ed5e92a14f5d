"""One rank's shard of the memory bank. Covered by tests/test_distributed.py.

``ShardedBank`` is a :class:`~instdisc.bank.MemoryBank` over the ``partition.size`` rows this rank owns, addressed by
LOCAL row (``partition.to_local(g)``); the update, set_rows and init_from methods are MemoryBank's, unchanged. Its
initial rows are exactly rows ``rank::W`` of the bank a single process draws from the same generator: the N x D
normal draw is replayed in chunks and only the owned rows are kept, so no rank ever holds N x D (see
:func:`draw_shard`). ``load_state_dict`` accepts either this shard or a full N x D bank (a checkpoint written by any
number of processes), which it slices.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bank import MemoryBank, check_storage_dtype
from ..errors import InstdiscError
from .partition import StridedPartition

__all__ = ["ShardedBank", "draw_shard"]

_DRAW_CHUNK_ROWS = 1 << 16


def _chunk_bounds(n: int, dim: int, step: int) -> list[tuple[int, int]]:
    """Row chunks [s, e) for replaying one randn(n, dim) call chunk by chunk.

    PyTorch's CPU normal sampler fills a tensor in blocks of 16 values and redraws the last 16 when the size is not a
    multiple of 16 (and uses another path below 16 values). Chunks whose value count is a multiple of 16, followed
    by a last chunk of at least 16 values, therefore consume the generator exactly like the single call (checked in
    tests/test_distributed.py against the single call)."""
    bounds, s = [], 0
    while s < n:
        e = min(n, s + step)
        if 0 < (n - e) * dim < 16:  # a tail under 16 values would take another code path: fold it into this chunk
            e = n
        bounds.append((s, e))
        s = e
    return bounds


def draw_shard(partition: StridedPartition, dim: int, *, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None, chunk_rows: int = _DRAW_CHUNK_ROWS) -> torch.Tensor:
    """Rows ``rank::W`` of MemoryBank(N, dim, generator=generator).memory, holding at most ``chunk_rows`` x dim of
    the full draw at a time -> (partition.size, dim) on the generator's device (CPU without one)."""
    w, r = partition.world, partition.rank
    step = max(16 * w, chunk_rows // (16 * w) * 16 * w)  # a multiple of W (owned rows start at offset r) and of 16
    work = torch.float64 if dtype == torch.float64 else torch.float32
    device = generator.device if generator is not None else None
    out = torch.empty(partition.size, dim, dtype=dtype, device=device)  # n_r x D
    for s, e in _chunk_bounds(partition.n, dim, step):
        block = torch.randn(e - s, dim, generator=generator, device=device, dtype=work)  # (e-s) x D
        block.div_(block.norm(dim=1, keepdim=True).clamp_(min=1e-12))  # MemoryBank's normalisation
        mine = block[(r - s) % w::w]
        lo = (s + (r - s) % w) // w  # local row of the first owned slot in [s, e)
        out[lo:lo + mine.shape[0]] = mine.to(dtype)
    return out


class ShardedBank(MemoryBank):
    """The ``partition.size`` x D rows of one rank (see the module docstring). ``n_data`` is the LOCAL row count."""

    def __init__(self, partition: StridedPartition, dim: int, *, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 draw: bool = True) -> None:
        nn.Module.__init__(self)
        if int(dim) < 1:
            raise InstdiscError(f"bank dim must be >= 1, got {dim}")
        check_storage_dtype(dtype)
        self.partition = partition
        self.n_data, self.dim = partition.size, int(dim)
        memory = (draw_shard(partition, self.dim, dtype=dtype, generator=generator).to(device) if draw
                  else torch.zeros(self.n_data, self.dim, dtype=dtype, device=device))  # n_r x D
        self.register_buffer("memory", memory, persistent=True)

    def extra_repr(self) -> str:
        p = self.partition
        return f"rows={self.n_data} of {p.n} (rank {p.rank} of {p.world}, strided), dim={self.dim}, " \
               f"dtype={self.memory.dtype}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "memory"
        full = state_dict.get(key)
        p = self.partition
        if isinstance(full, torch.Tensor) and full.dim() == 2 and full.shape[0] == p.n and p.n != self.n_data:
            state_dict[key] = p.slice_full(full)  # a full bank (any world size): keep this rank's rows
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
