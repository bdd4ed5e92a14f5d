"""``instdisc prepare``. Covered by tests/test_cli_prepare.py."""
from __future__ import annotations

import json

import click

from instdisc.data.prepare import prepare_cache

from .app import cli, data_options


@cli.command("prepare")
@click.argument("data")
@click.option("--out", "out", required=True, type=click.Path(), help="Image cache to write (e.g. cache.h5).")
@click.option("--image-size", type=int, default=None, help="Side of the cached squares [default: inferred].")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              callback=lambda ctx, p, v: None if v is None else int(v),
              help="1 (grayscale) or 3 (RGB) [default: inferred from the images].")
@data_options
@click.option("--skip-bad-images", is_flag=True, help="Leave unreadable images out (recorded in the cache).")
@click.option("--workers", type=int, default=None, help="Decoding threads [default: the CPU count].")
@click.option("--index-cache", type=click.Path(file_okay=False), default=None,
              help="Folder caching the file index and bad-image scan of the source.")
@click.option("--chunk-rows", type=int, default=None, hidden=True,
              help="Images decoded and written at a time [default: about 64 MiB of pixels].")
@click.option("--overwrite", is_flag=True, help="Replace a complete cache (the old one stays until the new one is "
                                                "complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")
def prepare_cmd(data, out, image_size, channels, data_root, limit, skip_bad_images, workers, index_cache, chunk_rows,
                overwrite, as_json):
    """Decode the folder or file list DATA once into an image cache: a dataset spec (cache:OUT) for every command.

    An interrupted prepare is continued by running the same command again.
    """
    res = prepare_cache(data, out, image_size=image_size, channels=channels, data_root=data_root, limit=limit,
                        skip_bad_images=skip_bad_images, overwrite=overwrite, workers=workers,
                        index_cache=index_cache, chunk_rows=chunk_rows)
    resumed = f", resumed after {res.resumed_from} images" if res.resumed_from else ""
    skipped = f", {res.skipped} bad images skipped" if res.skipped else ""
    click.echo(f"wrote {res.n} images ({res.channels} x {res.image_size} x {res.image_size}) to {out}{resumed}"
               f"{skipped} ({res.seconds:.1f}s, {res.images_per_s:.0f} images/s); use it as cache:{out}")
    if as_json:
        click.echo(json.dumps({"out": str(out), "n": res.n, "channels": res.channels, "image_size": res.image_size,
                               "resumed_from": res.resumed_from, "skipped": res.skipped, "seconds": res.seconds,
                               "images_per_s": res.images_per_s}))
