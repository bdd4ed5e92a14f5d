"""The training loop: set-up and resume (``train``), one epoch (``train_one_epoch``), the epoch's record.

Covered by tests/test_train_loop.py and tests/test_train_resume.py. The loop holds no distributed branch: what depends
on the number of processes is asked of the run strategy (:mod:`instdisc.training.strategy`: one process, or
:class:`instdisc.distributed.session.DistributedRun` under torchrun).

Every random choice of a step is drawn from a generator seeded by (seed, epoch, step) — the epoch's permutation,
the augmentations, the negatives (named streams, :class:`instdisc.seeding.Stream`) — so a run resumed from any step
boundary replays exactly what an uninterrupted run does (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text, check_free_space, check_writable_dir, remove_stale_temps
from ..bank_neighbours import cluster_purity, label_agreement
from ..data import build_dataset
from ..data.in_memory import IN_MEMORY_MAX_BYTES, decode_into_memory, decoded_bytes, fits_in_memory
from ..device import SIZE_CAP, inferred_size_cap, resolve_device
from ..models.registry import describe_downsample
from ..errors import InstdiscError
from ..faultpoints import fault_point
from ..method import InstDiscModel
from ..models.init_weights import load_init_weights
from ..seeding import Stream, get_rng_state, mix_seed, seed_everything, set_rng_state
from ..version import __version__
from .batches import DataError, data_error_message, guarded
from .budget import TimeBudget
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from .config import DEFAULT_EPOCHS, TrainConfig
from .health import HealthProbe, health_warnings
from .compiled import compile_embed, resolve_compile
from .precision import as_channels_last, autocast, resolve_amp, use_channels_last
from .progress import MetricsWriter, Progress, format_eta
from .schedule import lr_at
from .strategy import SingleProcess, launched_world_size
from .verdict import run_verdict, verdict_line

__all__ = ["train", "train_one_epoch", "TrainResult", "TrainingDiverged"]

log = logging.getLogger("instdisc.training")

# Settings that may differ between a run and its resume (they do not change what is computed on CPU; compile computes
# the same function, rounded differently, so a resume is bit-exact only with the same --compile).
_RESUMABLE_CHANGES = {"out", "workers", "log_every", "save_every", "device", "epochs", "steps", "time", "knn_every",
                      "knn_data", "data_root", "tensorboard", "verdict", "compile"}


# Step statistics of the objective whose epoch means go into the epoch record (see Objective.forward).
_EPOCH_MEANS = ("pos_sim", "neg_sim", "own_sim", "inbatch_sim", "bank_share", "neighbour_sim")


def _means(step_stats: dict[str, list[float]]) -> dict[str, float]:
    """Epoch means of the step statistics (nan entries ignored; nan when a statistic had no finite value)."""
    out = {}
    for key, values in step_stats.items():
        finite = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(finite)) if finite else float("nan")
    return out


class TrainingDiverged(InstdiscError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    interrupted: bool
    last_loss: float
    model: InstDiscModel
    stop_signal: int | None = None  # the signal that interrupted the run (SIGINT 2, SIGTERM 15)
    verdict: dict | None = None  # the end-of-run verdict record (instdisc.training.verdict); None: not computed


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it at each step boundary, saves and returns."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _check_resume_config(saved: dict, cfg: TrainConfig, n_data: int, ckpt_data: dict, fingerprint: str) -> None:
    if ckpt_data.get("n") != n_data:
        raise InstdiscError(f"cannot resume: the checkpoint's memory bank has {ckpt_data.get('n')} slots but the "
                            f"dataset now has {n_data} images")
    if ckpt_data.get("fingerprint") not in (None, fingerprint):
        raise InstdiscError(f"cannot resume: the dataset's content changed since the run started (fingerprint "
                            f"{fingerprint}, the run has {ckpt_data['fingerprint']}): same size, other images")
    now, saved = cfg.to_dict(), _as_current(saved)
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        k = diff[0]
        raise InstdiscError(f"cannot resume: setting {k!r} is {now[k]!r} but the checkpoint was trained with "
                            f"{saved.get(k)!r} ({len(diff)} setting(s) differ)")


def _as_current(saved: dict) -> dict:
    """A saved config in today's terms: a setting added since it was written takes its default (the run ran as the
    default does), a setting that moved is read from its old place (``extra.sync_bn``)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig.from_dict({k: v for k, v in saved.items() if k in known}).to_dict()
    except (InstdiscError, TypeError, ValueError):
        return saved


