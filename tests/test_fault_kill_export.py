"""kill -9 during ``export-features`` (the re-run resumes and the file ends identical) and ``export-encoder`` (the
output is complete or absent). Issue 6, "Crashes"; exercises instdisc/export/hdf5.py and atomic_dir.py.

The kills are deterministic: each process SIGKILLs itself at a named event (the library's test-only fault points,
instdisc/faultpoints.py) and the test checks which event it hit; the encoder test adds kills at random moments, with
assertions that hold wherever they land.
"""
import random
import time

import h5py
import numpy as np
import pytest

from _kill_helpers import CliProcess, kill_at, read_hits, wait_for
from conftest import make_fake_mnist
from instdisc.export import read_export, read_features

# 60 batches of 50 rows. n_written is flushed every 2 s: with each batch taking at least 0.2 s, a flush comes within
# at most 10 batches, so 5 runs killed at their first flush each find >= 10 batches left and each flush (and is
# killed) for sure.
SLOW_BATCH = {"instdisc.features:iter_feature_batches": 0.2}
N_ROWS, BATCH = 3000, 50


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

    out, hits = tmp_path / "f.h5", tmp_path / "hits.jsonl"
    written = [0]  # n_written in the file after each kill
    for i in range(5):
        p = CliProcess(base + ["--out", out], tmp_path / f"k{i}.log", slow=SLOW_BATCH, env=kill_at("hdf5.flush:1", hits))
        assert p.wait() == -9, p.output()
        assert "Traceback" not in p.output(), p.output()
        hit = read_hits(hits)[-1]
        assert (hit["event"], hit["index"], hit["pid"]) == ("hdf5.flush", 1, p.pid), hit
        if i:  # it resumed from the rows the previous run had flushed
            assert f"resuming {out}: {written[-1]} of {N_ROWS} rows were written" in p.output(), p.output()
        with h5py.File(out, "r") as f:  # still a readable HDF5 file after every kill, its counter flushed
            assert not f.attrs["complete"]
            assert int(f.attrs["n_written"]) == hit["rows"]
        assert written[-1] < hit["rows"] < N_ROWS and hit["rows"] % BATCH == 0, (written, hit)
        written.append(hit["rows"])
    last = CliProcess(base + ["--out", out], tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    assert f"resumed after {written[-1]} rows" in last.output(), last.output()
    assert written[-1] > 0  # so the resume path ran from a non-zero n_written, six times
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
    out, hits = tmp_path / "enc", tmp_path / "hits.jsonl"
    ref = CliProcess(["export-encoder", run, "--out", tmp_path / "ref", "--with-head"], tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    span = time.monotonic() - ref.t0

    def leftovers():
        return sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".enc."))

    def check_complete(path):  # every file present and matching metadata.json's hashes
        encoder, head, meta = read_export(path)
        assert head is not None and meta["has_head"]

    # Each crash window of atomic_directory, hit every time: (kill at, overwrite, out afterwards, left beside it).
    cases = [
        ("atomic_dir.temp_complete", False, "absent", ["tmp"]),  # a new folder, complete, not yet renamed
        (None, False, "complete", []),  # (an export that finishes)
        ("atomic_dir.temp_complete", True, "complete", ["tmp"]),  # the old folder is still in place
        ("atomic_dir.old_moved", True, "absent", ["old", "tmp"]),  # old folder moved aside, the new one not in place
        ("atomic_dir.temp_complete", True, "complete", ["tmp"]),  # the next export put the old folder back first
        ("atomic_dir.old_moved", True, "absent", ["old", "tmp"]),
        ("atomic_dir.old_moved", True, "absent", ["old", "tmp"]),
    ]
    kills = 0
    for i, (spec, overwrite, state, left) in enumerate(cases):
        args = ["export-encoder", run, "--out", out, "--with-head", *(["--overwrite"] if overwrite else [])]
        p = CliProcess(args, tmp_path / f"d{i}.log", env=kill_at(spec, hits) if spec else None)
        assert p.wait() == (-9 if spec else 0), p.output()
        if spec:
            kills += 1
            hit = read_hits(hits)[-1]
            assert (hit["event"], hit["pid"]) == (spec, p.pid), hit
            assert hit["path"] == str(tmp_path / f".enc.{left[0]}-{p.pid}")
            # Complete folders beside the target, only this process's: what earlier kills left was tidied.
            assert leftovers() == [f".enc.{x}-{p.pid}" for x in left]
            for x in leftovers():
                check_complete(tmp_path / x)
        assert out.exists() == (state == "complete")
        if out.exists():
            check_complete(out)

    rng = random.Random(6)
    for i in range(6):  # and at random moments: complete or absent wherever the kill lands
        p = CliProcess(["export-encoder", run, "--out", out, "--with-head", "--overwrite"], tmp_path / f"k{i}.log")
        time.sleep(rng.uniform(0, span))
        p.kill()
        assert p.proc.exitcode in (-9, 0), p.output()
        if out.exists():
            check_complete(out)
    assert kills >= 5
    last = CliProcess(["export-encoder", run, "--out", out, "--with-head", "--overwrite"], tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    check_complete(out)
    assert leftovers() == []


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
