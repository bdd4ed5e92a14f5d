"""``instdisc train``. Covered by tests/test_cli_train.py."""
from __future__ import annotations

import os
import signal

import click

from instdisc.training import CHOICES, RECIPES, TrainConfig, train as train_run
from instdisc.training.config import DEFAULT_RECIPE
from instdisc.models import list_encoders
from instdisc.models.timm_encoder import LIST_HINT as TIMM_LIST_HINT

from .app import cli, data_options


@cli.command("train")
@click.argument("data")
@click.option("--out", "out", required=True, type=click.Path(), help="Run directory (checkpoint, config, metrics).")
@data_options
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="fast: learns quickly on a CPU budget; neighbours: fast with the bank's 10 nearest rows as extra "
              "positives (AND-style, docs/bank.md); paper: InstDisc exactly (NCE, bank positive, per-sample K).")
@click.option("--arch", default=None, help=f"Encoder: {', '.join(list_encoders())}, or timm:NAME for any timm model "
              f"(needs the [timm] extra; list the names with: {TIMM_LIST_HINT}) [default: convnet-s-pool2]. The "
              f"convnets drop stride-2 layers on tiny images (the last map stays >= 4 px); NAME@D sets D of them.")
@click.option("--init-weights", type=click.Path(), default=None,
              help="Start the encoder from a local file: a timm / torchvision state dict (.pth, .pt), a .safetensors "
                   "file, or an instdisc export or run folder (new runs only; recorded with its SHA-256).")
@click.option("--head", type=click.Choice(CHOICES["head"]), default=None, help="Projection head.")
@click.option("--low-dim", type=int, default=None, help="Embedding dimension (default 128).")
@click.option("--nce-k", type=int, default=None, help="Bank negatives K per sample (default 4096; 0: no bank negatives).")
@click.option("--nce-t", type=float, default=None, help="Temperature tau (default 0.07).")
@click.option("--nce-m", type=float, default=None, help="Bank momentum m (default 0.5).")
@click.option("--loss", type=click.Choice(CHOICES["loss"]), default=None)
@click.option("--negatives", type=click.Choice(CHOICES["negatives"]), default=None,
              help="K per sample (exact InstDisc), or one draw of K shared by the batch.")
@click.option("--positive", type=click.Choice(CHOICES["positive"]), default=None,
              help="The sample's bank slot (InstDisc), the other view's embedding, or both in two terms "
                   "(view vs in-batch negatives + own bank row vs bank negatives).")
@click.option("--bank-weight", type=float, default=None,
              help="--positive view+bank: weight w of the bank term, 1 - w of the view term (default 0.5).")
@click.option("--neighbours", type=int, default=None,
              help="k nearest stored rows (FAISS over the bank) that join the bank term's positive, AND-style "
                   "(0: off; see docs/bank.md).")
@click.option("--neighbour-start", type=int, default=None,
              help="First neighbour search after this many epochs (0: right after the bank's initialisation).")
@click.option("--neighbour-every", type=int, default=None, help="Search the bank again every this many epochs.")
@click.option("--neighbour-index", type=click.Choice(CHOICES["neighbour_index"]), default=None,
              help="FAISS index of the neighbour search (auto: exact up to 60k rows, IVF above).")
@click.option("--neighbour-select", type=float, default=None,
              help="Share of all (image, neighbour) pairs kept at each search, those of the largest cosine, and "
                   "of the images kept in a --clusters cluster, those nearest their centroid (AND's confidence "
                   "selection; default 1: all).")
@click.option("--in-batch/--no-in-batch", default=None, help="Also use the batch's other views as negatives.")
@click.option("--z-mode", type=click.Choice(CHOICES["z_mode"]), default=None, help="NCE normaliser Z.")
@click.option("--bank-dtype", type=click.Choice(CHOICES["bank_dtype"]), default=None)
@click.option("--bank-init", type=click.Choice(CHOICES["bank_init"]), default=None)
@click.option("--augment", type=click.Choice(CHOICES["augment"]), default=None,
              help="auto: whole batches in memory (BatchAugment; folders and lists of up to 1 GiB decoded are read "
                   "into memory once); pil: per-sample PIL transforms of the files.")
@click.option("--crop-min", type=float, default=None,
              help="Smallest crop area fraction (default 0.2 as InstDisc; images under 24 px: up to 0.6).")
