"""Entry point: imports every command module so that each registers itself on the group."""
from __future__ import annotations

from . import compare, downstream, export, knn, mine, plot, prepare, train  # noqa: F401  (each registers its commands)
from .app import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="instdisc")
