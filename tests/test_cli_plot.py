"""cli/plot.py: instdisc plot and plot-embedding, and their one-line errors (exit 2)."""
import sys

import pytest

from instdisc.plots import MAP_SIZE, curves_size

from _cli_helpers import assert_one_line_error, invoke
from _plot_helpers import fake_records, png_stats, write_metrics


def test_plot_one_run(run, tmp_path):
    r = invoke(["plot", run[0], "--out", tmp_path / "c.png"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {tmp_path / 'c.png'}") and "panels: loss, lr" in r.output
    size, var = png_stats(tmp_path / "c.png")
    assert size[0] == 1500 and var > 100


def test_plot_several_runs_against_epoch(run, tmp_path):
    other = write_metrics(tmp_path / "other", fake_records(extra_epoch={"knn_top1": 0.4}))
    r = invoke(["plot", run[0], other, "--x", "epoch", "--out", tmp_path / "c.png", "--title", "two recipes"])
    assert r.exit_code == 0, r.output
    assert "2 run(s)" in r.output and "knn" in r.output
    panels = r.output.split("panels: ", 1)[1].splitlines()[0].split(", ")  # the run logs the health signals too
    assert {"loss", "lr", "similarity", "knn", "geometry", "spread", "staleness", "bank_share"} <= set(panels)
    assert png_stats(tmp_path / "c.png")[0] == curves_size(len(panels))


def _empty_metrics(p):
    (p / "metrics.jsonl").write_text("")
    return p


@pytest.mark.parametrize("make,words", [
    (lambda p: p / "missing", ["run not found"]),
    (lambda p: p, ["has no metrics.jsonl"]),
    (_empty_metrics, ["is empty"]),
    (lambda p: write_metrics(p, [r for r in fake_records() if r["type"] == "step"]), ["no finished epoch"]),
])
def test_plot_bad_runs(tmp_path, make, words):
    assert_one_line_error(invoke(["plot", make(tmp_path), "--out", tmp_path / "c.png"]), *words)
    assert not (tmp_path / "c.png").exists()


def test_plot_bad_out(tmp_path):
    run = write_metrics(tmp_path / "r", fake_records())
    assert_one_line_error(invoke(["plot", run, "--out", tmp_path / "c.jpg"]), ".png")
    assert_one_line_error(invoke(["plot", run, "--out", tmp_path / "no" / "c.png"]), "does not exist")
    assert_one_line_error(invoke(["plot", "--out", tmp_path / "c.png"]), "RUNS")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    run = write_metrics(tmp_path / "r", fake_records())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert_one_line_error(invoke(["plot", run, "--out", tmp_path / "c.png"]), "matplotlib", "instdisc[plot]")


def test_plot_embedding_of_a_model(run, tmp_path):
    r = invoke(["plot-embedding", run[0], "fashion-mnist:test", "--data-root", run[1], "--limit", 20,
                "--thumbnails", 3, "--out", tmp_path / "m.png", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "pca map of 20 points, 20 labelled in" in r.output
    size, var = png_stats(tmp_path / "m.png")
    assert size == MAP_SIZE and var > 100


def test_plot_embedding_errors(run, tmp_path):
    assert_one_line_error(invoke(["plot-embedding", run[0], "--out", tmp_path / "m.png"]), "DATA")
    assert_one_line_error(invoke(["plot-embedding", tmp_path / "nope", "fashion-mnist:test", "--out",
                                  tmp_path / "m.png"]), "model not found")
    assert_one_line_error(invoke(["plot-embedding", tmp_path / "f.h5", "--out", tmp_path / "m.png"]), "not found")
    assert_one_line_error(invoke(["plot-embedding", run[0], "fashion-mnist:test", "--data-root", run[1],
                                  "--limit", 0, "--out", tmp_path / "m.png"]), "--limit")
    assert_one_line_error(invoke(["plot-embedding", run[0], "fashion-mnist:test", "--method", "umap", "--out",
                                  tmp_path / "m.png"]), "--method")


def test_plot_embedding_of_unlabeled_features(run, tmp_path):
    import h5py

    from instdisc.export.hdf5 import export_features

    h5 = tmp_path / "f.h5"
    export_features(run[0], "fashion-mnist:test", h5, data_root=str(run[1]), limit=12)
    with h5py.File(h5, "r+") as f:
        f["labels"][...] = -1
    assert_one_line_error(invoke(["plot-embedding", h5, "--out", tmp_path / "m.png"]), "no labels")
