"""Which torch device a command runs on. Covered by tests/test_device.py."""
from __future__ import annotations

import torch

from .errors import InstdiscError

__all__ = ["DEVICES", "resolve_device", "inferred_size_cap", "SIZE_CAP"]

DEVICES = ("auto", "cpu", "cuda")  # the --device choices of every command

# The largest image side training infers for a folder or file list, by device type (--image-size overrides it). A
# CPU trains a 224 px RGB image ~5x slower than a 96 px one; a GPU takes the usual 224.
SIZE_CAP = {"cpu": 96, "cuda": 224}


def inferred_size_cap(device) -> int:
    """The cap on an inferred image size when training on ``device`` (SIZE_CAP; 224 for other device types)."""
    return SIZE_CAP.get(torch.device(device).type, 224)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a GPU is present, else CPU; ``cuda`` without a GPU is refused with one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InstdiscError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)
