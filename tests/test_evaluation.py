import json

import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.evaluation import format_knn, is_feature_file, knn_benchmark
from instdisc.training import train

from test_train_loop import tiny_cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import make_fake_mnist

    root = make_fake_mnist(tmp_path_factory.mktemp("data") / "fm")
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_cfg(root, out, epochs=1, low_dim=8))
    return root, out


def test_is_feature_file():
    assert is_feature_file("a.h5") and is_feature_file("x/B.HDF5") and not is_feature_file("fashion-mnist")


def test_knn_on_run_matches_direct(tiny_run):
    root, out = tiny_run
    res = knn_benchmark(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=5,
                        retrieval=True)
    assert 0 <= res["top1"] <= 1 and res["n_train"] == 96 and res["n_test"] == 40 and res["k"] == 5
    assert set(res["retrieval"]) >= {"recall@1", "recall@5", "recall@10", "map_at_r", "map"}
    text = format_knn(res)
    assert "top-1" in text and "mAP@R" in text


def test_use_bank_and_size_mismatch(tiny_run):
    root, out = tiny_run
    res = knn_benchmark(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=10,
                        use_bank=True)
    assert res["source"] == "bank" and res["n_train"] == 96
    with pytest.raises(InstdiscError, match="memory bank has 96 slots"):
        knn_benchmark(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root),
                      use_bank=True, limit=50)


def test_needs_model_for_datasets():
    with pytest.raises(InstdiscError, match="MODEL"):
        knn_benchmark(None, train="fashion-mnist:train", test="fashion-mnist:test")


def test_hdf5_sources(tiny_run, tmp_path):
    from instdisc.export.hdf5 import export_features

    root, out = tiny_run
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    export_features(out, "fashion-mnist:train", a, data_root=str(root))
    export_features(out, "fashion-mnist:test", b, data_root=str(root))
    from_files = knn_benchmark(None, train=str(a), test=str(b), k=5)
    direct = knn_benchmark(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=5)
    assert from_files["top1"] == direct["top1"] and from_files["nn1"] == direct["nn1"]
    emb = tmp_path / "e.h5"
    export_features(out, "fashion-mnist:test", emb, data_root=str(root), layer="embedding")
    with pytest.raises(InstdiscError, match="dimensions differ"):
        knn_benchmark(None, train=str(a), test=str(emb))
