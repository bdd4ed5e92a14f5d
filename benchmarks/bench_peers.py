"""Against the peers: instdisc, its no-bank control, lightly's SimCLR, MoCo v2 and NNCLR, and a label oracle, in one run.

Every arm trains the same encoder (``instdisc.models.build_encoder(--arch, in_channels=1, image_size=28)``, default
convnet-s-pool2) on the same Fashion-MNIST subset (the first ``--n`` images of fashion-mnist:train, as ``--limit``
takes them) for the same ``--epochs`` at the same ``--batch`` and ``--seed``, and is measured the same way: the
encoder's features (not the projection) through bench_quality's protocol (``_quality.measure``: weighted kNN, k = 200,
tau = 0.07, cosine, gallery the 60k training images, queries the 10k test images; and the linear probe unless
``--no-linear``). Per arm it reports kNN and linear top-1, seconds per epoch (median over the epochs after the first,
which pays for warm-up; the only epoch when there is one) and view-images/s (two views of every image an epoch
trains on, both arms drop the last partial batch: 2 x (N // B) x B / seconds per epoch).

    pip install -e '.[peers]'                                           # lightly, for the lightly arms and the oracle
    python benchmarks/bench_peers.py --threads 2                        # N 8000, B 64, 20 epochs: several hours on 2 cores
    python benchmarks/bench_peers.py --n 512 --epochs 1 --batch 64 --no-linear --threads 1 --workers 1   # smoke run

Arms (``--methods``, comma list; default all):

* ``instdisc``: ``instdisc.training.train`` on ``TrainConfig.from_recipe(DEFAULT_RECIPE)`` (``--recipe`` names
  another) as it is; ``control``: the same with ``nce_k=0, neighbours=0`` (in-batch negatives only, the bank never read).
  ``--instdisc-variant NAME=KEY=VALUE[&KEY=VALUE]`` (repeatable) adds more instdisc arms, values read as JSON. These
  arms run the way ``instdisc train`` runs: the recipe's batched augmentation on the uint8 array, channels-last, and
  bf16 autocast when instdisc resolves ``amp`` on for the device (the row records ``amp_resolved`` from the run's
  config.json; a variant ``fp32=amp=false`` forces float32). Their seconds per epoch are the ``seconds`` of the run's
  metrics.jsonl epoch records.
* ``simclr``, ``moco``, ``nnclr``: lightly 1.6 modules with the settings of lightly's CIFAR-10 benchmark and examples
  (``docs/source/getting_started/benchmarks/cifar10_benchmark.py``, ``examples/pytorch/*.py`` of lightly-ai/lightly),
  the ResNet-18's 512 replaced by our encoder's ``feature_dim`` D:
  SimCLR: ``SimCLRProjectionHead(D, 512, 128)``, ``NTXentLoss(temperature=0.5)`` on the two views.
  MoCo v2: ``MoCoProjectionHead(D, 512, 128)``; a key encoder + head, copies updated by ``update_momentum`` with an EMA
  that rises from 0.99 to 1 on a cosine over the run's steps (``cosine_schedule``); ``NTXentLoss(temperature=0.1,
  memory_bank_size=(4096, 128))``; the loss symmetrised over the two views as lightly's benchmark does (each call
  enqueues its keys).
  NNCLR: ``NNCLRProjectionHead(D, 512, 128)``, ``NNCLRPredictionHead(128, 512, 128)``, ``NNMemoryBankModule(size=(4096,
  128))`` (the nearest stored projection replaces z), ``NTXentLoss(temperature=0.5)``, 0.5 (l(nn(z0), p1) + l(nn(z1), p0)).
* ``oracle`` (a ceiling that reads the labels, never a method): supervised contrastive loss (``_supcon.supcon_loss``,
  Khosla et al. 2020) over the 2B views at temperature 0.1, with the SimCLR head and the same optimiser and views.

The lightly arms and the oracle share one training loop: SGD, lr 0.06 x B / 128, momentum 0.9, weight decay 5e-4 (on
every trained parameter, as lightly's benchmark), lr on a cosine from that value towards 0 over the run, set every
step; float32 on the CPU (lightly's default). Views: lightly's ``SimCLRTransform(input_size=28, gaussian_blur=0.0,
min_scale=0.2, normalize=the data's mean / std)`` on 1-channel PIL ("L") images made from the uint8 array, in a torch
DataLoader with ``--workers`` worker processes, shuffled by ``torch.Generator().manual_seed(seed)``, drop_last. The
transform works on "L" images as it is (checked): brightness and contrast jitter act; saturation jitter, hue jitter and
RandomGrayscale leave a 1-channel image unchanged, so the views are crop + flip + brightness/contrast, the same kinds of
change instdisc's recipe makes on gray images.

Seeds: ``torch.manual_seed(seed)`` before each lightly/oracle arm builds its model, so its heads start from torch's
global RNG under the same seed (SimCLR's and the oracle's heads are identical); the encoder is then given the weights
instdisc's own seeded model starts from (``instdisc.method.build_seeded_model(cfg).encoder``; instdisc draws them from
a seed stream of its own), so every arm's encoder starts from the same weights. The global RNG is seeded again before
the epochs, so with ``--workers 0`` the views of every lightly arm are the same; with workers they draw their seeds
from the loader's generator, the same for every arm too.

Prints per-epoch lines for the lightly arms (loss, seconds, view-images/s) and the epoch losses of the instdisc arms,
then a markdown table (method | kNN top-1 | linear top-1 | s/epoch | view-images/s | delta kNN vs control) for the
README, and writes JSON (``--json-out``, default benchmarks/results/bench_peers.json; rewritten after every arm, with
``"complete": false`` until the end): machine, command, argv, settings, rows with per-epoch losses and seconds, the table.
An arm whose loss turns NaN or infinite is reported as diverged and the run goes on. Not part of ``make test`` or
``make bench``; lightly stays out of the core install (extra ``peers``) and is imported only when an arm needs it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import _machine
import numpy as np
import torch
from torch import nn

from _quality import PROTOCOL, epoch_records, measure, parse_set
from _supcon import supcon_loss
from instdisc.data import build_dataset
from instdisc.method import build_seeded_model
from instdisc.models import build_encoder
from instdisc.training import TrainConfig, TrainingDiverged, train
from instdisc.training.config import DEFAULT_RECIPE

TRAIN, TEST = "fashion-mnist:train", "fashion-mnist:test"
CHANNELS, SIZE = 1, 28

METHODS: dict[str, str] = {  # --methods name -> the table's label
    "instdisc": "instdisc default",
    "control": "instdisc no-bank control",
    "simclr": "SimCLR (lightly)",
    "moco": "MoCo v2 (lightly)",
    "nnclr": "NNCLR (lightly)",
    "oracle": "label oracle (SupCon, ceiling)",
}
CONTROL = {"nce_k": 0, "neighbours": 0}  # the no-bank control's overrides of the recipe
PEERS = ("simclr", "moco", "nnclr", "oracle")  # the arms trained by train_peer (they need lightly)

# lightly's recommended settings (CIFAR-10 benchmark / examples), the backbone's width replaced by feature_dim
HIDDEN, PROJ = 512, 128       # projection head: feature_dim -> 512 -> 128; NNCLR's predictor 128 -> 512 -> 128
BANK = 4096                   # MoCo's negatives queue, NNCLR's support set
SIMCLR_T, MOCO_T, NNCLR_T, ORACLE_T = 0.5, 0.1, 0.5, 0.1
MOCO_EMA = (0.99, 1.0)        # key-encoder momentum, cosine from the first to the second value over the run's steps
LR_PER_128, SGD_MOMENTUM, WEIGHT_DECAY = 0.06, 0.9, 5e-4
MIN_SCALE = 0.2


def require_lightly() -> None:
    """Import lightly or stop with one line saying how to install it."""
    try:
        import lightly  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"bench_peers: the lightly arms need lightly ({e}); install it with: "
                         "pip install -e '.[peers]'") from None


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=KEY=VALUE[&KEY=VALUE]`` -> (NAME, overrides), values read as JSON (else kept as text)."""
    name, sep, rest = text.partition("=")
    if not name or not sep or "=" not in rest or any("=" not in kv for kv in rest.split("&")):
        raise argparse.ArgumentTypeError(f"wants NAME=KEY=VALUE[&KEY=VALUE], got {text!r}")
    return name, parse_set(rest.split("&"))


