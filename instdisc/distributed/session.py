"""A training run spread over W processes (torchrun): process group, sharded model, DDP, and the hooks the training
loop calls. Covered by tests/test_distributed_train.py (2 CPU processes, gloo) and tests/test_distributed.py.

``DistributedRun.from_env(cfg)`` returns None unless the process was launched with WORLD_SIZE > 1 (torchrun sets
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process never touches torch.distributed.
Backend: NCCL with device cuda:LOCAL_RANK when CUDA is used, gloo on CPU. Collectives time out after
INSTDISC_DIST_TIMEOUT_MIN minutes (default 60: rank 0 may be listing and checking a million files while the others
wait for its index cache).

What each rank holds: the encoder and head (replicated, DDP keeps them equal), a ``ShardedObjective`` with its
N/W bank rows, and the batches of its own slots (``ShardedBatches``). Checkpoints gather the bank on rank 0, which
writes the same file a single process writes (full N x D bank) plus ``distributed: {world_size, ...}``; any world
size can load it (the bank is re-sliced on load), see :func:`instdisc.training.strategy.resume_position` for what
resuming allows.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data.dataset import take_rows
from ..errors import InstdiscError
from ..method import InstDiscModel, build_seeded_model
from ..training.batches import data_error_message
from ..training.strategy import SingleProcess, launched_world_size
from . import comm
from .data import ShardedBatches, local_batch_size
from .objective import ShardedObjective
from .partition import StridedPartition

__all__ = ["DistributedRun", "BANK_KEY"]

log = logging.getLogger("instdisc.training")

BANK_KEY = "objective.bank.memory"
PARTITION = "strided"  # slot g on rank g % W


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    if text is None:
        raise InstdiscError(f"WORLD_SIZE is set but {name} is not: launch with torchrun (it sets RANK, LOCAL_RANK, "
                            f"MASTER_ADDR and MASTER_PORT)")
    try:
        return int(text)
    except ValueError:
        raise InstdiscError(f"{name} must be an integer, got {text!r}") from None


class _Embedder(nn.Module):
    """encoder -> head, the part DDP replicates (the bank stays out of DDP: it is sharded, not broadcast)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, low_dim)


def _subset(ds, idx: np.ndarray):
    """An IndexedDataset of rows ``idx`` of ``ds`` (for embedding one rank's shard)."""
    from ..data.dataset import IndexedDataset

    common = dict(spec=ds.spec, labels=ds.labels[idx], classes=ds.classes, channels=ds.channels,
                  image_size=ds.image_size, mean=ds.mean, std=ds.std)
    if ds.array is not None and getattr(ds, "memmapped", False):  # an image cache: read the rows batch by batch
        return _RowsOf(ds, idx)
    if ds.array is not None:
        out = IndexedDataset(array=take_rows(ds.array, idx), **common)
        out.eval_crop = getattr(ds, "eval_crop", None)
        return out
    paths = ds.paths.subset(idx) if hasattr(ds.paths, "subset") else [ds.paths[i] for i in idx]
    return IndexedDataset(paths=paths, **common)


class _RowsOf:
    """Rows ``idx`` of a memory-mapped dataset for feature extraction, gathered per batch (``array[rows]``), so a
    rank reads only its own slots' pages and never copies its shard whole."""

    def __init__(self, ds, idx: np.ndarray):
        self.ds, self.idx = ds, torch.from_numpy(np.asarray(idx, dtype=np.int64))
        self.labels = ds.labels[idx]
        for k in ("spec", "classes", "channels", "image_size", "mean", "std", "eval_crop"):
            setattr(self, k, getattr(ds, k, None))
        self.array = _RowArray(ds.array, self.idx)

    def __len__(self) -> int:
        return len(self.idx)


class _RowArray:
    """``a[rows]`` -> ``base[idx[rows]]``: the indexing ``features`` does on ``dataset.array``."""

    def __init__(self, base: torch.Tensor, idx: torch.Tensor):
        self.base, self.idx = base, idx

    def __getitem__(self, rows):
        return take_rows(self.base, self.idx[torch.as_tensor(rows)])  # (b, C, S, S) uint8

    def __len__(self) -> int:
        return len(self.idx)


