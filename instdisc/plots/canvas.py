"""Matplotlib without global state: figures of an exact pixel size, drawn by the Agg backend and written as PNG
atomically. Covered by tests/test_plots_canvas.py.

matplotlib comes with the ``[plot]`` extra and is imported only here, when a picture is drawn; ``pyplot`` (global
figure registry, backend selection) is never used.
"""
from __future__ import annotations

import io
from pathlib import Path

from ..atomic import atomic_write
from ..errors import InstdiscError

__all__ = ["DPI", "check_png_path", "new_figure", "save_png"]

DPI = 100  # pixels per inch of every picture: a figure of W x H pixels is W/DPI x H/DPI inches


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InstdiscError("pictures need matplotlib: pip install 'instdisc[plot]'") from None
    return matplotlib, Figure, FigureCanvasAgg


def check_png_path(out) -> Path:
    """``out`` as a Path, checked before any work: a ``.png`` name in an existing folder."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InstdiscError(f"--out must be a .png file, got {out}")
    if not out.parent.is_dir():
        raise InstdiscError(f"output folder does not exist: {out.parent}")
    return out


def new_figure(width_px: int, height_px: int):
    """A matplotlib Figure of ``width_px`` x ``height_px`` pixels at :data:`DPI`, laid out by constrained layout
    (titles, labels and legends do not overlap), attached to an Agg canvas."""
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out) -> Path:
    """Write ``fig`` to ``out`` as PNG at :data:`DPI` (exactly the figure's pixel size), atomically.

    The picture is stored with a palette of 256 colours (plots have few colours; the file is 3-4 times smaller than
    24-bit RGB)."""
    from PIL import Image

    out = check_png_path(out)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    return out