def cosine_lr(step: int, steps: int, base: float) -> float:
    """base x (1 + cos(pi step / steps)) / 2: the lr of step 0 .. steps - 1 (per-step form of lightly's
    CosineAnnealingLR over the epochs)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def per_epoch_seconds(seconds: list[float]) -> float:
    """The median seconds of the epochs after the first (the only one when there is one)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


# --------------------------------------------------------------------------------------------------- the peers
class Peer(nn.Module):
    """An encoder under a lightly method: ``before_step`` changes state outside autograd (momentum encoders), ``loss``
    scores one batch of two views x0, x1 (B, 1, 28, 28) with labels y (B,) (only the oracle reads them)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.backbone = encoder

    @torch.no_grad()
    def before_step(self, step: int, steps: int) -> None:
        pass

    def loss(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SimCLR(Peer):
    """NT-Xent over the 2B projections of the batch (Chen et al. 2020), lightly's modules."""

    def __init__(self, encoder: nn.Module):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(encoder)
        self.projection_head = SimCLRProjectionHead(encoder.feature_dim, HIDDEN, PROJ)
        self.criterion = NTXentLoss(temperature=SIMCLR_T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))  # (B, 128)

    def loss(self, x0, x1, y):
        return self.criterion(self(x0), self(x1))


class MoCo(Peer):
    """MoCo v2 (Chen et al. 2020): queries from the encoder, keys from its EMA copy, a queue of 4096 past keys as
    negatives (inside lightly's NTXentLoss), symmetrised over the two views."""

    def __init__(self, encoder: nn.Module):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__(encoder)
        self.projection_head = MoCoProjectionHead(encoder.feature_dim, HIDDEN, PROJ)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=MOCO_T, memory_bank_size=(BANK, PROJ))

    @torch.no_grad()
    def before_step(self, step: int, steps: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, steps, *MOCO_EMA)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))  # (B, 128) queries

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x))  # (B, 128)

    def loss(self, x0, x1, y):
        q0, q1 = self(x0), self(x1)
        k0, k1 = self.keys(x0), self.keys(x1)
        return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))


