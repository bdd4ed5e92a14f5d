"""``instdisc plot`` and ``instdisc plot-embedding``. Covered by tests/test_cli_plot.py."""
from __future__ import annotations

import click

from instdisc.device import DEVICES, resolve_device
from instdisc.plots.curves import X_AXES
from instdisc.plots.embedding import METHODS
from instdisc.source import LAYERS

from .app import cli


@cli.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--x", "x_axis", type=click.Choice(X_AXES), default="step", show_default=True,
              help="Horizontal axis: global step (with an epoch axis on top), or epoch (compares runs of different "
                   "batch sizes).")
@click.option("--title", default=None, help="Title above the panels.")
def plot_cmd(runs, out, x_axis, title):
    """Draw the training curves of one or more RUNS (run folders or metrics.jsonl files) into one PNG: loss, learning
    rate, positive/negative similarity, the health signals and bank kNN that the runs logged, images/s. Runs are
    overlaid in one colour each, named by their folders. See docs/visualisation.md."""
    from instdisc.plots import plot_runs

    res = plot_runs(list(runs), out, x=x_axis, title=title)
    w, h = res["size"]
    click.echo(f"wrote {res['path']} ({w}x{h} px): {len(res['runs'])} run(s), panels: {', '.join(res['panels'])}")


@cli.command("plot-embedding")
@click.argument("source", metavar="MODEL_OR_FEATURES", type=click.Path())
@click.argument("data", required=False)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--method", type=click.Choice(METHODS), default="pca", show_default=True,
              help="pca: linear, fast; tsne: non-linear neighbourhood map (scikit-learn), slower.")
@click.option("--limit", type=int, default=2000, show_default=True,
              help="At most N points: a fixed random subset of larger sets.")
@click.option("--thumbnails", type=int, default=0, show_default=True,
              help="Draw N images at their points, spread over the map (needs DATA).")
@click.option("--layer", type=click.Choice(LAYERS), default="encoder", show_default=True,
              help="Features of a model: encoder output v or head embedding z.")
@click.option("--data-root", type=click.Path(), default=None, help="Where named datasets' files are.")
@click.option("--seed", type=int, default=0, show_default=True, help="t-SNE seed.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
def plot_embedding_cmd(source, data, out, method, limit, thumbnails, layer, data_root, seed, device, batch_size):
    """Draw a 2-D map of features coloured by label (unlabeled points grey). MODEL_OR_FEATURES is a run folder or an
    exported encoder, whose features of DATA (a dataset spec) are mapped, or an HDF5 features file of export-features
    (DATA is then needed only for --thumbnails). See docs/visualisation.md."""
    from instdisc.plots import embedding_map

    res = embedding_map(source, data, out, method=method, limit=limit, thumbnails=thumbnails, layer=layer,
                        seed=seed, device=resolve_device(device), data_root=data_root, batch_size=batch_size)
    w, h = res["size"]
    click.echo(f"wrote {res['path']} ({w}x{h} px): {res['method']} map of {res['n']} points, {res['labelled']} "
               f"labelled in {res['classes']} classes")
