"""Checkpoints: one self-describing file, written atomically, loaded with ``weights_only=True``.

Covered by tests/test_train_checkpoint.py.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..atomic import atomic_torch_save
from ..errors import InstdiscError
from ..hashing import file_sha256  # re-exported: part of this module's API
from ..version import CHECKPOINT_FORMAT, __version__
from .config import TrainConfig

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "read_checkpoint", "load_run", "find_checkpoint", "file_sha256"]

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` (plus format/version fields) atomically: temp file, fsync, rename."""
    payload = dict(payload)
    payload["format_version"] = CHECKPOINT_FORMAT
    payload["instdisc_version"] = __version__
    payload["kind"] = "instdisc-checkpoint"
    atomic_torch_save(payload, path, event="checkpoint")  # event: test-only fault points (instdisc.faultpoints)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file, else ``path/checkpoint.pt``; InstdiscError when missing."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise InstdiscError(f"no checkpoint found at {p}")
    return p


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and check a checkpoint file; anything that is not an instdisc checkpoint raises InstdiscError.

    Uses ``torch.load(weights_only=True)``: a file carrying a pickled object (code) is refused, never executed.
    """
    p = find_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, AttributeError,
            TypeError, OSError) as e:  # OSError: torch's zip reader on a truncated file ("Invalid argument")
        text = str(e).strip()
        found = re.search(r"\bGLOBAL ([\w.]+)", text)  # the weights-only unpickler names the object it refused
        if isinstance(e, pickle.UnpicklingError) and found:
            raise InstdiscError(f"{p} is refused: it holds pickled Python objects ({found.group(1)}), not just "
                                f"tensors and plain data, and loading them could run code") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # not torch's "retry with weights_only=False"
        first = detail.group(1).strip() if detail else (text.splitlines()[0] if text else type(e).__name__)
        raise InstdiscError(f"{p} is not a readable instdisc checkpoint (damaged, truncated or another kind of "
                            f"file: {first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "instdisc-checkpoint":
        raise InstdiscError(f"{p} is a torch file but not an instdisc checkpoint")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise InstdiscError(f"{p} has checkpoint format {ckpt.get('format_version')}, this instdisc reads "
                            f"{CHECKPOINT_FORMAT}")
    return ckpt


def load_run(path: str | os.PathLike, map_location="cpu"):
    """(TrainConfig, InstDiscModel in eval mode, checkpoint dict) from a run directory or checkpoint file."""
    from ..method import build_model

    ckpt = read_checkpoint(path, map_location)
    cfg = TrainConfig.from_dict(ckpt["config"])
    data = ckpt["data"]
    model = build_model(cfg, n_data=data["n"], in_channels=data["channels"], image_size=data["image_size"],
                        draw_bank=False)  # the rows come from the checkpoint
    model.load_state_dict(ckpt["model"])
    model.eval()
    return cfg, model, ckpt
