"""Every training setting in one validated dataclass. Covered by tests/test_train_config.py."""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from ..bank import BANK_DTYPES, DEFAULT_K, auto_k
from ..bank_neighbours import NEIGHBOUR_INDEXES
from ..data.transforms import CROP_SCALE, JITTER
from ..device import DEVICES
from ..errors import InstdiscError
from ..models.head import HEADS
from ..normaliser import Z_MODES
from ..objective import LOSSES, NEGATIVES, POSITIVES
from .compiled import COMPILE_MODES
from .schedule import SCHEDULES

__all__ = ["TrainConfig", "RECIPES", "CHOICES", "DEFAULT_RECIPE", "DEFAULT_EPOCHS", "DEFAULT_BATCH", "MIN_STEPS",
           "SMALL_DATA_MIN_BATCH", "parse_duration"]

# The allowed values of each setting that is a choice, each list spelled once (in the module that implements it);
# the CLI's options and TrainConfig.validate both read them from here.
CHOICES: dict[str, tuple[str, ...]] = {
    "loss": LOSSES, "negatives": NEGATIVES, "positive": POSITIVES, "z_mode": Z_MODES,
    "bank_dtype": tuple(BANK_DTYPES), "bank_init": ("random", "encoder"), "augment": ("auto", "batch", "pil"),
    "device": DEVICES, "schedule": SCHEDULES, "head": HEADS, "neighbour_index": NEIGHBOUR_INDEXES,
    "cluster_source": ("bank", "labels"), "compile": COMPILE_MODES,
}

# Named recipes: "fast" learns quickly on a CPU budget (measured, see README); "neighbours" is fast with the bank's
# 10 nearest rows joining the bank term's positive (AND-style, docs/bank.md); "paper" is InstDisc as published.
_FAST = dict(loss="infonce", positive="view+bank", negatives="shared", in_batch=True, bank_init="encoder",
             head="mlp", lr=0.2, weight_decay=5e-4, schedule="cosine", warmup_epochs=0.2)
RECIPES: dict[str, dict] = {
    "fast": dict(_FAST),
    "neighbours": dict(_FAST, neighbours=10),
    "paper": dict(loss="nce", positive="bank", negatives="per-sample", in_batch=False, bank_init="random",
                  head="linear", lr=0.03, weight_decay=5e-4, schedule="step", warmup_epochs=0.0, z_mode="first-batch",
                  views=1),
}


DEFAULT_RECIPE = "fast"  # what `instdisc train` and TrainConfig.from_recipe() use when no recipe is named

# The training budget when --epochs / --batch-size / --steps / --time are not given (TrainConfig.resolve_budget):
# 10 epochs of 256, but never fewer than MIN_STEPS optimiser steps: on small data the batch first shrinks (to no less
# than SMALL_DATA_MIN_BATCH), then the epochs grow. Measured: 8,000 28 px images at 256 x 10 epochs (310 steps) end
# below raw pixels, at 64 x 10 (1,250 steps) above them (docs/small-data.md).
DEFAULT_EPOCHS = 10
DEFAULT_BATCH = 256
SMALL_DATA_MIN_BATCH = 64
MIN_STEPS = 1500

NEIGHBOUR_SHARE = 20  # a recipe's bank neighbours are at most N / 20 images (resolve_for_data): 10 from 200 up

CROP_MIN = CROP_SCALE[0]  # InstDisc's RandomResizedCrop scale (0.2, 1)
TINY_SIDE = 24  # images under this side get a larger smallest crop (crop_min_for)


def crop_min_for(image_size: int) -> float:
    """The smallest crop area fraction for ``image_size`` px images: 0.2 (InstDisc) from 24 px up; below, 0.2 x
    24 / size, at most 0.6 (16 px: 0.3, 12 px: 0.4, 8 px: 0.6), so that the smallest crop keeps about as many
    pixels across as at 24 px (sqrt(0.2 x 24 x 24) ~ 11 px) instead of a few."""
    if image_size >= TINY_SIDE:
        return CROP_MIN
    return round(min(0.6, CROP_MIN * TINY_SIDE / image_size), 2)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)", re.IGNORECASE)


