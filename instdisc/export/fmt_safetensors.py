"""The ``safetensors`` export format: ``encoder.safetensors`` (and ``head.safetensors``), the state dicts of
``encoder.pt`` / ``head.pt`` with the same keys; checked by reloading them bit-exact. Covered by
tests/test_export_formats.py."""
from __future__ import annotations

import torch

from .formats import ExportContext, ExportParityError, missing_extra

__all__ = ["write", "check"]


def _files(ctx: ExportContext) -> dict[str, str]:
    return {stem: f"{stem}.safetensors" for stem in ctx.states}


def write(ctx: ExportContext) -> list[str]:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise missing_extra("safetensors", "safetensors") from None
    info = {"format": "pt", "arch": str(ctx.meta["arch"]), "channels": str(ctx.meta["channels"]),
            "image_size": str(ctx.meta["image_size"])}  # header metadata: strings only
    for stem, name in _files(ctx).items():
        save_file({k: v.contiguous() for k, v in ctx.states[stem].items()}, str(ctx.folder / name), metadata=info)
    return list(_files(ctx).values())


def check(ctx: ExportContext) -> dict[str, float]:
    from safetensors.torch import load_file

    for stem, name in _files(ctx).items():
        back, want = load_file(str(ctx.folder / name)), ctx.states[stem]
        bad = sorted(set(back) ^ set(want)) or [k for k in want if back[k].dtype != want[k].dtype
                                                 or not torch.equal(back[k], want[k])]
        if bad:
            raise ExportParityError(f"export check failed: {name} does not reload bit-exact ({bad[0]})")
    return {"safetensors": 0.0}  # bit-exact
