"""Encoder export: a training run -> a self-describing folder that needs no checkpoint, no bank, no optimiser.

Covered by tests/test_export_encoder.py and tests/test_export_formats.py.

Layout of ``DIR`` (written into a temporary folder beside it and renamed into place, see
:mod:`instdisc.atomic_dir`)::

    encoder.pt               encoder state dict (plain tensors; ``torch.load(weights_only=True)``), no key prefix;
                             a ``timm:NAME`` encoder's keys are timm's own (``encoder_recipe`` in metadata.json)
    head.pt                  projection-head state dict (only with ``with_head=True``)
    encoder.torchscript.pt   [torchscript] TorchScript module: ``forward(x) -> v`` (B, feature_dim);
                             ``preprocess(x01)`` normalises float images in [0, 1]; ``embed(x) -> z`` with the head.
    encoder.pt2              [torchscript] instead, for an encoder that does not script: a ``torch.export``
                             program (``torch.export.load(f).module()(x) -> v``, or ``(v, z)`` with the head)
    encoder.safetensors      [safetensors] the same state dict(s) as safetensors (``head.safetensors``)
    encoder.onnx             [onnx] ONNX graph, dynamic batch axis, opset 17 (see :mod:`instdisc.export.fmt_onnx`)
    metadata.json            written last: arch, dims, input size, channels, mean/std, training config, source
                             checkpoint SHA-256, file SHA-256s, each format's files and measured parity, versions

Every file takes normalised images (``(x01 - mean) / std`` with metadata.json's mean / std). Each format is one
writer and one checker (:data:`FORMATS`; ``formats=`` picks a subset, the state dict is always written). Every export
is checked before it is renamed into place: the training-time encoder, the encoder rebuilt from ``encoder.pt`` and
the TorchScript (torch.export) module agree on a probe batch (max abs difference < 1e-5 on CPU), ONNX Runtime
within 1e-4 x max(1, max |feature|), safetensors reloads bit-exact. A default export skips, with a warning, a format
that cannot convert this encoder (``formats_skipped`` in metadata.json); one asked for by name is an error.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InstdiscError
from ..hashing import file_sha256 as _sha256  # a module name the export tests patch to inject a failure
from ..version import EXPORT_FORMAT, __version__
from ..atomic_dir import atomic_directory
from . import fmt_onnx, fmt_safetensors, fmt_torchscript
from .fmt_torchscript import PROGRAM_FILE, SCRIPT_FILE, load_torchscript, script_encoder
from .formats import ExportContext, ExportParityError, parity_max_abs_diff

__all__ = ["export_encoder", "read_export", "read_export_metadata", "load_torchscript",
           "script_encoder", "write_encoder_files", "parity_max_abs_diff", "EXPORT_KIND", "ENCODER_FILE",
           "HEAD_FILE", "SCRIPT_FILE", "PROGRAM_FILE", "METADATA_FILE", "PARITY_ATOL", "ExportParityError",
           "FORMATS", "DEFAULT_FORMATS"]

log = logging.getLogger(__name__)

EXPORT_KIND = "instdisc-encoder"
ENCODER_FILE = "encoder.pt"
HEAD_FILE = "head.pt"
METADATA_FILE = "metadata.json"
PARITY_ATOL = 1e-5
_PROBE_BATCH = 8


def _state_dict_cpu(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def _eval_resize(data_spec: str | None) -> str:
    """``native`` when the training data was an in-memory named dataset, else ``crop`` (see transform.py)."""
    from ..data.spec import parse_spec

    try:
        return "native" if data_spec and parse_spec(data_spec).kind == "named" else "crop"
    except InstdiscError:
        return "crop"


def _probe_batch(channels: int, image_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(_PROBE_BATCH, channels, image_size, image_size, generator=g)  # (B, C, S, S)


# Each export format: (writer, checker). The torch-level checkers' differences join parity.max_abs_diff (limit
# PARITY_ATOL); the others check their own limit (ONNX Runtime: 1e-4; safetensors: bit-exact).
FORMATS = {"torchscript": (fmt_torchscript.write, fmt_torchscript.check),
           "safetensors": (fmt_safetensors.write, fmt_safetensors.check),
           "onnx": (fmt_onnx.write, fmt_onnx.check)}
DEFAULT_FORMATS = tuple(FORMATS)
_TORCH_LEVEL = ("torchscript",)


def _check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))  # order kept, duplicates dropped
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise InstdiscError(f"unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in formats)  # the table's order: torch-level checks first


def _raise_if_off(diffs: dict[str, float], atol: float) -> None:
    broken = sorted(k for k, v in diffs.items() if not math.isfinite(v))
    if broken:  # NaN compares False with anything: it would pass the check below
        raise ExportParityError(f"export parity check failed: the encoder's outputs on the probe batch are not finite "
                                f"({', '.join(broken)}): its weights are NaN or overflow (a diverged run?)")
    worst = max(diffs, key=diffs.get)
    if diffs[worst] >= atol:
        raise ExportParityError(f"export parity check failed: {worst} differs from the training-time encoder by "
                                f"{diffs[worst]:.3g} (limit {atol:g})")


def _write_or_clean(write, ctx: ExportContext) -> list[str]:
    """Run a format's writer; on failure remove what it left in the folder."""
    before = set(ctx.folder.iterdir())
    try:
        return write(ctx)
    except BaseException:
        for f in set(ctx.folder.iterdir()) - before:
            f.unlink(missing_ok=True)
        raise