def _check_restart(out: Path, cfg: TrainConfig, n_data: int, fingerprint: str, existed: bool) -> None:
    """``--resume`` on a run that has no checkpoint yet (stopped before its first save): allowed when the run directory
    existed before this call and its ``config.json``, if written, matches; the run then starts from scratch."""
    if not existed:
        raise InstdiscError(f"--resume: no run directory at {out} (nothing to resume; leave out --resume to start a "
                            f"new run)")
    cfg_file = out / "config.json"
    if cfg_file.exists():
        try:
            saved = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InstdiscError(f"--resume: cannot read {cfg_file}: {e}") from None
        if not isinstance(saved, dict):
            raise InstdiscError(f"--resume: {cfg_file} is not an instdisc run config")
        _check_resume_config(saved, cfg, n_data, saved.get("dataset") or {}, fingerprint)
    log.warning("--resume: %s has no checkpoint yet (the run stopped before its first save); starting from scratch",
                out)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _checkpoint_bytes(model: torch.nn.Module, params: list) -> int:
    """About the size of a checkpoint: the model's state plus one SGD momentum buffer per parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + sum(p.numel() * p.element_size() for p in params) + (1 << 20)


def _strategy_for(cfg: TrainConfig):
    """One process, or W processes when launched by torchrun (WORLD_SIZE > 1)."""
    if launched_world_size() > 1:
        from ..distributed.session import DistributedRun

        return DistributedRun.from_env(cfg)
    return SingleProcess(resolve_device(cfg.device))


@dataclass
class _Run:
    """Everything a started (or resumed) run holds between epochs."""

    cfg: TrainConfig
    strategy: SingleProcess
    ds: object
    model: InstDiscModel
    embed: object  # images -> z: the model's embed, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    batches: object
    metrics: MetricsWriter
    knn_monitor: object | None
    probe: HealthProbe
    data_info: dict
    amp: bool
    out: Path
    compiled: bool = False  # the step's encoder + head run through torch.compile (--compile)
    epoch: int = 0
    start: int = 0  # the first step of ``epoch`` still to train
    global_step: int = 0
    losses: list = field(default_factory=list)  # the losses of the current epoch's steps so far
    step_stats: dict = field(default_factory=dict)  # (stat) -> the current epoch's values so far
    history: list = field(default_factory=list)  # the epoch records so far
    last_loss: float = float("nan")
    budget: TimeBudget | None = None  # --time: the step plan
    budget_line: str = ""  # how the batch size and the length of the run were chosen (config.json "budget")
    steps_run: int = 0  # steps this process ran (a --time budget's warm-up counts them)
    pil_path: bool = False  # files through the per-sample PIL path: the first epoch end says what prepare gives
    progress: Progress | None = None  # throughput and ETA of this process's steps (_fit)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run: --time's plan, --steps, or whole epochs (before a --time plan is made:
        DEFAULT_EPOCHS' worth, a provisional length for the learning-rate schedule)."""
        if self.budget is not None and self.budget.plan is not None:
            return self.budget.plan
        if self.cfg.steps is not None:
            return self.cfg.steps
        return self.steps_per_epoch * (self.cfg.epochs if self.cfg.epochs is not None else DEFAULT_EPOCHS)

    @property
    def n_epochs(self) -> int:
        """Epochs the run passes through (the last one may stop part-way: --steps, --time)."""
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def checkpoint(self, epoch: int, step_in_epoch: int, losses: list[float], stats: dict | None = None) -> None:
        """Save the state at a step boundary (``step_in_epoch`` steps of ``epoch`` done); every process calls it."""
        state = self.strategy.full_state_dict(self.model)
        if state is not None:
            save_checkpoint(self.ckpt_path, {
                "config": self.cfg.to_dict(), "model": state, "optimizer": self.optimizer.state_dict(),
                "scheduler": {"name": self.cfg.schedule, "step": self.global_step}, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "step": self.global_step, "rng": get_rng_state(),
                "data": self.data_info, "epoch_losses": list(losses),
                "epoch_stats": {k: list(v) for k, v in (stats or {}).items()},
                "metrics_bytes": self.metrics.path.stat().st_size if self.metrics.path.exists() else 0,
                **({"time_budget": self.budget.state()} if self.budget is not None else {}),
                **self.strategy.run_info(self.cfg)})
        self.strategy.after_checkpoint()


