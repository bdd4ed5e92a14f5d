"""instdisc/plots/curves.py: the series come from the file; panels follow the fields present; the picture's size."""

import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.plots.curves import (NOT_PLOTTED, PANELS, curves_size, draw_curves, panels_for, plot_runs, run_names,
                                   run_series)
from instdisc.plots.metrics import read_metrics

from _plot_helpers import fake_records, png_stats, write_metrics


def test_series_are_the_file_values(tmp_path):
    recs = fake_records(epochs=2, spe=4, every=2)
    rs = run_series(read_metrics(write_metrics(tmp_path / "r", recs)), "r")
    steps = [r for r in recs if r["type"] == "step"]
    loss = rs.series[("step", "loss")]
    assert loss.x.tolist() == [r["global_step"] for r in steps] == [2, 4, 6, 8]
    assert loss.y.tolist() == [r["loss"] for r in steps]
    assert rs.series[("step", "neg_sim")].y.tolist() == [r["neg_sim"] for r in steps]
    ep = rs.series[("epoch", "loss")]
    assert ep.x.tolist() == [4, 8] and ep.y.tolist() == [4.0, 3.0]
    assert rs.steps_per_epoch == 4
    assert ("step", "log_z") not in rs.series  # null everywhere: not a series
    assert not {f for _, f in rs.series} & NOT_PLOTTED  # eta_s, seconds, ... are not curves


def test_epoch_axis_divides_by_steps_per_epoch():
    rs = run_series(fake_records(epochs=2, spe=4, every=2), "r", x="epoch")
    assert rs.series[("step", "loss")].x.tolist() == [0.5, 1.0, 1.5, 2.0]
    assert rs.series[("epoch", "loss")].x.tolist() == [1.0, 2.0]


def test_null_and_missing_values_are_gaps():
    recs = fake_records(epochs=1, spe=4, every=1)
    recs[1]["loss"] = None
    del recs[2]["pos_sim"]
    rs = run_series(recs, "r")
    assert np.isnan(rs.series[("step", "loss")].y[1]) and np.isnan(rs.series[("step", "pos_sim")].y[2])
    assert np.isfinite(rs.series[("step", "loss")].y[[0, 2, 3]]).all()


def test_no_epoch_record_is_an_error():
    recs = [r for r in fake_records() if r["type"] == "step"]
    with pytest.raises(InstdiscError, match="runs/x has no finished epoch"):
        run_series(recs, "x", where="runs/x")


def test_panels_follow_the_fields_present():
    base = run_series(fake_records(), "a")
    assert [p.key for p, _ in panels_for([base])] == ["loss", "lr", "similarity", "throughput"]
    # epoch records with the training-health fields (and one field no table knows): panels appear, in table order
    health = dict(pos_sim=0.9, neg_sim=0.1, gap=0.8, alignment=0.5, uniformity=-2.0, z_std=0.08, staleness=0.9,
                  bank_knn_top1=0.5, knn_top1=0.6, brand_new_signal=1.0)
    rich = run_series(fake_records(extra_epoch=health), "b")
    panels = panels_for([base, rich])
    assert [p.key for p, _ in panels] == ["loss", "lr", "similarity", "knn", "geometry", "spread", "staleness",
                                          "throughput", "brand_new_signal"]
    fields = dict((p.key, fs) for p, fs in panels)
    assert fields["similarity"] == ("pos_sim", "neg_sim", "gap") and fields["knn"] == ("knn_top1", "bank_knn_top1")
    assert ("epoch", "pos_sim") in rich.series and ("step", "pos_sim") in rich.series


def test_known_panels_have_titles_and_units():
    for p in PANELS:
        assert p.title and p.ylabel and p.fields
    assert next(p for p in PANELS if p.key == "knn").scale == 100.0  # fractions drawn as %


def test_size_is_documented():
    assert curves_size(1) == curves_size(3) == (1500, 460)
    assert curves_size(4) == (1500, 820) and curves_size(9) == (1500, 1180)


def test_draw_one_and_several_runs(tmp_path):
    a = run_series(fake_records(), "a")
    b = run_series(fake_records(extra_epoch=dict(knn_top1=0.3, alignment=0.4)), "b")
    res = draw_curves([a, b], tmp_path / "c.png")
    size, var = png_stats(tmp_path / "c.png")
    assert size == res["size"] == curves_size(len(res["panels"])) == (1500, 820)
    assert var > 100  # not blank
    res = draw_curves([a], tmp_path / "one.png", x="epoch", title="mine")
    assert png_stats(tmp_path / "one.png")[0] == curves_size(4)


def test_loss_axis_is_logarithmic_when_runs_differ_by_decades(tmp_path):
    a = run_series(fake_records(), "infonce")
    recs = fake_records()
    for r in recs:
        r["loss"] *= 300  # an NCE loss summed over K noise samples
    b = run_series(recs, "nce")
    assert draw_curves([a, b], tmp_path / "c.png")["log_y"] == ["loss"]
    assert draw_curves([a], tmp_path / "c.png")["log_y"] == []


def test_plot_runs_on_a_real_run(run, tmp_path):
    out, _ = run
    res = plot_runs([out], tmp_path / "curves.png")
    assert res["runs"] == [out.name]
    assert {"loss", "lr", "similarity", "throughput"} <= set(res["panels"])
    size, var = png_stats(res["path"])
    assert size == curves_size(len(res["panels"])) and var > 100


def test_run_names_tell_runs_apart(tmp_path):
    for p in ("a/run", "b/run", "c"):
        (tmp_path / p).mkdir(parents=True)
    assert run_names([tmp_path / "a/run", tmp_path / "c"]) == ["run", "c"]
    assert run_names([tmp_path / "a/run", tmp_path / "b/run"]) == ["a/run", "b/run"]
    assert run_names([tmp_path / "c", tmp_path / "c"]) == ["c #1", "c #2"]


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(InstdiscError, match="at least one run"):
        plot_runs([], tmp_path / "x.png")
