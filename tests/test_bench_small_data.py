"""Tests for benchmarks/small_datasets.py and the pure parts of benchmarks/bench_small_data.py, on tiny hand-built
inputs (no wheel is downloaded, no training runs). Imported by path."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # bench_small_data imports small_datasets by name; dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


sd = _load("small_datasets")


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


# ------------------------------------------------------------------------------------------------- the unpickler
@pytest.mark.parametrize("arr", [np.arange(12, dtype=np.uint8).reshape(3, 2, 2), np.array([3, 0, 9], dtype=np.int64)])
def test_unpickler_reads_numpy_arrays(arr):
    for proto in (3, 4):  # the wheel's are protocol 4 (2 needs _codecs.encode, 5 numpy's _frombuffer: both refused)
        got = sd.numpy_loads(pickle.dumps(arr, protocol=proto))
        assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_unpickler_reads_numpy1_global_names():
    """The wheel's pickles name numpy.core.multiarray._reconstruct (numpy 1.x); a numpy 2 pickle names numpy._core."""
    data = pickle.dumps(np.arange(4, dtype=np.uint8), protocol=3)  # text GLOBAL opcodes, no frames: easy to edit
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        edited = data.replace(b"numpy._core.multiarray\n", module + b"\n").replace(b"numpy.core.multiarray\n",
                                                                                     module + b"\n")
        assert module + b"\n_reconstruct" in edited
        assert np.array_equal(sd.numpy_loads(edited), np.arange(4, dtype=np.uint8))


@pytest.mark.parametrize("obj", [_Evil(), {"a": np.arange(3)}, [np.arange(3)], np.array([object()], dtype=object)])
def test_unpickler_refuses_everything_else(obj, capsys):
    with pytest.raises(pickle.UnpicklingError):
        sd.numpy_loads(pickle.dumps(obj, protocol=4))
    assert "ran code" not in capsys.readouterr().out


def test_unpickler_refuses_a_non_numpy_global():
    data = b"\x80\x04cos\nsystem\n\x8c\x04echo\x85R."  # os.system("echo")
    with pytest.raises(pickle.UnpicklingError, match="refused global os.system"):
        sd.numpy_loads(data)
    with pytest.raises(pickle.UnpicklingError, match="numpy.load"):
        sd.numpy_loads(b"\x80\x04cnumpy\nload\n\x8c\x01x\x85R.")  # a numpy name that is not allowed


# ------------------------------------------------------------------------------------------------------ the split
def test_stratified_split_is_deterministic_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])  # sorted by class, like the wheel's labels
    tr, te = sd.stratified_split(labels, 25, seed=0)
    tr2, te2 = sd.stratified_split(labels, 25, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(te) == 25 and len(tr) == 75
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(100))  # a partition
    assert np.all(np.diff(te) > 0) and np.all(np.diff(tr) > 0)
    assert np.bincount(labels[te]).tolist() == [3, 5, 7, 10]  # 2.5, 5, 7.5, 10: equal remainders, the first class
    assert not np.array_equal(sd.stratified_split(labels, 25, seed=1)[1], te)


def test_stratified_split_equal_classes_and_unsorted_labels():
    labels = np.tile(np.arange(10), 100)  # 1000, 100 a class, interleaved
    tr, te = sd.stratified_split(labels, 200)
    assert np.bincount(labels[te]).tolist() == [20] * 10 and len(tr) == 800
    with pytest.raises(ValueError):
        sd.stratified_split(labels, 1001)


def test_digits_split_sizes_match_the_brief():
    assert sd.DATASETS["digits"].n_test == 360 and sd.DATASETS["animal-mnist"].n_test == 2000


# --------------------------------------------------------------------------------------------------- digits CSV
def test_parse_digits_csv_two_rows():
    row0 = [0] * 63 + [16] + [3]
    row1 = [8] + [1] * 63 + [9]
    text = "\n".join(",".join(str(v) for v in r) for r in (row0, row1)) + "\n"
    images, labels = sd.parse_digits_csv(text)
    assert images.shape == (2, 8, 8) and images.dtype == np.uint8
    assert labels.tolist() == [3, 9] and labels.dtype == np.int64
    assert images[0, 7, 7] == 255 and images[0].sum() == 255
    assert images[1, 0, 0] == 128  # round(8 * 255 / 16) = round(127.5)
    assert images[1, 0, 1] == 16  # round(255 / 16) = round(15.94)


@pytest.mark.parametrize("text", ["", "1,2,3\n", ",".join(["17"] * 64 + ["1"]), ",".join(["1"] * 64 + ["10"]),
                                  ",".join(["x"] * 65)])
def test_parse_digits_csv_refuses_bad_rows(text):
    with pytest.raises(ValueError):
        sd.parse_digits_csv(text)


