import numpy as np
import torch
from PIL import Image

from instdisc.data import build_dataset, eval_transform
from instdisc.features import extract_features, iter_feature_batches


def test_rows_by_index_array_path(fake_mnist):
    ds = build_dataset("fashion-mnist:test", data_root=str(fake_mnist))
    fn = lambda x: x.flatten(1)[:, :5] * 2  # noqa: E731
    a = extract_features(fn, ds, batch_size=7)
    assert a.features.shape == (40, 5) and a.features.dtype == np.float32
    ref = np.stack([fn(ds.with_transform(eval_transform(ds))[i][0][None]).numpy()[0] for i in range(40)])
    np.testing.assert_allclose(a.features, ref, atol=1e-6)
    np.testing.assert_array_equal(a.indices, np.arange(40))
    np.testing.assert_array_equal(a.labels, ds.labels)


def test_rows_by_index_file_path(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = build_dataset(str(tmp_path), image_size=16)
    fn = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    f = extract_features(fn, ds, batch_size=3)
    ref = np.stack([fn(ds.with_transform(eval_transform(ds))[i][0][None]).numpy()[0] for i in range(10)])
    np.testing.assert_allclose(f.features, ref, atol=1e-6)
    assert f.labels.tolist() == [0] * 5 + [1] * 5


def test_iter_from_start(fake_mnist):
    ds = build_dataset("fashion-mnist:test", data_root=str(fake_mnist))
    rows = [idx for idx, _ in iter_feature_batches(lambda x: x.flatten(1), ds, start=33, batch_size=4)]
    assert np.concatenate(rows).tolist() == list(range(33, 40))


def test_one_image_batch(fake_mnist):
    ds = build_dataset("fashion-mnist:test", data_root=str(fake_mnist), limit=1)
    f = extract_features(lambda x: x.mean(dim=(1, 2, 3))[:, None], ds)
    assert f.features.shape == (1, 1) and torch.isfinite(torch.from_numpy(f.features)).all()
