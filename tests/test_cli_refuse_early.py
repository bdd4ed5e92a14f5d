"""Every command refuses a bad option value before any expensive pass (issue 21, item 7): exit 2, one `error:`
line naming the option, and no dataset built, no feature extracted, no checkpoint or metrics file read — the
functions that do so are replaced by ones that fail the test if called. One test per command."""
import importlib
import pkgutil
import sys
import time

import pytest

import instdisc
from _cli_helpers import assert_one_line_error, invoke

# what reads data (or a run's weights, for the commands that read no dataset)
EXPENSIVE = ("build_dataset", "build_capped", "extract_features", "iter_feature_batches", "features_for",
             "load_run", "read_metrics")


class ReadData(AssertionError):
    """Raised by the stand-ins: a check came after the expensive pass."""


def _refuse(*args, **kwargs):
    raise ReadData("data was read before the options were checked")


@pytest.fixture
def no_data(monkeypatch):
    """Every loaded instdisc module's name for an expensive function now fails the test when called."""
    for info in pkgutil.walk_packages(instdisc.__path__, "instdisc."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            pass
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("instdisc", "instdisc_cli") and module is not None:
            for attr in EXPENSIVE:
                if callable(getattr(module, attr, None)):
                    monkeypatch.setattr(module, attr, _refuse)


def _refused(args, *words):
    t0 = time.perf_counter()
    r = invoke(args)
    assert_one_line_error(r, *words)
    assert time.perf_counter() - t0 < 10  # no pass over any data


def _specs(root):
    return ["--train", "fashion-mnist:train", "--data-root", root]


def test_knn(run, no_data):
    out, root = run
    _refused(["knn", out, *_specs(root), "--test", "fashion-mnist:test", "--k", "-3"], "k must be an integer >= 1")
    _refused(["knn", out, *_specs(root), "--test", "fashion-mnist:test", "--tau", "0"], "tau must be")
    _refused(["knn", out, *_specs(root), "--test", "fashion-mnist:test", "--workers", "-1"], "--workers")


def test_compare(run, no_data):
    out, root = run
    _refused(["compare", out, *_specs(root), "--test", "fashion-mnist:test", "--k", "-3"], "k must be an integer")
    _refused(["compare", out, *_specs(root), "--test", "fashion-mnist:test", "--limit", "0"], "--limit")


def test_neighbors(run, no_data, tmp_path):
    out, root = run
    _refused(["neighbors", out, *_specs(root), "--query", "fashion-mnist:test", "--out", tmp_path / "n.png",
              "--limit", "0"], "--limit")


def test_linear_probe(run, no_data):
    out, root = run
    _refused(["linear-probe", out, *_specs(root), "--test", "fashion-mnist:test", "--epochs", "0"], "--epochs")
    _refused(["linear-probe", out, *_specs(root), "--test", "fashion-mnist:test", "--lr", "-1"], "--lr")
    _refused(["linear-probe", out, *_specs(root), "--test", "fashion-mnist:test", "--batch-size", "0"],
             "--batch-size")


def test_finetune(run, no_data, tmp_path):
    out, root = run
    _refused(["finetune", out, *_specs(root), "--test", "fashion-mnist:test", "--out", tmp_path / "ft",
              "--workers", "-1"], "--workers")


def test_export_features(run, no_data, tmp_path):
    out, root = run
    _refused(["export-features", out, "fashion-mnist:train", "--out", tmp_path / "f.h5", "--data-root", root,
              "--workers", "-1"], "--workers")


def test_export_encoder(run, no_data, tmp_path):
    out, _ = run
    (tmp_path / "taken").mkdir()
    _refused(["export-encoder", out, "--out", tmp_path / "taken"], "exists")


def test_plot(run, no_data, tmp_path):
    out, _ = run
    _refused(["plot", out, "--out", tmp_path / "curves.jpg"], ".png")


def test_plot_embedding(run, no_data, tmp_path):
    out, root = run
    _refused(["plot-embedding", out, "fashion-mnist:train", "--out", tmp_path / "e.png", "--data-root", root,
              "--limit", "0"], "--limit")
    _refused(["plot-embedding", out, "fashion-mnist:train", "--out", tmp_path / "e.png", "--data-root", root,
              "--batch-size", "0"], "--batch-size")


def test_prepare(no_data, tmp_path):
    (tmp_path / "imgs").mkdir()
    for opt in ("--workers", "--chunk-rows"):
        _refused(["prepare", tmp_path / "imgs", "--out", tmp_path / "c.h5", opt, "0"], opt)


@pytest.mark.parametrize("opt,value", [("--log-every", "0"), ("--save-every", "-1"), ("--knn-every", "-1"),
                                       ("--warmup-epochs", "-1"), ("--weight-decay", "-1"), ("--image-size", "4")])
def test_train(run, no_data, tmp_path, opt, value):
    _, root = run
    _refused(["train", "fashion-mnist:train", "--out", tmp_path / "t", "--data-root", root, opt, value], opt)


def test_train_resume_and_checkpoint_refused_before_the_data(run, no_data, tmp_path):
    out, root = run
    _refused(["train", "fashion-mnist:train", "--out", tmp_path / "none", "--data-root", root, "--resume"],
             "--resume: no run directory at")
    _refused(["train", "fashion-mnist:train", "--out", out, "--data-root", root], "already holds a checkpoint")
