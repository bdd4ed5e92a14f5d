"""What the memory bank gives without another pass over the data: every training image's nearest neighbours (and,
optionally, a clustering) searched in a finished run's stored rows, written to an HDF5 file. Covered by
tests/test_mining.py.

The bank holds one unit embedding per training image, slot i = image i of the run's dataset, refreshed as training
visited it. A method with only in-batch negatives keeps nothing of the kind: to find neighbours it has to embed the
whole collection again (docs/bank.md measures both). Uses: near-duplicates (the largest similarities), neighbour
mining for SCAN-style clustering or label propagation, pseudo-labels from the clusters, a look at what the encoder
groups together.

File (``kind`` = "instdisc-bank-neighbours", ``format_version`` 1):

    neighbours    (N, k) int64: the k other slots with the largest cosine to slot i, best first (-1: IVF found none)
    similarities  (N, k) float32: the cosines of those pairs (nan where -1)
    clusters      (N,) int64: spherical k-means cluster of every slot (only with ``clusters`` > 0)
    attrs         run, checkpoint step / epoch, data spec, n, dim, k, index ("flat" | "ivf"), clusters, seconds,
                  and with ``labels``: label_agreement (share of neighbour pairs with the same label), cluster_purity

The file appears whole or not at all (a temporary file beside it, renamed when complete); an existing file is
replaced only with ``overwrite``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bank_neighbours import cluster_bank, cluster_purity, label_agreement, resolve_index_kind, search_bank
from .errors import InstdiscError

__all__ = ["MineResult", "mine_bank", "check_mine_request", "run_labels", "read_bank_neighbours", "MINE_KIND", "MINE_FORMAT"]

MINE_KIND = "instdisc-bank-neighbours"
MINE_FORMAT = 1


@dataclass
class MineResult:
    path: Path
    n: int
    k: int
    index: str
    clusters: int
    seconds: float
    label_agreement: float | None = None
    cluster_purity: float | None = None


def _bank_rows(model) -> torch.Tensor:
    bank = getattr(getattr(model, "objective", None), "bank", None)
    if bank is None:
        raise InstdiscError("this run has no memory bank to search")
    return bank.memory


def check_mine_request(out: str | os.PathLike, *, k: int, clusters: int, overwrite: bool) -> Path:
    """The checks that need no run or data (the CLI calls it before reading anything): ``out`` writable as asked,
    ``k`` >= 1, ``clusters`` 0 or >= 2. Returns ``out`` as a Path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InstdiscError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise InstdiscError(f"{out} exists and is not a file; choose another --out")
    if not out.parent.is_dir():
        raise InstdiscError(f"the folder of --out does not exist: {out.parent}")
    if k < 1:
        raise InstdiscError(f"--k must be >= 1, got {k}")
    if clusters < 0 or clusters == 1:
        raise InstdiscError(f"--clusters must be 0 (none) or >= 2, got {clusters}")
    return out


def mine_bank(run: str | os.PathLike, out: str | os.PathLike, *, k: int = 10, clusters: int = 0,
              index: str = "auto", seed: int = 0, labels=None, overwrite: bool = False) -> MineResult:
    """Search the bank of ``run`` (a run folder or checkpoint) for every slot's ``k`` nearest other slots (FAISS:
    ``index`` auto | flat | ivf, as training's ``--neighbour-index``), optionally cluster it into ``clusters``
    (spherical k-means, ``seed``), and write the HDF5 file ``out``. ``labels`` ((N,) ints, -1 for none), when given,
    only measure the neighbours' label agreement and the clusters' purity (attrs and the result)."""
    from .training.checkpoint import load_run

    out = check_mine_request(out, k=k, clusters=clusters, overwrite=overwrite)
    cfg, model, ckpt = load_run(run)
    memory = _bank_rows(model)  # (N, D)
    n = memory.shape[0]
    if not 1 <= k < n:
        raise InstdiscError(f"--k must satisfy 1 <= k < N = {n} (the bank's rows), got {k}")
    if clusters and not 2 <= clusters <= n:
        raise InstdiscError(f"--clusters must satisfy 2 <= C <= N = {n}, got {clusters}")
    if labels is not None and len(labels) != n:
        raise InstdiscError(f"{len(labels)} labels for a bank of {n} rows")
    kind = resolve_index_kind(index, n)
    t0 = time.perf_counter()
    slots, sims = search_bank(memory, k, kind=kind, seed=seed, with_scores=True)  # (N, k), (N, k)
    assign = cluster_bank(memory, clusters, seed=seed) if clusters else None  # (N,)
    seconds = time.perf_counter() - t0
    agree = label_agreement(slots, labels) if labels is not None else None
    purity = cluster_purity(assign, labels) if labels is not None and assign is not None else None
    attrs = {"kind": MINE_KIND, "format_version": MINE_FORMAT, "run": str(run), "data": cfg.data,
             "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"]), "n": n, "dim": int(memory.shape[1]), "k": k,
             "index": kind, "clusters": int(clusters), "seconds": seconds,
             **({"label_agreement": agree} if agree is not None else {}),
             **({"cluster_purity": purity} if purity is not None else {})}
    _write(out, slots.numpy(), sims.numpy(), None if assign is None else assign.numpy(), attrs)
    return MineResult(out, n, k, kind, int(clusters), seconds, agree, purity)


def run_labels(run: str | os.PathLike, *, data_root: str | os.PathLike | None = None) -> np.ndarray | None:
    """(N,) int64 labels of the training images of ``run`` in bank-slot order (its data spec, --data-root, --limit,
    --skip-bad-images rebuilt), or None when the data has no labels. For the monitor only."""
    from .data import build_dataset
    from .training.checkpoint import read_checkpoint
    from .training.config import TrainConfig

    ckpt = read_checkpoint(run)
    cfg = TrainConfig.from_dict(ckpt["config"])
    ds = build_dataset(cfg.data, data_root=data_root or cfg.data_root, limit=cfg.limit,
                       skip_bad_images=cfg.skip_bad_images)
    labels = getattr(ds, "labels", None)
    if labels is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != ckpt["data"]["n"]:
        raise InstdiscError(f"{cfg.data} now has {labels.shape[0]} images, the run's bank {ckpt['data']['n']}: "
                            f"the labels would not line up with the slots")
    return labels if bool((labels >= 0).any()) else None


def _write(out: Path, slots: np.ndarray, sims: np.ndarray, assign: np.ndarray | None, attrs: dict) -> None:
    import h5py

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("neighbours", data=slots)
            f.create_dataset("similarities", data=sims)
            if assign is not None:
                f.create_dataset("clusters", data=assign)
            for key, v in attrs.items():
                f.attrs[key] = v
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def read_bank_neighbours(path: str | os.PathLike) -> dict:
    """The arrays and attributes of a file ``mine_bank`` wrote: {"neighbours", "similarities", ["clusters"],
    "attrs"}; InstdiscError for a missing file or one of another kind or format."""
    import h5py

    from .h5file import plain, read_attrs

    attrs = read_attrs(path, kind=MINE_KIND, format_version=MINE_FORMAT, what="bank-neighbours file",
                       format_name="bank-neighbours", hint="; `instdisc mine RUN --out FILE` writes one")
    with h5py.File(path, "r") as f:
        res = {name: f[name][()] for name in ("neighbours", "similarities", "clusters") if name in f}
    res["attrs"] = {k: plain(v) for k, v in attrs.items()}
    return res