def write_encoder_files(folder: Path, encoder: nn.Module, meta: dict, *, head: nn.Module | None = None,
                        extra: dict[str, dict] | None = None, formats=None) -> dict:
    """Write the export layout into ``folder`` (already created, normally a temporary one) and check parity.

    ``meta`` must hold channels, image_size, mean, std; arch etc. are passed through. ``extra`` maps further file
    names to state dicts (e.g. a fine-tuned classifier). ``formats``: a subset of :data:`FORMATS` (the state dict
    ``encoder.pt`` is always written: instdisc reads it back); a format that cannot be written (a converter that
    does not take this encoder, a missing package) is then an InstdiscError. ``None``: every format, skipping those
    that cannot be written with a warning (listed in ``formats_skipped``). A checker that fails always raises.
    Returns the metadata written.
    """
    strict = formats is not None
    formats = _check_formats(DEFAULT_FORMATS if formats is None else formats)
    encoder.eval()
    if head is not None:
        head.eval()
    states = {"encoder": _state_dict_cpu(encoder)}
    files = {ENCODER_FILE: states["encoder"]}
    if head is not None:
        states["head"] = files[HEAD_FILE] = _state_dict_cpu(head)
    files.update(extra or {})
    for name, state in files.items():
        torch.save(state, folder / name)
    cpu_encoder = _rebuild(meta["arch"], meta["channels"], meta["image_size"], folder / ENCODER_FILE, folder)
    cpu_head = None
    if head is not None:
        cpu_head = _rebuild_head(encoder.feature_dim, meta["low_dim"], meta["head"], folder / HEAD_FILE, folder)

    # Parity: training-time encoder (on its device) vs rebuilt-from-state-dict vs each format, on CPU.
    x = _probe_batch(meta["channels"], meta["image_size"])
    device = next(encoder.parameters()).device
    train_fn = (lambda t: encoder(t.to(device)).cpu()) if device.type != "cpu" else encoder
    ref_z_fn = (lambda t: head(encoder(t.to(device))).cpu()) if head is not None else None
    diffs = parity_max_abs_diff(train_fn, {"reloaded": cpu_encoder}, x)
    if head is not None:
        diffs.update(parity_max_abs_diff(ref_z_fn, {"reloaded_embed": lambda t: cpu_head(cpu_encoder(t))}, x))
    atol = PARITY_ATOL if device.type == "cpu" else 1e-3  # GPU kernels differ from CPU ones
    _raise_if_off(diffs, atol)
    with torch.no_grad():
        ref_v = train_fn(x).float().cpu()  # (B, D)
        ref_z = ref_z_fn(x).float().cpu() if head is not None else None  # (B, low_dim)
    ctx = ExportContext(folder, cpu_encoder, cpu_head, states, meta, x, ref_v, ref_z, atol)
    written: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        write, check = FORMATS[fmt]
        try:
            names = _write_or_clean(write, ctx)
        except Exception as e:  # noqa: BLE001 - a converter that cannot take this encoder, or a missing package
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if strict:
                raise InstdiscError(f"the {fmt} export of {meta['arch']} failed: {why} (leave {fmt} out of "
                                    f"--format)") from None
            log.warning("skipping the %s export of %s: %s", fmt, meta["arch"], why)
            skipped[fmt] = why
            continue
        measured = check(ctx)
        if fmt in _TORCH_LEVEL:
            diffs.update(measured)
            _raise_if_off(diffs, atol)
        written[fmt] = {"files": names, "max_abs_diff": measured}
    meta = dict(meta)
    meta.update(
        format_version=EXPORT_FORMAT, kind=meta.get("kind", EXPORT_KIND), instdisc_version=__version__,
        torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        feature_dim=int(encoder.feature_dim), has_head=head is not None,
        input={"shape": [None, meta["channels"], meta["image_size"], meta["image_size"]], "dtype": "float32",
               "normalised": True, "note": "every file takes normalised images (x01 - mean) / std; TorchScript's "
                                           "preprocess() maps [0,1] to them"},
        encoder_recipe=_recipe(meta),
        files={name: _sha256(folder / name) for name in [*files, *(n for w in written.values() for n in w["files"])]},
        parity={"max_abs_diff": diffs, "probe_batch": _PROBE_BATCH, "atol": atol, "device": str(device)},
    )
    for fmt, w in written.items():
        w["sha256"] = {n: meta["files"][n] for n in w["files"]}
        w["limit"] = {"onnx": fmt_onnx.parity_limit_note(), "safetensors": "bit-exact"}.get(fmt, atol)
    if "onnx" in written:
        written["onnx"].update(opset=fmt_onnx.OPSET, inputs=["image"],
                               outputs=["features"] + (["embedding"] if head is not None else []),
                               dynamic_axes={"batch": 0}, onnxruntime_version=_version("onnxruntime"))
    meta["formats"] = written
    if skipped:
        meta["formats_skipped"] = skipped
    meta["weights_sha256"] = _weights_sha256(meta["files"], head is not None)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    (folder / METADATA_FILE).write_text(text, encoding="utf-8")
    return meta


