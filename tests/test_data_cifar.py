"""instdisc/data/cifar.py: CIFAR-10/100 python pickle batches (fake batches in tmp_path)."""
import os
import pickle

import numpy as np
import pytest
import torch

from instdisc.data import build_dataset
from instdisc.errors import InstdiscError


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(folder, per_batch=3, seed=0, bytes_keys=True):
    """Official layout: data_batch_1..5 + test_batch + batches.meta; returns {split: (data N x 3072, labels)}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        write_pickle(os.path.join(folder, name), {key("data"): data, key("labels"): labels, key("batch_label"): b"x"})
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(data)
        out[split][1].extend(labels)
    names = [f"class{k}".encode() for k in range(10)]
    write_pickle(os.path.join(folder, "batches.meta"), {key("label_names"): names, key("num_vis"): 3072})
    return {s: (np.concatenate(d), np.array(lab)) for s, (d, lab) in out.items()}


def make_cifar100(folder, n=4, seed=1):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        write_pickle(os.path.join(folder, split), {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n})
        out[split] = (data, np.array(fine))
    write_pickle(os.path.join(folder, "meta"), {b"fine_label_names": [f"f{k}".encode() for k in range(100)]})
    return out


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_train_test(tmp_path, bytes_keys):
    data = make_cifar10(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    ds = build_dataset("cifar10", data_root=tmp_path)  # parent of the archive folder
    raw, labels = data["train"]
    assert ds.array.dtype == torch.uint8 and ds.array.shape == (15, 3, 32, 32)
    assert np.array_equal(ds.array.reshape(15, -1).numpy(), raw)
    assert np.array_equal(ds.labels, labels) and ds.labels.dtype == np.int64
    assert ds.classes == [f"class{k}" for k in range(10)]
    assert ds.channels == 3 and ds.image_size == 32
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    test = build_dataset("cifar10:test", data_root=tmp_path / "cifar-10-batches-py")  # the folder itself
    assert len(test) == 3 and np.array_equal(test.labels, data["test"][1])


def test_pixel_layout_is_rgb_planes(tmp_path):
    raw = make_cifar10(tmp_path)["train"][0]
    ds = build_dataset("cifar10", data_root=tmp_path)
    img = ds.load_image(4)
    assert img.mode == "RGB" and img.size == (32, 32)
    y, x = 5, 7
    expected = tuple(int(raw[4, c * 1024 + y * 32 + x]) for c in range(3))
    assert img.getpixel((x, y)) == expected
    assert ds[4][0].shape == (3, 32, 32)


def test_cifar100_fine_labels(tmp_path):
    data = make_cifar100(tmp_path / "cifar-100-python")
    ds = build_dataset("cifar100:test", data_root=tmp_path)
    assert np.array_equal(ds.labels, data["test"][1]) and len(ds.classes) == 100 and ds.classes[3] == "f3"
    assert ds.mean == (0.5071, 0.4865, 0.4409)


def test_limit(tmp_path):
    raw = make_cifar10(tmp_path)["train"][0]
    ds = build_dataset("cifar-10", data_root=tmp_path, limit=4)
    idx = np.sort(np.random.default_rng(0).choice(15, 4, replace=False))
    assert np.array_equal(ds.array.reshape(4, -1).numpy(), raw[idx])


def test_missing_batch_names_path(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(InstdiscError, match="incomplete: expected .*data_batch_3"):
        build_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(InstdiscError, match="cifar-100-python/train"):
        build_dataset("cifar100", data_root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_pickles_that_run_code(tmp_path):
    make_cifar10(tmp_path)
    write_pickle(tmp_path / "test_batch", {b"data": _Evil(), b"labels": [0]})
    with pytest.raises(InstdiscError, match="refusing to load"):
        build_dataset("cifar10:test", data_root=tmp_path)


def test_wrong_shape_is_reported(tmp_path):
    make_cifar10(tmp_path)
    write_pickle(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(InstdiscError, match=r"data \(2, 100\)"):
        build_dataset("cifar10:test", data_root=tmp_path)
