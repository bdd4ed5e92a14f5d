"""The training loop. Covered by tests/test_train_loop.py and tests/test_train_resume.py.

Every random choice of a step is drawn from a generator seeded by (seed, epoch, step) — the epoch's permutation,
the augmentations, the negatives — so a run resumed from any step boundary replays exactly what an uninterrupted
run does (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_text, check_writable_dir
from ..data import build_dataset
from ..data.transforms import TwoView, train_transform
from ..errors import InstdiscError
from ..features import extract_features
from ..method import InstDiscModel, build_model
from ..seeding import get_rng_state, set_rng_state
from ..version import __version__
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from .config import TrainConfig
from .progress import MetricsWriter, Progress, format_eta
from .schedule import lr_at

__all__ = ["train", "TrainResult", "resolve_device", "TrainingDiverged", "build_seeded_model"]

log = logging.getLogger("instdisc.train")

# Settings that may differ between a run and its resume (they do not change what is computed on CPU).
_RESUMABLE_CHANGES = {"out", "workers", "log_every", "save_every", "device", "epochs", "knn_every", "knn_data",
                      "data_root"}


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InstdiscError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so (seed, epoch, step) streams never collide in practice."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


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
            self.aug = BatchAugment(ds)
            self.array = ds.array.to(device) if device.type == "cuda" else ds.array
        else:
            self.transform = train_transform(ds)

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
                                                 persistent_workers=False)
            for xs, idx in loader:
                yield idx, [x.to(self.device, non_blocking=True) for x in xs]


def _check_resume_config(saved: dict, cfg: TrainConfig, n_data: int, ckpt_data: dict) -> None:
    if ckpt_data["n"] != n_data:
        raise InstdiscError(f"cannot resume: the checkpoint's memory bank has {ckpt_data['n']} slots but the dataset "
                            f"now has {n_data} images")
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


def _init_bank_from_encoder(model: InstDiscModel, ds, device, batch_size: int) -> None:
    was = model.training
    model.eval()
    feats = extract_features(model.embed, ds, batch_size=batch_size, device=device)
    model.objective.init_bank(torch.from_numpy(feats.features).to(device))
    model.train(was)


def train(cfg: TrainConfig, *, resume: bool = False, dataset=None, stop_flag: _StopFlag | None = None) -> TrainResult:
    """Train ``cfg`` into ``cfg.out``: ``config.json``, ``metrics.jsonl`` and ``checkpoint.pt`` (atomic).

    ``resume=True`` continues from ``cfg.out/checkpoint.pt``. Returns when the run ends or when SIGINT/SIGTERM asked it
    to stop (after saving a checkpoint at the step boundary).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else build_dataset(
        cfg.data, data_root=cfg.data_root, limit=cfg.limit, skip_bad_images=cfg.skip_bad_images,
        image_size=cfg.image_size)
    n = len(ds)
    cfg.validate_for_data(n)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if resume:
        if not ckpt_path.exists():
            raise InstdiscError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path, map_location="cpu")
        _check_resume_config(ckpt["config"], cfg, n, ckpt["data"])
    else:
        if ckpt_path.exists():
            raise InstdiscError(f"{out} already holds a checkpoint; pass --resume to continue it or choose a new --out")
        check_writable_dir(out)

    use_batch_aug = cfg.augment == "batch" or (cfg.augment == "auto" and getattr(ds, "array", None) is not None)
    if use_batch_aug and getattr(ds, "array", None) is None:
        raise InstdiscError(f"--augment batch needs an in-memory dataset; {cfg.data} is read from files (use pil)")
    data_info = {"n": n, "spec": cfg.data, "channels": ds.channels, "image_size": ds.image_size,
                 "mean": list(ds.mean), "std": list(ds.std)}

    model = build_seeded_model(cfg, n_data=n, in_channels=ds.channels, image_size=ds.image_size)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batches = _Batches(cfg, ds, device, use_batch_aug)
    spe = batches.steps_per_epoch
    total_steps = spe * cfg.epochs

    epoch, start, global_step = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, start, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at epoch %d step %d (global step %d)", ckpt_path, epoch + 1, start, global_step)
    else:
        resolved = cfg.to_dict()
        resolved.update(instdisc_version=__version__, git_commit=_git_commit(), device_resolved=str(device),
                        augment_resolved="batch" if use_batch_aug else "pil", dataset=data_info,
                        steps_per_epoch=spe, torch_version=torch.__version__)
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        if cfg.bank_init == "encoder":
            t0 = time.perf_counter()
            _init_bank_from_encoder(model, ds, device, max(256, cfg.batch_size))
            log.info("memory bank initialised from the untrained encoder in %.1fs", time.perf_counter() - t0)

    metrics = MetricsWriter(out / "metrics.jsonl")
    amp = cfg.amp and device.type == "cuda"
    stop = stop_flag or _StopFlag()

    def checkpoint(ep: int, step_in_epoch: int) -> None:
        save_checkpoint(ckpt_path, {
            "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": {"name": cfg.schedule, "step": global_step}, "epoch": ep, "step_in_epoch": step_in_epoch,
            "step": global_step, "rng": get_rng_state(), "data": data_info})

    progress = Progress(total_steps, cfg.batch_size, global_step)
    last_loss = float("nan")
    interrupted = False
    knn_monitor = _KnnMonitor(cfg, ds, device) if cfg.knn_every else None
    log.info("training %s on %d images (%s), %d epochs x %d steps, batch %d, device %s, augment %s",
             cfg.arch, n, cfg.data, cfg.epochs, spe, cfg.batch_size, device, "batch" if use_batch_aug else "pil")
    model.train()
    with stop.installed():
        while epoch < cfg.epochs:
            t_epoch, losses = time.perf_counter(), []
            for s_idx, (idx, views) in enumerate(batches.epoch(epoch, start), start=start):
                if stop.signum is not None:
                    interrupted = True
                    break
                lr = lr_at(global_step, spe, base_lr=cfg.lr, epochs=cfg.epochs, schedule=cfg.schedule,
                           warmup_epochs=cfg.warmup_epochs, lr_steps=cfg.lr_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = idx.to(device)
                g_neg = torch.Generator(device=device).manual_seed(_mix(cfg.seed, epoch, s_idx, 3))
                loss, stats, z_update = _step_loss(model, views, idx, cfg, g_neg, amp)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1} step {s_idx + 1}; the last good checkpoint "
                        f"is kept at {ckpt_path if ckpt_path.exists() else '(none yet)'}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.objective.update(idx, z_update)
                global_step += 1
                last_loss = loss.item()
                losses.append(last_loss)
                if global_step % cfg.log_every == 0 or s_idx + 1 == spe:
                    sps, ips, eta = progress.rates(global_step)
                    log.info("epoch %d/%d step %d/%d loss %.4f lr %.4f %.2f steps/s %.0f img/s ETA %s",
                             epoch + 1, cfg.epochs, s_idx + 1, spe, last_loss, lr, sps, ips, format_eta(eta))
                    metrics.write({"type": "step", "epoch": epoch + 1, "step": s_idx + 1, "global_step": global_step,
                                   "lr": lr, "steps_per_s": sps, "images_per_s": ips, "eta_s": eta, **stats})
                if cfg.save_every and global_step % cfg.save_every == 0 and s_idx + 1 < spe:
                    checkpoint(epoch, s_idx + 1)
            else:
                s_idx = spe - 1
            if interrupted:
                checkpoint(epoch, s_idx)
                log.warning("stopped by signal %d: checkpoint saved at epoch %d step %d; continue with --resume",
                            stop.signum, epoch + 1, s_idx)
                break
            epoch, start = epoch + 1, 0
            record = {"type": "epoch", "epoch": epoch, "global_step": global_step,
                      "loss": float(np.mean(losses)) if losses else float("nan"),
                      "seconds": time.perf_counter() - t_epoch}
            if knn_monitor is not None and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
                record.update(knn_monitor(model))
                log.info("epoch %d kNN (bank, k=%d) top1 %.2f%%", epoch, cfg.knn_k, record["knn_top1"])
            checkpoint(epoch, 0)
            metrics.write(record)
            log.info("epoch %d/%d done in %.1fs, mean loss %.4f", epoch, cfg.epochs, record["seconds"], record["loss"])
    return TrainResult(out, epoch, global_step, interrupted, last_loss, model)