def train(cfg: TrainConfig, *, resume: bool = False, dataset=None, stop_flag: _StopFlag | None = None,
          index_cache: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.out``: ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` (atomic).

    ``resume=True`` continues from ``cfg.out/checkpoint.pt``. Returns when the run ends or when SIGINT/SIGTERM asked it
    to stop (after saving a checkpoint at the step boundary). ``index_cache``: folder caching the file index of folder
    and file-list datasets (default ``cfg.out/.index-cache``). Launched by torchrun with WORLD_SIZE > 1, the run is
    distributed over the processes, with a sharded memory bank (see :mod:`instdisc.distributed`).
    """
    t_call = time.perf_counter()  # a --time budget counts from here
    cfg.validate()
    strategy = _strategy_for(cfg)
    try:
        run = _start(cfg, strategy, resume, dataset, index_cache, t_call)
        return _fit(run, stop_flag or _StopFlag())
    finally:
        strategy.close()


def _start(cfg: TrainConfig, strategy, resume: bool, dataset, index_cache, t_call: float) -> _Run:
    """Build the data, the model and the optimizer, check everything, then start the run or load its checkpoint."""
    device = strategy.device
    run_existed = Path(cfg.out).is_dir()  # before the index cache (default OUT/.index-cache) can create it
    if resume and not run_existed:  # refused before the data is read (the same check as _check_restart's)
        raise InstdiscError(f"--resume: no run directory at {cfg.out} (nothing to resume; leave out --resume to "
                            f"start a new run)")
    if not resume and (Path(cfg.out) / CHECKPOINT_NAME).exists():
        raise InstdiscError(f"{cfg.out} already holds a checkpoint; pass --resume to continue it or choose a new "
                            f"--out")
    cache_dir = index_cache if index_cache is not None else Path(cfg.out) / ".index-cache"
    with strategy.local_main_first():  # one lister per node
        ds = dataset if dataset is not None else build_dataset(
            cfg.data, data_root=cfg.data_root, limit=cfg.limit, skip_bad_images=cfg.skip_bad_images,
            image_size=cfg.image_size, channels=cfg.channels, cache_dir=cache_dir,
            max_image_size=inferred_size_cap(device))
    if strategy.is_main and (getattr(ds, "geometry", None) or {}).get("capped"):
        log.info("the inferred image size is capped at %d on %s (%s); --image-size chooses another",
                 inferred_size_cap(device), device.type, ", ".join(f"{k} {v}" for k, v in SIZE_CAP.items()))
    n = len(ds)
    chosen = cfg.resolve_for_data(n)
    if chosen and strategy.is_main:
        log.info("%s", chosen)
    budget_line = cfg.resolve_budget(n)
    crop_line = cfg.resolve_for_images(ds.image_size)
    arch_line = describe_downsample(cfg.arch, ds.image_size)
    if strategy.is_main:
        for line in (budget_line, crop_line, arch_line):
            if line:
                log.info("%s", line)
    cfg.validate_for_data(n)
    ds = _in_memory(ds, cfg, strategy.is_main)  # after the checks: decoding may take a while
    use_batch_aug = cfg.augment == "batch" or (cfg.augment == "auto" and getattr(ds, "array", None) is not None)
    if use_batch_aug and getattr(ds, "array", None) is None:
        raise InstdiscError(f"--augment batch needs an in-memory dataset; {cfg.data} is read from files (use pil)")
    data_info = {"n": n, "spec": cfg.data, "channels": ds.channels, "image_size": ds.image_size,
                 "mean": list(ds.mean), "std": list(ds.std), "fingerprint": ds.fingerprint(),
                 **({"geometry": ds.geometry} if getattr(ds, "geometry", None) else {})}
    strategy.check_data(cfg, n, data_info["fingerprint"])  # the same data in every process
    model = strategy.build_model(cfg, n_data=n, in_channels=ds.channels, image_size=ds.image_size)
    params = [p for p in model.parameters() if p.requires_grad]

    # Every check runs before anything is written: a refused run leaves the run directory as it was.
    knn_monitor = strategy.knn_monitor(cfg, ds) if cfg.knn_every else None  # refuses a monitor that cannot work
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, map_location="cpu")
        _check_resume_config(ckpt["config"], cfg, n, ckpt["data"], data_info["fingerprint"])
    elif resume:
        _check_restart(out, cfg, n, data_info["fingerprint"], run_existed)
    elif ckpt_path.exists():
        raise InstdiscError(f"{out} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    need = max(_checkpoint_bytes(model, params), ckpt_path.stat().st_size if ckpt is not None else 0)
    check_free_space(_existing_parent(out), need)
    check_writable_dir(out)
    stale = remove_stale_temps(out) + remove_stale_temps(cache_dir) if strategy.is_main else []
    if stale:
        log.warning("removed %d temp file(s) left by a killed run in %s, e.g. %s", len(stale), out, stale[0].name)

    use_channels_last(model.to(device))  # conv weights channels-last: faster oneDNN / cuDNN kernels
    compiled = resolve_compile(cfg.compile, device)
    embed = compile_embed(strategy.wrap(model), compiled)  # DDP over encoder + head in a distributed run; --compile
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batches = strategy.batches(cfg, ds, use_batch_aug)
    run = _Run(cfg, strategy, ds, model, embed, optimizer, batches,
               MetricsWriter.for_run(out, cfg, main=strategy.is_main), knn_monitor,
               HealthProbe(ds, cfg.seed, crop_min=cfg.crop_min, jitter=cfg.jitter, device=device), data_info,
               resolve_amp(cfg.amp, device), out)  # amp: bf16 autocast of encoder + head (CUDA; CPUs with bf16)
    run.budget_line = budget_line
    run.compiled = compiled
    run.pil_path = not use_batch_aug
    if cfg.time is not None:  # a resumed run keeps its plan and the seconds it had spent
        run.budget = TimeBudget.from_state((ckpt or {}).get("time_budget"), cfg.time, since=time.perf_counter() - t_call,
                                           hard_stop=strategy.world == 1)  # one clock must not split the ranks
    if ckpt is not None:
        _load(run, ckpt)
    else:
        _begin(run, use_batch_aug)
    run.history = _epoch_history(run.metrics.path)  # earlier epochs' records (a resumed run's warnings see them)
    length = (f"{run.total_steps} steps ({run.n_epochs} epochs of {run.steps_per_epoch})"
              if run.budget is None or run.budget.plan else f"steps fitted to --time ({run.steps_per_epoch} an epoch)")
    log.info("training %s on %d images (%s), %s, batch %d, device %s, augment %s, %s",
             cfg.arch, n, cfg.data, length, cfg.batch_size, device,
             "batch" if use_batch_aug else "pil", "bf16 autocast" if run.amp else "float32")
    if run.compiled:
        log.info("encoder + head compiled with torch.compile (--compile %s): the first step pays the compile", cfg.compile)
    return run


def _in_memory(ds, cfg: TrainConfig, is_main: bool):
    """A file dataset that fits in memory (instdisc.data.in_memory) is decoded once and trained through BatchAugment,
    unless --augment pil asks for the per-sample path; a larger one keeps the PIL path (said once)."""
    if ds.paths is None or cfg.augment == "pil":
        return ds
    if fits_in_memory(ds):
        return decode_into_memory(ds)
    if is_main:
        log.info("%d files take the per-sample PIL path: decoded they would take %.1f GiB, over the in-memory bound "
                 "of %d MiB", len(ds), decoded_bytes(ds) / 2**30, IN_MEMORY_MAX_BYTES >> 20)
    return ds


def _load(run: _Run, ckpt: dict) -> None:
    """Continue from ``ckpt``: weights, optimizer, position, RNG state, the epoch's losses so far."""
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.epoch, run.start, run.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        set_rng_state(ckpt["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstdiscError(f"cannot resume: {run.ckpt_path} does not fit this run ({first[:200]})") from None
    run.epoch, run.start, run.global_step = run.strategy.resume_position(ckpt, run.steps_per_epoch)
    run.losses = [float(x) for x in ckpt.get("epoch_losses", [])]
    run.step_stats = {k: [float(x) for x in v] for k, v in ckpt.get("epoch_stats", {}).items()}
    _truncate(run.metrics.path, ckpt.get("metrics_bytes"))  # drop records of steps that are replayed
    log.info("resumed %s at epoch %d step %d (global step %d)", run.ckpt_path, run.epoch + 1, run.start,
             run.global_step)


def _begin(run: _Run, use_batch_aug: bool) -> None:
    """A new run (or a restart of one that never saved): config.json, seeds, the bank from the encoder."""
    cfg, strategy = run.cfg, run.strategy
    _truncate(run.metrics.path, 0)  # a new record
    seed_everything(cfg.seed)  # global RNG state is then a function of (seed, step), saved and restored exactly
    resolved = cfg.to_dict()
    resolved.update(instdisc_version=__version__, git_commit=_git_commit(), device_resolved=str(run.device),
                    augment_resolved="batch" if use_batch_aug else "pil", amp_resolved=run.amp, compile_resolved=run.compiled,
                    dataset=run.data_info, steps_per_epoch=run.steps_per_epoch, torch_version=torch.__version__,
                    budget=run.budget_line, encoder_adapted=describe_downsample(cfg.arch, run.ds.image_size),
                    data_in_memory=getattr(run.ds, "decoded_from", None) == "files",
                    **strategy.run_info(cfg))
    if cfg.init_weights:  # the encoder starts from the file (each process alike); the bank below is built from it
        resolved["init_weights_loaded"] = load_init_weights(run.model.encoder, cfg.init_weights)  # path, SHA-256
    if strategy.is_main:
        atomic_write_text(run.out / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    if cfg.bank_init == "encoder":
        t0 = time.perf_counter()
        strategy.init_bank_from_encoder(run.model, run.ds, max(256, cfg.batch_size))  # each process: its rows
        log.info("memory bank initialised from the untrained encoder in %.1fs", time.perf_counter() - t0)
    if (cfg.neighbours or cfg.clusters) and cfg.neighbour_start == 0:
        _refresh_neighbours(run, 0)
    fault_point("train.before_first_checkpoint")  # test-only (instdisc.faultpoints): a kill before any save


def _fit(run: _Run, stop: _StopFlag) -> TrainResult:
    """Epochs until the run's steps are done (:attr:`_Run.total_steps`) or a stop request."""
    cfg = run.cfg
    progress = run.progress = Progress(run.total_steps, cfg.batch_size, run.global_step)
    interrupted = False
    run.model.train()
    with stop.installed():
        while run.epoch < run.n_epochs and run.global_step < run.total_steps:
            t_epoch = time.perf_counter()
            done = train_one_epoch(run, stop, progress)
            if done < run.steps_per_epoch and run.global_step < run.total_steps:  # a stop request: save, return
                interrupted = True
                run.checkpoint(run.epoch, done, run.losses, run.step_stats)
                run.strategy.raise_pending_data_error(done)  # an image became unreadable in some process
                log.warning("stopped by signal %d: checkpoint saved at epoch %d step %d; continue with --resume",
                            stop.signum, run.epoch + 1, done)
                break
            _end_epoch(run, time.perf_counter() - t_epoch)
    verdict = run.strategy.on_main(functools.partial(_verdict, run)) if not interrupted and cfg.verdict else None
    return TrainResult(run.out, run.epoch, run.global_step, interrupted, run.last_loss, run.model,
                       stop.signum if interrupted else None, verdict)


def _verdict(run: _Run) -> dict:
    """Does the run learn? The verdict record (instdisc.training.verdict), logged and written to metrics.jsonl."""
    record = run_verdict(run.model, run.cfg, run.ds, run.probe, run.data_info, device=run.device, epoch=run.epoch)
    run.metrics.write(record)
    (log.info if record["verdict"] == "learned" else log.warning)("%s", verdict_line(record))
    return record


def train_one_epoch(run: _Run, stop: _StopFlag, progress: Progress) -> int:
    """Train the steps ``run.start ..`` of epoch ``run.epoch``; returns the steps of the epoch done (fewer than
    ``steps_per_epoch`` when a stop was requested: the state is then at that step boundary, not yet saved)."""
    cfg, model, optimizer, strategy = run.cfg, run.model, run.optimizer, run.strategy
    spe, epoch, device = run.steps_per_epoch, run.epoch, run.device
    losses, step_stats = run.losses, run.step_stats

    def on_data_error(steps_done: int, error: BaseException) -> None:
        strategy.on_data_error(functools.partial(run.checkpoint, epoch, losses=losses, stats=step_stats),
                               steps_done, error)

    stopping = lambda: stop.signum is not None  # noqa: E731
    s_idx = run.start
    for s_idx, (idx, views) in enumerate(guarded(run.batches.epoch(epoch, run.start), run.start, on_data_error,
                                                 stopping), start=run.start):
        if strategy.any_true(stopping()):
            return s_idx
        if run.global_step >= run.total_steps:  # the run's last step was in this epoch (--steps, --time)
            return s_idx
        lr = lr_at(run.global_step, spe, base_lr=cfg.lr, epochs=run.n_epochs, schedule=cfg.schedule,
                   warmup_epochs=cfg.warmup_epochs, lr_steps=cfg.lr_steps, total_steps=run.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = idx.to(device)
        g_neg = torch.Generator(device=device).manual_seed(mix_seed(cfg.seed, epoch, s_idx, Stream.NEGATIVES))
        loss, stats, z_update = _step_loss(model, views, idx, cfg, g_neg, run.amp, run.embed)
        loss_value = strategy.mean(loss.item())  # the global batch's loss
        stats["loss"] = loss_value
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at epoch {epoch + 1} step {s_idx + 1}; the last good checkpoint is kept "
                f"at {run.ckpt_path if run.ckpt_path.exists() else '(none yet)'}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.objective.update(idx, z_update)
        run.global_step += 1
        run.steps_run += 1
        run.last_loss = loss_value
        if run.budget is not None:
            _after_step_budget(run)
        losses.append(loss_value)
        for key in _EPOCH_MEANS:
            if key in stats:
                step_stats.setdefault(key, []).append(stats[key])
        if run.global_step % cfg.log_every == 0 or s_idx + 1 == spe:
            sps, ips, eta = progress.rates(run.global_step)
            log.info("epoch %d/%d step %d/%d loss %.4f lr %.4f %.2f steps/s %.0f img/s ETA %s",
                     epoch + 1, run.n_epochs, s_idx + 1, spe, loss_value, lr, sps, ips, format_eta(eta))
            run.metrics.write({"type": "step", "epoch": epoch + 1, "step": s_idx + 1, "global_step": run.global_step,
                               "lr": lr, "steps_per_s": sps, "images_per_s": ips, "eta_s": eta, **stats})
        fault_point("train.step", index=run.global_step)  # test-only: kill (or slow) after step, before its save
        if cfg.save_every and run.global_step % cfg.save_every == 0 and s_idx + 1 < spe:
            run.checkpoint(epoch, s_idx + 1, losses, step_stats)
        if run.global_step >= run.total_steps:
            return s_idx + 1
    return spe


def _after_step_budget(run: _Run) -> None:
    """--time: make the step plan once the speed is measured (logged, and a ``plan`` record in metrics.jsonl)."""
    before = run.budget.plan
    if run.budget.after_step(run.global_step, run.steps_run) is not None:  # the same step in every process
        run.budget.plan = run.strategy.from_main(run.budget.plan)
        _record_plan(run, "measured" if before is None else "budget spent: stopped before the plan's end")


def _record_plan(run: _Run, why: str) -> None:
    """A new --time plan: the progress ETA follows it; one log line and a ``plan`` record."""
    run.progress.total_steps = run.total_steps
    b = run.budget
    log.info("%s (%s at step %d)", b.describe(), why, run.global_step)
    run.metrics.write({"type": "plan", "global_step": run.global_step, "steps": b.plan, "epochs": run.n_epochs,
                       "budget_s": b.seconds, "spent_s": b.spent(), "seconds_per_step": b.seconds_per_step,
                       "why": why})


def _end_epoch(run: _Run, seconds: float) -> None:
    """Close epoch ``run.epoch``: its record (means, health, kNN), the checkpoint at its end, warnings."""
    cfg, spe = run.cfg, run.steps_per_epoch
    losses, step_stats = run.losses, run.step_stats
    run.epoch, run.start = run.epoch + 1, 0
    epoch = run.epoch
    record = {"type": "epoch", "epoch": epoch, "global_step": run.global_step,
              "loss": float(np.mean(losses)) if losses else float("nan"), "seconds": seconds, **_means(step_stats)}
    try:  # the probe reads its images again (file datasets): one may have become unreadable meanwhile
        record.update(run.strategy.health(run.probe, run.model, epoch))
    except InstdiscError as e:
        # every step of the epoch is done; --resume starts at step spe of it and closes it as this run would
        run.strategy.on_data_error(lambda done: run.checkpoint(epoch - 1, done, losses, step_stats), spe, e)
        raise
    record["gap"] = record.get("pos_sim", float("nan")) - (
        record["neg_sim"] if math.isfinite(record.get("neg_sim", float("nan")))
        else record.get("inbatch_sim", float("nan")))
    if neighbours_due(cfg, epoch):  # before the checkpoint, which holds the new table
        record.update(_refresh_neighbours(run, epoch))
    if run.knn_monitor is not None and (epoch % cfg.knn_every == 0 or epoch == run.n_epochs):
        record.update(run.knn_monitor(run.model))
        log.info("epoch %d kNN (bank, k=%d) top1 %.2f%%", epoch, cfg.knn_k, 100 * record["knn_top1"])
    run.metrics.write(record)  # before the checkpoint, which records the metrics file's length
    run.losses, run.step_stats = [], {}
    if run.budget is not None and run.budget.replan and run.budget.plan is not None:  # saved with the checkpoint
        old = run.budget.plan
        run.budget.at_epoch_end(run.global_step)
        run.budget.plan = run.strategy.from_main(run.budget.plan)  # every process stops at the same step
        if run.budget.plan != old:
            _record_plan(run, "re-measured at an epoch end")
    run.checkpoint(epoch, 0, [])
    log.info("epoch %d/%d done in %.1fs, mean loss %.4f, pos/neg gap %.3f, staleness %.3f, uniformity %.2f, "
             "z_std %.4f", epoch, run.n_epochs, record["seconds"], record["loss"], record["gap"],
             *(record.get(k, float("nan")) for k in ("staleness", "uniformity", "z_std")))
    run.history.append(record)
    if run.pil_path and run.strategy.is_main:  # once: the measured rate, and what prepare would give
        run.pil_path = False
        rate = run.steps_run * cfg.batch_size * cfg.views / max(seconds, 1e-9)  # all in this, its first epoch
        log.warning("the per-sample PIL path trained %.0f view-images/s this epoch; `instdisc prepare %s --out "
                    "data.h5` decodes the files once, and `instdisc train cache:data.h5 ...` then trains through "
                    "BatchAugment (8,000 PNGs of 28 px on 2 CPU cores: ~275 images/s via PIL, ~1,600 from memory; "
                    "docs/large-collections.md)", rate, cfg.data)
    for text in health_warnings(run.history, cfg.low_dim):
        log.warning("epoch %d: %s", epoch, text)


