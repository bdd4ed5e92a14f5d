"""Training curves: the series of one or more runs' ``metrics.jsonl`` and the picture ``instdisc plot`` draws.

Covered by tests/test_plots_curves.py.

:func:`run_series` turns records into series (pure: the numbers plotted are the file's numbers); :func:`panels_for`
groups the fields present into panels by the table :data:`PANELS` (known fields: title, unit, scale) and gives every
other numeric field a panel of its own, so a field added to the records later is drawn without a code change;
:func:`draw_curves` draws them, one colour per run; :func:`plot_runs` does all three for run folders.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InstdiscError
from .canvas import check_png_path, new_figure, save_png
from .metrics import metrics_path, read_metrics

__all__ = ["PANELS", "NOT_PLOTTED", "Panel", "RunSeries", "Series", "curves_size", "draw_curves", "panels_for",
           "plot_runs", "run_names", "run_series"]


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    ylabel: str                # the quantity and its unit
    fields: tuple[str, ...]    # record fields drawn in this panel, in legend order
    scale: float = 1.0         # values are multiplied by this (fractions -> %)
    log_if_wide: bool = False  # logarithmic y axis when the positive values span more than two decades


# Known fields -> panel, in the order the panels are drawn. Step records and epoch records may both hold a field
# (loss: per logged step and the epoch mean); both are drawn in its panel.
PANELS: tuple[Panel, ...] = (
    Panel("loss", "Training loss", "loss (nats)", ("loss",), log_if_wide=True),
    Panel("lr", "Learning rate", "learning rate (SGD step size)", ("lr",)),
    Panel("similarity", "Positive vs negative similarity", "cosine similarity",
          ("pos_sim", "neg_sim", "inbatch_sim", "gap")),
    Panel("knn", "Bank kNN accuracy (held-out data)", "accuracy (%)", ("knn_top1", "knn_top5", "bank_knn_top1"),
          scale=100.0),
    Panel("geometry", "Alignment and uniformity (lower is better)", "value (as logged)",
          ("alignment", "uniformity")),
    Panel("spread", "Embedding spread", "std of z per dimension", ("z_std",)),
    Panel("staleness", "Memory bank: stored rows vs current embeddings", "cosine similarity",
          ("staleness", "own_sim", "stale_gap")),
    Panel("bank_share", "Bank rows' share of the negatives' softmax weight", "fraction", ("bank_share",)),
    Panel("log_z", "NCE normaliser Z", "log Z (nats)", ("log_z",)),
    Panel("throughput", "Training throughput", "images/s", ("images_per_s",)),
)
# Fields that are coordinates or bookkeeping, not curves.
NOT_PLOTTED = frozenset({"type", "epoch", "step", "global_step", "eta_s", "steps_per_s", "seconds"})
KINDS = ("step", "epoch")
X_AXES = ("step", "epoch")  # the horizontal axes a figure can use

WIDTH_PX, ROW_PX, HEADER_PX, COLUMNS = 1500, 360, 100, 3
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # (line style, epoch marker) of a panel's fields


@dataclass
class Series:
    x: np.ndarray  # (n,) float64: global step, or epoch when the run was read with x="epoch"
    y: np.ndarray  # (n,) float64: the field's values; NaN where a record has null or lacks the field


@dataclass
class RunSeries:
    """The curves of one run: ``series[(kind, field)]`` with kind "step" (logged steps) or "epoch" (epoch ends)."""

    name: str
    steps_per_epoch: float | None
    series: dict[tuple[str, str], Series] = field(default_factory=dict)

    def fields(self) -> set[str]:
        return {f for _, f in self.series}


def _number(v) -> float:
    """A record value as float; NaN for null, non-numbers and booleans."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return math.nan
    return float(v)


def run_series(records: list[dict], name: str, x: str = "step", where: str | None = None) -> RunSeries:
    """The series of ``records`` (of one run). ``x``: "step" puts every point at its record's global step (epoch
    records at the step that ended the epoch), "epoch" at global step / steps per epoch (epoch records at 1, 2, ...).

    A field is a series of a kind when at least one record of that kind holds a finite number for it; fields in
    :data:`NOT_PLOTTED` are not series. Raises InstdiscError, naming ``where`` (default: ``name``), when there is no
    epoch record.
    """
    if x not in X_AXES:
        raise InstdiscError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    by_kind = {k: [r for r in records if r.get("type") == k] for k in KINDS}
    ends = [r for r in by_kind["epoch"] if _number(r.get("epoch")) > 0 and _number(r.get("global_step")) > 0]
    if not ends:
        raise InstdiscError(f"{where or name} has no finished epoch (no epoch record); the curves need at least one")
    spe = _number(ends[0]["global_step"]) / _number(ends[0]["epoch"])  # steps per epoch
    out = RunSeries(name, spe)
    for kind, recs in by_kind.items():
        recs = [r for r in recs if math.isfinite(_number(r.get("global_step")))]
        if not recs:
            continue
        xs = np.array([_number(r["global_step"]) for r in recs], dtype=np.float64)  # (n,)
        if x == "epoch":
            xs = xs / spe
        names = sorted({k for r in recs for k in r if k not in NOT_PLOTTED})
        for f in names:
            ys = np.array([_number(r.get(f)) for r in recs], dtype=np.float64)  # (n,)
            if np.isfinite(ys).any():
                out.series[(kind, f)] = Series(xs, ys)
    return out


