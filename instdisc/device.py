"""Which torch device a command runs on. Covered by tests/test_device.py."""
from __future__ import annotations

import torch

from .errors import InstdiscError

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")  # the --device choices of every command


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when a GPU is present, else CPU; ``cuda`` without a GPU is refused with one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InstdiscError("--device cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)
