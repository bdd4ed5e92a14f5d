"""instdisc/data/cache.py: image caches as dataset specs, memory-mapped, used by every command."""
import h5py
import numpy as np
import pytest
import torch
from test_data_prepare import make_folder

from instdisc.data import build_dataset, parse_spec
from instdisc.data.cache import EVAL_CROP, is_image_cache, open_cache
from instdisc.data.prepare import prepare_cache
from instdisc.errors import InstdiscError


@pytest.fixture(scope="module")
def folder_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    src = make_folder(root / "src", n_per_class=12, size=(30, 24))
    prepare_cache(str(src), root / "c.h5")
    return src, root / "c.h5"


def test_spec_forms(folder_and_cache):
    _, path = folder_and_cache
    assert parse_spec(f"cache:{path}").kind == "cache" and parse_spec(str(path)).kind == "cache"
    a, b = build_dataset(f"cache:{path}"), build_dataset(str(path))
    assert a.fingerprint() == b.fingerprint() and len(a) == 36
    assert is_image_cache(path)


def test_memory_mapped_not_loaded(folder_and_cache):
    _, path = folder_and_cache
    ds = open_cache(path)
    assert ds.memmapped and isinstance(ds.mmap, np.memmap) and ds.array.data_ptr() == ds.mmap.ctypes.data
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(ds.array.numpy(), f["images"][:])
    ds.array[0].zero_()  # copy-on-write: the file is never changed
    with h5py.File(path, "r") as f:
        assert f["images"][0].any()


def test_limit_size_and_channels(folder_and_cache):
    _, path = folder_and_cache
    ds = build_dataset(f"cache:{path}", limit=10)
    assert len(ds) == 10 and not ds.memmapped
    full = build_dataset(f"cache:{path}")
    rows = np.sort(np.random.default_rng(0).choice(36, 10, replace=False))
    np.testing.assert_array_equal(ds.labels, full.labels[rows])
    assert ds.fingerprint() != full.fingerprint()
    big = build_dataset(f"cache:{path}", image_size=32)
    assert tuple(big[0][0].shape) == (3, 32, 32)
    with pytest.raises(InstdiscError, match="holds 3-channel images, not 1"):
        build_dataset(f"cache:{path}", channels=1)


def test_not_a_cache(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.attrs["kind"] = "instdisc-features"
    with pytest.raises(InstdiscError, match="not an instdisc image cache"):
        build_dataset(str(p))
    with pytest.raises(InstdiscError, match="image cache not found"):
        build_dataset(f"cache:{tmp_path / 'missing.h5'}")


def test_eval_sees_the_centre_like_a_folder(folder_and_cache):
    from instdisc.data.batch_aug import batch_eval

    _, path = folder_and_cache
    ds = open_cache(path)
    assert ds.eval_crop == EVAL_CROP
    x = batch_eval(ds.array[:4], ds)  # (4, 3, 24, 24): centre 21 px, resized back to 24
    y = torch.stack([ds[i][0] for i in range(4)])  # PIL eval transform of the same rows
    assert x.shape == y.shape == (4, 3, 24, 24)
    assert np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1] > 0.9  # noise images: resampling differs


def test_same_model_same_features_from_cache_and_folder(folder_and_cache, tmp_path):
    """A model trained on the folder sees (nearly) the same inputs from the cache: same rows, labels, slots."""
    from test_train_loop import tiny_cfg

    from instdisc.evaluation import knn_benchmark
    from instdisc.features import extract_features
    from instdisc.source import open_model
    from instdisc.training import train

    src, path = folder_and_cache
    train(tiny_cfg(None, tmp_path / "run", data=str(src), data_root=None, nce_k=16))
    model = open_model(tmp_path / "run")
    f_folder = extract_features(model.fn(), model.prepare(build_dataset(str(src))))
    f_cache = extract_features(model.fn(), model.prepare(build_dataset(f"cache:{path}")))
    np.testing.assert_array_equal(f_folder.labels, f_cache.labels)
    a = f_folder.features / np.linalg.norm(f_folder.features, axis=1, keepdims=True)
    b = f_cache.features / np.linalg.norm(f_cache.features, axis=1, keepdims=True)
    assert (a * b).sum(1).mean() > 0.95
    r1 = knn_benchmark(tmp_path / "run", train=str(src), test=str(src), k=5)
    r2 = knn_benchmark(tmp_path / "run", train=f"cache:{path}", test=f"cache:{path}", k=5)
    assert abs(r1["top1"] - r2["top1"]) <= 0.2 and r1["n_train"] == r2["n_train"] == 36
    bank = knn_benchmark(tmp_path / "run", train=f"cache:{path}", test=str(src), k=5, use_bank=True)
    assert bank["n_train"] == 36
