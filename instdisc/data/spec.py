"""Turn a dataset spec string into an :class:`IndexedDataset`. Covered by tests/test_data_spec.py.

Spec forms::

    fashion-mnist[:train|:test]   mnist[:...]   cifar10[:...]   cifar100[:...]   (local files, see DEFAULT_ROOT)
    /path/to/folder               class sub-folders -> labels by sorted name; flat folder -> labels -1
    filelist:/path/list.txt       or any path ending in .txt / .csv
    cache:/path/cache.h5          an image cache made by ``instdisc prepare`` (or any existing .h5 / .hdf5 file)
"""
from __future__ import annotations

import difflib
import logging
import numbers
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InstdiscError
from .cifar import CIFAR_DATASETS, load_cifar_split
from .dataset import IndexedDataset, limit_indices
from .filelist import read_filelist
from .filelist import save_scan as save_filelist_scan
from .folder import index_folder
from .geometry import GRAY_MEAN, GRAY_STD, MAX_SIZE, infer_geometry
from .folder import save_scan as save_folder_scan
from .images import IMG_EXTENSIONS, BadImage, find_bad_images
from .idx import IDX_DATASETS, load_idx_split
from .paths import PathTable

__all__ = ["Spec", "parse_spec", "build_dataset", "scan_bad_images", "DATASET_NAMES", "DEFAULT_ROOT",
           "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_FOLDER_SIZE"]

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets"  # named datasets default to DEFAULT_ROOT/<name>
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FOLDER_SIZE = MAX_SIZE  # the cap of the inferred size of file datasets
SPLITS = ("train", "test")
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100")
_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist", "mnist": "mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar_10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100", "cifar_100": "cifar100",
}
_LIST_SUFFIXES = (".txt", ".csv")
_CACHE_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class Spec:
    kind: str  # "named" | "folder" | "filelist" | "cache"
    name: str | None = None  # canonical dataset name (kind "named")
    split: str | None = None  # "train" | "test" (kind "named")
    path: str | None = None  # folder or list file (other kinds)


def _known() -> str:
    return ", ".join(DATASET_NAMES)


def parse_spec(spec: str) -> Spec:
    """Classify ``spec``; InstdiscError (with a did-you-mean suggestion for near-miss names) when it is none."""
    if not isinstance(spec, str) or not spec.strip():
        raise InstdiscError(f"empty dataset spec {spec!r}; use one of {_known()}, a folder, or filelist:PATH")
    s = spec.strip()
    if s.lower().startswith("filelist:"):
        path = os.path.expanduser(s[len("filelist:"):].strip())
        if not path:
            raise InstdiscError(f"dataset spec {spec!r} names no file list; use filelist:PATH")
        return Spec("filelist", path=path)
    if s.lower().startswith("cache:"):
        path = os.path.expanduser(s[len("cache:"):].strip())
        if not path:
            raise InstdiscError(f"dataset spec {spec!r} names no cache file; use cache:PATH")
        return Spec("cache", path=path)
    name, colon, split = s.partition(":")
    canonical = _ALIASES.get(name.lower())
    if canonical is not None:
        split = split.lower() if colon else "train"
        if split not in SPLITS:
            close = difflib.get_close_matches(split, SPLITS, n=1)
            hint = f"; did you mean {canonical}:{close[0]}?" if close else ""
            raise InstdiscError(f"unknown split {split!r} in dataset spec {spec!r} (use train or test){hint}")
        return Spec("named", name=canonical, split=split)
    path = os.path.expanduser(s)
    if os.path.isdir(path):
        return Spec("folder", path=path)
    if os.path.isfile(path):
        if path.lower().endswith(_LIST_SUFFIXES):
            return Spec("filelist", path=path)
        if path.lower().endswith(_CACHE_SUFFIXES):
            return Spec("cache", path=path)
        raise InstdiscError(f"dataset spec {spec!r} is a file but not a .txt/.csv file list or .h5 image cache; use "
                            f"filelist:{s}")
    if os.sep in s or s.startswith((".", "~")) or s.lower().endswith(_LIST_SUFFIXES):
        raise InstdiscError(f"dataset path not found: {path}")
    close = difflib.get_close_matches(name.lower(), list(_ALIASES), n=1, cutoff=0.6)
    if close:
        suggestion = _ALIASES[close[0]] + (f":{split}" if colon else "")
        raise InstdiscError(f"unknown dataset {spec!r}; did you mean {suggestion!r}? (known: {_known()})")
    raise InstdiscError(
        f"unknown dataset {spec!r}: not one of {_known()} and no such folder or file list")


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise InstdiscError(f"limit must be a positive integer, got {limit!r}")
    if limit <= 0:
        raise InstdiscError(f"limit must be a positive integer, got {limit}")
    return int(limit)


