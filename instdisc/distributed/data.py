"""Each rank's share of the training batches. Covered by tests/test_distributed.py.

Rank r trains only on the samples whose bank slot it owns (``StridedPartition``: slot g on rank g % W), so every
positive is local. Epoch e visits them in the order of the single-process permutation of epoch e restricted to the
rank's slots (same seed, same ``randperm``): the partition is fixed, shuffled anew every epoch, and every rank can
tell every rank's order. ``--batch-size`` is the GLOBAL batch: each rank takes ``batch_size / W`` samples per step
and an epoch has ``floor(N / W) // (batch_size / W)`` steps on every rank (the same count everywhere).

Image caches: rank r gathers only the rows of its own slots from the memory map, so it reads only those pages.
File datasets: DataLoader workers get the single-process Ctrl-C protection, and an image that cannot be read is
reported to the run (``on_data_error``), which stops every rank at the same step boundary with a checkpoint.
"""
from __future__ import annotations

import torch

from ..errors import InstdiscError
from ..training.batches import Batches, data_error_text
from .partition import StridedPartition

__all__ = ["ShardedBatches", "local_batch_size"]


def local_batch_size(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise InstdiscError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                            f"{world} processes (each takes batch_size / {world})")
    return global_batch // world


class ShardedBatches(Batches):
    """The loop's :class:`~instdisc.training.batches.Batches` for one rank: yields (idx (B/W,) GLOBAL slots of this
    rank, [views]) per step. Overrides only the permutation, the batch size, the rank in the seeds and the report
    of an unreadable image."""

    def __init__(self, cfg, ds, device: torch.device, use_batch_aug: bool, partition: StridedPartition,
                 on_data_error=None):
        super().__init__(cfg, ds, device, use_batch_aug)
        self.partition = partition
        self.on_data_error = on_data_error  # (text) -> None: the run stops with every rank at this step boundary
        self.batch_size = local_batch_size(cfg.batch_size, partition.world)
        self.steps_per_epoch = partition.min_size // self.batch_size
        if self.steps_per_epoch < 1:
            raise InstdiscError(f"each of the {partition.world} processes holds {partition.min_size} images, fewer "
                                f"than its share {self.batch_size} of --batch-size {cfg.batch_size}")

    def permutation(self, epoch: int) -> torch.Tensor:
        """This rank's slots in the order of the single-process permutation of ``epoch`` -> (n_r,)."""
        perm = super().permutation(epoch)  # (N,)
        return perm[self.partition.owner(perm) == self.partition.rank]

    def stream_seed(self, *parts: int) -> int:
        """BatchAugment's views and the DataLoader's base seed: one stream per rank (PIL views are seeded per
        sample, so every image gets the crops of a single-process run)."""
        return super().stream_seed(*parts, self.partition.rank)

    def on_unreadable(self, error: InstdiscError) -> None:
        """Every rank must reach the same step boundary to save: report the error and hand the loop a batch it will
        not use; its stop check (a collective) sees the error there on every rank."""
        if self.on_data_error is None:
            raise error
        self.on_data_error(data_error_text(error))
