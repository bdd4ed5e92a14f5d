"""``instdisc mine``: every training image's nearest neighbours (and clusters) from a run's memory bank. Covered by
tests/test_cli_mine.py."""
from __future__ import annotations

import json

import click

from instdisc.bank_neighbours import NEIGHBOUR_INDEXES
from instdisc.mining import check_mine_request, mine_bank, run_labels

from .app import cli


@cli.command("mine")
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 file to write (e.g. neighbours.h5).")
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per training image.")
@click.option("--clusters", type=int, default=0, show_default=True,
              help="Also cluster the bank into C clusters (spherical k-means; 0: no clustering).")
@click.option("--index", type=click.Choice(NEIGHBOUR_INDEXES), default="auto", show_default=True,
              help="FAISS search: flat (exact), ivf (approximate), auto (exact up to 60k rows).")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means and IVF training sample.")
@click.option("--labels/--no-labels", "use_labels", default=True, show_default=True,
              help="When the run's data has labels, report the share of neighbours with the same label (a monitor; "
                   "the search never reads them).")
@click.option("--data-root", type=click.Path(), default=None, help="Where the run's data is now (for --labels).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file (the old one stays until the new one is "
                                                "complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def mine_cmd(run_dir, out, k, clusters, index, seed, use_labels, data_root, overwrite, as_json):
    """Search RUN_DIR's memory bank (one stored embedding per training image) for every image's K nearest other
    images, without another pass over the data, and write them to an HDF5 file (docs/bank.md)."""
    check_mine_request(out, k=k, clusters=clusters, overwrite=overwrite)  # before the run and the data are read
    labels = run_labels(run_dir, data_root=data_root) if use_labels else None
    res = mine_bank(run_dir, out, k=k, clusters=clusters, index=index, seed=seed, labels=labels, overwrite=overwrite)
    extra = "" if res.label_agreement is None else f"; {100 * res.label_agreement:.1f}% of neighbours share a label"
    if res.cluster_purity is not None:
        extra += f", cluster purity {100 * res.cluster_purity:.1f}%"
    click.echo(f"wrote {res.n} x {res.k} neighbours{f' and {res.clusters} clusters' if res.clusters else ''} "
               f"({res.index} search, {res.seconds:.1f}s) to {out}{extra}")
    if as_json:
        click.echo(json.dumps({"out": str(out), "n": res.n, "k": res.k, "index": res.index,
                               "clusters": res.clusters, "seconds": res.seconds,
                               "label_agreement": res.label_agreement, "cluster_purity": res.cluster_purity}))
