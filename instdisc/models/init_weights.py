"""``--init-weights PATH``: start an encoder from a local file. Covered by tests/test_init_weights.py.

Accepted: a timm / torchvision / instdisc state dict (``.pth``, ``.pt``, ``.bin``; also one wrapped as
``{"state_dict": ...}``, ``{"model": ...}``), a ``.safetensors`` file, or an instdisc export folder (its
``encoder.pt``) or run (its ``checkpoint.pt``). Keys are matched after dropping the usual wrappers' prefixes
(``module.``, ``encoder.``, ``backbone.``, ``model.``) and, where the encoder nests its network (``net.`` of the
torchvision ResNets), adding the encoder's own. Keys the encoder lacks (a classifier head ``fc.*`` / ``head.*``, a
projection head, a memory bank) are dropped and reported with the missing ones in one line; a matched key of another
shape refuses the file.
Only tensors are read (``weights_only=True`` / safetensors): nothing in the file can run code.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InstdiscError
from ..hashing import file_sha256

__all__ = ["load_init_weights", "read_weights", "match_keys", "STRIP_PREFIXES"]

log = logging.getLogger(__name__)

STRIP_PREFIXES = ("module.", "encoder.", "backbone.", "model.", "_orig_mod.")
_WRAPPERS = ("state_dict", "model", "model_state", "module", "encoder")


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _weights_file(path: Path) -> Path:
    """The file to read: ``path`` itself, or an export folder's ``encoder.pt`` (``encoder.safetensors``)."""
    if path.is_dir():
        for name in ("encoder.pt", "encoder.safetensors", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise InstdiscError(f"--init-weights {path}: a folder must be an instdisc export or run (no encoder.pt "
                            f"or checkpoint.pt in it)")
    if not path.is_file():
        raise InstdiscError(f"--init-weights {path}: no such file")
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict of tensors, the file read) from a weights file or an export folder; InstdiscError if unreadable."""
    f = _weights_file(Path(path))
    if f.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InstdiscError("reading .safetensors needs the safetensors package: pip install "
                                "'instdisc[export]'") from None
        try:
            state = load_file(str(f), device="cpu")
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InstdiscError(f"--init-weights {f} is not a readable safetensors file ({_first_line(e)})") from None
    else:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise InstdiscError(f"--init-weights {f} is not a readable state dict of tensors ({_first_line(e)})") \
                from None
    for _ in range(2):  # {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(state, dict):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict) and state[k]), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
    if not isinstance(state, dict):
        raise InstdiscError(f"--init-weights {f} holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InstdiscError(f"--init-weights {f} holds no tensors")
    return tensors, f


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def match_keys(source: dict[str, torch.Tensor], target_keys) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(tensors renamed to the target's keys, missing target keys, unexpected source keys).

    Source keys lose the wrappers' prefixes; then the one target-side prefix ("" or the encoder's first name
    segment, e.g. ``net.``) that matches most keys is added."""
    target_keys = list(target_keys)
    stripped: dict[str, tuple[str, torch.Tensor]] = {}
    for k, v in source.items():
        stripped.setdefault(_strip(k), (k, v))
    wanted = set(target_keys)
    prefixes = {""} | {k.split(".", 1)[0] + "." for k in target_keys if "." in k}
    best = max(sorted(prefixes), key=lambda q: sum(q + k in wanted for k in stripped))
    matched = {best + k: v for k, (_, v) in stripped.items() if best + k in wanted}
    missing = [k for k in target_keys if k not in matched]
    unexpected = [orig for k, (orig, _) in stripped.items() if best + k not in wanted]
    return matched, missing, unexpected


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_init_weights(encoder: nn.Module, path: str | os.PathLike) -> dict:
    """Copy the matching tensors of ``path`` into ``encoder``; returns what config.json records (path, file,
    SHA-256, loaded / missing / unexpected keys). Refuses a file with no matching key or a key of another shape."""
    source, f = read_weights(path)
    target = encoder.state_dict()
    matched, missing, unexpected = match_keys(source, target.keys())
    if not matched:
        raise InstdiscError(f"--init-weights {f}: none of its {len(source)} keys (e.g. {next(iter(source))}) "
                            f"matches the encoder's (e.g. {next(iter(target))}); is it another architecture?")
    for k, v in matched.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise InstdiscError(f"--init-weights {f} does not fit the encoder: {k} has shape {tuple(v.shape)} in "
                                f"the file, {tuple(target[k].shape)} in the encoder (another architecture, "
                                f"channel count or image size?)")
    encoder.load_state_dict({k: v.to(target[k].dtype) for k, v in matched.items()}, strict=False)
    report = {"path": str(path), "file": str(f.resolve()), "sha256": file_sha256(f), "loaded": len(matched),
              "missing": missing, "unexpected": unexpected}
    log.info("--init-weights: loaded %d tensors from %s; missing %d%s; unexpected (dropped) %d%s", len(matched), f,
             len(missing), f" ({_short(missing)})" if missing else "", len(unexpected),
             f" ({_short(unexpected)})" if unexpected else "")
    return report
