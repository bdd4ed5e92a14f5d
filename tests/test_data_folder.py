"""instdisc/data/folder.py, images.py, index_cache.py, paths.py: image folders, bad images, the index cache."""
import logging
import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

import instdisc.data.spec as spec_mod
from instdisc.data import build_dataset, scan_bad_images
from instdisc.data.folder import index_folder
from instdisc.data.images import check_image
from instdisc.data.paths import PathTable
from instdisc.errors import InstdiscError


def save(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)
    return str(path)


def noisy(size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=None).convert(mode)


def make_classes(root):
    """cat: 2 JPEGs of different sizes; dog: grayscale PNG, RGBA PNG, palette PNG with transparency (nested)."""
    save(root / "cat" / "a.jpg", noisy((40, 30)))
    save(root / "cat" / "b.JPEG", noisy((17, 60), seed=1))
    save(root / "dog" / "c.png", noisy((20, 20), "L"))
    save(root / "dog" / "d.png", Image.new("RGBA", (12, 9), (0, 0, 255, 0)))
    pal = Image.new("P", (16, 16))
    pal.putpalette([0, 0, 0, 10, 20, 30] * 128)
    save(root / "dog" / "sub" / "e.png", pal, transparency=0)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.png", noisy((8, 8)))
    save(root / "dog" / ".y.png", noisy((8, 8)))


def age(root, seconds=100):
    """Backdate every directory mtime (fresh mtimes are never trusted by the cache)."""
    t = time.time() - seconds
    for d, _, _ in os.walk(root):
        os.utime(d, (t, t))


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_class_folders_labels_and_modes(tmp_path):
    make_classes(tmp_path)
    ds = build_dataset(str(tmp_path), image_size=32)
    names = [os.path.relpath(p, tmp_path) for p in ds.paths]
    assert names == ["cat/a.jpg", "cat/b.JPEG", "dog/c.png", "dog/d.png", "dog/sub/e.png"]
    assert ds.classes == ["cat", "dog"] and list(ds.labels) == [0, 0, 1, 1, 1]
    assert ds.channels == 3 and ds.array is None and ds.mean == (0.485, 0.456, 0.406)
    sizes = []
    for i in range(len(ds)):
        img = ds.load_image(i)
        assert img.mode == "RGB"
        sizes.append(img.size)
        x, j, label = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and j == i and label == ds.labels[i]
    assert sizes == [(40, 30), (17, 60), (20, 20), (12, 9), (16, 16)]
    assert ds.load_image(3).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert ds.load_image(4).getpixel((0, 0)) == (255, 255, 255)
    assert ds.load_image(2).getpixel((5, 5))[0] == ds.load_image(2).getpixel((5, 5))[2]  # gray -> equal channels


def test_inferred_image_size_and_flat_folder(tmp_path):
    for k in range(3):
        save(tmp_path / f"img{k}.png", noisy((30, 20), seed=k))
    (tmp_path / "empty_sub").mkdir()
    ds = build_dataset(str(tmp_path))
    assert len(ds) == 3 and list(ds.labels) == [-1, -1, -1] and ds.classes == []
    assert ds.image_size == 20 and ds[0][0].shape == (3, 20, 20)  # the short side (instdisc.data.geometry)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InstdiscError, match="no images found in"):
        build_dataset(str(tmp_path))


def make_bad(root):
    good = [save(root / "c" / f"good{k}.jpg", noisy((64, 48), seed=k), quality=90) for k in range(3)]
    save(root / "c" / "trunc.jpg", noisy((64, 48), seed=9), quality=90)
    truncate(root / "c" / "trunc.jpg")
    save(root / "c" / "trunc.png", noisy((64, 48), seed=8))
    truncate(root / "c" / "trunc.png", 0.7)
    (root / "c" / "zero.png").write_bytes(b"")
    (root / "c" / "text.jpg").write_text("hello, not a jpeg")
    return good


def test_check_image_reasons(tmp_path):
    good = make_bad(tmp_path)
    assert check_image(good[0]) is None
    assert check_image(str(tmp_path / "c" / "zero.png")) == "empty file"
    assert check_image(str(tmp_path / "c" / "text.jpg")) == "not an image"
    assert "truncated" in check_image(str(tmp_path / "c" / "trunc.jpg")).lower()
    assert check_image(str(tmp_path / "c" / "trunc.png")) is not None
    assert check_image(str(tmp_path / "c" / "missing.png")) == "file not found"
    # a complete JPEG with trailing bytes after the EOI marker is fine
    with open(good[1], "ab") as f:
        f.write(b"trailing camera data")
    assert check_image(good[1]) is None


