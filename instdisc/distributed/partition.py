"""Which rank owns which memory-bank slot. Pure index arithmetic, no communication. Covered by
tests/test_distributed.py.

Strided partition of N slots over W ranks: global slot g lives on rank ``g % W`` at local row ``g // W``. Rank r
holds ``ceil((N - r) / W)`` rows (the shards differ by at most one row), and the samples a rank trains on are exactly
the slots it holds, so a sample's positive row is always local. The full bank is rebuilt from the shards by
interleaving them: row ``l * W + r`` of the full bank is row ``l`` of shard ``r``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InstdiscError

__all__ = ["StridedPartition"]


@dataclass(frozen=True)
class StridedPartition:
    """Slots of a bank of ``n`` rows owned by ``rank`` of ``world`` ranks (see the module docstring)."""

    n: int
    world: int
    rank: int

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise InstdiscError(f"rank {self.rank} is not in a world of {self.world} processes")
        if self.n < self.world:
            raise InstdiscError(f"cannot shard a bank of {self.n} slots over {self.world} processes")

    @property
    def size(self) -> int:
        """Rows held by this rank."""
        return self.shard_size(self.rank)

    def shard_size(self, rank: int) -> int:
        return (self.n - rank + self.world - 1) // self.world

    @property
    def max_size(self) -> int:
        """Rows of the largest shard (rank 0's): ceil(N / W)."""
        return self.shard_size(0)

    @property
    def min_size(self) -> int:
        """Rows of the smallest shard: floor(N / W)."""
        return self.n // self.world

    def owner(self, g: torch.Tensor) -> torch.Tensor:
        return g % self.world

    def to_local(self, g: torch.Tensor) -> torch.Tensor:
        """Local rows of global slots ``g`` (they must be owned by this rank)."""
        return torch.div(g, self.world, rounding_mode="floor")

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        return local * self.world + self.rank

    def owned(self, device=None) -> torch.Tensor:
        """(size,) int64 global slots of this rank, in local-row order."""
        return torch.arange(self.rank, self.n, self.world, device=device)

    def check_owned(self, g: torch.Tensor) -> None:
        """InstdiscError when a slot of ``g`` is out of range or lives on another rank."""
        if g.numel() == 0:
            return
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= self.n:
            raise InstdiscError(f"idx out of range [0, {self.n}): min {lo}, max {hi}")
        foreign = self.owner(g) != self.rank
        if bool(foreign.any()):
            slot = int(g[foreign][0])
            raise InstdiscError(f"slot {slot} lives on rank {slot % self.world}, not on rank {self.rank} "
                                f"(each rank trains only on the samples of its own bank shard)")

    def slice_full(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (N, ...) tensor (a strided view)."""
        if full.shape[0] != self.n:
            raise InstdiscError(f"expected {self.n} rows to shard, got {full.shape[0]}")
        return full[self.rank::self.world]

    def interleave(self, padded: torch.Tensor) -> torch.Tensor:
        """(W, max_size, ...) shards (zero-padded to max_size) -> the full (N, ...) tensor in global slot order."""
        if padded.shape[:2] != (self.world, self.max_size):
            raise InstdiscError(f"expected shards of shape ({self.world}, {self.max_size}, ...), "
                                f"got {tuple(padded.shape)}")
        full = padded.transpose(0, 1).reshape(self.world * self.max_size, *padded.shape[2:])  # row l*W + r
        return full[: self.n]  # the padding rows are exactly those with l*W + r >= N
