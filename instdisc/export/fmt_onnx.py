"""The ``onnx`` export format: ``encoder.onnx``, checked with ONNX Runtime. Covered by tests/test_export_formats.py.

Graph: input ``image`` (batch, C, S, S) float32, *normalised* like ``forward()`` of the other files (the mean / std
are in metadata.json: ``(x01 - mean) / std``); output ``features`` (batch, D), and ``embedding`` (batch, low_dim,
unit rows) when the export keeps the head. The batch axis is dynamic; opset :data:`OPSET`; written by the
TorchScript-based exporter (``dynamo=False``: offline, deterministic, no onnxscript). Checked before the folder is
renamed into place: ONNX Runtime (CPU) on the probe batch, and on a smaller batch, within :data:`ATOL` of the
training-time encoder (x max(1, max |feature|) for encoders whose features are far from unit scale).
"""
from __future__ import annotations

import warnings

import torch

from .formats import EncoderGraph, ExportContext, check_close, missing_extra

__all__ = ["write", "check", "OPSET", "ATOL", "FILE"]

FILE = "encoder.onnx"
OPSET = 17
ATOL = 1e-4


def _outputs(ctx: ExportContext) -> list[str]:
    return ["features"] if ctx.head is None else ["features", "embedding"]


def write(ctx: ExportContext) -> list[str]:
    for package in ("onnx", "onnxruntime"):  # the exporter needs onnx; the checker, onnxruntime
        try:
            __import__(package)
        except ImportError:
            raise missing_extra(package, "onnx") from None
    graph = EncoderGraph(ctx.encoder, ctx.head).eval()
    axes = {name: {0: "batch"} for name in ["image", *_outputs(ctx)]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is marked deprecated in torch >= 2.9
        torch.onnx.export(graph, (ctx.x,), str(ctx.folder / FILE), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=_outputs(ctx), dynamic_axes=axes,
                          do_constant_folding=True)
    return [FILE]


def check(ctx: ExportContext) -> dict[str, float]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(ctx.folder / FILE), opts, providers=["CPUExecutionProvider"])
    out = {}
    for n in (len(ctx.x), 3):  # the probe batch, and another batch size (the dynamic axis)
        got = sess.run(None, {"image": ctx.x[:n].numpy()})
        refs = [ctx.ref_v[:n]] + ([] if ctx.ref_z is None else [ctx.ref_z[:n]])
        for name, g, r in zip(_outputs(ctx), got, refs):
            limit = max(ATOL, ctx.atol) * max(1.0, float(r.abs().max()))
            key = f"onnx_{name}"
            out[key] = max(out.get(key, 0.0), check_close(f"ONNX Runtime ({name})", torch.from_numpy(g), r, limit))
    return out


def parity_limit_note() -> str:
    return f"{ATOL:g} x max(1, max |feature|)"