def test_bad_images_error_by_default_and_skip(tmp_path, caplog):
    good = make_bad(tmp_path)
    with pytest.raises(InstdiscError) as e:
        build_dataset(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"4 unreadable images in {tmp_path}, first: ") and "\n" not in msg
    assert str(tmp_path / "c" / "text.jpg") in msg and msg.endswith("pass --skip-bad-images to drop them")
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(str(tmp_path), skip_bad_images=True)
    assert "skipping 4 unreadable images" in caplog.text
    assert list(ds.paths) == good and list(ds.source_indices) == [0, 1, 2]
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 2]
    assert scan_bad_images(ds) == []
    (tmp_path / "one.txt").write_text("c/zero.png\n")
    with pytest.raises(InstdiscError, match="all 1 images .* are unreadable"):
        build_dataset(str(tmp_path / "one.txt"), skip_bad_images=True)


def test_limit_scans_only_the_subset(tmp_path, monkeypatch):
    make_bad(tmp_path)
    seen = []
    real = spec_mod.find_bad_images
    monkeypatch.setattr(spec_mod, "find_bad_images", lambda paths: seen.append(len(paths)) or real(paths))
    ds = build_dataset(str(tmp_path), limit=5, skip_bad_images=True)
    assert seen == [5]
    chosen = np.sort(np.random.default_rng(0).choice(7, 5, replace=False))
    assert list(ds.source_indices) == [i for i in chosen if i < 3]  # files 0-2 are the good ones


def test_file_broken_after_build_raises_with_path(tmp_path):
    good = make_bad(tmp_path)
    ds = build_dataset(str(tmp_path), skip_bad_images=True)
    os.remove(good[1])
    with pytest.raises(InstdiscError, match=f"cannot read image {good[1]}: file not found"):
        ds[1]
    truncate(good[2])
    with pytest.raises(InstdiscError, match=f"cannot read image {good[2]}"):
        ds.load_image(2)