@click.option("--jitter", type=float, default=None,
              help="Colour jitter strength: brightness, contrast, saturation (hue at most 0.5) [default: 0.4].")
@click.option("--epochs", type=int, default=None,
              help="Epochs (default 10, more on small data: at least 1500 optimiser steps; see docs/small-data.md).")
@click.option("--batch-size", type=int, default=None,
              help="Batch size (default 256; on small data down to 64 so that the run gets at least 1500 steps).")
@click.option("--steps", type=int, default=None, help="Optimiser steps in all, instead of --epochs.")
@click.option("--time", "time", default=None,
              help="Wall-clock budget, e.g. 90s, 10m, 1h30m: the run measures its speed after a few steps and fits "
                   "the number of steps and the learning-rate schedule to it (instead of --epochs).")
@click.option("--lr", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--schedule", type=click.Choice(CHOICES["schedule"]), default=None)
@click.option("--warmup-epochs", type=float, default=None)
@click.option("--image-size", type=int, default=None,
              help="Side of the images the encoder sees (folders, lists: default inferred from the images, at most "
                   "96 on a CPU and 224 on CUDA).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              callback=lambda ctx, p, v: None if v is None else int(v),
              help="Folders, lists: 1 (grayscale) or 3 (RGB) [default: inferred from the images].")
@click.option("--skip-bad-images", is_flag=True, default=None, help="Drop unreadable images instead of stopping.")
@click.option("--device", type=click.Choice(CHOICES["device"]), default=None)
@click.option("--no-amp", "amp", flag_value=False, default=None, help="Disable bf16 autocast (used on CUDA and on CPUs with native bf16).")
@click.option("--compile", "compile", type=click.Choice(CHOICES["compile"]), default=None,
              help="torch.compile the encoder + head: auto = where it measured faster (no device yet; "
                   "docs/training.md), on, off [default: auto].")
@click.option("--seed", type=int, default=None)
@click.option("--workers", type=int, default=None, help="DataLoader worker processes (file datasets).")
@click.option("--log-every", type=int, default=None)
@click.option("--save-every", type=int, default=None, help="Also checkpoint every N steps.")
@click.option("--knn-every", type=int, default=None, help="kNN-evaluate the bank every N epochs (needs --knn-data).")
@click.option("--knn-data", default=None, help="Labelled held-out dataset for --knn-every.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Also write the metrics.jsonl scalars as TensorBoard event files into this folder (needs the "
                   "[plot] extra).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (a run killed before its "
              "first checkpoint starts again from scratch if its config.json matches).")
@click.option("--no-verdict", "verdict", flag_value=False, default=None,
              help="Skip the end-of-run verdict (kNN of the learned vs the untrained encoder vs raw pixels on a "
                   "held-out slice of the training data; health signals without labels).")
@click.option("--sync-bn", is_flag=True, default=None,
              help="Distributed runs (torchrun): synchronise BatchNorm statistics across processes (CUDA only).")
@click.option("--index-cache", type=click.Path(file_okay=False), default=None,
              help="Folder caching the file index of folder and file-list datasets [default: OUT/.index-cache].")
def train_cmd(data, out, recipe, resume, index_cache, **opts):
    """Train an encoder on DATA (a dataset spec: fashion-mnist:train, cifar10, a folder, filelist:PATH).

    Launched with torchrun (WORLD_SIZE > 1) it trains with DDP and a memory bank sharded over the processes;
    --batch-size is then the global batch.

    SIGINT (Ctrl-C) or SIGTERM saves a checkpoint at the next step boundary and exits with 128 + the signal number
    (130, 143); `--resume` continues the run exactly.
    """
    cfg = TrainConfig.from_recipe(recipe, data=data, out=out, **opts)
    result = train_run(cfg, resume=resume, index_cache=index_cache)
    state = "interrupted (resume with --resume)" if result.interrupted else "done"
    if os.environ.get("RANK", "0") == "0":  # under torchrun: one summary line, from rank 0
        click.echo(f"{state}: {result.epochs_done} epochs, {result.global_step} steps, last loss "
                   f"{result.last_loss:.4f}, run in {result.run_dir}")
    if result.interrupted:  # checkpoint saved; 128 + signal (130 Ctrl-C, 143 SIGTERM) so `train && next` stops here
        raise SystemExit(128 + (result.stop_signal or signal.SIGTERM))
