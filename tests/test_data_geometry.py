"""instdisc/data/geometry.py: image size and channels inferred from a folder's or list's images."""
import logging

import numpy as np
import pytest
from PIL import Image

from instdisc.data import build_dataset
from instdisc.data.geometry import MAX_SIZE, infer_geometry, is_gray_image
from instdisc.errors import InstdiscError


def _write(path, mode="L", size=(28, 28), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "P-gray":
        img = rgb.convert("L").convert("P")  # palette of grays
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = rgb.convert(mode)
    img.save(path)
    return str(path)


def gray_folder(root, n_per_class=4, size=(28, 28), classes=("a", "b")):
    for c in classes:
        for i in range(n_per_class):
            _write(root / c / f"{i}.png", "L", size, seed=i)
    return root


def test_grayscale_folder_is_one_channel_at_its_own_size(tmp_path, caplog):
    gray_folder(tmp_path / "g")
    with caplog.at_level(logging.INFO, logger="instdisc"):
        ds = build_dataset(str(tmp_path / "g"))
    assert (ds.channels, ds.image_size) == (1, 28)
    assert len(ds.mean) == 1 and len(ds.std) == 1
    assert ds.geometry["channels"] == 1 and ds.geometry["image_size"] == 28 and ds.geometry["sampled"] == 8
    assert "8 of 8 sampled images grayscale" in ds.geometry["reason"]
    assert any("image geometry of" in r.getMessage() and "median short side 28" in r.getMessage()
               for r in caplog.records)
    x, i, y = ds[0]
    assert tuple(x.shape) == (1, 28, 28)


def test_rgb_and_one_colour_image_make_three_channels(tmp_path):
    gray_folder(tmp_path / "m")
    _write(tmp_path / "m" / "a" / "rgb.jpg", "RGB", (28, 28))
    ds = build_dataset(str(tmp_path / "m"))
    assert ds.channels == 3 and len(ds.mean) == 3
    assert tuple(ds[0][0].shape) == (3, 28, 28)


def test_palette_images_gray_or_colour(tmp_path):
    g = _write(tmp_path / "pg.png", "P-gray")
    c = _write(tmp_path / "pc.png", "P")
    with Image.open(g) as img:
        assert img.mode == "P" and is_gray_image(img)
    with Image.open(c) as img:
        assert img.mode == "P" and not is_gray_image(img)
    assert infer_geometry([g, g]).channels == 1
    assert infer_geometry([g, c]).channels == 3


def test_mixed_sizes_take_the_median_short_side_and_still_load(tmp_path):
    sizes = [(40, 30), (17, 60), (100, 50), (33, 33), (64, 80)]  # short sides 30 17 50 33 64 -> median 33
    for k, s in enumerate(sizes):
        _write(tmp_path / "mix" / "c" / f"{k}.png", "RGB" if k % 2 else "L", s, seed=k)
    ds = build_dataset(str(tmp_path / "mix"))
    assert (ds.channels, ds.image_size) == (3, 33)
    for i in range(len(ds)):
        assert tuple(ds[i][0].shape) == (3, 33, 33)


def test_large_images_are_capped_and_small_raised(tmp_path):
    big = [_write(tmp_path / f"b{k}.png", "RGB", (500, 375), seed=k) for k in range(3)]
    g = infer_geometry(big)
    assert g.image_size == MAX_SIZE and "capped at 224" in g.reason
    tiny = [_write(tmp_path / f"t{k}.png", "L", (5, 6)) for k in range(2)]
    assert infer_geometry(tiny).image_size == 8


def test_flat_unlabeled_folder(tmp_path):
    for k in range(5):
        _write(tmp_path / "flat" / f"{k}.png", "L", (20, 24), seed=k)
    ds = build_dataset(str(tmp_path / "flat"))
    assert (ds.labels == -1).all() and (ds.channels, ds.image_size) == (1, 20)


def test_given_values_win_and_are_checked(tmp_path):
    gray_folder(tmp_path / "g")
    ds = build_dataset(str(tmp_path / "g"), image_size=32, channels=3)
    assert (ds.channels, ds.image_size) == (3, 32) and "as given" in ds.geometry["reason"]
    assert tuple(ds[0][0].shape) == (3, 32, 32)
    ds = build_dataset(str(tmp_path / "g"), image_size=16)
    assert (ds.channels, ds.image_size) == (1, 16)
    with pytest.raises(InstdiscError, match="channels must be 1 or 3"):
        build_dataset(str(tmp_path / "g"), channels=2)


def test_unreadable_files_have_no_vote(tmp_path):
    good = [_write(tmp_path / f"{k}.png", "L", (28, 28)) for k in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    g = infer_geometry(good + [str(bad)])
    assert (g.channels, g.image_size, g.sampled) == (1, 28, 3)


def test_sample_is_fixed(tmp_path):
    paths = [_write(tmp_path / f"{k}.png", "L", (10 + k, 40), seed=k) for k in range(12)]
    a, b = infer_geometry(paths, sample=5), infer_geometry(paths, sample=5)
    assert a == b and a.sampled == 5