class DistributedRun(SingleProcess):
    """This process's place in a multi-process run: the run strategy of :mod:`instdisc.training.strategy` for W
    processes (its hooks that talk to the other ranks are collectives)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, owns_group: bool):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.owns_group = owns_group
        self.is_main = rank == 0
        self.partition: StridedPartition | None = None
        self.sync_bn = False
        self._log_level = None

    # ------------------------------------------------------------------ set-up / tear-down
    @classmethod
    def from_env(cls, cfg) -> "DistributedRun | None":
        world = launched_world_size()
        if world <= 1:
            return None
        rank, local_rank = _env_int("RANK"), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            if not torch.cuda.is_available():
                raise InstdiscError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
            if local_rank >= torch.cuda.device_count():
                raise InstdiscError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "
                                    f"GPU(s): --nproc_per_node must not exceed the GPUs per node")
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        sync_bn = bool(cfg.sync_bn)
        if sync_bn and device.type != "cuda":
            raise InstdiscError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm does not run on CPU)")
        owns = False
        if dist.is_initialized():
            if dist.get_world_size() != world or dist.get_rank() != rank:
                raise InstdiscError(f"a process group of size {dist.get_world_size()} (rank {dist.get_rank()}) is "
                                    f"already initialised, but WORLD_SIZE={world} RANK={rank}")
        else:
            minutes = float(os.environ.get("INSTDISC_DIST_TIMEOUT_MIN", "60"))
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(minutes=minutes))
            owns = True
        run = cls(rank, world, local_rank, device, owns)
        run.sync_bn = sync_bn
        if not run.is_main:  # one copy of the progress lines: the other ranks log warnings and errors only
            root = logging.getLogger("instdisc")
            run._log_level = root.level
            root.setLevel(logging.WARNING)
        log.info("distributed: %d processes (%s), this is rank %d on %s", world, backend, rank, device)
        return run

    def close(self) -> None:
        if self._log_level is not None:
            logging.getLogger("instdisc").setLevel(self._log_level)
            self._log_level = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    @contextlib.contextmanager
    def local_main_first(self):
        """Run the body on each node's local rank 0 first (it fills the file-index cache), then on the others."""
        if self.local_rank != 0:
            dist.barrier()
        yield
        if self.local_rank == 0:
            dist.barrier()

    # ------------------------------------------------------------------ checks
    def check_data(self, cfg, n: int, fingerprint: str) -> None:
        """Same dataset on every rank, a global batch the ranks can split, shards holding a batch each."""
        every = [None] * self.world
        dist.all_gather_object(every, (n, fingerprint))
        if len(set(every)) > 1:
            bad = next(r for r, v in enumerate(every) if v != every[0])
            raise InstdiscError(f"the ranks see different datasets: rank 0 has {every[0][0]} images (fingerprint "
                                f"{every[0][1]}), rank {bad} has {every[bad][0]} ({every[bad][1]})")
        local_batch_size(cfg.batch_size, self.world)
        self.partition = StridedPartition(n, self.world, self.rank)

    # ------------------------------------------------------------------ model
    def build_model(self, cfg, *, n_data: int, in_channels: int, image_size: int) -> InstDiscModel:
        """The model of one process (same encoder and head weights; bank = this rank's rows of the same initial
        bank) without ever holding the N x D bank."""
        model = build_seeded_model(cfg, n_data=n_data, in_channels=in_channels, image_size=image_size,
                                   objective_cls=ShardedObjective, partition=self.partition)
        rows, size = self.partition.size, model.objective.bank.memory.element_size()
        log.info("sharded memory bank: %d of %d rows on each rank (%.1f MB, the full bank would be %.1f MB)",
                 rows, n_data, rows * cfg.low_dim * size / 1e6, n_data * cfg.low_dim * size / 1e6)
        return model

    def wrap(self, model: InstDiscModel):
        """DDP over encoder + head (SyncBatchNorm first with --sync-bn); returns the callable the loop embeds with.
        Call after ``model.to(device)`` and before the optimizer is built."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.sync_bn:  # the converted modules reuse the same Parameters; state_dict keys do not change
            model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
            model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(_Embedder(model.encoder, model.head), device_ids=ids)

    def batches(self, cfg, ds, use_batch_aug: bool) -> ShardedBatches:
        self._data_error = None
        return ShardedBatches(cfg, ds, self.device, use_batch_aug, self.partition,
                              on_data_error=self._note_data_error)

    def _note_data_error(self, text: str) -> None:
        self._data_error = text

    def owned_dataset(self, ds):
        """This rank's slots of ``ds`` (for the bank initialisation: each rank embeds its own)."""
        return _subset(ds, self.partition.owned().numpy())

    def describe(self, what: str) -> str:
        return f"{what} (rank {self.rank})"

    def health(self, probe, model: InstDiscModel, epoch: int) -> dict:
        """The training-health signals (instdisc.training.health) over the probe slots this rank owns, averaged
        over ranks weighted by their number of probe slots. A collective."""
        owned = self.partition.owned(device=probe.slots.device)  # (n_r,) global slots of this rank
        mine = probe.slots[torch.isin(probe.slots, owned)]  # this rank's probe slots
        local = probe(model, epoch, rows=self.partition.to_local(mine), slots=mine) if mine.numel() else {}
        keys = ("staleness", "stale_gap", "uniformity", "z_std", "alignment")
        count = float(mine.numel())
        totals = self._reduce([count] + [local.get(k, 0.0) * count for k in keys])
        return {k: (t / totals[0] if totals[0] else float("nan")) for k, t in zip(keys, totals[1:])}

    def knn_monitor(self, cfg, ds):
        from .knn import DistributedKnnMonitor

        return DistributedKnnMonitor(cfg, ds, self.device, self.partition)

    # ------------------------------------------------------------------ per step
    def _reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (a --time plan: every rank stops at the same step)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_true(self, flag: bool) -> bool:
        """True on every rank when it is True on any (e.g. a stop signal that reached one process), or when any
        rank could not read an image (the loop then saves at this step boundary and calls ``raise_data_error``)."""
        mine = getattr(self, "_data_error", None) is not None
        stop, bad = self._reduce([1.0 if flag else 0.0, 1.0 if mine else 0.0], dist.ReduceOp.MAX)
        self._any_data_error = bad > 0
        return stop > 0 or bad > 0

    def raise_pending_data_error(self, steps_done: int) -> None:
        """After the stop checkpoint: InstdiscError on every rank when an image could not be read on any."""
        if not getattr(self, "_any_data_error", False):
            return
        text = getattr(self, "_data_error", None) or "an image could not be read by another process"
        raise InstdiscError(f"{data_error_message(text, steps_done)} (rank {self.rank})")

    def mean(self, value: float) -> float:
        """Mean over ranks (nan or inf anywhere makes it non-finite everywhere)."""
        return self._reduce([float(value)])[0] / self.world

    # ------------------------------------------------------------------ checkpoints
    def run_info(self, cfg) -> dict:
        return {"distributed": {"world_size": self.world, "partition": PARTITION,
                                "batch_per_rank": cfg.batch_size // self.world, "backend": dist.get_backend()}}

    def after_checkpoint(self) -> None:
        dist.barrier()  # the file exists before any rank goes on

    def full_state_dict(self, model: InstDiscModel) -> dict | None:
        """model.state_dict() with the full N x D bank (CPU) on rank 0, None on the others. A collective."""
        sd = model.state_dict()
        local = sd[BANK_KEY]
        padded = comm.gather_rows_to_main(local, self.partition.max_size)  # (W, ceil(N/W), D) on rank 0
        if not self.is_main:
            return None
        sd[BANK_KEY] = self.partition.interleave(padded).contiguous()  # N x D in global slot order
        return sd

    def on_data_error(self, save, steps_done: int, error: BaseException) -> None:
        """An image could not be read outside ``ShardedBatches`` (which reports unreadable images through
        ``any_true`` so that all ranks save together; e.g. by the health probe). A checkpoint is a collective that
        the other ranks cannot join here, so nothing is saved: the run stops with the last one."""
        text = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise InstdiscError(f"{text} (rank {self.rank}, step {steps_done} of this epoch); a distributed run keeps only "
                            f"its last checkpoint (use --save-every): restore or remove the file, then --resume")
