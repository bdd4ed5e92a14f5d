"""instdisc/plots/canvas.py: exact pixel sizes, PNG paths, the missing-extra error."""
import sys

import pytest

from instdisc.errors import InstdiscError
from instdisc.plots.canvas import DPI, check_png_path, new_figure, save_png

from _plot_helpers import png_stats


def test_figure_has_the_asked_pixel_size(tmp_path):
    fig = new_figure(640, 360)
    fig.add_subplot().plot([0, 1, 2], [2, 0, 1])
    path = save_png(fig, tmp_path / "a.png")
    size, var = png_stats(path)
    assert size == (640, 360) and var > 0 and DPI == 100
    assert not [p for p in tmp_path.iterdir() if p.name != "a.png"]  # no temp file left


@pytest.mark.parametrize("name,match", [("a.jpg", "must be a .png"), ("missing/a.png", "folder does not exist")])
def test_bad_out_paths(tmp_path, name, match):
    with pytest.raises(InstdiscError, match=match):
        check_png_path(tmp_path / name)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(InstdiscError, match=r"matplotlib: pip install 'instdisc\[plot\]'"):
        new_figure(100, 100)
