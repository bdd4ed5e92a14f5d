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
from ..training import loop as _loop
from .partition import StridedPartition

__all__ = ["ShardedBatches", "local_batch_size"]


def local_batch_size(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise InstdiscError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                            f"{world} processes (each takes batch_size / {world})")
    return global_batch // world


class ShardedBatches(_loop._Batches):
    """The loop's ``_Batches`` for one rank: yields (idx (B/W,) GLOBAL slots of this rank, [views]) per step."""

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

    def epoch(self, epoch: int, start: int):
        cfg, b, r = self.cfg, self.batch_size, self.partition.rank
        perm = self.permutation(epoch)[: self.steps_per_epoch * b].view(self.steps_per_epoch, b)
        if self.use_batch_aug:  # augmentation stream seeded by (seed, epoch, step, rank)
            for s in range(start, self.steps_per_epoch):
                idx = perm[s]
                x = self.array[idx.to(self.array.device)].to(self.device, non_blocking=True)  # (b, C, H, W) uint8
                g = torch.Generator(device=self.device).manual_seed(_loop._mix(cfg.seed, epoch, s, 2, r))
                yield idx, [self.aug(x, generator=g) for _ in range(cfg.views)]
        else:  # per-sample seeds (seed, epoch, slot): every image gets the crops of a single-process run
            src = _loop._SeededTwoView(self.ds, self.transform, cfg.seed, epoch, cfg.views)
            init = getattr(_loop, "_ignore_sigint", None) if cfg.workers else None
            workers_seed = torch.Generator().manual_seed(_loop._mix(cfg.seed, epoch, 4, r))  # not the global RNG
            loader = torch.utils.data.DataLoader(src, batch_sampler=[q.tolist() for q in perm[start:]],
                                                 num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                                 persistent_workers=False, worker_init_fn=init,
                                                 generator=workers_seed)
            try:
                for xs, idx in _loop._worker_batches(loader):  # Ctrl-C protection of the workers, as one process
                    yield idx, [x.to(self.device, non_blocking=True) for x in xs]
            except InstdiscError as e:
                if self.on_data_error is None:
                    raise
                # every rank must reach the same step boundary to save: hand the loop a batch it will not use;
                # its stop check (a collective) sees the error there on every rank
                self.on_data_error(_loop.data_error_text(e))
                yield None, None
