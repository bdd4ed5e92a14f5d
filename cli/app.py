"""The click group and shared helpers. Covered by tests/test_cli_app.py."""
from __future__ import annotations

import logging
import sys

import click

from instdisc.errors import InstdiscError


class InstdiscGroup(click.Group):
    """Turns :class:`InstdiscError` into ``error: <message>`` on stderr and exit status 2 (no traceback)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InstdiscError as e:
            click.echo(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
            ctx.exit(2)
        except click.UsageError as e:  # a bad option value or an unknown command/option: one line, status 2
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
            ctx.exit(2)


def setup_logging(verbose: bool = False) -> None:
    from instdisc.progress_bar import set_quiet

    set_quiet(False)  # a new command starts with progress shown (tests invoke many in one process)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("instdisc")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


@click.group(cls=InstdiscGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="instdisc")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """instdisc: memory-bank instance discrimination — train, evaluate (kNN), export."""
    from instdisc.allocator import keep_freed_memory

    setup_logging(verbose)
    keep_freed_memory()  # CPU steps re-allocate the same large tensors: reuse them (instdisc/allocator.py)


def _set_quiet(ctx, param, value):
    if value:
        from instdisc.progress_bar import set_quiet

        set_quiet(True)
    return value


def quiet_option(f):
    """--quiet: no progress bars or periodic progress lines (other log lines and warnings stay)."""
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                        help="No progress bars or progress lines.")(f)


def data_options(f):
    """--data-root, --limit and --quiet, accepted by every command that reads a dataset."""
    f = quiet_option(f)
    f = click.option("--limit", type=int, default=None, help="Use a fixed subset of N images (quick trials).")(f)
    f = click.option("--data-root", type=click.Path(), default=None,
                     help="Where named datasets' files are (fashion-mnist defaults to "
                          "/usr/share/datasets/fashion-mnist).")(f)
    return f