def _check_channels(channels) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels not in (1, 3):
        raise InstdiscError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _check_image_size(image_size) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise InstdiscError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _named(spec_text: str, spec: Spec, data_root, limit, image_size) -> IndexedDataset:
    if data_root is not None:
        root = os.path.expanduser(str(data_root))
        if not os.path.isdir(root):
            raise InstdiscError(f"data root not found: {root}")
    else:
        root = os.path.join(DEFAULT_ROOT, spec.name)
    if spec.name in IDX_DATASETS:
        info = IDX_DATASETS[spec.name]
        images, labels = load_idx_split(info, spec.split, root)  # N x 1 x 28 x 28, (N,)
        classes = list(info.classes)
    else:
        info = CIFAR_DATASETS[spec.name]
        images, labels, classes = load_cifar_split(info, spec.split, root)  # N x 3 x 32 x 32, (N,)
    if len(labels) == 0:
        raise InstdiscError(f"dataset {spec_text!r} in {root} is empty")
    sel = limit_indices(len(labels), limit, spec_text)
    if limit is not None:
        images, labels = images[sel], labels[sel]  # fancy indexing copies
    elif not images.flags.writeable:
        images = images.copy()
    array = torch.from_numpy(np.ascontiguousarray(images))  # uint8 N x C x H x W
    return IndexedDataset(spec=f"{spec.name}:{spec.split}", labels=labels, classes=classes,
                          channels=array.shape[1], image_size=image_size or info.image_size,
                          mean=info.mean, std=info.std, array=array, source_indices=sel)


def _select_good(paths: PathTable, sel: np.ndarray, cached_bad: list[BadImage] | None, full: bool, save,
                 source: str, skip_bad_images: bool) -> np.ndarray:
    """Check the chosen files for unreadable images; raise, or drop them when ``skip_bad_images``."""
    if cached_bad is not None:
        chosen = set(sel.tolist()) if not full else None
        bad = [b for b in cached_bad if chosen is None or b.index in chosen]
        log.info("bad-image scan of %s taken from the index cache", source)
    else:
        t0 = time.perf_counter()
        sub = paths if full else paths.subset(sel)
        found = find_bad_images(sub)
        bad = [BadImage(int(sel[b.index]), b.path, b.reason) for b in found]  # indices into the full listing
        log.info("checked %d images in %s in %.1f s: %d unreadable", len(sub), source,
                 time.perf_counter() - t0, len(bad))
        if full:
            save(bad)
    if not bad:
        return sel
    first = f"{bad[0].path} ({bad[0].reason})"
    if not skip_bad_images:
        raise InstdiscError(f"{_plural(len(bad), 'unreadable image')} in {source}, first: {first}; "
                            f"pass --skip-bad-images to drop them")
    keep = sel[~np.isin(sel, np.array([b.index for b in bad], dtype=np.int64))]
    if len(keep) == 0:
        raise InstdiscError(f"all {len(sel)} images in {source} are unreadable, first: {first}")
    log.warning("skipping %s in %s, first: %s", _plural(len(bad), "unreadable image"), source, first)
    return keep