def neighbours_due(cfg: TrainConfig, epochs_done: int) -> bool:
    """True when the bank's neighbour table is searched again after ``epochs_done`` epochs (the schedule of
    --neighbour-start / --neighbour-every; 0 = right after the bank's initialisation)."""
    return bool(cfg.neighbours or cfg.clusters) and epochs_done >= cfg.neighbour_start and \
        (epochs_done - cfg.neighbour_start) % cfg.neighbour_every == 0


def _refresh_neighbours(run: _Run, epochs_done: int) -> dict:
    """Search the bank for every slot's neighbours (a collective in a distributed run); the stats of the epoch
    record: stability, search seconds, index, and (a monitor only, never read by training) the share of neighbours
    with the same label when the data has labels."""
    objective = run.model.objective
    stats = objective.refresh_neighbours(seed=mix_seed(run.cfg.seed, epochs_done, Stream.NEIGHBOURS))
    nb = objective.neighbours
    if run.cfg.cluster_source == "labels":  # the label oracle (benchmarks): the true classes as the clusters
        nb.set_clusters(torch.as_tensor(np.asarray(run.ds.labels)))
    if nb.k:
        stats["neighbour_label_agreement"] = label_agreement(nb.slots.cpu(), run.ds.labels)
    if nb.clusters:
        stats["cluster_label_purity"] = cluster_purity(nb.assign.cpu(), run.ds.labels)
    log.info("bank neighbours (k=%d, clusters %d, %s) searched after epoch %d in %.2fs: %.3f of the pairs selected, "
             "%.3f kept since the last search; labels (a monitor): neighbours agree %.3f, cluster purity %.3f", nb.k,
             nb.clusters, stats["neighbour_index"], epochs_done, stats["neighbour_seconds"],
             stats.get("neighbour_selected", float("nan")), stats["neighbour_stability"],
             stats.get("neighbour_label_agreement", float("nan")), stats.get("cluster_label_purity", float("nan")))
    return stats


