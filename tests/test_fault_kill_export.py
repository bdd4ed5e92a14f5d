"""kill -9 during ``export-features`` (the re-run resumes and the file ends identical) and ``export-encoder`` (the
output is complete or absent). Issue 6, "Crashes"; exercises instdisc/export/hdf5.py and atomic_dir.py.
"""
import random
import time

import h5py
import numpy as np
import pytest

from _kill_helpers import CliProcess, wait_for
from conftest import make_fake_mnist
from instdisc.export import read_export, read_features

SLOW_BATCH = {"instdisc.features:iter_feature_batches": 0.05}  # 60 batches: ~3 s of writing to land kills in


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_kill")
    data = make_fake_mnist(root / "fm", n_train=96, n_test=3000)
    run = root / "run"
    p = CliProcess(["train", "fashion-mnist:train", "--data-root", data, "--out", run, "--arch", "convnet-tiny",
                    "--batch-size", "16", "--nce-k", "32", "--low-dim", "16", "--epochs", "1"], root / "train.log")
    assert p.wait() == 0, p.output()
    return data, run


def test_sigkill_export_features_then_rerun_ends_identical(trained, tmp_path):
    data, run = trained
    base = ["export-features", run, "fashion-mnist:test", "--data-root", data, "--batch-size", "50"]
    ref = CliProcess(base + ["--out", tmp_path / "ref.h5"], tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()

    out, rng = tmp_path / "f.h5", random.Random(6)
    kills = 0
    for i in range(9):
        p = CliProcess(base + ["--out", out], tmp_path / f"k{i}.log", slow=SLOW_BATCH)
        time.sleep(rng.uniform(0, 2.5))
        p.kill()
        assert "Traceback" not in p.output(), p.output()
        assert p.proc.exitcode in (-9, 0), p.output()
        if p.proc.exitcode == 0:  # it finished before the kill
            break
        kills += 1
        if out.exists():
            with h5py.File(out, "r") as f:  # still a readable HDF5 file after every kill
                if f.attrs["complete"]:
                    break
    else:
        last = CliProcess(base + ["--out", out], tmp_path / "final.log")
        assert last.wait() == 0, last.output()
    assert kills >= 5, kills
    assert sorted(x.name for x in tmp_path.iterdir() if ".tmp-" in x.name) == []

    fa, la, ia, attrs_a = read_features(tmp_path / "ref.h5")
    fb, lb, ib, attrs_b = read_features(out)
    assert fa.tobytes() == fb.tobytes() and np.array_equal(la, lb) and np.array_equal(ia, ib)
    with h5py.File(tmp_path / "ref.h5", "r") as a, h5py.File(out, "r") as b:
        assert set(a) == set(b)
        for name in a:
            assert np.array_equal(a[name][:], b[name][:]), name
    skip = {"created", "completed"}  # wall-clock times
    assert {k: str(v) for k, v in attrs_a.items() if k not in skip} == \
           {k: str(v) for k, v in attrs_b.items() if k not in skip}


def test_sigkill_export_encoder_leaves_complete_or_absent(trained, tmp_path):
    _, run = trained
    out = tmp_path / "enc"
    ref = CliProcess(["export-encoder", run, "--out", tmp_path / "ref", "--with-head"], tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    span = time.monotonic() - ref.t0
    rng = random.Random(6)
    kills = 0
    for i in range(10):
        p = CliProcess(["export-encoder", run, "--out", out, "--with-head", "--overwrite"], tmp_path / f"k{i}.log")
        time.sleep(rng.uniform(0, span))
        p.kill()
        assert p.proc.exitcode in (-9, 0), p.output()
        kills += p.proc.exitcode == -9
        if out.exists():  # complete: every file present and matching metadata.json's hashes
            encoder, head, meta = read_export(out)
            assert head is not None and meta["has_head"]
    assert kills >= 5
    if not out.exists():
        last = CliProcess(["export-encoder", run, "--out", out, "--with-head"], tmp_path / "final.log")
        assert last.wait() == 0, last.output()
    read_export(out)


def test_killed_export_encoder_temp_folder_is_cleaned_by_next_export(trained, tmp_path):
    _, run = trained
    out = tmp_path / "enc"
    stale = tmp_path / ".enc.tmp-999999999"  # what a killed export leaves (pid of a process that is gone)
    stale.mkdir()
    (stale / "encoder.pt").write_bytes(b"half")
    p = CliProcess(["export-encoder", run, "--out", out], tmp_path / "a.log")
    assert p.wait() == 0, p.output()
    assert not stale.exists()


def test_sigkill_while_creating_the_feature_file(trained, tmp_path):
    """Killed as soon as the file appears (it used to be created under its final name, and a kill before its first
    flush left an empty or headerless file that the re-run refused)."""
    data, run = trained
    out = tmp_path / "f.h5"
    args = ["export-features", run, "fashion-mnist:test", "--data-root", data, "--out", out]
    for i in range(3):
        out.unlink(missing_ok=True)
        p = CliProcess(args, tmp_path / f"k{i}.log")
        wait_for(lambda: out.exists() or any(tmp_path.glob(".f.h5.tmp-*")) or not p.alive(), every=0.0005,
                 what="the HDF5 file")
        p.kill()
        again = CliProcess(args, tmp_path / f"again{i}.log")
        assert again.wait() == 0, again.output()
        read_features(out)
        assert sorted(x.name for x in tmp_path.iterdir() if ".tmp-" in x.name) == []
