"""``instdisc knn`` and ``instdisc neighbors``. Covered by tests/test_cli_knn.py."""
from __future__ import annotations

import json

import click

from instdisc.evaluation import format_knn, knn_benchmark
from instdisc.neighbors import neighbor_grid
from instdisc.device import DEVICES, resolve_device
from instdisc.source import LAYERS

from .app import cli, data_options

_INDEXES = ["flat", "ivf", "hnsw", "ivfpq"]


@cli.command("knn")
@click.argument("model", required=False, type=click.Path())
@click.option("--train", "train_spec", required=True, help="Gallery: a dataset spec or an HDF5 feature file.")
@click.option("--test", "test_spec", required=True, help="Queries: a dataset spec or an HDF5 feature file.")
@data_options
@click.option("--k", type=int, default=200, show_default=True, help="Neighbours that vote.")
@click.option("--tau", type=float, default=0.07, show_default=True, help="Vote weight exp(s/tau).")
@click.option("--index", type=click.Choice(_INDEXES), default="flat", show_default=True,
              help="flat = exact; ivf / hnsw / ivfpq = approximate, for large galleries.")
@click.option("--layer", type=click.Choice(LAYERS), default="encoder", show_default=True)
@click.option("--use-bank", is_flag=True, help="Gallery = the run's memory bank (InstDisc's training monitor).")
@click.option("--retrieval", is_flag=True, help="Also recall@1/5/10, mAP@R and mAP (labels as relevance).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def knn_cmd(model, train_spec, test_spec, data_root, limit, k, tau, index, layer, use_bank, retrieval, device,
            batch_size, workers, as_json):
    """Weighted kNN accuracy (and retrieval metrics) of MODEL's features; MODEL is a run directory or an exported
    encoder, and may be left out when --train and --test are both HDF5 feature files."""
    res = knn_benchmark(model, train=train_spec, test=test_spec, k=k, tau=tau, index=index, layer=layer,
                        use_bank=use_bank, retrieval=retrieval, device=resolve_device(device), data_root=data_root,
                        limit=limit, batch_size=batch_size, workers=workers)
    click.echo(format_knn(res))
    if as_json:
        keys = ["top1", "top5", "nn1", "majority", "k", "tau", "n_train", "n_test", "index", "seconds",
                "feature_seconds", "source"]
        payload = {key: res[key] for key in keys}
        if "retrieval" in res:
            payload["retrieval"] = {key: v for key, v in res["retrieval"].items() if key != "ks"}
        click.echo(json.dumps(payload, default=float))


@cli.command("neighbors")
@click.argument("model", type=click.Path())
@click.option("--train", "train_spec", required=True, help="Gallery dataset.")
@click.option("--query", "query_spec", required=True, help="Dataset the query images are drawn from.")
@click.option("--out", required=True, type=click.Path(), help="PNG file to write.")
@data_options
@click.option("--n", type=int, default=8, show_default=True, help="Query rows.")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per row.")
@click.option("--layer", type=click.Choice(LAYERS), default="encoder", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which queries are drawn.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def neighbors_cmd(model, train_spec, query_spec, out, data_root, limit, n, k, layer, seed, device):
    """Draw each query with its k nearest training images (green frame: same label, red: different)."""
    res = neighbor_grid(model, train=train_spec, query=query_spec, out=out, n=n, k=k, layer=layer, seed=seed,
                        device=resolve_device(device), data_root=data_root, limit=limit)
    rate = "-" if res["match_rate"] is None else f"{100 * res['match_rate']:.1f}%"
    click.echo(f"wrote {res['path']}: {len(res['queries'])} queries x {res['k']} neighbours, {rate} same label")
