import json

import numpy as np
import pytest

from instdisc.errors import InstdiscError
from instdisc.evaluation import format_knn, is_feature_file, knn_benchmark
from instdisc.training import train

from test_train_loop import tiny_cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import make_template_mnist

    root = make_template_mnist(tmp_path_factory.mktemp("data") / "fm")  # well-posed neighbours (see there)
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_cfg(root, out, epochs=1, low_dim=8))
    return root, out


def test_is_feature_file():
    assert is_feature_file("a.h5") and is_feature_file("x/B.HDF5") and not is_feature_file("fashion-mnist")


def test_knn_on_run_matches_direct(tiny_run):
    """The benchmark equals weighted kNN, 1-NN, majority, top-5 and retrieval metrics computed here from their
    definitions (float64) on the encoder features of the checkpoint's weights, run directly on the images."""
    import _reference as ref
    from instdisc.data import build_dataset

    root, out = tiny_run
    res = knn_benchmark(out, train="fashion-mnist:train", test="fashion-mnist:test", data_root=str(root), k=5,
                        retrieval=True)
    assert res["n_train"] == 96 and res["n_test"] == 40 and res["k"] == 5 and res["source"] == "encoder"
    ckpt, enc, _ = ref.load_parts(out)
    mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    train_ds = build_dataset("fashion-mnist:train", data_root=str(root))
    test_ds = build_dataset("fashion-mnist:test", data_root=str(root))
    g = ref.encode(enc, ref.eval_inputs(train_ds, mean, std))  # (96, 16)
    q = ref.encode(enc, ref.eval_inputs(test_ds, mean, std))  # (40, 16)
    assert ref.label_margin(g, train_ds.labels, q) > 1e-5  # far above float32 rounding: equality is meaningful
    want = ref.weighted_knn(g, train_ds.labels, q, test_ds.labels, k=5, tau=0.07)
    assert 0 < want["top1_count"] < 40 and want["top5"] is not None  # neither trivial extreme; 6 classes
    assert res["top1"] == pytest.approx(want["top1"], abs=1e-12)
    for key in ("top5", "nn1", "majority"):
        assert res[key] == pytest.approx(want[key], abs=1e-12), key
    assert res["per_class"] == pytest.approx(want["per_class"], abs=1e-12)
    want_r = ref.retrieval(q, test_ds.labels, g, train_ds.labels)
    for key, value in want_r.items():
        assert res["retrieval"][key] == pytest.approx(value, abs=1e-6), key
    text = format_knn(res)
    assert f"weighted kNN top-1  {100 * want['top1']:.2f}%" in text and "mAP@R" in text


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
