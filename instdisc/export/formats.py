"""What every export format's writer and checker share: the context they read and the error a checker raises.

Covered by tests/test_export_encoder.py. Each format is one writer ``write(ctx) -> [file names]`` and one checker
``check(ctx) -> {name: max abs difference}`` (see :data:`instdisc.export.encoder.FORMATS`); the export folder is
renamed into place only when every checker passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InstdiscError

__all__ = ["EncoderGraph", "ExportContext", "ExportParityError", "check_close", "missing_extra",
           "parity_max_abs_diff"]


class EncoderGraph(nn.Module):
    """What the ONNX and torch.export writers trace: x -> v (B, D), or (v, head(v)) with the projection head."""

    def __init__(self, encoder: nn.Module, head: nn.Module | None):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        v = self.encoder(x)  # (B, D)
        return v if self.head is None else (v, self.head(v))  # (B, D), (B, low_dim)


class ExportParityError(RuntimeError):
    """The reloaded or converted encoder does not reproduce the training-time features (a bug, not user input)."""


@dataclass
class ExportContext:
    folder: Path                       # the temporary export folder
    encoder: nn.Module                 # rebuilt from encoder.pt, CPU, eval mode
    head: nn.Module | None             # rebuilt from head.pt, or None
    states: dict[str, dict]            # file stem ("encoder", "head") -> CPU state dict as written to encoder.pt
    meta: dict                         # arch, channels, image_size, mean, std, ...
    x: torch.Tensor                    # (B, C, S, S) probe batch, normalised-input space
    ref_v: torch.Tensor                # (B, D) training-time encoder features of x, on CPU
    ref_z: torch.Tensor | None         # (B, low_dim) training-time embedding of x, or None
    atol: float                        # limit of the torch-to-torch checks (1e-5 on CPU)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    """Max abs difference of ``got`` against ``want``; ExportParityError when not finite or >= ``atol``."""
    d = float((got.float() - want.float()).abs().max())
    if not math.isfinite(d):
        raise ExportParityError(f"export parity check failed: {name} gives non-finite outputs on the probe batch")
    if d >= atol:
        raise ExportParityError(f"export parity check failed: {name} differs from the training-time encoder by "
                                f"{d:.3g} (limit {atol:g})")
    return d


def missing_extra(package: str, fmt: str) -> InstdiscError:
    return InstdiscError(f"the {fmt} export needs the {package} package: pip install 'instdisc[export]' (or leave "
                         f"{fmt} out of --format)")


@torch.no_grad()
def parity_max_abs_diff(reference, others: dict, x: torch.Tensor) -> dict[str, float]:
    """Max abs difference of each ``others[name](x)`` against ``reference(x)``; all modules in eval mode."""
    ref = reference(x).float()  # (B, D)
    return {name: float((fn(x).float() - ref).abs().max()) for name, fn in others.items()}