class NNCLR(Peer):
    """NNCLR (Dwibedi et al. 2021): the nearest neighbour of z in a support set of 4096 past projections is the positive
    of the other view's prediction."""

    def __init__(self, encoder: nn.Module):
        from lightly.loss import NTXentLoss
        from lightly.models.modules import NNCLRPredictionHead, NNCLRProjectionHead, NNMemoryBankModule

        super().__init__(encoder)
        self.projection_head = NNCLRProjectionHead(encoder.feature_dim, HIDDEN, PROJ)
        self.prediction_head = NNCLRPredictionHead(PROJ, HIDDEN, PROJ)
        self.memory_bank = NNMemoryBankModule(size=(BANK, PROJ))
        self.criterion = NTXentLoss(temperature=NNCLR_T)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x))  # (B, 128)
        return z.detach(), self.prediction_head(z)  # (B, 128) each

    def loss(self, x0, x1, y):
        (z0, p0), (z1, p1) = self(x0), self(x1)
        z0 = self.memory_bank(z0, update=False)  # lightly's bank: the lookup, and the write of z1 below, in forward
        z1 = self.memory_bank(z1, update=True)
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


class Oracle(Peer):
    """The label oracle: SimCLR's head, supervised contrastive loss over the 2B views (every view of the class is a
    positive). A ceiling for what the encoder can learn in this budget, not a method."""

    def __init__(self, encoder: nn.Module):
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(encoder)
        self.projection_head = SimCLRProjectionHead(encoder.feature_dim, HIDDEN, PROJ)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))  # (B, 128)

    def loss(self, x0, x1, y):
        z = torch.cat([self(x0), self(x1)])  # (2B, 128)
        return supcon_loss(z, torch.cat([y, y]), temperature=ORACLE_T)


PEER_CLASSES: dict[str, type[Peer]] = {"simclr": SimCLR, "moco": MoCo, "nnclr": NNCLR, "oracle": Oracle}


