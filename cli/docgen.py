"""``python -m instdisc_cli.docgen > docs/cli.md``: every command with every option, from the click definitions.

Covered by tests/test_docs.py (docs/cli.md must equal what this prints, and every flag must be documented)."""
from __future__ import annotations

import click

from .main import cli

__all__ = ["cli_reference"]


def _option_line(p: click.Parameter) -> str:
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    kind = ""
    if isinstance(p.type, click.Choice):
        kind = " " + "\\|".join(str(c) for c in p.type.choices)
    elif not getattr(p, "is_flag", False) and p.type.name not in ("boolean",):
        kind = f" {p.type.name.upper()}"
    text = " ".join((getattr(p, "help", None) or "").split())
    return f"| {names}{kind} | {text} |"


def cli_reference() -> str:
    """The markdown page: one section per command (sorted), its usage line, help and an option table."""
    out = ["# Command reference", "", "Generated from the click definitions by `python -m instdisc_cli.docgen > "
           "docs/cli.md` (a test checks it is current). [Back to the README](../README.md)", ""]
    ctx = click.Context(cli, info_name="instdisc")
    for name in sorted(cli.commands):
        cmd = cli.commands[name]
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out += [f"## `instdisc {name}`", "", f"`{cmd.get_usage(sub).replace('Usage: ', '')}`", ""]
        doc = (cmd.help or "").strip().split("\n\n")[0]
        if doc:
            out += [" ".join(doc.split()), ""]
        opts = [p for p in cmd.params if isinstance(p, click.Option)]
        if opts:
            out += ["| option | meaning |", "|---|---|", *(_option_line(p) for p in opts), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    click.echo(cli_reference(), nl=False)
