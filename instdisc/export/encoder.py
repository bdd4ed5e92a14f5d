"""Encoder export: a training run -> a self-describing folder that needs no checkpoint, no bank, no optimiser.

Covered by tests/test_export_encoder.py.

Layout of ``DIR`` (written into a temporary folder beside it and renamed into place, see
:mod:`instdisc.atomic_dir`)::

    encoder.pt               encoder state dict (plain tensors; ``torch.load(weights_only=True)``), no key prefix
    head.pt                  projection-head state dict (only with ``with_head=True``)
    encoder.torchscript.pt   TorchScript module: ``forward(x) -> v`` (B, feature_dim); ``preprocess(x01)``
                             normalises float images in [0, 1]; ``embed(x) -> z`` (B, low_dim) with the head
    metadata.json            written last: arch, dims, input size, channels, mean/std, training config, source
                             checkpoint SHA-256, file SHA-256s, parity measured at export, versions

Every export is checked before it is renamed into place: the training-time encoder, the encoder rebuilt from
``encoder.pt`` and the TorchScript module must agree on a probe batch (max abs difference < 1e-5).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InstdiscError
from ..version import EXPORT_FORMAT, __version__
from ..atomic_dir import atomic_directory

__all__ = ["export_encoder", "read_export", "read_export_metadata", "load_torchscript",
           "script_encoder", "write_encoder_files", "parity_max_abs_diff", "EXPORT_KIND", "ENCODER_FILE",
           "HEAD_FILE", "SCRIPT_FILE", "METADATA_FILE", "PARITY_ATOL", "ExportParityError"]

log = logging.getLogger(__name__)

EXPORT_KIND = "instdisc-encoder"
ENCODER_FILE = "encoder.pt"
HEAD_FILE = "head.pt"
SCRIPT_FILE = "encoder.torchscript.pt"
METADATA_FILE = "metadata.json"
PARITY_ATOL = 1e-5
_PROBE_BATCH = 8


class ExportParityError(RuntimeError):
    """The reloaded or scripted encoder does not reproduce the training-time features (a bug, not user input)."""


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_dict_cpu(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def _eval_resize(data_spec: str | None) -> str:
    """``native`` when the training data was an in-memory named dataset, else ``crop`` (see transform.py)."""
    from ..data.spec import parse_spec

    try:
        return "native" if data_spec and parse_spec(data_spec).kind == "named" else "crop"
    except InstdiscError:
        return "crop"


@torch.no_grad()
def parity_max_abs_diff(reference, others: dict, x: torch.Tensor) -> dict[str, float]:
    """Max abs difference of each ``others[name](x)`` against ``reference(x)``; all modules in eval mode."""
    ref = reference(x).float()  # (B, D)
    return {name: float((fn(x).float() - ref).abs().max()) for name, fn in others.items()}


def _probe_batch(channels: int, image_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(_PROBE_BATCH, channels, image_size, image_size, generator=g)  # (B, C, S, S)


def write_encoder_files(folder: Path, encoder: nn.Module, meta: dict, *, head: nn.Module | None = None,
                        extra: dict[str, dict] | None = None) -> dict:
    """Write the export layout into ``folder`` (already created, normally a temporary one) and check parity.

    ``meta`` must hold channels, image_size, mean, std; arch etc. are passed through. ``extra`` maps further file
    names to state dicts (e.g. a fine-tuned classifier). Returns the metadata written.
    """
    encoder.eval()
    if head is not None:
        head.eval()
    files = {ENCODER_FILE: _state_dict_cpu(encoder)}
    if head is not None:
        files[HEAD_FILE] = _state_dict_cpu(head)
    files.update(extra or {})
    for name, state in files.items():
        torch.save(state, folder / name)
    cpu_encoder = _rebuild(meta["arch"], meta["channels"], meta["image_size"], folder / ENCODER_FILE, folder)
    cpu_head = None
    if head is not None:
        cpu_head = _rebuild_head(encoder.feature_dim, meta["low_dim"], meta["head"], folder / HEAD_FILE, folder)
    scripted = script_encoder(cpu_encoder, meta["mean"], meta["std"], head=cpu_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, str(folder / SCRIPT_FILE))
    reloaded_script = load_torchscript(folder / SCRIPT_FILE)

    # Parity: training-time encoder (on its device) vs rebuilt-from-state-dict vs TorchScript, on CPU.
    x = _probe_batch(meta["channels"], meta["image_size"])
    device = next(encoder.parameters()).device
    train_fn = (lambda t: encoder(t.to(device)).cpu()) if device.type != "cpu" else encoder
    diffs = parity_max_abs_diff(train_fn, {"reloaded": cpu_encoder, "torchscript": reloaded_script}, x)
    if head is not None:
        ref_z = (lambda t: head(encoder(t.to(device))).cpu())
        diffs.update(parity_max_abs_diff(ref_z, {"torchscript_embed": reloaded_script.embed,
                                                 "reloaded_embed": lambda t: cpu_head(cpu_encoder(t))}, x))
    atol = PARITY_ATOL if device.type == "cpu" else 1e-3  # GPU kernels differ from CPU ones
    broken = sorted(k for k, v in diffs.items() if not math.isfinite(v))
    if broken:  # NaN compares False with anything: it would pass the check below
        raise ExportParityError(f"export parity check failed: the encoder's outputs on the probe batch are not finite "
                                f"({', '.join(broken)}): its weights are NaN or overflow (a diverged run?)")
    worst = max(diffs, key=diffs.get)
    if diffs[worst] >= atol:
        raise ExportParityError(f"export parity check failed: {worst} differs from the training-time encoder by "
                                f"{diffs[worst]:.3g} (limit {atol:g})")
    meta = dict(meta)
    meta.update(
        format_version=EXPORT_FORMAT, kind=meta.get("kind", EXPORT_KIND), instdisc_version=__version__,
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        feature_dim=int(encoder.feature_dim), has_head=head is not None,
        input={"shape": [None, meta["channels"], meta["image_size"], meta["image_size"]], "dtype": "float32",
               "normalised": True, "note": "forward() takes normalised images; preprocess() maps [0,1] to them"},
        files={name: _sha256(folder / name) for name in [*files, SCRIPT_FILE]},
        parity={"max_abs_diff": diffs, "probe_batch": _PROBE_BATCH, "atol": atol, "device": str(device)},
    )
    meta["weights_sha256"] = _weights_sha256(meta["files"], head is not None)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    (folder / METADATA_FILE).write_text(text, encoding="utf-8")
    return meta


def _weights_sha256(files: dict, with_head: bool) -> str:
    h = hashlib.sha256(files[ENCODER_FILE].encode())
    if with_head:
        h.update(files[HEAD_FILE].encode())
    return h.hexdigest()


def export_encoder(run: str | os.PathLike, out: str | os.PathLike, *, with_head: bool = False,
                   overwrite: bool = False) -> dict:
    """Export the encoder of a training run (folder or checkpoint file) to folder ``out``; returns its metadata.

    ``out`` is complete or absent: built beside it and renamed. An existing ``out`` needs ``overwrite=True``.
    """
    from ..training.checkpoint import file_sha256, find_checkpoint, load_run

    ckpt_path = find_checkpoint(run)
    from ..atomic_dir import check_can_replace

    check_can_replace(out, overwrite, "export folder")  # fail before the (slow) load
    sha = file_sha256(ckpt_path)
    cfg, model, ckpt = load_run(ckpt_path)
    data = ckpt["data"]
    meta = {
        "arch": cfg.arch, "channels": int(data["channels"]), "image_size": int(data["image_size"]),
        "mean": [float(m) for m in data["mean"]], "std": [float(s) for s in data["std"]],
        "low_dim": int(cfg.low_dim), "head": cfg.head if with_head else None,
        "eval_resize": _eval_resize(data.get("spec")), "config": cfg.to_dict(), "data": data,
        "source": {"checkpoint": str(Path(ckpt_path).resolve()), "checkpoint_sha256": sha,
                   "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]),
                   "instdisc_version": ckpt.get("instdisc_version")},
    }
    with atomic_directory(out, overwrite=overwrite, what="export folder") as tmp:
        meta = write_encoder_files(tmp, model.encoder, meta, head=model.head if with_head else None)
    log.info("exported %s encoder (%d-d features%s) from %s to %s; parity max abs diff %.2g", cfg.arch,
             meta["feature_dim"], ", with head" if with_head else "", ckpt_path, out,
             max(meta["parity"]["max_abs_diff"].values()))
    return meta


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The checked ``metadata.json`` of an export folder."""
    d = Path(path)
    f = d / METADATA_FILE
    if not f.exists():
        raise InstdiscError(f"{d} is not an exported encoder (no {METADATA_FILE})")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InstdiscError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in (EXPORT_KIND, "instdisc-finetuned"):
        raise InstdiscError(f"{f} does not describe an instdisc encoder export")
    if meta.get("format_version") != EXPORT_FORMAT:
        raise InstdiscError(f"{d} has export format {meta.get('format_version')}, this instdisc reads {EXPORT_FORMAT}")
    missing = [k for k in ("arch", "channels", "image_size", "mean", "std", "feature_dim", "files") if k not in meta]
    if missing:
        raise InstdiscError(f"{f} lacks {', '.join(missing)}")
    return meta