def test_load_digits_checks_the_member_checksum(tmp_path):
    wheel = tmp_path / "scikit_learn-1.9.1-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("sklearn/datasets/data/digits.csv.gz", gzip.compress(b"0," * 64 + b"1\n"))
    with pytest.raises(ValueError, match="SHA-256"):
        sd.load_digits(wheel)


# ------------------------------------------------------------------------------------------------ folder writing
def test_write_image_folder(tmp_path):
    images = np.arange(5 * 8 * 8, dtype=np.int64).reshape(5, 8, 8) % 256
    images = images.astype(np.uint8)
    labels = np.array([1, 0, 1, 1, 0])
    n = sd.write_image_folder(tmp_path / "train", images, labels, ["zero", "one"], np.array([0, 1, 3]))
    assert n == 3
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "train").rglob("*.png"))
    assert files == ["train/one/0.png", "train/one/3.png", "train/zero/1.png"]
    img = Image.open(tmp_path / "train" / "one" / "3.png")
    assert img.mode == "L" and img.size == (8, 8)
    assert np.array_equal(np.array(img), images[3])


def test_write_image_folder_pads_indices(tmp_path):
    images = np.zeros((12, 4, 4), np.uint8)
    sd.write_image_folder(tmp_path, images, np.zeros(12, int), ["a"], [2, 11])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["02.png", "11.png"]


def test_materialise_keeps_a_complete_folder_and_refuses_a_foreign_one(tmp_path, monkeypatch):
    ds = sd.DATASETS["digits"]
    done = tmp_path / "digits"
    (done / "train").mkdir(parents=True)
    (done / ".complete.json").write_text(json.dumps({"format": sd.FORMAT, "members": ds.members}))
    monkeypatch.setattr(sd, "fetch_wheel", lambda *a, **k: pytest.fail("a complete folder must not be redone"))
    assert sd.materialise(tmp_path, ["digits"], quiet=True) == {"digits": (done / "train", done / "test")}
    (done / ".complete.json").unlink()
    with pytest.raises(FileExistsError):
        sd.materialise(tmp_path, ["digits"], quiet=True)


def test_materialise_from_a_hand_built_wheel(tmp_path, monkeypatch):
    """The whole path on a fake 20-row digits wheel (checksum pinned to it): atomic folder, manifest, split."""
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(0, 17, 64)) + [i % 10] for i in range(20)]
    member = gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode())
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "scikit_learn-1.9.1-fake.whl", "w") as z:
        z.writestr("sklearn/datasets/data/digits.csv.gz", member)
    fake = sd.Dataset(**{**sd.DATASETS["digits"].__dict__, "n_test": 4,
                         "members": {"sklearn/datasets/data/digits.csv.gz": hashlib.sha256(member).hexdigest()}})
    monkeypatch.setitem(sd.DATASETS, "digits", fake)
    real_parse = sd.parse_digits_csv
    monkeypatch.setitem(sd.LOADERS, "digits", (lambda w: real_parse(gzip.decompress(
        sd._member(w, *next(iter(fake.members.items())))).decode()), sd.LOADERS["digits"][1]))
    out = sd.materialise(tmp_path, ["digits"], quiet=True)
    train, test = out["digits"]
    assert len(list(train.rglob("*.png"))) == 16 and len(list(test.rglob("*.png"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "wheels"]  # no temporary folder left
    manifest = json.loads((tmp_path / "digits" / ".complete.json").read_text())
    # 2 a class, 0.4 test rows each: the 4 go to the first classes (equal remainders)
    assert manifest["n_train"] == 16 and manifest["test_per_class"] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------- bench_small_data
def test_bench_verdict_right_and_compare_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_BENCH))  # bench_small_data imports _machine, as scripts there do
    bench = _load("bench_small_data")
    rows = [{"features": "learned encoder (v)", "top1": 0.9}, {"features": "learned embedding (z)", "top1": 0.5},
            {"features": "untrained encoder (v)", "top1": 0.7}, {"features": "raw pixels", "top1": 0.8}]
    test = bench.compare_top1(rows)
    assert test == {"learned": 0.9, "untrained": 0.7, "raw": 0.8}
    assert bench.verdict_right("learned", test)
    assert not bench.verdict_right("did not beat raw pixels", test)
    worse = {**test, "raw": 0.95}
    assert bench.verdict_right("did not beat raw pixels", worse) and not bench.verdict_right("learned", worse)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"type": "epoch", "epoch": 1}, {"type": "verdict", "verdict": "learned", "knn_learned": 0.5}, {})) + "\n")
    assert bench.verdict_record(run)["verdict"] == "learned"
    assert bench.verdict_record(tmp_path / "absent") is None
    assert bench._last_json_line("table\n{\"k\": 200}\n") == {"k": 200}

