"""instdisc/data/spec.py and dataset.py: spec parsing, argument validation, the IndexedDataset contract."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from instdisc.data import IndexedDataset, build_dataset, parse_spec, scan_bad_images
from instdisc.data.spec import Spec
from instdisc.data.transforms import TwoView, train_transform
from instdisc.errors import InstdiscError


def write_idx(path, arr):
    data = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    with open(str(path) + ".gz", "wb") as f:
        f.write(gzip.compress(data))


@pytest.fixture
def fmnist_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


@pytest.mark.parametrize("text, expected", [
    ("fashion-mnist", Spec("named", "fashion-mnist", "train")),
    ("FashionMNIST:TEST", Spec("named", "fashion-mnist", "test")),
    ("fmnist:test", Spec("named", "fashion-mnist", "test")),
    ("mnist:train", Spec("named", "mnist", "train")),
    ("cifar-10", Spec("named", "cifar10", "train")),
    (" cifar100:test ", Spec("named", "cifar100", "test")),
    ("filelist:/x/y.txt", Spec("filelist", path="/x/y.txt")),
])
def test_parse_named_and_filelist(text, expected):
    assert parse_spec(text) == expected


def test_parse_paths(tmp_path):
    (tmp_path / "l.csv").write_text("a.png\n")
    (tmp_path / "model.pt").write_text("x")
    assert parse_spec(str(tmp_path)) == Spec("folder", path=str(tmp_path))
    assert parse_spec(str(tmp_path / "l.csv")) == Spec("filelist", path=str(tmp_path / "l.csv"))
    with pytest.raises(InstdiscError, match="is a file but not a .txt/.csv file list"):
        parse_spec(str(tmp_path / "model.pt"))


@pytest.mark.parametrize("text, match", [
    ("fasion-mnist", "unknown dataset 'fasion-mnist'; did you mean 'fashion-mnist'?"),
    ("fasion-mnist:test", "did you mean 'fashion-mnist:test'?"),
    ("cifar1O", "did you mean 'cifar10'?"),
    ("mnsit", "did you mean 'mnist'?"),
    ("fashion-mnist:tset", "unknown split 'tset' .* did you mean fashion-mnist:test?"),
    ("fashion-mnist:val", "unknown split 'val'"),
    ("imagenet", "unknown dataset 'imagenet': not one of fashion-mnist, mnist, cifar10, cifar100"),
    ("/no/such/dir", "dataset path not found: /no/such/dir"),
    ("", "empty dataset spec"),
    ("filelist:", "names no file list"),
])
def test_spec_errors_are_one_line_instdisc_errors(text, match):
    with pytest.raises(InstdiscError, match=match) as e:
        build_dataset(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, match", [
    ({"limit": 0}, "limit must be a positive integer, got 0"),
    ({"limit": -5}, "got -5"),
    ({"limit": 2.5}, "got 2.5"),
    ({"limit": True}, "got True"),
    ({"limit": 13}, "limit 13 is larger than dataset 'fashion-mnist' \\(12 images\\)"),
    ({"image_size": 0}, "image_size must be a positive integer"),
])
def test_argument_validation(fmnist_root, kw, match):
    with pytest.raises(InstdiscError, match=match):
        build_dataset("fashion-mnist", data_root=fmnist_root, **kw)


def test_numpy_int_limit_and_full_limit(fmnist_root):
    assert len(build_dataset("fashion-mnist", data_root=fmnist_root, limit=np.int64(12))) == 12


def test_dataset_contract(fmnist_root):
    ds = build_dataset("fashion-mnist", data_root=fmnist_root)
    assert isinstance(ds, IndexedDataset) and isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 12 and ds.labels.shape == (12,) and ds.labels.dtype == np.int64
    x, i, label = ds[-1]
    assert i == 11 and label == ds.labels[11] and isinstance(label, int)
    with pytest.raises(IndexError):
        ds[12]
    assert scan_bad_images(ds) == []
    assert "fashion-mnist:train" in repr(ds)


def test_with_transform_is_shallow_copy(fmnist_root):
    ds = build_dataset("fashion-mnist", data_root=fmnist_root)
    two = ds.with_transform(TwoView(train_transform(ds)))
    assert two.array is ds.array and two.labels is ds.labels and ds.transform is not two.transform
    (v1, v2), i, _ = two[0]
    assert v1.shape == v2.shape == (1, 28, 28) and i == 0
    assert isinstance(ds[0][0], torch.Tensor)  # the original keeps its eval transform
    raw = ds.with_transform(None)
    assert raw[0][0].mode == "L"


@pytest.mark.slow
def test_pickle_round_trip_and_workers(fmnist_root):
    base = build_dataset("fashion-mnist", data_root=fmnist_root)
    ds = base.with_transform(TwoView(train_transform(base)))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone.array, ds.array) and clone.mean == ds.mean
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    seen = []
    for (v1, v2), idx, label in loader:
        assert v1.shape[1:] == (1, 28, 28) and v2.shape == v1.shape
        seen += idx.tolist()
    assert seen == list(range(12))


def test_default_root_error_names_path(monkeypatch, tmp_path):
    import instdisc.data.spec as spec_mod
    monkeypatch.setattr(spec_mod, "DEFAULT_ROOT", str(tmp_path))
    with pytest.raises(InstdiscError, match=f"expected {os.path.join(str(tmp_path), 'cifar100')}"):
        build_dataset("cifar100")


def test_take_rows_is_indexing_by_rows():
    from instdisc.data.dataset import take_rows

    a = torch.arange(5 * 2 * 3, dtype=torch.uint8).view(5, 2, 3)
    for idx in ([4, 0, 4], np.array([2, 1], dtype=np.int64), torch.tensor([3]), range(1, 4), []):
        got = take_rows(a, idx)
        expected = a[torch.as_tensor(list(idx), dtype=torch.long)]
        assert torch.equal(got, expected) and got.dtype == a.dtype
        assert got.data_ptr() != a.data_ptr() or len(got) == 0  # a copy, never a view of the source
    mm = np.arange(24, dtype=np.uint8).reshape(4, 6)  # not a tensor: indexed as it is
    assert (take_rows(mm, [3, 1]) == mm[[3, 1]]).all()
