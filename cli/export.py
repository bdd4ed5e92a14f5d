"""``instdisc export-encoder`` and ``instdisc export-features``. Covered by tests/test_cli_export.py."""
from __future__ import annotations

import json

import click

from instdisc.export.encoder import FORMATS, export_encoder
from instdisc.export.hdf5 import COMPRESSIONS, DTYPES, LAYERS, export_features
from instdisc.device import DEVICES, resolve_device

from .app import cli, data_options


@cli.command("export-encoder")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Export folder to create.")
@click.option("--with-head", is_flag=True, help="Also keep the projection head (embedding z).")
@click.option("--format", "formats", type=click.Choice(list(FORMATS)), multiple=True,
              help="Formats to write besides encoder.pt and metadata.json; repeat to pick several [default: all: "
                   "torchscript (torch.export where the encoder does not script), safetensors, onnx, skipping with "
                   "a warning one that cannot convert this encoder]. Each file is checked against the "
                   "training-time encoder before the folder appears.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder (only once the new one is "
                                                "complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def export_encoder_cmd(run_dir, out, with_head, formats, overwrite, as_json):
    """Export the encoder of RUN_DIR (a training run or its checkpoint): state dict, TorchScript, safetensors, ONNX
    and metadata.json (each file's SHA-256 and measured parity; see docs/evaluation.md)."""
    meta = export_encoder(run_dir, out, with_head=with_head, overwrite=overwrite, formats=formats or None)
    diff = max(meta["parity"]["max_abs_diff"].values())
    click.echo(f"exported {meta['arch']} encoder ({meta['feature_dim']}-d features"
               f"{', with head' if with_head else ''}) to {out} as {', '.join(sorted(meta['files']))}; parity "
               f"max abs diff {diff:.2g}")
    if as_json:
        click.echo(json.dumps({"out": str(out), "arch": meta["arch"], "feature_dim": meta["feature_dim"],
                               "has_head": meta["has_head"], "parity_max_abs_diff": diff,
                               "files": sorted(meta["files"]),
                               "formats": {f: w["max_abs_diff"] for f, w in meta["formats"].items()},
                               "checkpoint_sha256": meta["source"]["checkpoint_sha256"]}))


@cli.command("export-features")
@click.argument("model", type=click.Path())
@click.argument("data")
@click.option("--out", "out", required=True, type=click.Path(), help="HDF5 file to write (e.g. features.h5).")
@click.option("--layer", type=click.Choice(LAYERS), default="encoder", show_default=True,
              help="encoder: feature v; embedding: L2-normalised head output z (needs a head).")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True)
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
@data_options
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes (files).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing file (the old one stays until the new one is "
                                                "complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def export_features_cmd(model, data, out, layer, dtype, compression, data_root, limit, batch_size, workers, device,
                        overwrite, as_json):
    """Write MODEL's features of DATA to an HDF5 file. MODEL: a run folder or an exported encoder.

    An interrupted export is continued by running the same command again.
    """
    res = export_features(model, data, out, layer=layer, dtype=dtype, compression=compression,
                          batch_size=batch_size, device=resolve_device(device), workers=workers,
                          data_root=data_root, limit=limit, overwrite=overwrite)
    resumed = f", resumed after {res.resumed_from} rows" if res.resumed_from else ""
    click.echo(f"wrote {res.n} x {res.dim} {dtype} {layer} features to {out}{resumed} ({res.seconds:.1f}s)")
    if as_json:
        click.echo(json.dumps({"out": str(out), "n": res.n, "dim": res.dim, "layer": layer, "dtype": dtype,
                               "resumed_from": res.resumed_from, "seconds": res.seconds}))
