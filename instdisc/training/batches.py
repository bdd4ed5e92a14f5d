"""The batches a training run consumes, and what happens when an image cannot be read. Covered by
tests/test_train_loop.py, tests/test_fault_signals.py, tests/test_fault_data.py and (one rank's share)
tests/test_distributed.py.

``Batches.epoch(e, start)`` yields ``(idx (B,) long slots, [view (B, C, S, S) float, ...])`` for steps
``start .. steps_per_epoch - 1`` of epoch ``e``. Every random choice comes from a named stream
(:class:`instdisc.seeding.Stream`) seeded by (seed, epoch, step or sample), so a resumed run replays exactly what an
uninterrupted one does: the permutation (``PERMUTATION``), BatchAugment's views of a step (``BATCH_VIEWS``), the PIL
views of one sample whatever worker loads it (``PIL_VIEWS``), the DataLoader's base seed (``LOADER``).

A distributed run's :class:`instdisc.distributed.data.ShardedBatches` overrides only what sharding changes: the
permutation (this rank's slots), the batch size, the rank in the seeds, and how an unreadable image is reported.
"""
from __future__ import annotations

import logging
import math
import signal
import threading

import torch

from ..data.dataset import take_rows
from ..data.transforms import jitter_strengths, train_transform
from ..errors import InstdiscError
from ..seeding import Stream, mix_seed

__all__ = ["Batches", "SeededViews", "DataError", "data_error_text", "data_error_message", "guarded",
           "ignore_sigint", "start_workers", "worker_batches"]

log = logging.getLogger("instdisc.training")


class SeededViews(torch.utils.data.Dataset):
    """PIL path: sample j of epoch e is augmented under torch seed (seed, e, j, stream), whatever worker loads it
    (stream PIL_VIEWS in training; fine-tuning has its own). Yields ((view (C, S, S),) * views, j)."""

    def __init__(self, ds, transform, seed: int, epoch: int, views: int, *, stream: int = Stream.PIL_VIEWS):
        self.ds, self.t, self.seed, self.epoch, self.views = ds, transform, seed, epoch, views
        self.stream = stream

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, j):
        img = self.ds.load_image(j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, j, self.stream))
            xs = tuple(self.t(img) for _ in range(self.views))
        return xs, j