def _epoch_history(path: Path) -> list[dict]:
    """The epoch records already in ``metrics.jsonl`` (a resumed run's), oldest first."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "epoch":
            out.append(rec)
    return out


def _truncate(path: Path, nbytes: int | None) -> None:
    """Cut ``path`` back to ``nbytes`` (records written after the checkpoint that a resume replays)."""
    if nbytes is None or not path.exists() or path.stat().st_size <= nbytes:
        return
    with open(path, "r+b") as f:
        f.truncate(nbytes)


def _step_loss(model: InstDiscModel, views: list[torch.Tensor], idx: torch.Tensor, cfg: TrainConfig,
               g_neg: torch.Generator, amp: bool, embed=None):
    """Loss of one batch and the embedding that refreshes the batch's bank slots (``embed``: the DDP-wrapped
    encoder + head of a distributed run; default ``model.embed``)."""
    B = idx.shape[0]
    with autocast(idx.device, amp):
        z = (model.embed if embed is None else embed)(as_channels_last(torch.cat(views, 0)))  # (V*B, low_dim)
    z = F.normalize(z.float(), dim=1)
    if cfg.views == 1:
        loss, stats = model.objective(z, idx, generator=g_neg)
        return loss, stats, z.detach()
    z1, z2 = z[:B], z[B:]  # (B, low_dim) each
    if cfg.positive != "bank":  # "view", "view+bank": the other view is the positive of the view term
        l1, stats = model.objective(z1, idx, z_pos=z2, generator=g_neg)
        l2, _ = model.objective(z2, idx, z_pos=z1, generator=g_neg)
        loss = 0.5 * (l1 + l2)
    else:
        l1, stats = model.objective(z1, idx, generator=g_neg)
        l2, _ = model.objective(z2, idx, generator=g_neg)
        loss = 0.5 * (l1 + l2)
    stats = dict(stats, loss=float(loss.detach()))
    return loss, stats, F.normalize(z1.detach() + z2.detach(), dim=1)