def _files(spec_text: str, spec: Spec, limit, image_size, channels, cache_dir, skip_bad_images,
           max_image_size: int) -> IndexedDataset:
    if spec.kind == "folder":
        src = index_folder(spec.path, cache_dir=cache_dir)
        source, save = src.root, (lambda bad: save_folder_scan(src, bad))
        if len(src.paths) == 0:
            raise InstdiscError(f"no images found in {src.root} (looked for {', '.join(IMG_EXTENSIONS)})")
    else:
        src = read_filelist(spec.path, cache_dir=cache_dir)
        source, save = src.source, (lambda bad: save_filelist_scan(src, bad))
    n = len(src.paths)
    sel = limit_indices(n, limit, spec_text)
    sel = _select_good(src.paths, sel, src.bad, limit is None, save, source, skip_bad_images)
    paths = src.paths if len(sel) == n else src.paths.subset(sel)
    geo = infer_geometry(paths, image_size=image_size, channels=channels, max_size=max_image_size)
    log.info("image geometry of %s: %s", source, geo.reason)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if geo.channels == 3 else (GRAY_MEAN, GRAY_STD)
    ds = IndexedDataset(spec=spec_text, labels=src.labels[sel], classes=src.classes, channels=geo.channels,
                        image_size=geo.image_size, mean=mean, std=std, paths=paths, source_indices=sel)
    ds.geometry = geo.to_dict()
    ds.n_source = n
    return ds


def build_dataset(spec: str, *, data_root: str | os.PathLike | None = None, limit: int | None = None,
                  skip_bad_images: bool = False, image_size: int | None = None, channels: int | None = None,
                  cache_dir: str | os.PathLike | None = None, max_image_size: int = MAX_SIZE) -> IndexedDataset:
    """Build the dataset named by ``spec`` (see the module docstring).

    data_root: folder holding a named dataset's files, or its parent (default ``/usr/share/datasets/<name>``).
    limit: keep a fixed subset of N samples (``np.random.default_rng(0).choice(n, N, replace=False)``, sorted).
        For files the subset is drawn from the listing, then only it is checked for bad images, so skipped bad
        files leave fewer than N samples (the same good files are chosen whether or not others are broken).
    skip_bad_images: drop unreadable files (logged) instead of raising InstdiscError (folders and file lists).
        Surviving samples are numbered 0..N-1; ``ds.source_indices`` maps them back to the listing.
    image_size: side of the images the model sees (default 28 mnist-likes, 32 CIFAR; files: inferred from a sample of
        the images, see :mod:`instdisc.data.geometry`).
    channels: 1 or 3 for files (default inferred: 1 when every sampled image is grayscale); in-memory datasets
        keep their own.
    cache_dir: where folder indexes and bad-image scans are cached between runs.
    max_image_size: files: the cap on an inferred size (default MAX_SIZE, 224; training on a CPU passes a lower one,
        see instdisc.device.inferred_size_cap).
    """
    limit = _check_limit(limit)
    image_size = _check_image_size(image_size)
    channels = _check_channels(channels)
    parsed = parse_spec(spec)
    spec_text = spec.strip()
    cache_dir = None if cache_dir is None else os.path.expanduser(str(cache_dir))
    if parsed.kind == "named":
        ds = _named(spec_text, parsed, data_root, limit, image_size)
    elif parsed.kind == "cache":
        from .cache import open_cache

        ds = open_cache(parsed.path, spec=spec_text, limit=limit, image_size=image_size, channels=channels)
    else:
        ds = _files(spec_text, parsed, limit, image_size, channels, cache_dir, skip_bad_images, int(max_image_size))
    log.info("dataset %s: %d samples, %d classes, %d channels, image size %d", ds.spec, len(ds), len(ds.classes),
             ds.channels, ds.image_size)
    return ds


def scan_bad_images(ds: IndexedDataset, *, workers: int | None = None) -> list[BadImage]:
    """Unreadable files of a file-based dataset (``index`` = dataset position); [] for in-memory datasets."""
    if ds.paths is None:
        return []
    return find_bad_images(ds.paths, workers=workers)