# ------------------------------------------------------------------------------------------------------- views
class PilViews(torch.utils.data.Dataset):
    """Row i of a uint8 (N, 1, H, W) array as a PIL "L" image through ``transform``: (views, label)."""

    def __init__(self, array: np.ndarray, labels: np.ndarray, transform):
        if array.ndim != 4 or array.shape[1] != 1 or array.dtype != np.uint8 or len(labels) != len(array):
            raise ValueError(f"PilViews wants uint8 (N, 1, H, W) images and N labels, got {array.dtype} "
                             f"{array.shape} and {len(labels)} labels")
        self.array, self.labels, self.transform = array, labels, transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.array[i, 0])), int(self.labels[i])  # 2-d uint8 -> mode "L"


def _seed_worker(worker_id: int) -> None:
    """numpy in a loader worker from the seed torch gave that worker (lightly's GaussianBlur draws from numpy)."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


def view_loader(ds, batch: int, seed: int, workers: int) -> torch.utils.data.DataLoader:
    """Shuffled, drop_last batches ((x0, x1), y) of two lightly SimCLR views of ``ds``'s images."""
    from lightly.transforms import SimCLRTransform

    transform = SimCLRTransform(input_size=SIZE, gaussian_blur=0.0, min_scale=MIN_SCALE,
                                normalize={"mean": list(ds.mean), "std": list(ds.std)})
    array = np.ascontiguousarray(np.asarray(ds.array))  # (N, 1, 28, 28) uint8
    views = PilViews(array, np.asarray(ds.labels), transform)
    return torch.utils.data.DataLoader(views, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker,
                                       persistent_workers=workers > 0)