def test_cache_hit_and_invalidation(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_classes(root)
    age(root)
    first = index_folder(str(root), cache_dir=str(cache))
    assert not first.from_cache and len(os.listdir(cache)) == 1
    second = index_folder(str(root), cache_dir=str(cache))
    assert second.from_cache and second.paths == first.paths and second.classes == first.classes
    assert np.array_equal(second.labels, first.labels)
    # a new file in a nested folder
    save(root / "dog" / "sub" / "f.png", noisy((8, 8)))
    age(root)
    third = index_folder(str(root), cache_dir=str(cache))
    assert not third.from_cache and len(third.paths) == 6
    assert index_folder(str(root), cache_dir=str(cache)).from_cache
    # a removed file, a new class
    os.remove(root / "cat" / "a.jpg")
    save(root / "emu" / "g.png", noisy((8, 8)))
    age(root)
    fourth = index_folder(str(root), cache_dir=str(cache))
    assert not fourth.from_cache and fourth.classes == ["cat", "dog", "emu"] and len(fourth.paths) == 6


def test_fresh_mtimes_are_not_trusted(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_classes(root)  # mtimes are "now": a change within the same tick could hide
    index_folder(str(root), cache_dir=str(cache))
    assert not index_folder(str(root), cache_dir=str(cache)).from_cache


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_classes(root)
    age(root)
    index_folder(str(root), cache_dir=str(cache))
    (cfile,) = cache.iterdir()
    cfile.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        again = index_folder(str(root), cache_dir=str(cache))
    assert not again.from_cache and len(again.paths) == 5 and "unreadable index cache" in caplog.text
    assert index_folder(str(root), cache_dir=str(cache)).from_cache


def test_scan_result_is_cached(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_bad(root)
    age(root)
    calls = []
    real = spec_mod.find_bad_images
    monkeypatch.setattr(spec_mod, "find_bad_images", lambda paths: calls.append(1) or real(paths))
    with pytest.raises(InstdiscError, match="4 unreadable"):
        build_dataset(str(root), cache_dir=cache)
    with pytest.raises(InstdiscError, match="4 unreadable"):
        build_dataset(str(root), cache_dir=cache)
    ds = build_dataset(str(root), cache_dir=cache, skip_bad_images=True)
    assert len(calls) == 1 and len(ds) == 3


@pytest.mark.slow
def test_dataloader_workers_and_pickle(tmp_path):
    make_classes(tmp_path)
    ds = build_dataset(str(tmp_path), image_size=16)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.paths == ds.paths and torch.equal(clone[2][0], ds[2][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    idx = torch.cat([b[1] for b in loader])
    assert idx.tolist() == list(range(len(ds)))


def test_path_table():
    t = PathTable.from_names("/r", ["a/x.png", "b/ü.jpg", "c.png"])
    assert len(t) == 3 and t[1] == "/r/b/ü.jpg" and t[-1] == "/r/c.png"
    assert t == ["/r/a/x.png", "/r/b/ü.jpg", "/r/c.png"]
    s = t.subset([2, 0])
    assert list(s) == ["/r/c.png", "/r/a/x.png"] and s.names() == ["c.png", "a/x.png"]
    assert len(t.subset([])) == 0
    assert pickle.loads(pickle.dumps(t)) == t
    with pytest.raises(IndexError):
        t[3]


def test_top_level_images_beside_classes_are_ignored_with_a_warning(tmp_path, caplog):
    save(tmp_path / "a" / "x.png", noisy((8, 8)))
    save(tmp_path / "stray.png", noisy((8, 8)))
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(str(tmp_path))
    assert len(ds) == 1 and ds.classes == ["a", "b"]
    assert "ignoring 1 images directly in" in caplog.text and "1 class folders" in caplog.text


def _photo_like(w=500, h=375, seed=0):
    """Smooth colour waves plus sensor-like noise (a stand-in for a photograph)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 23 + c) * np.cos(y / 31 - c) for c in range(3)], -1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_draft_matches_full_decode_within_tolerance(tmp_path, mode):
    """The documented tolerance (docs/large-collections.md): reduced-scale decode + resize vs full decode + the same
    resize, 0..255 levels: mean |diff| < 1.5, 99th percentile <= 6, at every size where a draft applies (sizes such
    as 56 or 68 px, where the halved 500x375 -> 250x188 rounds the resized width differently, once missed it by
    a mean of 5-6 levels: the geometry now comes from the file's own size)."""
    from instdisc.data.images import DRAFT_MARGIN, decode_square, open_image, resize_short_side

    p = tmp_path / "photo.jpg"
    _photo_like().save(p, quality=90)
    full = open_image(str(p), mode)
    drafted_sizes = set()
    for size in sorted(set(range(8, 134, 3)) | {32, 56, 64, 68, 96, 133}):
        drafted = open_image(str(p), mode, min_side=int(np.ceil(DRAFT_MARGIN * size)))
        if drafted.size == (500, 375):
            continue  # 375 < 2 x 1.4 S: no draft, the same pixels
        assert min(drafted.size) >= DRAFT_MARGIN * size and min(drafted.size) >= 375 // 4  # never 1/8
        drafted_sizes.add(size)
        got = np.asarray(decode_square(str(p), mode, size)).astype(int)
        ref = np.asarray(resize_short_side(full, size)).astype(int)
        d = np.abs(got - ref)
        assert got.shape == ref.shape and d.mean() < 1.5 and np.percentile(d, 99) <= 6, (size, d.mean(), d.max())
    assert {32, 56, 64, 96, 133} <= drafted_sizes


def test_draft_only_when_a_halving_is_possible(tmp_path):
    from instdisc.data.images import open_image

    p = tmp_path / "photo.jpg"
    _photo_like().save(p, quality=90)
    full = np.asarray(open_image(str(p), "RGB"))
    same = np.asarray(open_image(str(p), "RGB", min_side=200))  # 375 < 2 x 200: full decode, identical pixels
    np.testing.assert_array_equal(full, same)
    png = tmp_path / "photo.png"
    _photo_like().save(png)
    assert open_image(str(png), "RGB", min_side=20).size == (500, 375)  # only JPEGs have a draft mode


def test_pil_training_path_drafts_keeping_the_smallest_crop_sharp(tmp_path):
    from instdisc.training import TrainConfig
    from instdisc.training.batches import Batches

    for k in range(4):
        save(tmp_path / "d" / f"{k}.jpg", _photo_like(seed=k))
    ds = build_dataset(str(tmp_path / "d"), image_size=64)
    cfg = TrainConfig(data=str(tmp_path / "d"), batch_size=2, crop_min=0.2, augment="pil")
    b = Batches(cfg, ds, torch.device("cpu"), use_batch_aug=False)
    assert b.ds.draft_scale == pytest.approx(5 ** 0.5)  # 1 / sqrt(crop_min)
    img = b.ds.load_image(0)
    assert min(img.size) == 188 and 0.2 ** 0.5 * 188 >= 64  # halved; the smallest crop still has >= 64 px
