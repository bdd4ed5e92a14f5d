"""How a run is spread over processes: the small interface the training loop calls, for one process.

The loop (:mod:`instdisc.training.loop`) holds no distributed branch: it asks its run strategy for the model, the
batches, the embedder it trains through, the reductions, the state dict to save, the bank initialisation, the kNN
monitor and what to do when an image cannot be read. :class:`SingleProcess` is one process;
:class:`instdisc.distributed.session.DistributedRun` (torchrun, W processes) overrides what sharding changes.
Covered by tests/test_train_strategy.py (one process) and tests/test_distributed_train.py (two).
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..errors import InstdiscError
from ..features import eval_mode, extract_features
from ..method import InstDiscModel, build_seeded_model
from .batches import Batches, DataError, data_error_message
from .knn_monitor import KnnMonitor

__all__ = ["SingleProcess", "launched_world_size", "resume_position"]

log = logging.getLogger("instdisc.training")


def launched_world_size() -> int:
    """WORLD_SIZE of the environment (torchrun), 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        return int(text)
    except ValueError:
        raise InstdiscError(f"WORLD_SIZE must be an integer, got {text!r}") from None


def resume_position(ckpt: dict, steps_per_epoch: int, world: int) -> tuple[int, int, int]:
    """(epoch, step_in_epoch, global_step) to continue a checkpoint with ``world`` processes.

    Same world size: exactly where it stopped. Another world size: the shards are re-cut from the full bank, but the
    batches of an epoch depend on the partition, so only a checkpoint from an epoch end can be continued (a
    mid-epoch one is refused); the global step is re-counted with this run's steps per epoch."""
    saved = int((ckpt.get("distributed") or {}).get("world_size", 1))
    epoch, start, step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
    if saved == world:
        return epoch, start, step
    if start != 0:
        raise InstdiscError(f"cannot resume: the checkpoint was saved in the middle of epoch {epoch + 1} (step "
                            f"{start}) by {saved} process(es) and this run has {world}; resume it with {saved} "
                            f"process(es), or from a checkpoint saved at an epoch end")
    log.info("resuming a %d-process checkpoint with %d process(es): bank re-partitioned at the end of epoch %d", saved,
             world, epoch)
    return epoch, 0, epoch * steps_per_epoch


class SingleProcess:
    """The run strategy of one process on ``device``: every hook is the plain thing (no collective)."""

    rank, world, is_main = 0, 1, True

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    # ------------------------------------------------------------------ set-up / tear-down
    def close(self) -> None:
        """Release what the strategy holds (a process group)."""

    def local_main_first(self):
        """Context in which the dataset is built (a node's first process fills the file-index cache)."""
        return contextlib.nullcontext()

    def check_data(self, cfg, n: int, fingerprint: str) -> None:
        """Checks that need every process's view of the data (one process: nothing to compare)."""

    def run_info(self, cfg) -> dict:
        """Entries for config.json and checkpoints that describe the processes (one process: none)."""
        return {}

    # ------------------------------------------------------------------ model and data
    def build_model(self, cfg, *, n_data: int, in_channels: int, image_size: int) -> InstDiscModel:
        return build_seeded_model(cfg, n_data=n_data, in_channels=in_channels, image_size=image_size)

    def wrap(self, model: InstDiscModel):
        """The callable the loop embeds a batch with (images -> z); call after ``model.to(device)``."""
        return model.embed

    def batches(self, cfg, ds, use_batch_aug: bool) -> Batches:
        return Batches(cfg, ds, self.device, use_batch_aug)

    def knn_monitor(self, cfg, ds) -> KnnMonitor:
        return KnnMonitor(cfg, ds, self.device)

    def owned_dataset(self, ds):
        """The samples whose bank rows this process holds (one process: all)."""
        return ds

    def describe(self, what: str) -> str:
        return what

    @torch.no_grad()
    def init_bank_from_encoder(self, model: InstDiscModel, ds, batch_size: int) -> None:
        """This process's bank rows <- the untrained encoder + head's embeddings of its samples (eval transform)."""
        with eval_mode(model):
            feats = extract_features(model.embed, self.owned_dataset(ds), batch_size=batch_size,
                                     device=self.device, desc=self.describe("memory bank init"))
        model.objective.init_bank(torch.from_numpy(feats.features).to(self.device))

    def health(self, probe, model: InstDiscModel, epoch: int) -> dict:
        """The training-health signals of the probe (instdisc.training.health)."""
        return probe(model, epoch)

    def on_main(self, fn):
        """``fn()`` in the process that writes the run's files (the end-of-run verdict), None in the others; no
        collective: the others go on at once."""
        return fn() if self.is_main else None

    # ------------------------------------------------------------------ per step
    def any_true(self, flag: bool) -> bool:
        """Whether any process says ``flag`` (a stop request)."""
        return flag

    def from_main(self, value):
        """The main process's ``value`` (one process: ``value``; a collective in a distributed run)."""
        return value

    def mean(self, value: float) -> float:
        """The mean over processes of a step's scalar (the loss of the global batch)."""
        return value

    # ------------------------------------------------------------------ checkpoints and errors
    def full_state_dict(self, model: InstDiscModel) -> dict | None:
        """The state dict to save (None on processes that do not write)."""
        return model.state_dict()

    def after_checkpoint(self) -> None:
        """Called by every process after a checkpoint was written."""

    def resume_position(self, ckpt: dict, steps_per_epoch: int) -> tuple[int, int, int]:
        return resume_position(ckpt, steps_per_epoch, self.world)

    def on_data_error(self, save, steps_done: int, error: BaseException) -> None:
        """An image could not be read after ``steps_done`` steps of the epoch: ``save(steps_done)`` and raise a
        one-line :class:`DataError` (the run continues with --resume once the file is back)."""
        save(steps_done)
        raise DataError(data_error_message(error, steps_done)) from None

    def raise_pending_data_error(self, steps_done: int) -> None:
        """After a stop checkpoint: raise the data error a process reported, if any (one process: none pending)."""