def _load_state(path: Path, folder: Path) -> dict:
    if not path.exists():
        raise InstdiscError(f"{folder} is incomplete: {path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InstdiscError(f"{path} is not a readable state dict ({first[:200]})") from None


def _load_into(module: nn.Module, state: dict, path: Path) -> nn.Module:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["mismatch"])[0]
        raise InstdiscError(f"{path} does not fit the architecture in metadata.json ({first[:200]})") from None
    return module.eval()


def _rebuild(arch: str, channels: int, image_size: int, path: Path, folder: Path) -> nn.Module:
    from ..models import build_encoder

    return _load_into(build_encoder(arch, in_channels=channels, image_size=image_size), _load_state(path, folder),
                      path)


def _rebuild_head(in_dim: int, low_dim: int, kind: str, path: Path, folder: Path) -> nn.Module:
    from ..models import ProjectionHead

    return _load_into(ProjectionHead(in_dim, low_dim, kind=kind), _load_state(path, folder), path)


def read_export(path: str | os.PathLike, *, verify: bool = True):
    """(encoder, head or None, meta) of an export folder, both modules in eval mode on CPU.

    ``verify`` checks each weight file against the SHA-256 recorded in metadata.json (a modified or truncated
    file raises InstdiscError).
    """
    d = Path(path)
    meta = read_export_metadata(d)
    if verify:
        for name in (ENCODER_FILE, HEAD_FILE):
            want = meta["files"].get(name)
            if want is not None and (d / name).exists() and _sha256(d / name) != want:
                raise InstdiscError(f"{d / name} does not match the SHA-256 in metadata.json (modified or damaged)")
    encoder = _rebuild(meta["arch"], int(meta["channels"]), int(meta["image_size"]), d / ENCODER_FILE, d)
    head = None
    if meta.get("has_head") and meta.get("head"):
        head = _rebuild_head(encoder.feature_dim, int(meta["low_dim"]), meta["head"], d / HEAD_FILE, d)
    return encoder, head, meta
