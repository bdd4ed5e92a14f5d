"""instdisc/data/filelist.py: datasets given as text files of image paths."""
import os

import numpy as np
import pytest
from PIL import Image

from instdisc.data import build_dataset
from instdisc.data.filelist import read_filelist
from instdisc.errors import InstdiscError


def make_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (10 + k, 12), (k * 20, 0, 0)).save(path)
    return [os.path.join(folder, n) for n in names]


def test_relative_paths_and_int_labels(tmp_path):
    make_images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/a.png\t2\n\nimgs/b.png\t0\nimgs/c.png\t-1\n")
    ds = build_dataset(str(lst), image_size=8)
    assert list(ds.paths) == [str(tmp_path / "imgs" / n) for n in ("a.png", "b.png", "c.png")]
    assert list(ds.labels) == [2, 0, -1] and ds.classes == ["0", "1", "2"]
    assert ds.channels == 3 and ds[1][0].shape == (3, 8, 8) and ds.load_image(1).size == (11, 12)


def test_csv_with_header_and_class_names_absolute_paths(tmp_path):
    paths = make_images(tmp_path / "x", ["p1.jpg", "p2.jpg", "p3.jpg"])
    lst = tmp_path / "sub" / "data.csv"
    lst.parent.mkdir()
    lst.write_text("path,label\n" + "\n".join(f"{p},{c}" for p, c in zip(paths, ["zebra", "ant", "zebra"])) + "\n")
    ds = build_dataset(f"filelist:{lst}")
    assert list(ds.paths) == paths and ds.classes == ["ant", "zebra"] and list(ds.labels) == [1, 0, 1]


def test_no_labels_and_commas_in_names(tmp_path):
    make_images(tmp_path, ["a,b.png", "c.png"])
    lst = tmp_path / "l.txt"
    lst.write_text("a,b.png\nc.png\n")
    ds = build_dataset(str(lst))
    assert [os.path.basename(p) for p in ds.paths] == ["a,b.png", "c.png"]
    assert list(ds.labels) == [-1, -1] and ds.classes == []


def test_missing_files_error_or_skip(tmp_path):
    make_images(tmp_path, ["a.png", "b.png"])
    lst = tmp_path / "l.txt"
    lst.write_text("a.png,0\ngone.png,1\nb.png,1\nalso_gone.png,0\n")
    with pytest.raises(InstdiscError) as e:
        build_dataset(str(lst))
    assert str(e.value) == (f"2 unreadable images in {lst}, first: {tmp_path / 'gone.png'} (file not found); "
                            "pass --skip-bad-images to drop them")
    ds = build_dataset(str(lst), skip_bad_images=True)
    assert [os.path.basename(p) for p in ds.paths] == ["a.png", "b.png"] and list(ds.labels) == [0, 1]
    assert list(ds.source_indices) == [0, 2]


def test_limit_is_deterministic(tmp_path):
    names = [f"i{k}.png" for k in range(10)]
    make_images(tmp_path, names)
    (tmp_path / "l.txt").write_text("\n".join(names))
    a = build_dataset(str(tmp_path / "l.txt"), limit=4)
    b = build_dataset(str(tmp_path / "l.txt"), limit=4)
    idx = np.sort(np.random.default_rng(0).choice(10, 4, replace=False))
    assert list(a.paths) == list(b.paths) == [str(tmp_path / names[i]) for i in idx]


def test_scan_cached_while_list_unchanged(tmp_path):
    make_images(tmp_path, ["a.png"])
    lst = tmp_path / "l.txt"
    lst.write_text("a.png\nmissing.png\n")
    old = lst.stat().st_mtime - 100
    os.utime(lst, (old, old))
    with pytest.raises(InstdiscError):
        build_dataset(str(lst), cache_dir=tmp_path / "cache")
    assert read_filelist(str(lst), cache_dir=str(tmp_path / "cache")).bad[0].reason == "file not found"
    lst.write_text("a.png\n")
    assert read_filelist(str(lst), cache_dir=str(tmp_path / "cache")).bad is None
    assert len(build_dataset(str(lst), cache_dir=tmp_path / "cache")) == 1


@pytest.mark.parametrize("text, match", [
    ("# only a comment\n\n", "has no image paths"),
    ("a.png,-3\n", "negative label -3"),
])
def test_bad_lists(tmp_path, text, match):
    lst = tmp_path / "l.txt"
    lst.write_text(text)
    with pytest.raises(InstdiscError, match=match):
        build_dataset(str(lst))


def test_missing_list(tmp_path):
    with pytest.raises(InstdiscError, match="file list not found: .*nope.txt"):
        build_dataset(f"filelist:{tmp_path / 'nope.txt'}")
    with pytest.raises(InstdiscError, match="dataset path not found: .*nope.csv"):
        build_dataset(str(tmp_path / "nope.csv"))
