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
    """The match rate and every frame colour equal what the k nearest training images (cosine, float64, on the
    checkpoint encoder's features computed here) say: green where a neighbour's label is the query's."""
    import _reference as ref
    from instdisc.data import build_dataset
    from instdisc.neighbors import GRAY

    root, out = tiny_run
    res = neighbor_grid(out, train="fashion-mnist:train", query="fashion-mnist:test", data_root=str(root),
                        out=tmp_path / "g.png", n=3, k=4)
    pic = Image.open(tmp_path / "g.png")
    assert pic.mode == "RGB" and res["k"] == 4
    picked = res["queries"]
    assert len(picked) == 3 and picked == sorted(set(picked)) and all(0 <= i < 40 for i in picked)
    ckpt, enc, _ = ref.load_parts(out)
    mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    train_ds = build_dataset("fashion-mnist:train", data_root=str(root))
    test_ds = build_dataset("fashion-mnist:test", data_root=str(root))
    g = ref.encode(enc, ref.eval_inputs(train_ds, mean, std))
    q = ref.encode(enc, ref.eval_inputs(test_ds, mean, std))[picked]
    assert ref.label_margin(g, train_ds.labels, q) > 1e-5  # neighbour labels are well posed in float32
    _, ids = ref.neighbours(g, q, 4)  # (3, 4)
    same = train_ds.labels[ids] == test_ds.labels[picked][:, None]  # (3, 4)
    assert 0 < same.sum() < same.size  # both colours occur
    assert res["match_rate"] == pytest.approx(same.mean(), abs=1e-12)
    step, gap = 64 + 2 * 4 + 2, 12  # default cell 64, border 4; neighbours start after the gap
    assert pic.size == (5 * step + gap, 3 * step)
    for r in range(3):
        assert pic.getpixel((0, r * step)) == GRAY
        for c in range(1, 5):
            assert pic.getpixel((c * step + gap, r * step)) == (GREEN if same[r, c - 1] else RED), (r, c)


def test_neighbor_grid_bad_out(tiny_run, tmp_path):  # noqa: F811
    root, out = tiny_run
    with pytest.raises(InstdiscError, match="png"):
        neighbor_grid(out, train="fashion-mnist:train", query="fashion-mnist:test", data_root=str(root),
                      out=tmp_path / "g.jpg")
