import numpy as np
import pytest
from PIL import Image

from instdisc.errors import InstdiscError
from instdisc.neighbors import GREEN, RED, neighbor_grid, render_grid

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_render_grid_frames():
    img = Image.new("L", (10, 10), 128)
    pic = render_grid([[img, img, img]], [[(0, 0, 0), GREEN, RED]], cell=16, border=2, gap=4)
    step = 16 + 4 + 2
    assert pic.size == (3 * step + 4, step)
    assert pic.getpixel((step + 4, 0)) == GREEN
    assert pic.getpixel((2 * step + 4, 0)) == RED


def test_neighbor_grid_png(tiny_run, tmp_path):  # noqa: F811
    root, out = tiny_run
    res = neighbor_grid(out, train="fashion-mnist:train", query="fashion-mnist:test", data_root=str(root),
                        out=tmp_path / "g.png", n=3, k=4)
    pic = Image.open(tmp_path / "g.png")
    assert pic.mode == "RGB" and len(res["queries"]) == 3 and res["k"] == 4
    assert 0 <= res["match_rate"] <= 1


def test_neighbor_grid_bad_out(tiny_run, tmp_path):  # noqa: F811
    root, out = tiny_run
    with pytest.raises(InstdiscError, match="png"):
        neighbor_grid(out, train="fashion-mnist:train", query="fashion-mnist:test", data_root=str(root),
                      out=tmp_path / "g.jpg")