class Batches:
    """A run's batches (see the module docstring): BatchAugment on the training device for in-memory datasets and
    image caches (``use_batch_aug``), PIL transforms in DataLoader workers for files."""

    def __init__(self, cfg, ds, device: torch.device, use_batch_aug: bool):
        from .config import crop_min_for

        self.cfg, self.ds, self.device, self.use_batch_aug = cfg, ds, device, use_batch_aug
        self.batch_size = cfg.batch_size  # this process's share of a step
        self.steps_per_epoch = len(ds) // cfg.batch_size  # the remainder of a permutation is left out
        # a run resolves the crop (TrainConfig.resolve_for_images); a config that did not takes the same rule
        crop_min = cfg.crop_min if cfg.crop_min is not None else crop_min_for(ds.image_size)
        if use_batch_aug:
            from ..data.batch_aug import BatchAugment
            self.aug = BatchAugment(ds, scale=(crop_min, 1.0), **jitter_strengths(cfg.jitter))
            on_disk = getattr(ds, "memmapped", False)  # an image cache is read from its memmap, batch by batch
            self.array = ds.array.to(device) if device.type == "cuda" and not on_disk else ds.array
        else:
            self.transform = train_transform(ds, scale=(crop_min, 1.0), jitter=cfg.jitter)
            if getattr(ds, "paths", None) is not None:  # JPEG draft: the smallest crop still has >= S source pixels
                from ..data.images import DRAFT_MARGIN

                self.ds = ds.with_draft(max(DRAFT_MARGIN, 1 / math.sqrt(crop_min)))

    # ------------------------------------------------------------------ what sharding overrides
    def permutation(self, epoch: int) -> torch.Tensor:
        """The slots in the order epoch ``epoch`` visits them -> (N,)."""
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, epoch, Stream.PERMUTATION))
        return torch.randperm(len(self.ds), generator=g)  # (N,)

    def stream_seed(self, *parts: int) -> int:
        """The seed of a stream of this process (a rank appends its number)."""
        return mix_seed(self.cfg.seed, *parts)

    def on_unreadable(self, error: InstdiscError) -> None:
        """An image of the PIL path could not be read: raise it (one process: :func:`guarded` saves and stops). A
        hook: a rank reports it instead and returns, so that all ranks stop at the same step boundary."""
        raise error

    # ------------------------------------------------------------------ the epoch
    def epoch(self, epoch: int, start: int):
        cfg, b = self.cfg, self.batch_size
        perm = self.permutation(epoch)[: self.steps_per_epoch * b].view(self.steps_per_epoch, b)  # (steps, b)
        if self.use_batch_aug:
            for s in range(start, self.steps_per_epoch):
                idx = perm[s]
                x = take_rows(self.array, idx).to(self.device, non_blocking=True)  # (b, C, H, W) uint8
                g = torch.Generator(device=self.device).manual_seed(self.stream_seed(epoch, s, Stream.BATCH_VIEWS))
                yield idx, [self.aug(x, generator=g) for _ in range(cfg.views)]
            return
        src = SeededViews(self.ds, self.transform, cfg.seed, epoch, cfg.views)
        loader = torch.utils.data.DataLoader(src, batch_sampler=[p.tolist() for p in perm[start:]],
                                             num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=False,
                                             worker_init_fn=ignore_sigint if cfg.workers else None,
                                             # its base seed from here, not the global RNG (saved in checkpoints)
                                             generator=torch.Generator().manual_seed(
                                                 self.stream_seed(epoch, Stream.LOADER)))
        try:
            for xs, idx in worker_batches(loader):
                yield idx, [x.to(self.device, non_blocking=True) for x in xs]
        except InstdiscError as e:
            self.on_unreadable(e)  # one process: raises; a rank reports it and hands the loop an unused batch
            yield None, None


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C is the main process's to handle (it saves and stops at a step boundary)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with SIGINT blocked in this thread while the worker processes start.

    A Ctrl-C reaches the whole process group. A forked worker inherits the blocked mask, so it cannot die of a
    Ctrl-C before ``ignore_sigint`` runs; the signal itself is not lost: the kernel hands it to another thread of
    this process, or to this one when the mask is restored, and the stop flag's handler runs. (A spawned worker
    does not keep the mask; if one dies of a Ctrl-C while starting, :func:`guarded` turns its death into the stop.)
    """
    if (not loader.num_workers or not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        return iter(loader)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def worker_batches(loader: torch.utils.data.DataLoader):
    """Iterate ``loader`` (workers started by :func:`start_workers`) and shut its workers down when the consumer
    stops, here rather than in the iterator's ``__del__``, where an error (e.g. a worker killed by the same Ctrl-C)
    would be printed as a traceback after a clean stop."""
    it = start_workers(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as e:  # noqa: BLE001 - the run already stopped cleanly; say it and go on
                log.debug("DataLoader worker shutdown: %s", e)


class DataError(InstdiscError):
    """An image could not be read while training (e.g. deleted after the start-up scan)."""


def data_error_text(e: BaseException) -> str:
    """The one-line reason of an image that could not be read (DataLoader workers' wrapping removed)."""
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is the last line
        text = text.splitlines()[-1].strip()
        head, sep, rest = text.partition(": ")
        text = rest if sep and head.endswith("Error") else text
    return text.splitlines()[0] if text else type(e).__name__


def data_error_message(e: BaseException | str, done: int) -> str:
    text = e if isinstance(e, str) else data_error_text(e)
    return (f"{text}; progress is saved at step {done} of this epoch: put the file back (it has a memory-bank slot), "
            f"then continue with --resume")


def guarded(batches, start: int, on_error, stopping=lambda: False):
    """Yield from the batch iterator of an epoch that starts at step ``start``. When an image cannot be read, call
    ``on_error(steps_done, error)``, which raises (the run strategy's ``on_data_error``: one process saves, every
    yielded batch having been trained on, and raises a one-line :class:`DataError` naming the file). When the
    batches fail while a stop was requested (``stopping()``: a DataLoader worker killed by the same Ctrl-C), yield
    ``(None, None)`` instead, so the loop stops at this step boundary as for any signal."""
    done = start
    try:
        for item in batches:
            yield item
            done += 1
    except InstdiscError as e:
        on_error(done, e)
        raise  # on_error must raise; never train on after an unreadable image
    except RuntimeError as e:
        if not stopping():
            raise
        log.info("the batches stopped after the stop signal (%s)", (str(e).strip().splitlines() or ["?"])[0][:200])
        yield None, None  # the loop sees the stop request before using the batch