def _recipe(meta: dict) -> dict:
    from ..models import encoder_recipe

    return encoder_recipe(meta["arch"], in_channels=int(meta["channels"]), image_size=int(meta["image_size"]))


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _weights_sha256(files: dict, with_head: bool) -> str:
    h = hashlib.sha256(files[ENCODER_FILE].encode())
    if with_head:
        h.update(files[HEAD_FILE].encode())
    return h.hexdigest()


def export_encoder(run: str | os.PathLike, out: str | os.PathLike, *, with_head: bool = False,
                   overwrite: bool = False, formats=None) -> dict:
    """Export the encoder of a training run (folder or checkpoint file) to folder ``out``; returns its metadata.

    ``out`` is complete or absent: built beside it and renamed. An existing ``out`` needs ``overwrite=True``.
    ``formats``: which of :data:`FORMATS` to write besides the state dict (None: all that can be written, see
    :func:`write_encoder_files`).
    """
    from ..training.checkpoint import file_sha256, find_checkpoint, load_run

    ckpt_path = find_checkpoint(run)
    from ..atomic_dir import check_can_replace

    if formats is not None:
        formats = _check_formats(formats)
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
        meta = write_encoder_files(tmp, model.encoder, meta, head=model.head if with_head else None,
                                   formats=formats)
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