def _step_loss(model: InstDiscModel, views: list[torch.Tensor], idx: torch.Tensor, cfg: TrainConfig,
               g_neg: torch.Generator, amp: bool):
    """Loss of one batch and the embedding that refreshes the batch's bank slots."""
    B = idx.shape[0]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        z = model.embed(torch.cat(views, 0))  # (V*B, low_dim)
    z = F.normalize(z.float(), dim=1)
    if cfg.views == 1:
        loss, stats = model.objective(z, idx, generator=g_neg)
        return loss, stats, z.detach()
    z1, z2 = z[:B], z[B:]  # (B, low_dim) each
    if cfg.positive == "view":
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
    """InstDisc's training-time monitor: the bank as gallery, held-out images embedded with the eval transform."""

    def __init__(self, cfg: TrainConfig, train_ds, device):
        from ..data import build_dataset as _build

        self.cfg, self.device = cfg, device
        self.train_labels = np.asarray(train_ds.labels)
        self.test_ds = _build(cfg.knn_data, data_root=cfg.data_root)
        if (self.train_labels < 0).all():
            raise InstdiscError("--knn-every needs labels in the training data")

    def __call__(self, model: InstDiscModel) -> dict:
        from ..knn import knn_evaluate

        was = model.training
        model.eval()
        test = extract_features(model.embed, self.test_ds, device=self.device)
        model.train(was)
        bank = F.normalize(model.objective.bank.memory.float(), dim=1).cpu().numpy()
        res = knn_evaluate(bank, self.train_labels, test.features, test.labels, k=self.cfg.knn_k, tau=self.cfg.nce_t)
        return {"knn_top1": res["top1"], "knn_top5": res.get("top5")}