def parse_duration(text) -> float:
    """Seconds of a duration written ``90s``, ``10m``, ``1h30m``, ``1.5h`` or a bare number of seconds; InstdiscError
    naming the problem otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        t = str(text).strip().replace(" ", "")
        try:
            seconds = float(t)
        except ValueError:
            parts = _DURATION.findall(t)
            if not parts or "".join(a + u for a, u in parts).lower() != t.lower():
                raise InstdiscError(f"--time must be a duration such as 90s, 10m or 1h30m, got {text!r}") from None
            seconds = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for a, u in parts)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise InstdiscError(f"--time must be a positive duration, got {text!r}")
    return seconds


@dataclass
class TrainConfig:
    data: str = "fashion-mnist:train"
    out: str = "runs/run"
    data_root: str | None = None
    limit: int | None = None
    image_size: int | None = None
    channels: int | None = None        # folders / lists: 1 or 3 (default: inferred from the images)
    skip_bad_images: bool = False
    recipe: str = "fast"
    arch: str = "convnet-s-pool2"
    init_weights: str | None = None    # start the encoder from this local file (state dict, .safetensors, export)
    head: str = "mlp"
    low_dim: int = 128
    epochs: int | None = None          # None: DEFAULT_EPOCHS, more on small data (resolve_budget)
    batch_size: int | None = None      # None: DEFAULT_BATCH, less on small data (resolve_budget)
    steps: int | None = None           # optimiser steps in all (instead of whole epochs); --time sets it
    time: float | None = None          # seconds: fit the steps to this budget after measuring the speed
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"           # cosine | step | constant
    lr_steps: tuple[float, ...] = (0.6, 0.8)  # fractions of the run where "step" multiplies lr by 0.1
    warmup_epochs: float = 0.2
    nce_k: int | None = None           # bank negatives K; None: DEFAULT_K, fewer on small datasets (resolve_for_data)
    nce_t: float = 0.07
    nce_m: float = 0.5
    loss: str = "infonce"              # nce | infonce | softmax
    negatives: str = "shared"          # shared | per-sample
    positive: str = "view+bank"        # bank | view | view+bank | neighbour | view+neighbour
    bank_weight: float = 0.5           # positive view+bank: weight w of the bank term, (1 - w) of the view term
    neighbours: int = 0                # k_nb nearest stored rows joining the bank term's positive (0: off)
    neighbour_start: int = 1           # first search after this many epochs (0: right after the bank's init)
    neighbour_every: int = 1           # then every this many epochs
    neighbour_index: str = "auto"      # auto | flat | ivf (FAISS; auto: exact up to 60k rows)
    neighbour_select: float = 1.0      # share of (slot, neighbour) pairs / cluster members kept per search: the
    #                                    most similar pairs, the members nearest their centroid (AND's selection)
    clusters: int = 0                  # C: k-means clusters over the bank; same-cluster batch samples are positives
    cluster_source: str = "bank"       # bank | labels (the label oracle: a ceiling for benchmarks, never a method)
    in_batch: bool = True
    views: int = 2                     # 1: one augmented view per image (paper), 2: two views
    z_mode: str = "running"            # first-batch | running  (NCE normaliser Z)
    bank_dtype: str = "float32"        # float32 | float16 | bfloat16
    bank_init: str = "encoder"         # random | encoder (eval-transform embeddings of the untrained model)
    augment: str = "auto"              # auto | batch | pil
    crop_min: float | None = None      # RandomResizedCrop keeps a fraction in [crop_min, 1] of the image area
    #                                    (None: 0.2, more for images under 24 px: crop_min_for)
    jitter: float = JITTER             # colour jitter strength: brightness, contrast, saturation (hue at most 0.5)
    device: str = "auto"               # auto | cpu | cuda
    amp: bool = True                   # bf16 autocast of encoder + head on CUDA and on CPUs with native bf16
    compile: str = "auto"              # auto | on | off: torch.compile of encoder + head (auto: where it measured faster)
    seed: int = 0
    workers: int = 0
    log_every: int = 50
    save_every: int = 0                # also checkpoint every N steps (0: only at epoch ends)
    knn_every: int = 0
    knn_data: str | None = None
    knn_k: int = 200
    tensorboard: str | None = None     # folder for TensorBoard event files (the metrics.jsonl scalars), needs [plot]
    sync_bn: bool = False              # distributed runs on CUDA: SyncBatchNorm over the processes
    verdict: bool = True               # end-of-run verdict: learned vs untrained vs raw pixels (training/verdict.py)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides) -> "TrainConfig":
        """Config for a named recipe; ``overrides`` (non-None values) win over the recipe's values."""
        if recipe not in RECIPES:
            raise InstdiscError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        values = dict(RECIPES[recipe])
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("nce_k") == 0 and "neighbours" not in given:
            values.pop("neighbours", None)  # the no-bank control: no bank to search either
        values.update(given)
        values["recipe"] = recipe
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InstdiscError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        extra = dict(d.get("extra") or {})
        if "sync_bn" in extra:  # runs saved before sync_bn was a setting carried it in extra
            d.setdefault("sync_bn", bool(extra.pop("sync_bn")))
            d["extra"] = extra
        if "lr_steps" in d:
            d["lr_steps"] = tuple(d["lr_steps"])
        return cls(**d)

    def validate(self) -> None:
        def bad(msg: str):
            raise InstdiscError(msg)

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                bad(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.nce_t > 0:
            bad(f"--nce-t (temperature tau) must be > 0, got {self.nce_t}")
        if not 0 <= self.nce_m < 1:
            bad(f"--nce-m (bank momentum m) must be in [0, 1), got {self.nce_m}")
        if self.nce_k is not None and self.nce_k < 0:
            bad(f"--nce-k must be >= 0, got {self.nce_k}")
        if self.nce_k == 0 and self.loss != "softmax" and not (
                self.loss == "infonce" and self.positive != "bank" and self.in_batch):
            bad("--nce-k 0 (no bank negatives) needs --loss infonce --positive view --in-batch: the in-batch "
                "negatives are then the only ones")
        if self.positive == "view+bank" and (self.loss != "infonce" or not self.in_batch):
            bad("--positive view+bank needs --loss infonce and --in-batch")
        if self.neighbours < 0:
            bad(f"--neighbours must be >= 0, got {self.neighbours}")
        if self.neighbours and not (self.loss == "infonce" and self.positive in ("bank", "view+bank")
                                    and self.nce_k != 0):
            bad("--neighbours needs --loss infonce, --positive view+bank (or bank) and bank negatives (--nce-k > 0): "
                "the neighbours join the bank term's positive")
        if self.clusters < 0 or self.clusters == 1:
            bad(f"--clusters must be 0 or >= 2, got {self.clusters}")
        if self.clusters and not (self.loss == "infonce" and self.in_batch and self.positive in ("view", "view+bank")):
            bad("--clusters needs --loss infonce, --in-batch and --positive view+bank (or view): same-cluster samples "
                "of the batch join the view term's positive")
        if not 0.0 < self.neighbour_select <= 1.0:
            bad(f"--neighbour-select must be in (0, 1], got {self.neighbour_select}")
        if self.neighbour_start < 0:
            bad(f"--neighbour-start must be >= 0, got {self.neighbour_start}")
        if self.neighbour_every < 1:
            bad(f"--neighbour-every must be >= 1, got {self.neighbour_every}")
        if self.epochs is not None and self.epochs < 1:
            bad(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            bad(f"--batch-size must be >= 2, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            bad(f"--steps must be >= 1, got {self.steps}")
        if self.time is not None:
            self.time = parse_duration(self.time)
        given = [name for name, v in (("--epochs", self.epochs), ("--steps", self.steps), ("--time", self.time))
                 if v is not None]
        if len(given) > 1:
            bad(f"give one of --epochs, --steps and --time, not {' and '.join(given)}: each sets the length of the run")
        if not self.lr > 0:
            bad(f"--lr must be > 0, got {self.lr}")
        if self.low_dim < 1:
            bad(f"--low-dim must be >= 1, got {self.low_dim}")
        if self.views not in (1, 2):
            bad(f"views must be 1 or 2, got {self.views}")
        if self.positive != "bank" and self.views != 2:
            bad(f"--positive {self.positive} needs two views per image")
        if not 0 < self.bank_weight <= 1:
            bad(f"--bank-weight must be in (0, 1], got {self.bank_weight}")
        if self.in_batch and self.views != 2:
            bad("in-batch negatives need two views per image")
        if self.crop_min is not None and not 0 < self.crop_min <= 1:
            bad(f"--crop-min must be in (0, 1], got {self.crop_min}")
        if not 0 <= self.jitter <= 1:
            bad(f"--jitter must be in [0, 1], got {self.jitter}")
        from ..models.registry import check_arch

        check_arch(self.arch)  # before any data is read
        if self.init_weights is not None and not os.path.exists(self.init_weights):
            bad(f"--init-weights {self.init_weights}: no such file or folder")
        if self.workers < 0:
            bad(f"--workers must be >= 0, got {self.workers}")
        if self.image_size is not None and self.image_size < 8:  # the encoders' smallest input
            bad(f"--image-size must be >= 8, got {self.image_size}")
        if self.log_every < 1:
            bad(f"--log-every must be >= 1, got {self.log_every}")
        if self.save_every < 0:
            bad(f"--save-every must be >= 0 (0: only at epoch ends), got {self.save_every}")
        if self.knn_every < 0:
            bad(f"--knn-every must be >= 0, got {self.knn_every}")
        if self.knn_k < 1:
            bad(f"knn_k must be >= 1, got {self.knn_k}")
        if not self.warmup_epochs >= 0:
            bad(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not self.weight_decay >= 0:
            bad(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum}")
        if self.channels not in (None, 1, 3):
            bad(f"--channels must be 1 or 3, got {self.channels}")
        if self.limit is not None and self.limit < 1:
            bad(f"--limit must be >= 1, got {self.limit}")
        if self.knn_every and not self.knn_data:
            bad("--knn-every needs --knn-data (a labelled held-out dataset)")
        if self.tensorboard is not None:
            from .tensorboard import require_tensorboard

            require_tensorboard()  # fail before any work when the package is missing

    def resolve_for_data(self, n_data: int) -> str | None:
        """Fill in what depends on the dataset size (K when --nce-k was not given; a recipe's neighbours, at most
        N / NEIGHBOUR_SHARE); returns a line saying what was chosen, or None."""
        lines = []
        if self.nce_k is None:
            self.nce_k = auto_k(n_data)
            why = "the default" if self.nce_k == DEFAULT_K else f"half of the {n_data} images (default {DEFAULT_K})"
            lines.append(f"bank negatives K = {self.nce_k} ({why}; set --nce-k to choose)")
        recipe_nb = RECIPES.get(self.recipe, {}).get("neighbours", 0)
        if recipe_nb and self.neighbours == recipe_nb and self.neighbours > n_data // NEIGHBOUR_SHARE:
            self.neighbours = n_data // NEIGHBOUR_SHARE  # small data: the recipe's k_nb, at most N / 20 (0: off)
            k_text = f"k = {self.neighbours}" if self.neighbours else "off"
            lines.append(f"bank neighbours {k_text} (the recipe's {recipe_nb} on {n_data} images, at most one in "
                         f"{NEIGHBOUR_SHARE}; set --neighbours to choose)")
        return "; ".join(lines) or None

    def resolve_for_images(self, image_size: int) -> str | None:
        """Fill in the crop scale when it was not given (:func:`crop_min_for`); returns a line when it differs from
        InstDisc's 0.2, else None."""
        if self.crop_min is not None:
            return None
        self.crop_min = crop_min_for(image_size)
        if self.crop_min == CROP_MIN:
            return None
        return (f"crop scale [{self.crop_min:g}, 1] instead of [{CROP_MIN:g}, 1] for {image_size} px images, so that "
                f"a crop keeps enough pixels to stay recognisable (set --crop-min to choose)")

    def resolve_budget(self, n_data: int) -> str:
        """Fill in the batch size and the epochs that were not given (see DEFAULT_EPOCHS .. MIN_STEPS); returns the
        line that says what was chosen and why (logged, and recorded in config.json as ``budget``)."""
        why = []
        epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS
        wants_min = self.epochs is None and self.steps is None and self.time is None
        if self.batch_size is None:
            b = DEFAULT_BATCH
            while b > SMALL_DATA_MIN_BATCH and (n_data // b) * epochs < MIN_STEPS:
                b //= 2
            while b > 2 and b > n_data // 2:  # at least two steps an epoch
                b //= 2
            if b != DEFAULT_BATCH:
                why.append(f"batch {b} instead of {DEFAULT_BATCH} on {n_data} images")
            self.batch_size = b
        spe = max(1, n_data // self.batch_size)
        if wants_min:
            if spe * epochs < MIN_STEPS:
                epochs = math.ceil(MIN_STEPS / spe)
                why.append(f"{epochs} epochs instead of {DEFAULT_EPOCHS}")
            self.epochs = epochs
        if self.time is not None:
            return (f"training budget: --time {self.time:g}s, the steps are fitted once the speed is measured "
                    f"(batch {self.batch_size}, {spe} steps an epoch)")
        total = self.steps if self.steps is not None else spe * self.epochs
        text = f"training budget: batch {self.batch_size}, {total} steps ({math.ceil(total / spe)} epochs of {spe})"
        if why:
            text += (f"; {' and '.join(why)} so that small data gets at least {MIN_STEPS} optimiser steps (set "
                     f"--batch-size, --epochs, --steps or --time to choose)")
        return text

    def validate_for_data(self, n_data: int) -> None:
        """Checks that need the dataset size (after :meth:`resolve_for_data`)."""
        if self.batch_size is not None and self.batch_size > n_data:
            raise InstdiscError(f"--batch-size ({self.batch_size}) is larger than the dataset ({n_data} images)")
        if self.loss != "softmax" and self.nce_k >= n_data:
            raise InstdiscError(f"--nce-k ({self.nce_k}) must be smaller than the number of images ({n_data})")
        if self.clusters > n_data:
            raise InstdiscError(f"--clusters ({self.clusters}) must not exceed the number of images ({n_data})")
        if self.neighbours >= n_data:
            raise InstdiscError(f"--neighbours ({self.neighbours}) must be smaller than the number of images "
                                f"({n_data})")
