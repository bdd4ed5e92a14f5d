"""instdisc.training.verdict: the end-of-run verdict (and the loop's no-discrimination warning it goes with)."""
import json
import logging

import numpy as np
import pytest

from instdisc.compare import compare_datasets
from instdisc.data import build_dataset
from instdisc.data.subset import rows_of
from instdisc.training import train
from instdisc.training.verdict import (LEARNED, MAX_GALLERY, MAX_QUERIES, NOT_RAW, NOT_UNTRAINED, _decide_knn,
                                       held_out_slice, verdict_line)

from test_train_loop import tiny_cfg


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_held_out_slice_is_fixed_disjoint_bounded_and_labelled_only():
    labels = np.arange(30000) % 10
    labels[::7] = -1  # unlabelled rows never enter the slice
    gallery, queries = held_out_slice(labels, seed=3)
    assert len(queries) == MAX_QUERIES and len(gallery) == MAX_GALLERY
    assert not set(gallery) & set(queries) and (labels[gallery] >= 0).all() and (labels[queries] >= 0).all()
    again = held_out_slice(labels, seed=3)
    assert np.array_equal(again[0], gallery) and np.array_equal(again[1], queries)
    other = held_out_slice(labels, seed=4)
    assert not np.array_equal(other[1], queries)
    small = held_out_slice(np.arange(100) % 4, seed=0)  # 100 labelled (<= 5000): half are queries
    assert (len(small[0]), len(small[1])) == (50, 50)
    mid = held_out_slice(np.arange(6000) % 4, seed=0)  # over 5000 labelled: a fifth, at most 1000
    assert (len(mid[0]), len(mid[1])) == (4000, 1000)
    assert [len(x) for x in held_out_slice(np.arange(1500) % 4, seed=0)] == [750, 750]
    assert held_out_slice(np.full(500, -1), seed=0) is None  # no labels
    assert held_out_slice(np.zeros(500, dtype=int), seed=0) is None  # one class
    assert held_out_slice(np.arange(19) % 2, seed=0) is None  # too few labelled


def test_decision_and_margin():
    """1000 queries, learned 0.8: one standard error is sqrt(0.8 * 0.2 / 1000) = 0.012649."""
    assert _decide_knn(0.8, 0.7974, 0.7913, 1000) == (NOT_UNTRAINED, pytest.approx(0.012649, abs=1e-6))
    assert _decide_knn(0.7972, 0.7974, 0.7913, 1000)[0] == NOT_UNTRAINED  # the run
    assert _decide_knn(0.80, 0.70, 0.795, 1000)[0] == NOT_RAW
    assert _decide_knn(0.8628, 0.7974, 0.7913, 1000)[0] == LEARNED
    assert _decide_knn(1.0, 0.9, 0.9, 1000)[1] == 0.005  # at least half a point


def test_verdict_equals_compare_on_the_same_slice(fake_mnist, tmp_path, caplog):
    """The record's three accuracies are exactly `instdisc compare`'s rows on the verdict's slice (gallery rows vs
    query rows of the training data), and the verdict is one line on the log plus one record in metrics.jsonl."""
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="instdisc"):
        res = train(tiny_cfg(fake_mnist, out, epochs=1, log_every=100))
    rec = res.verdict
    assert _records(out)[-1] == json.loads(json.dumps(rec))
    assert rec["type"] == "verdict" and rec["epoch"] == 1 and rec["verdict"] in (LEARNED, NOT_UNTRAINED, NOT_RAW)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict: ")]
    assert lines == [verdict_line(rec)] and "\n" not in lines[0]
    ds = build_dataset("fashion-mnist:train", data_root=str(fake_mnist))
    gallery, queries = held_out_slice(ds.labels, seed=0)
    assert (rec["n_gallery"], rec["n_queries"]) == (len(gallery), len(queries)) == (48, 48)
    rows = compare_datasets(out, rows_of(ds, gallery), rows_of(ds, queries), k=rec["k"], tau=rec["tau"])
    top1 = {r["features"]: r["top1"] for r in rows}
    assert rec["knn_learned"] == top1["learned encoder (v)"]
    assert rec["knn_untrained"] == top1["untrained encoder (v)"]
    assert rec["knn_raw"] == top1["raw pixels"]


def test_no_verdict_and_unlabelled_data(fake_mnist, tmp_path):
    """--no-verdict writes no record; without labels the verdict compares the health signals with the untrained
    encoder's."""
    res = train(tiny_cfg(fake_mnist, tmp_path / "off", limit=40, verdict=False))
    assert res.verdict is None and all(r["type"] != "verdict" for r in _records(tmp_path / "off"))
    ds = build_dataset("fashion-mnist:train", data_root=str(fake_mnist), limit=40)
    ds.labels = np.full(len(ds), -1, dtype=np.int64)
    rec = train(tiny_cfg(fake_mnist, tmp_path / "unl", limit=40), dataset=ds).verdict
    assert rec["verdict"] in (LEARNED, NOT_UNTRAINED) and rec["n_probe"] == 40 and "knn_learned" not in rec
    for key in ("alignment", "uniformity", "gap"):
        assert np.isfinite(rec[f"{key}_learned"]) and np.isfinite(rec[f"{key}_untrained"])
    assert "no labels" in verdict_line(rec)


def test_warning_fires_on_a_run_built_to_fail(fake_mnist, tmp_path, caplog):
    """Every image the same: nothing tells one image from another, the gap stays at 0 and the warning comes at the
    third epoch; the verdict then says the run did not beat the untrained encoder."""
    ds = build_dataset("fashion-mnist:train", data_root=str(fake_mnist), limit=32)
    ds.array = ds.array[:1].expand_as(ds.array).contiguous()  # (32, 1, 28, 28): 32 copies of one image
    with caplog.at_level(logging.WARNING, logger="instdisc"):
        res = train(tiny_cfg(fake_mnist, tmp_path / "fail", limit=32, nce_k=16, epochs=3, log_every=100),
                    dataset=ds)
    warned = [r.getMessage() for r in caplog.records if "does not discriminate" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("epoch 3: ") and "try" in warned[0]
    assert res.verdict["verdict"] == NOT_UNTRAINED


def test_resume_gives_one_verdict_of_the_finished_run(fake_mnist, tmp_path):
    """A run extended by --resume ends with one verdict, of its last epoch (the earlier one is cut with the records
    written after the checkpoint)."""
    out = tmp_path / "run"
    train(tiny_cfg(fake_mnist, out, limit=40, nce_k=16, epochs=1))
    res = train(tiny_cfg(fake_mnist, out, limit=40, nce_k=16, epochs=2), resume=True)
    verdicts = [r for r in _records(out) if r["type"] == "verdict"]
    assert len(verdicts) == 1 and verdicts[0]["epoch"] == 2 == res.verdict["epoch"]


def test_cli_prints_one_verdict_line_and_no_verdict_skips_it(fake_mnist, tmp_path):
    from _cli_helpers import invoke

    args = ["train", "fashion-mnist:train", "--data-root", fake_mnist, "--arch", "convnet-tiny", "--epochs", "1",
            "--batch-size", "16", "--limit", "40", "--nce-k", "16", "--low-dim", "16", "-q"]
    r = invoke([*args, "--out", tmp_path / "a"])
    assert r.exit_code == 0 and r.stderr.count("verdict: ") == 1, r.output
    r = invoke([*args, "--out", tmp_path / "b", "--no-verdict"])
    assert r.exit_code == 0 and "verdict: " not in r.stderr, r.output
