"""``instdisc compare`` (the demo's table). Covered by tests/test_cli_compare.py."""
from __future__ import annotations

import json

import click

from instdisc.compare import compare_knn, format_table
from instdisc.device import DEVICES, resolve_device

from .app import cli, data_options


@cli.command("compare")
@click.argument("run_dir", type=click.Path())
@click.option("--train", "train_spec", required=True, help="Labelled gallery dataset.")
@click.option("--test", "test_spec", required=True, help="Labelled query dataset.")
@data_options
@click.option("--k", type=int, default=200, show_default=True)
@click.option("--tau", type=float, default=0.07, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def compare_cmd(run_dir, train_spec, test_spec, data_root, limit, k, tau, device, as_json):
    """kNN accuracy of the learned features vs the untrained encoder vs raw pixels."""
    rows = compare_knn(run_dir, train=train_spec, test=test_spec, k=k, tau=tau, device=resolve_device(device),
                       data_root=data_root, limit=limit)
    click.echo(format_table(rows, k, tau))
    if as_json:
        click.echo(json.dumps({"k": k, "tau": tau, "rows": rows}))
