"""The training loop. Covered by tests/test_train_loop.py and tests/test_train_resume.py.

Every random choice of a step is drawn from a generator seeded by (seed, epoch, step) — the epoch's permutation,
the augmentations, the negatives — so a run resumed from any step boundary replays exactly what an uninterrupted
run does (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..seeding import mix_seed as _mix
from ..atomic import atomic_write_text, check_free_space, check_writable_dir, remove_stale_temps
from ..data import build_dataset
from ..data.transforms import TwoView, train_transform
from ..errors import InstdiscError
from ..faultpoints import fault_point
from ..features import extract_features
from ..method import InstDiscModel, build_model
from ..seeding import get_rng_state, seed_everything, set_rng_state
from ..version import __version__
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from .config import TrainConfig
from .precision import as_channels_last, autocast, resolve_amp, use_channels_last
from .health import HealthProbe, health_warnings
from .progress import MetricsWriter, Progress, format_eta
from .schedule import lr_at

__all__ = ["train", "TrainResult", "resolve_device", "TrainingDiverged", "build_seeded_model"]

log = logging.getLogger("instdisc.training")

# Settings that may differ between a run and its resume (they do not change what is computed on CPU).
_RESUMABLE_CHANGES = {"out", "workers", "log_every", "save_every", "device", "epochs", "knn_every", "knn_data",
                      "data_root", "tensorboard"}


# Step statistics of the objective whose epoch means go into the epoch record (see Objective.forward).
_EPOCH_MEANS = ("pos_sim", "neg_sim", "own_sim", "inbatch_sim", "bank_share")


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InstdiscError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)




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


class _SeededTwoView(torch.utils.data.Dataset):
    """PIL path: sample j of epoch e is augmented under torch seed mix(seed, e, j), whatever worker loads it."""

    def __init__(self, ds, transform, seed: int, epoch: int, views: int):
        self.ds, self.t, self.seed, self.epoch, self.views = ds, transform, seed, epoch, views

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, j):
        img = self.ds.load_image(j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, self.epoch, j, 7))
            xs = tuple(self.t(img) for _ in range(self.views))
        return xs, j


class _Batches:
    """Yields (idx (B,) long, [view (B,C,S,S) float, ...]) for steps start..steps_per_epoch-1 of an epoch."""

    def __init__(self, cfg: TrainConfig, ds, device: torch.device, use_batch_aug: bool):
        self.cfg, self.ds, self.device, self.use_batch_aug = cfg, ds, device, use_batch_aug
        self.steps_per_epoch = len(ds) // cfg.batch_size
        if use_batch_aug:
            from ..data.batch_aug import BatchAugment
            self.aug = BatchAugment(ds, scale=(cfg.crop_min, 1.0))
            on_disk = getattr(ds, "memmapped", False)  # an image cache is read from its memmap, batch by batch
            self.array = ds.array.to(device) if device.type == "cuda" and not on_disk else ds.array
        else:
            self.transform = train_transform(ds, scale=(cfg.crop_min, 1.0))
            if getattr(ds, "paths", None) is not None:  # JPEG draft: the smallest crop still has >= S source pixels
                from ..data.images import DRAFT_MARGIN

                self.ds = ds.with_draft(max(DRAFT_MARGIN, 1 / math.sqrt(cfg.crop_min)))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.cfg.seed, epoch, 1))
        return torch.randperm(len(self.ds), generator=g)  # (N,)

    def epoch(self, epoch: int, start: int):
        cfg, B = self.cfg, self.cfg.batch_size
        perm = self.permutation(epoch)[: self.steps_per_epoch * B].view(self.steps_per_epoch, B)
        if self.use_batch_aug:
            for s in range(start, self.steps_per_epoch):
                idx = perm[s]
                x = self.array[idx.to(self.array.device)].to(self.device, non_blocking=True)  # (B, C, H, W) uint8
                g = torch.Generator(device=self.device).manual_seed(_mix(cfg.seed, epoch, s, 2))
                yield idx, [self.aug(x, generator=g) for _ in range(cfg.views)]
        else:
            src = _SeededTwoView(self.ds, self.transform, cfg.seed, epoch, cfg.views)
            loader = torch.utils.data.DataLoader(src, batch_sampler=[p.tolist() for p in perm[start:]],
                                                 num_workers=cfg.workers,
                                                 pin_memory=self.device.type == "cuda",
                                                 persistent_workers=False,
                                                 worker_init_fn=_ignore_sigint if cfg.workers else None,
                                                 # its base seed from here, not the global RNG (saved in checkpoints)
                                                 generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch, 4)))
            for xs, idx in _worker_batches(loader):
                yield idx, [x.to(self.device, non_blocking=True) for x in xs]


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C is the main process's to handle (it saves and stops at a step boundary)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` with SIGINT blocked in this thread while the worker processes start.

    A Ctrl-C reaches the whole process group. A forked worker inherits the blocked mask, so it cannot die of a
    Ctrl-C before ``_ignore_sigint`` runs; the signal itself is not lost: the kernel hands it to another thread of
    this process, or to this one when the mask is restored, and the stop flag's handler runs. (A spawned worker
    does not keep the mask; if one dies of a Ctrl-C while starting, ``_guarded`` turns its death into the stop.)
    """
    if (not loader.num_workers or not hasattr(signal, "pthread_sigmask")
            or threading.current_thread() is not threading.main_thread()):
        return iter(loader)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _worker_batches(loader: torch.utils.data.DataLoader):
    """Iterate ``loader`` (workers started by ``_start_workers``) and shut its workers down when the consumer stops,
    here rather than in the iterator's ``__del__``, where an error (e.g. a worker killed by the same Ctrl-C) would
    be printed as a traceback after a clean stop."""
    it = _start_workers(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as e:  # noqa: BLE001 - the run already stopped cleanly; say it and go on
                log.debug("DataLoader worker shutdown: %s", e)


class _DataError(InstdiscError):
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


def _guarded(batches, start: int, save, stopping=lambda: False):
    """Yield from the batch iterator of an epoch that starts at step ``start``. When an image cannot be read, call
    ``save(steps_done)`` (every yielded batch was trained on: the state is at a step boundary) and raise a one-line
    :class:`_DataError` naming the file (DataLoader workers' errors are unwrapped). When the batches fail while a
    stop was requested (``stopping()``: a DataLoader worker killed by the same Ctrl-C), yield ``(None, None)``
    instead, so the loop stops at this step boundary as for any signal."""
    done = start
    try:
        for item in batches:
            yield item
            done += 1
    except InstdiscError as e:
        save(done)
        raise _DataError(data_error_message(e, done)) from None
    except RuntimeError as e:
        if not stopping():
            raise
        log.info("the batches stopped after the stop signal (%s)", (str(e).strip().splitlines() or ["?"])[0][:200])
        yield None, None  # the loop sees the stop request before using the batch


def _check_resume_config(saved: dict, cfg: TrainConfig, n_data: int, ckpt_data: dict, fingerprint: str) -> None:
    if ckpt_data.get("n") != n_data:
        raise InstdiscError(f"cannot resume: the checkpoint's memory bank has {ckpt_data.get('n')} slots but the "
                            f"dataset now has {n_data} images")
    if ckpt_data.get("fingerprint") not in (None, fingerprint):
        raise InstdiscError(f"cannot resume: the dataset's content changed since the run started (fingerprint "
                            f"{fingerprint}, the run has {ckpt_data['fingerprint']}): same size, other images")
    now = cfg.to_dict()
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        k = diff[0]
        raise InstdiscError(f"cannot resume: setting {k!r} is {now[k]!r} but the checkpoint was trained with "
                            f"{saved.get(k)!r} ({len(diff)} setting(s) differ)")


def build_seeded_model(cfg: TrainConfig, *, n_data: int, in_channels: int, image_size: int) -> InstDiscModel:
    """The model a run with ``cfg.seed`` starts from. Layer init draws from torch's global RNG, so it runs inside
    ``fork_rng`` under a seed derived from ``cfg.seed``: the same weights every time, global state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(cfg.seed, 0, 5))
        gen = torch.Generator().manual_seed(_mix(cfg.seed, 0))
        return build_model(cfg, n_data=n_data, in_channels=in_channels, image_size=image_size, generator=gen)


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


def _init_bank_from_encoder(model: InstDiscModel, ds, device, batch_size: int) -> None:
    was = model.training
    model.eval()
    feats = extract_features(model.embed, ds, batch_size=batch_size, device=device, desc="memory bank init")
    model.objective.init_bank(torch.from_numpy(feats.features).to(device))
    model.train(was)


def train(cfg: TrainConfig, *, resume: bool = False, dataset=None, stop_flag: _StopFlag | None = None,
          index_cache: str | os.PathLike | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.out``: ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` (atomic).

    ``resume=True`` continues from ``cfg.out/checkpoint.pt``. Returns when the run ends or when SIGINT/SIGTERM asked it
    to stop (after saving a checkpoint at the step boundary). ``index_cache``: folder caching the file index of folder
    and file-list datasets (default ``cfg.out/.index-cache``). Launched by torchrun with WORLD_SIZE > 1, the run is
    distributed over the processes, with a sharded memory bank (see :mod:`instdisc.distributed`).
    """
    cfg.validate()
    from ..distributed.session import DistributedRun  # [distributed] None unless WORLD_SIZE > 1

    dist = DistributedRun.from_env(cfg)
    try:
        return _train(cfg, resume, dataset, stop_flag, index_cache, dist)
    finally:
        if dist is not None:
            dist.close()


def _train(cfg: TrainConfig, resume: bool, dataset, stop_flag, index_cache, dist) -> TrainResult:
    device = resolve_device(cfg.device) if dist is None else dist.device
    run_existed = Path(cfg.out).is_dir()  # before the index cache (default OUT/.index-cache) can create it
    cache_dir = index_cache if index_cache is not None else Path(cfg.out) / ".index-cache"
    with contextlib.nullcontext() if dist is None else dist.local_main_first():  # [distributed] one lister per node
        ds = dataset if dataset is not None else build_dataset(
            cfg.data, data_root=cfg.data_root, limit=cfg.limit, skip_bad_images=cfg.skip_bad_images,
            image_size=cfg.image_size, channels=cfg.channels, cache_dir=cache_dir)
    n = len(ds)
    chosen = cfg.resolve_for_data(n)
    if chosen and (dist is None or dist.is_main):
        log.info("%s", chosen)
    cfg.validate_for_data(n)
    use_batch_aug = cfg.augment == "batch" or (cfg.augment == "auto" and getattr(ds, "array", None) is not None)
    if use_batch_aug and getattr(ds, "array", None) is None:
        raise InstdiscError(f"--augment batch needs an in-memory dataset; {cfg.data} is read from files (use pil)")
    data_info = {"n": n, "spec": cfg.data, "channels": ds.channels, "image_size": ds.image_size,
                 "mean": list(ds.mean), "std": list(ds.std), "fingerprint": ds.fingerprint(),
                 **({"geometry": ds.geometry} if getattr(ds, "geometry", None) else {})}
    if dist is None:
        model = build_seeded_model(cfg, n_data=n, in_channels=ds.channels, image_size=ds.image_size)
    else:  # [distributed] same data on every rank; this rank's N/W bank rows only
        dist.check_data(cfg, n, data_info["fingerprint"])
        model = dist.build_model(cfg, n_data=n, in_channels=ds.channels, image_size=ds.image_size)
    params = [p for p in model.parameters() if p.requires_grad]

    # Every check runs before anything is written: a refused run leaves the run directory as it was.
    knn_monitor = ((_KnnMonitor(cfg, ds, device) if dist is None else dist.knn_monitor(cfg, ds))
                   if cfg.knn_every else None)  # refuses a monitor that cannot work, before any step
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
    stale = remove_stale_temps(out) + remove_stale_temps(cache_dir) if dist is None or dist.is_main else []
    if stale:
        log.warning("removed %d temp file(s) left by a killed run in %s, e.g. %s", len(stale), out, stale[0].name)

    use_channels_last(model.to(device))  # conv weights channels-last: faster oneDNN / cuDNN kernels
    embed = None if dist is None else dist.wrap(model)  # [distributed] DDP over encoder + head
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batches = _Batches(cfg, ds, device, use_batch_aug) if dist is None else dist.batches(cfg, ds, device, use_batch_aug)
    spe = batches.steps_per_epoch
    total_steps = spe * cfg.epochs
    metrics = MetricsWriter.for_run(out, cfg, main=dist is None or dist.is_main)

    amp = resolve_amp(cfg.amp, device)  # bf16 autocast of encoder + head (CUDA; CPUs with native bf16)
    epoch, start, global_step, epoch_losses, epoch_stats = 0, 0, 0, [], {}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            epoch, start, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
            set_rng_state(ckpt["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InstdiscError(f"cannot resume: {ckpt_path} does not fit this run ({first[:200]})") from None
        if dist is not None or "distributed" in ckpt:  # [distributed] another world size: epoch ends only
            from ..distributed.session import resume_position

            epoch, start, global_step = resume_position(ckpt, spe, 1 if dist is None else dist.world)
        epoch_losses = [float(x) for x in ckpt.get("epoch_losses", [])]
        epoch_stats = {k: [float(x) for x in v] for k, v in ckpt.get("epoch_stats", {}).items()}
        _truncate(metrics.path, ckpt.get("metrics_bytes"))  # drop records of steps that are replayed
        log.info("resumed %s at epoch %d step %d (global step %d)", ckpt_path, epoch + 1, start, global_step)
    else:
        _truncate(metrics.path, 0)  # a new run (or a restart of one that never saved) starts a new record
        seed_everything(cfg.seed)  # global RNG state is then a function of (seed, step), saved and restored exactly
        resolved = cfg.to_dict()
        resolved.update(instdisc_version=__version__, git_commit=_git_commit(), device_resolved=str(device),
                        augment_resolved="batch" if use_batch_aug else "pil", amp_resolved=amp, dataset=data_info,
                        steps_per_epoch=spe, torch_version=torch.__version__)
        if dist is not None:
            resolved["distributed"] = dist.checkpoint_info(cfg)
        if dist is None or dist.is_main:
            atomic_write_text(out / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        if cfg.bank_init == "encoder":
            t0 = time.perf_counter()
            if dist is None:
                _init_bank_from_encoder(model, ds, device, max(256, cfg.batch_size))
            else:  # [distributed] every rank embeds its own slots
                dist.init_bank_from_encoder(model, ds, max(256, cfg.batch_size))
            log.info("memory bank initialised from the untrained encoder in %.1fs", time.perf_counter() - t0)
        fault_point("train.before_first_checkpoint")  # test-only (instdisc.faultpoints): a kill before any save

    stop = stop_flag or _StopFlag()

    def checkpoint(ep: int, step_in_epoch: int, losses: list[float], stats: dict | None = None) -> None:
        state = model.state_dict() if dist is None else dist.full_state_dict(model)  # [distributed] bank -> rank 0
        if state is not None:
            save_checkpoint(ckpt_path, {
                "config": cfg.to_dict(), "model": state, "optimizer": optimizer.state_dict(),
                "scheduler": {"name": cfg.schedule, "step": global_step}, "epoch": ep, "step_in_epoch": step_in_epoch,
                "step": global_step, "rng": get_rng_state(), "data": data_info, "epoch_losses": list(losses),
                "epoch_stats": {k: list(v) for k, v in (stats or {}).items()},
                "metrics_bytes": metrics.path.stat().st_size if metrics.path.exists() else 0,
                **({} if dist is None else {"distributed": dist.checkpoint_info(cfg)})})
        if dist is not None:
            dist.barrier()  # the file exists before any rank goes on

    progress = Progress(total_steps, cfg.batch_size, global_step)
    last_loss = float("nan")
    interrupted, stop_signal = False, None
    log.info("training %s on %d images (%s), %d epochs x %d steps, batch %d, device %s, augment %s, %s",
             cfg.arch, n, cfg.data, cfg.epochs, spe, cfg.batch_size, device, "batch" if use_batch_aug else "pil",
             "bf16 autocast" if amp else "float32")
    health = HealthProbe(ds, cfg.seed, crop_min=cfg.crop_min, device=device)
    history = _epoch_history(metrics.path)  # earlier epochs' records (a resumed run's warnings see them)
    model.train()
    with stop.installed():
        while epoch < cfg.epochs:
            t_epoch, losses, epoch_losses = time.perf_counter(), epoch_losses, []
            step_stats, epoch_stats = epoch_stats, {}  # the epoch's step statistics (kept in mid-epoch checkpoints)
            on_data_error = (functools.partial(checkpoint, epoch, losses=losses, stats=step_stats)  # (steps) -> save
                             if dist is None else dist.data_error)
            for s_idx, (idx, views) in enumerate(_guarded(batches.epoch(epoch, start), start, on_data_error,
                                                          lambda: stop.signum is not None), start=start):
                if (stop.signum is not None) if dist is None else dist.any_true(stop.signum is not None):
                    interrupted = True
                    break
                lr = lr_at(global_step, spe, base_lr=cfg.lr, epochs=cfg.epochs, schedule=cfg.schedule,
                           warmup_epochs=cfg.warmup_epochs, lr_steps=cfg.lr_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = idx.to(device)
                g_neg = torch.Generator(device=device).manual_seed(_mix(cfg.seed, epoch, s_idx, 3))
                loss, stats, z_update = _step_loss(model, views, idx, cfg, g_neg, amp, embed)
                loss_value = loss.item() if dist is None else dist.mean(loss.item())  # [distributed] global batch
                if dist is not None:
                    stats["loss"] = loss_value
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"loss became {loss_value} at epoch {epoch + 1} step {s_idx + 1}; the last good checkpoint "
                        f"is kept at {ckpt_path if ckpt_path.exists() else '(none yet)'}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.objective.update(idx, z_update)
                global_step += 1
                last_loss = loss_value
                losses.append(last_loss)
                for key in _EPOCH_MEANS:
                    if key in stats:
                        step_stats.setdefault(key, []).append(stats[key])
                if global_step % cfg.log_every == 0 or s_idx + 1 == spe:
                    sps, ips, eta = progress.rates(global_step)
                    log.info("epoch %d/%d step %d/%d loss %.4f lr %.4f %.2f steps/s %.0f img/s ETA %s",
                             epoch + 1, cfg.epochs, s_idx + 1, spe, last_loss, lr, sps, ips, format_eta(eta))
                    metrics.write({"type": "step", "epoch": epoch + 1, "step": s_idx + 1, "global_step": global_step,
                                   "lr": lr, "steps_per_s": sps, "images_per_s": ips, "eta_s": eta, **stats})
                fault_point("train.step", index=global_step)  # test-only: kill (or slow) after step, before its save
                if cfg.save_every and global_step % cfg.save_every == 0 and s_idx + 1 < spe:
                    checkpoint(epoch, s_idx + 1, losses, step_stats)
            else:
                s_idx = spe - 1
            if interrupted:
                stop_signal = stop.signum
                checkpoint(epoch, s_idx, losses, step_stats)
                if dist is not None:
                    dist.raise_data_error(s_idx)  # [distributed] an image became unreadable: saved, now stop
                log.warning("stopped by signal %d: checkpoint saved at epoch %d step %d; continue with --resume",
                            stop_signal, epoch + 1, s_idx)
                break
            epoch, start = epoch + 1, 0
            record = {"type": "epoch", "epoch": epoch, "global_step": global_step,
                      "loss": float(np.mean(losses)) if losses else float("nan"),
                      "seconds": time.perf_counter() - t_epoch, **_means(step_stats)}
            try:  # the probe reads its images again (file datasets): one may have become unreadable meanwhile
                record.update(health(model, epoch) if dist is None else dist.health(health, model, epoch))
            except InstdiscError as e:
                if dist is not None:
                    raise
                # every step of the epoch is done; --resume starts at step spe of it and closes it as this run would
                checkpoint(epoch - 1, spe, losses, step_stats)
                raise _DataError(data_error_message(e, spe)) from None
            record["gap"] = record.get("pos_sim", float("nan")) - (
                record["neg_sim"] if math.isfinite(record.get("neg_sim", float("nan")))
                else record.get("inbatch_sim", float("nan")))
            if knn_monitor is not None and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
                record.update(knn_monitor(model))
                log.info("epoch %d kNN (bank, k=%d) top1 %.2f%%", epoch, cfg.knn_k, 100 * record["knn_top1"])
            metrics.write(record)  # before the checkpoint, which records the metrics file's length
            checkpoint(epoch, 0, [])
            log.info("epoch %d/%d done in %.1fs, mean loss %.4f, pos/neg gap %.3f, staleness %.3f, uniformity %.2f, "
                     "z_std %.4f", epoch, cfg.epochs, record["seconds"], record["loss"], record["gap"],
                     *(record.get(k, float("nan")) for k in ("staleness", "uniformity", "z_std")))
            history.append(record)
            for text in health_warnings(history, cfg.low_dim):
                log.warning("epoch %d: %s", epoch, text)
    return TrainResult(out, epoch, global_step, interrupted, last_loss, model, stop_signal)


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


class _KnnMonitor:
    """InstDisc's training-time monitor: the bank as gallery, held-out images embedded with the eval transform.

    Built before training starts, so a setting that cannot work is refused before any step: the held-out set is
    built at the training data's image size and channels, and only labelled bank slots and labelled held-out images
    take part (the rest are left out, with a log line saying how many)."""

    def __init__(self, cfg: TrainConfig, train_ds, device):
        from ..data import build_dataset as _build

        self.cfg, self.device = cfg, device
        self.train_labels = np.asarray(train_ds.labels)
        self.gallery_rows = np.flatnonzero(self.train_labels >= 0)  # (G,) bank slots that vote
        if len(self.gallery_rows) == 0:
            raise InstdiscError("--knn-every needs labels in the training data")
        if len(self.gallery_rows) < len(self.train_labels):
            log.warning("kNN monitor: %d of %d training images are unlabeled; the gallery is the %d labelled bank "
                        "slots", len(self.train_labels) - len(self.gallery_rows), len(self.train_labels),
                        len(self.gallery_rows))
        self.test_ds = _build(cfg.knn_data, data_root=cfg.data_root, image_size=train_ds.image_size,
                              channels=train_ds.channels)
        if self.test_ds.channels != train_ds.channels:
            raise InstdiscError(f"--knn-data {cfg.knn_data} has {self.test_ds.channels}-channel images but the "
                                f"training data has {train_ds.channels}")
        test_labels = np.asarray(self.test_ds.labels)
        self.query_rows = np.flatnonzero(test_labels >= 0)  # (Q,) held-out images that are scored
        if len(self.query_rows) == 0:
            raise InstdiscError(f"--knn-data {cfg.knn_data} has no labelled images (a kNN monitor needs labels)")
        if len(self.query_rows) < len(test_labels):
            log.warning("kNN monitor: %d of %d --knn-data images are unlabeled and are not scored",
                        len(test_labels) - len(self.query_rows), len(test_labels))

    def _queries(self, model: InstDiscModel):
        was = model.training
        model.eval()
        test = extract_features(model.embed, self.test_ds, device=self.device, desc="kNN monitor features")
        model.train(was)
        return test.features[self.query_rows], test.labels[self.query_rows]  # (Q, D), (Q,)

    def __call__(self, model: InstDiscModel) -> dict:
        from ..knn import knn_evaluate

        q, q_labels = self._queries(model)
        bank = F.normalize(model.objective.bank.memory.float(), dim=1).cpu().numpy()[self.gallery_rows]  # (G, D)
        res = knn_evaluate(bank, self.train_labels[self.gallery_rows], q, q_labels, k=self.cfg.knn_k,
                           tau=self.cfg.nce_t)
        return {"knn_top1": res["top1"], "knn_top5": res.get("top5")}
