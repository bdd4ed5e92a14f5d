"""The ``torchscript`` export format: ``encoder.torchscript.pt`` where the encoder scripts, else a ``torch.export``
program ``encoder.pt2``; checked by reloading it and comparing on the probe batch. Covered by
tests/test_export_encoder.py and tests/test_export_formats.py."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InstdiscError
from .formats import EncoderGraph, ExportContext, parity_max_abs_diff

__all__ = ["write", "check", "script_encoder", "load_torchscript", "SCRIPT_FILE", "PROGRAM_FILE"]

log = logging.getLogger(__name__)

SCRIPT_FILE = "encoder.torchscript.pt"
PROGRAM_FILE = "encoder.pt2"


class _ScriptedEncoder(nn.Module):
    """What goes into TorchScript: the encoder plus its normalisation constants."""

    def __init__(self, encoder: nn.Module, mean, std):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = int(encoder.feature_dim)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, feature_dim)

    @torch.jit.export
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """float B x C x S x S in [0, 1] -> normalised input for ``forward``."""
        return (x - self.mean) / self.std


class _ScriptedEncoderHead(_ScriptedEncoder):
    def __init__(self, encoder: nn.Module, head: nn.Module, mean, std):
        super().__init__(encoder, mean, std)
        self.head = head

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, low_dim), unit rows


def script_encoder(encoder: nn.Module, mean, std, head: nn.Module | None = None) -> torch.jit.ScriptModule:
    """TorchScript module (eval mode) of ``encoder`` (and ``head``); runs with nothing but torch installed."""
    wrapper = _ScriptedEncoder(encoder, mean, std) if head is None else _ScriptedEncoderHead(encoder, head, mean, std)
    wrapper.eval()
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the format still loads everywhere
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(wrapper)
    return scripted.eval()


def load_torchscript(path: str | os.PathLike, map_location="cpu") -> torch.jit.ScriptModule:
    """The TorchScript module of an export folder (or file)."""
    p = Path(path)
    if p.is_dir():
        p = p / SCRIPT_FILE
    if not p.exists():
        raise InstdiscError(f"no TorchScript module at {p}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(p), map_location=map_location).eval()


def _torch_export(ctx: ExportContext):
    """A ``torch.export`` program of encoder (and head), batch axis dynamic."""
    graph = EncoderGraph(ctx.encoder, ctx.head).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        return torch.export.export(graph, (ctx.x,), dynamic_shapes=({0: batch},))


def write(ctx: ExportContext) -> list[str]:
    """[torchscript] TorchScript where the encoder scripts, else a torch.export program."""
    try:
        scripted = script_encoder(ctx.encoder, ctx.meta["mean"], ctx.meta["std"], head=ctx.head)
    except Exception as e:  # noqa: BLE001 - TorchScript rejects code in many ways; torch.export takes the rest
        log.warning("%s does not script (%s); writing a torch.export program %s instead", ctx.meta["arch"],
                    (str(e).strip().splitlines() or [type(e).__name__])[0][:160], PROGRAM_FILE)
        torch.export.save(_torch_export(ctx), str(ctx.folder / PROGRAM_FILE))
        return [PROGRAM_FILE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(ctx.folder / SCRIPT_FILE))
    return [SCRIPT_FILE]


def check(ctx: ExportContext) -> dict[str, float]:
    """Reloaded TorchScript (or torch.export program) against the training-time encoder on the probe batch."""
    if (ctx.folder / SCRIPT_FILE).exists():
        m = load_torchscript(ctx.folder / SCRIPT_FILE)
        diffs = parity_max_abs_diff(lambda t: ctx.ref_v, {"torchscript": m}, ctx.x)
        if ctx.head is not None:
            diffs.update(parity_max_abs_diff(lambda t: ctx.ref_z, {"torchscript_embed": m.embed}, ctx.x))
        return diffs
    prog = torch.export.load(str(ctx.folder / PROGRAM_FILE)).module()
    if ctx.head is None:
        return parity_max_abs_diff(lambda t: ctx.ref_v, {"torch_export": prog}, ctx.x)
    diffs = parity_max_abs_diff(lambda t: ctx.ref_v, {"torch_export": lambda t: prog(t)[0]}, ctx.x)
    diffs.update(parity_max_abs_diff(lambda t: ctx.ref_z, {"torch_export_embed": lambda t: prog(t)[1]}, ctx.x))
    return diffs
