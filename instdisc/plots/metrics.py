"""Read a training run's ``metrics.jsonl``: one record per line, ``type`` "step" or "epoch". Covered by
tests/test_plots_metrics.py.

Accepts the strict files written now (non-finite numbers as ``null``) and older ones (bare ``NaN``). A damaged last
line (a kill during the write) is skipped with a warning; a damaged line elsewhere is an error.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import InstdiscError

__all__ = ["METRICS_NAME", "metrics_path", "read_metrics"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


def metrics_path(run: str | os.PathLike) -> Path:
    """The metrics file of ``run``: a run folder (``RUN/metrics.jsonl``) or the file itself."""
    p = Path(run)
    if not p.exists():
        raise InstdiscError(f"run not found: {p}")
    if p.is_dir():
        f = p / METRICS_NAME
        if not f.is_file():
            raise InstdiscError(f"{p} has no {METRICS_NAME} (not a training run folder?)")
        return f
    return p


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The records of ``run`` in file order; InstdiscError when there are none or a line is not a JSON object."""
    path = metrics_path(run)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InstdiscError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if k == len(numbered) - 1 and records:
                log.warning("%s: skipped the damaged last line %d (a run killed while writing it?)", path, lineno)
                break
            raise InstdiscError(f"{path} line {lineno} is not a JSON object: {line[:80]!r}")
        records.append(rec)
    if not records:
        raise InstdiscError(f"{path} is empty: the run has not logged a step yet")
    return records