# ------------------------------------------------------------------------------------------------------- the arms
class Interrupted(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def train_instdisc(name: str, label: str, overrides: dict, args, work: Path) -> dict:
    """Train one instdisc arm through ``instdisc.training.train``; its row (without the measurement)."""
    out = work / name.replace(" ", "-").replace("/", "-")
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig.from_recipe(args.recipe, data=TRAIN, out=str(out), limit=args.n, epochs=args.epochs,
                                  batch_size=args.batch, seed=args.seed, arch=args.arch, log_every=10 ** 9,
                                  **overrides)
    row = {"method": name, "label": label, "family": "instdisc", "recipe": args.recipe, "overrides": overrides,
           "config": cfg.to_dict()}
    t0 = time.perf_counter()
    try:
        res = train(cfg)
    except TrainingDiverged as e:
        return {**row, "diverged": str(e), "train_seconds": time.perf_counter() - t0}
    if res.interrupted:
        print(f"interrupted by signal {res.stop_signal}: stopping the benchmark", flush=True)
        raise Interrupted(128 + (res.stop_signal or 15))
    recs = epoch_records(out)
    seconds = [r["seconds"] for r in recs]
    images = (args.n // args.batch) * args.batch
    for r in recs:
        print(f"  {name} epoch {r['epoch']}/{args.epochs} loss {r['loss']:.4f} {r['seconds']:.1f}s "
              f"{2 * images / r['seconds']:.0f} view-img/s", flush=True)
    spe = per_epoch_seconds(seconds)
    amp = json.loads((out / "config.json").read_text()).get("amp_resolved") if (out / "config.json").exists() else None
    return {**row, "nce_k": res.model.objective.k, "amp_resolved": amp, "train_seconds": time.perf_counter() - t0,
            "epoch_loss": [r["loss"] for r in recs], "epoch_seconds": seconds, "seconds_per_epoch": spe,
            "view_images_per_s": 2 * images / spe, "epochs_log": recs, "encoder": res.model.encoder}


def train_peer(method: str, train_ds, init_encoder: dict, args) -> dict:
    """Train one lightly arm (or the oracle) with the shared loop; its row (without the measurement)."""
    torch.manual_seed(args.seed)
    encoder = build_encoder(args.arch, in_channels=CHANNELS, image_size=SIZE)
    encoder.load_state_dict(init_encoder)
    model = PEER_CLASSES[method](encoder)
    torch.manual_seed(args.seed)  # the views (with --workers 0) no longer depend on what the model drew
    loader = view_loader(train_ds, args.batch, args.seed, args.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = LR_PER_128 * args.batch / 128
    opt = torch.optim.SGD(params, lr=base_lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    steps = len(loader) * args.epochs
    row = {"method": method, "label": METHODS[method], "family": "oracle" if method == "oracle" else "lightly",
           "settings": {"base_lr": base_lr, "sgd_momentum": SGD_MOMENTUM, "weight_decay": WEIGHT_DECAY,
                        "schedule": "cosine per step", "steps": steps, "precision": "float32",
                        "trained_parameters": sum(p.numel() for p in params)}}
    recs, step, t_start = [], 0, time.perf_counter()
    model.train()
    for epoch in range(1, args.epochs + 1):
        t0, losses, images = time.perf_counter(), [], 0
        for (x0, x1), y in loader:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, base_lr)
            model.before_step(step, steps)
            loss = model.loss(x0, x1, y)
            if not torch.isfinite(loss):
                msg = f"loss {loss.item()} at epoch {epoch} step {step}"
                print(f"  {method} diverged: {msg}", flush=True)
                return {**row, "diverged": msg, "epochs_log": recs, "train_seconds": time.perf_counter() - t_start}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            images += len(y)
            step += 1
        seconds = time.perf_counter() - t0
        rec = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": seconds, "images": images,
               "lr_end": opt.param_groups[0]["lr"]}
        recs.append(rec)
        print(f"  {method} epoch {epoch}/{args.epochs} loss {rec['loss']:.4f} {seconds:.1f}s "
              f"{2 * images / seconds:.0f} view-img/s", flush=True)
    spe = per_epoch_seconds([r["seconds"] for r in recs])
    return {**row, "train_seconds": time.perf_counter() - t_start, "epoch_loss": [r["loss"] for r in recs],
            "epoch_seconds": [r["seconds"] for r in recs], "seconds_per_epoch": spe,
            "view_images_per_s": 2 * recs[-1]["images"] / spe, "epochs_log": recs, "encoder": model.backbone}


# ------------------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    """The README's markdown table; the delta is against the no-bank control's kNN top-1 of the same run."""
    ctrl = next((r for r in rows if r["method"] == "control" and "knn_top1" in r), None)
    lines = ["| method | kNN top-1 | linear top-1 | s/epoch | view-images/s | Δ kNN vs control |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "diverged" in r:
            lines.append(f"| {r['label']} | diverged | | | | |")
            continue
        lin = f"{r['linear_top1']:.2f}" if "linear_top1" in r else "—"
        delta = "(control)" if r is ctrl else (f"{r['knn_top1'] - ctrl['knn_top1']:+.2f}" if ctrl else "—")
        lines.append(f"| {r['label']} | {r['knn_top1']:.2f} | {lin} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['view_images_per_s']:.0f} | {delta} |")
    return "\n".join(lines)


def settings() -> dict:
    return {"data": TRAIN, "test": TEST, "lightly": {
        "simclr": f"SimCLRProjectionHead(D, {HIDDEN}, {PROJ}), NTXentLoss(temperature={SIMCLR_T})",
        "moco": f"MoCoProjectionHead(D, {HIDDEN}, {PROJ}), update_momentum EMA cosine {MOCO_EMA[0]} -> {MOCO_EMA[1]} per "
                f"step, NTXentLoss(temperature={MOCO_T}, memory_bank_size=({BANK}, {PROJ})), symmetrised",
        "nnclr": f"NNCLRProjectionHead(D, {HIDDEN}, {PROJ}), NNCLRPredictionHead({PROJ}, {HIDDEN}, {PROJ}), "
                 f"NNMemoryBankModule(size=({BANK}, {PROJ})), NTXentLoss(temperature={NNCLR_T}), symmetrised",
        "oracle": f"SimCLRProjectionHead(D, {HIDDEN}, {PROJ}), supervised contrastive loss (Khosla et al. 2020, "
                  f"L_out) over 2B views, temperature {ORACLE_T}",
        "optimiser": f"SGD lr {LR_PER_128} x B / 128, momentum {SGD_MOMENTUM}, weight decay {WEIGHT_DECAY}, cosine "
                     "per step",
        "views": f"SimCLRTransform(input_size={SIZE}, gaussian_blur=0.0, min_scale={MIN_SCALE}, normalize=data "
                 "mean/std) on PIL L images",
    }, "control_overrides": CONTROL}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8000, help="training images (the first N of fashion-mnist:train)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="convnet-s-pool2", help="the encoder of every arm (instdisc's registry)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"the instdisc arms' recipe (default {DEFAULT_RECIPE})")
    ap.add_argument("--instdisc-variant", action="append", default=[],
                    metavar="NAME=KEY=VALUE[&KEY=VALUE]", help="one more instdisc arm: the recipe with these overrides")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=2, help="PIL worker processes of the lightly arms' loader")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    ap.add_argument("--work", default="/tmp/instdisc-bench-peers", help="instdisc run directories (replaced)")
    ap.add_argument("--json-out", default=str(_machine.REPO / "benchmarks" / "results" / "bench_peers.json"))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    try:
        variants = [parse_variant(v) for v in args.instdisc_variant]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--instdisc-variant {e}")
    names = [n for n, _ in variants]
    if len(set(names)) != len(names) or set(names) & set(METHODS):
        ap.error(f"--instdisc-variant names must be unique and differ from the methods, got {', '.join(names)}")
    if args.n < args.batch or args.batch < 2 or args.epochs < 1 or args.workers < 0:
        ap.error(f"need 2 <= --batch <= --n, --epochs >= 1, --workers >= 0; got n {args.n}, batch {args.batch}, "
                 f"epochs {args.epochs}, workers {args.workers}")
    if any(m in PEERS for m in methods):
        require_lightly()  # before hours of instdisc training, not after
    if args.threads:
        torch.set_num_threads(args.threads)

    arms: list[tuple[str, str, dict | None]] = []  # (name, label, instdisc overrides or None for a peer)
    for m in methods:
        if m == "instdisc":
            arms.append((m, f"{METHODS[m]} ({args.recipe})", {}))
        elif m == "control":
            arms.append((m, METHODS[m], dict(CONTROL)))
        else:
            arms.append((m, METHODS[m], None))
    arms += [(f"instdisc {n}", f"instdisc {n}", o) for n, o in variants]

    gallery, queries = build_dataset(TRAIN), build_dataset(TEST)
    train_ds = build_dataset(TRAIN, limit=args.n)
    init_encoder = build_seeded_model(TrainConfig.from_recipe(args.recipe, arch=args.arch, seed=args.seed),
                                      n_data=args.n, in_channels=CHANNELS, image_size=SIZE).encoder.state_dict()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    command = " ".join([_machine.command_line("bench_peers.py", args, skip=("json_out", "instdisc_variant")),
                        *(f"--instdisc-variant '{v}'" for v in args.instdisc_variant)])

    def save(complete: bool) -> Path:
        payload = {"benchmark": "bench_peers", "complete": complete, "machine": _machine.machine_info(),
                   "command": command, "argv": vars(args),
                   "protocol": PROTOCOL, "settings": settings(), "rows": rows, "table": table(rows)}
        return _machine.write_json(args.json_out, payload)

    for name, label, overrides in arms:
        print(f"{label}: training N {args.n}, B {args.batch}, {args.epochs} epochs, seed {args.seed}", flush=True)
        try:
            if overrides is None:
                row = train_peer(name, train_ds, init_encoder, args)
            else:
                row = train_instdisc(name, label, overrides, args, work)
        except Interrupted as e:
            save(False)
            return e.code
        except KeyboardInterrupt:
            print("interrupted: stopping the benchmark", flush=True)
            save(False)
            return 130
        encoder = row.pop("encoder", None)
        if encoder is not None:
            t0 = time.perf_counter()
            row.update(measure(encoder, gallery, queries, not args.no_linear))
            row["measure_seconds"] = time.perf_counter() - t0
            print(f"{label}: kNN {row['knn_top1']:.2f}  linear {row.get('linear_top1', float('nan')):.2f}  "
                  f"{row['seconds_per_epoch']:.1f} s/epoch  {row['view_images_per_s']:.0f} view-img/s", flush=True)
        rows.append(row)
        save(False)

    print()
    print(table(rows))
    print(f"\nwrote {save(True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
