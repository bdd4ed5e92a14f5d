"""``instdisc linear-probe`` and ``instdisc finetune``. Covered by tests/test_cli_downstream.py."""
from __future__ import annotations

import json

import click

from instdisc.downstream.finetune import finetune
from instdisc.downstream.linear import OPTIMIZERS, PREPROCESS, linear_probe
from instdisc.export.hdf5 import LAYERS
from instdisc.device import DEVICES, resolve_device

from .app import cli, data_options


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}%"


@cli.command("linear-probe")
@click.argument("model", type=click.Path())
@click.option("--train", "train_spec", required=True, help="Labelled dataset the classifier is trained on.")
@click.option("--test", "test_spec", required=True, help="Labelled dataset it is evaluated on.")
@data_options
@click.option("--layer", type=click.Choice(LAYERS), default="encoder", show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="lbfgs", show_default=True,
              help="lbfgs: full batch (epochs = iteration cap); adam/sgd: minibatches, cosine lr.")
@click.option("--preprocess", type=click.Choice(PREPROCESS), default="whiten", show_default=True)
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: lbfgs 1.0, adam 1e-3, sgd 0.1.")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Minibatch (adam/sgd).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def linear_probe_cmd(model, train_spec, test_spec, data_root, limit, layer, optimizer, preprocess, epochs, lr,
                     weight_decay, batch_size, device, workers, seed, as_json):
    """Top-1 of a linear classifier trained on MODEL's frozen features (run folder or exported encoder)."""
    res = linear_probe(model, train_spec, test_spec, layer=layer, optimizer=optimizer, preprocess=preprocess,
                       epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                       device=resolve_device(device), limit=limit, data_root=data_root, seed=seed, workers=workers)
    click.echo(f"linear probe ({res.dim}-d {layer} features, {res.n_train} train / {res.n_test} test, "
               f"{res.n_classes} classes): top-1 {_fmt(res.top1)}  top-5 {_fmt(res.top5)}  "
               f"(train top-1 {_fmt(res.train_top1)}; features {res.seconds_features:.1f}s, "
               f"fit {res.seconds_train:.1f}s)")
    if as_json:
        click.echo(json.dumps(res.to_dict()))


@cli.command("finetune")
@click.argument("model", type=click.Path())
@click.option("--train", "train_spec", required=True, help="Labelled dataset to fine-tune on.")
@click.option("--test", "test_spec", required=True, help="Labelled dataset to evaluate on.")
@click.option("--out", "out", required=True, type=click.Path(), help="Folder for the fine-tuned model.")
@data_options
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--no-augment", "augment", flag_value=False, default=True, help="Train without augmentation.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def finetune_cmd(model, train_spec, test_spec, out, data_root, limit, epochs, lr, weight_decay, batch_size, augment,
                 device, workers, seed, overwrite, as_json):
    """Fine-tune MODEL's encoder with a new linear layer on labelled data; save it to --out."""
    res = finetune(model, train_spec, test_spec, out, epochs=epochs, lr=lr, weight_decay=weight_decay,
                   batch_size=batch_size, augment=augment, device=resolve_device(device), seed=seed, limit=limit,
                   data_root=data_root, workers=workers, overwrite=overwrite)
    click.echo(f"fine-tuned {res.epochs} epochs on {res.n_train} images: top-1 {_fmt(res.top1)}  "
               f"top-5 {_fmt(res.top5)}  ({res.seconds:.1f}s), saved to {out}")
    if as_json:
        click.echo(json.dumps(res.to_dict()))
