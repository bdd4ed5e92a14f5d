"""The one place that seeds global RNGs, plus capture/restore of every RNG state. Covered by tests/test_seeding.py."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "get_rng_state", "set_rng_state", "mix_seed", "Stream"]


class Stream:
    """Named RNG streams: each random choice of a run draws from ``mix_seed(seed, ..., Stream.X, ...)`` in the place
    its user documents. The numbers are part of the results (a resume, the 2-process parity and every recorded
    figure depend on them): never renumber one, add new ones."""

    PERMUTATION = 1  # (seed, epoch, PERMUTATION): the epoch's order of the samples
    BATCH_VIEWS = 2  # (seed, epoch, step, BATCH_VIEWS[, rank]): BatchAugment's views of a step
    NEGATIVES = 3  # (seed, epoch, step, NEGATIVES): the bank negatives of a step
    LOADER = 4  # (seed, epoch, LOADER[, rank]): the DataLoader's base seed (its workers never draw from it)
    MODEL_INIT = 5  # (seed, 0, MODEL_INIT): torch's global RNG while encoder and head are built
    BANK_INIT = 0  # (seed, BANK_INIT): the generator that draws the initial bank rows
    PIL_VIEWS = 7  # (seed, epoch, sample, PIL_VIEWS): the PIL transforms' views of one sample
    PROBE = 11  # (seed, PROBE): the health probe's fixed slots
    PROBE_VIEWS = 12  # (seed, PROBE_VIEWS, epoch): the probe's views of an epoch
    FINETUNE_VIEWS = 11  # (seed, epoch, sample, FINETUNE_VIEWS): fine-tuning's PIL views of one sample
    NEIGHBOURS = 13  # (seed, epoch, NEIGHBOURS): the IVF training sample of a bank-neighbour search
    VERDICT = 14  # (seed, VERDICT): the held-out slice of the end-of-run verdict


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style): independent streams per (seed, epoch, step, purpose)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def get_rng_state() -> dict:
    """Every global RNG state as tensors/plain types (safe for ``torch.load(weights_only=True)``)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensor(np.random.get_state()),
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_tensor_to_numpy_state(state["numpy"]))
    random.setstate(_tensor_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensor(st) -> dict:
    _, keys, pos, has_gauss, cached = st
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _tensor_to_numpy_state(d: dict):
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def _python_state_to_tensor(st) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _tensor_to_python_state(d: dict):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