def panels_for(runs: list[RunSeries]) -> list[tuple[Panel, tuple[str, ...]]]:
    """(panel, fields present in some run) for the panels that have data: the known panels in table order, then one
    panel per unknown field, sorted by name."""
    present = set().union(*(r.fields() for r in runs)) if runs else set()
    known = {f for p in PANELS for f in p.fields}
    out = [(p, tuple(f for f in p.fields if f in present)) for p in PANELS]
    out = [(p, fs) for p, fs in out if fs]
    for f in sorted(present - known):
        out.append((Panel(f, f.replace("_", " "), f"{f} (as logged)", (f,)), (f,)))
    return out


def curves_size(n_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a picture with ``n_panels`` panels: 1500 wide; 360 per row of three panels plus
    100 for the title and the legend of runs."""
    rows = max(1, math.ceil(n_panels / COLUMNS))
    return WIDTH_PX, HEADER_PX + ROW_PX * rows


def run_names(paths: list) -> list[str]:
    """Legend names: each run's folder name (a metrics file: its folder's), with as many parent folders as it takes
    to tell the runs apart; the same folder given twice gets " #1", " #2", ..."""
    parts = []
    for p in paths:
        p = Path(p).absolute()
        parts.append((p.parent if p.is_file() else p).parts[1:])  # without the root "/"
    for depth in range(1, max(len(q) for q in parts) + 1):
        names = ["/".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name} #{i + 1}" for i, name in enumerate("/".join(q[-1:]) for q in parts)]


def _wide(ys: list[np.ndarray]) -> bool:
    """True when all finite values are > 0 and the largest is more than 100 times the smallest."""
    v = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.zeros(0)
    return bool(len(v)) and v.min() > 0 and v.max() > 100 * v.min()


def _colour(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def draw_curves(runs: list[RunSeries], out, *, x: str = "step", title: str | None = None) -> dict:
    """Draw ``runs`` into the PNG ``out`` (size :func:`curves_size`); returns {"path", "size", "panels", "log_y"
    (the panels drawn with a logarithmic y axis: the loss when its values span more than two decades, as when
    recipes with different losses are compared)}.

    One panel per entry of :func:`panels_for`, three per row. Colour = run (legend below the panels); line style =
    field (legend in the panel); lines = logged steps, markers = epoch records. With x="step" and one steps-per-epoch
    shared by all runs, each panel has an epoch axis on top.
    """
    from matplotlib.lines import Line2D

    panels = panels_for(runs)
    width, height = curves_size(len(panels))
    fig = new_figure(width, height)
    rows = math.ceil(len(panels) / COLUMNS)
    axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
    log_y = []
    spes = {r.steps_per_epoch for r in runs}
    spe = spes.pop() if len(spes) == 1 and x == "step" else None  # one steps-per-epoch: an epoch axis on top
    for ax, (panel, fields) in zip(axes, panels):
        handles = []
        for j, f in enumerate(fields):
            style, marker = _STYLES[j % len(_STYLES)]
            for i, run in enumerate(runs):
                s = run.series.get(("step", f))
                if s is not None:
                    ax.plot(s.x, s.y * panel.scale, ls=style, lw=1.3, color=_colour(i), alpha=0.9)
                e = run.series.get(("epoch", f))
                if e is not None:
                    ax.plot(e.x, e.y * panel.scale, ls=style if s is None else "none", lw=1.3, marker=marker, ms=4.5,
                            color=_colour(i), markeredgecolor="white", markeredgewidth=0.6)
            if any(("step", f) in r.series for r in runs):
                handles.append(Line2D([], [], color="0.25", ls=style, label=f))
            if any(("epoch", f) in r.series for r in runs):
                only_epoch = not any(("step", f) in r.series for r in runs)
                handles.append(Line2D([], [], color="0.25", ls=style if only_epoch else "none", marker=marker, ms=4.5,
                                      label=f if only_epoch else f"{f} (epoch)"))
        if panel.log_if_wide and _wide([s.y for r in runs for (_, f), s in r.series.items() if f in fields]):
            ax.set_yscale("log")
            log_y.append(panel.key)
        ax.set_title(panel.title, fontsize=11)
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel("global step (batches)" if x == "step" else "epoch")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8, handlelength=3.2)
        if spe:
            top = ax.secondary_xaxis("top", functions=(lambda s, k=spe: s / k, lambda e, k=spe: e * k))
            top.set_xlabel("epoch", fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=[Line2D([], [], color=_colour(i), lw=2.5, label=r.name) for i, r in enumerate(runs)],
               loc="outside lower center", ncols=min(len(runs), 6), fontsize=10, frameon=False)
    fig.suptitle(title or ("Training curves" if len(runs) == 1 else f"Training curves of {len(runs)} runs"),
                 fontsize=14)
    path = save_png(fig, out)
    return {"path": str(path), "size": (width, height), "panels": [p.key for p, _ in panels], "log_y": log_y}


def plot_runs(runs: list[str | os.PathLike], out, *, x: str = "step", title: str | None = None,
              names: list[str] | None = None) -> dict:
    """``instdisc plot``: read each run's metrics.jsonl and draw the curves of all of them into ``out`` (PNG).
    Returns :func:`draw_curves`' dict plus "runs" (the legend names)."""
    if not runs:
        raise InstdiscError("give at least one run folder (or metrics.jsonl file)")
    check_png_path(out)
    names = list(names) if names is not None else run_names([metrics_path(r) for r in runs])
    series = [run_series(read_metrics(r), name, x=x, where=str(metrics_path(r))) for r, name in zip(runs, names)]
    res = draw_curves(series, out, x=x, title=title)
    res["runs"] = names
    return res
