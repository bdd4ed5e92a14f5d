"""Every bad argument: one ``error:`` line naming the problem, exit status 2, no traceback, nothing changed.

Table-driven over the commands (issue 6, "Bad arguments"); runs in-process with click's CliRunner. Covers the CLI
boundary of cli/app.py (InstdiscError and click usage errors -> one line, status 2) and the checks in
instdisc/training/loop.py, instdisc/atomic.py, instdisc/data, instdisc/export and instdisc/evaluation that it reaches.

Each case builds its inputs in its own folder; the runner hashes every file there before and after the command and
asserts that no file changed or disappeared and that nothing new appeared, except the dataset index cache (a cache
of the folder listing that ``train`` keeps in ``OUT/.index-cache``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _kill_helpers import snapshot
from conftest import make_fake_mnist
from instdisc_cli.main import cli


def train_args(data, out, *extra):
    args = ["train", "fashion-mnist:train", "--data-root", data, "--out", out, "--arch", "convnet-tiny",
            "--batch-size", "16", "--nce-k", "32", "--low-dim", "8", "--epochs", "1", *extra]
    return [str(a) for a in args]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A trained run and its feature files, built once; cases copy what they need."""
    root = tmp_path_factory.mktemp("golden")
    data = make_fake_mnist(root / "fm")
    run = root / "run"
    for args in (train_args(data, run),
                 ["export-features", run, "fashion-mnist:test", "--data-root", data, "--out", root / "enc.h5"],
                 ["export-features", run, "fashion-mnist:test", "--data-root", data, "--out", root / "emb.h5",
                  "--layer", "embedding"]):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    return root


@dataclass
class Ctx:
    root: Path
    golden: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list = field(default_factory=list)

    @property
    def data(self) -> Path:
        d = self.root / "fm"
        if not d.exists():
            shutil.copytree(self.golden / "fm", d)
        return d

    def run(self) -> Path:
        d = self.root / "run"
        if not d.exists():
            shutil.copytree(self.golden / "run", d)
        return d

    def copy(self, name: str) -> Path:
        shutil.copy(self.golden / name, self.root / name)
        return self.root / name


# ---- the cases: each returns (argv, text the error line must contain) -----------------------------------------

def missing_path(c):
    return ["train", str(c.root / "no" / "such" / "images"), "--out", str(c.root / "o")], "dataset path not found"


def empty_folder(c):
    (c.root / "empty").mkdir()
    return ["train", str(c.root / "empty"), "--out", str(c.root / "o")], "no images found in"


def empty_file_list(c):
    (c.root / "list.txt").write_text("# nothing here\n")
    return ["train", f"filelist:{c.root / 'list.txt'}", "--out", str(c.root / "o")], "file list has no image paths"


def spec_typo(c):
    return train_args(c.data, c.root / "o")[:1] + ["fashon-mnist"] + train_args(c.data, c.root / "o")[2:], \
        "did you mean 'fashion-mnist'"


def split_typo(c):
    args = train_args(c.data, c.root / "o")
    args[1] = "fashion-mnist:tset"
    return args, "unknown split 'tset'"


def data_root_missing(c):
    return train_args(c.root / "nowhere", c.root / "o"), "data root not found"


def k_not_below_n(c):
    return train_args(c.data, c.root / "o", "--nce-k", "96"), \
        "--nce-k (96) must be smaller than the number of images (96)"


def tau_zero(c):
    return train_args(c.data, c.root / "o", "--nce-t", "0"), "(temperature tau) must be > 0, got 0.0"


def tau_negative(c):
    return train_args(c.data, c.root / "o", "--nce-t", "-0.5"), "(temperature tau) must be > 0, got -0.5"


def m_one(c):
    return train_args(c.data, c.root / "o", "--nce-m", "1"), "(bank momentum m) must be in [0, 1), got 1.0"


def m_negative(c):
    return train_args(c.data, c.root / "o", "--nce-m", "-0.1"), "(bank momentum m) must be in [0, 1), got -0.1"


def batch_larger_than_data(c):
    return train_args(c.data, c.root / "o", "--batch-size", "200", "--nce-k", "8"), \
        "--batch-size (200) is larger than the dataset (96 images)"


def unknown_arch(c):
    return train_args(c.data, c.root / "o", "--arch", "resnet99"), "unknown arch 'resnet99'"


def cuda_without_gpu(c):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    return train_args(c.data, c.root / "o", "--device", "cuda"), "no CUDA GPU is available"


def limit_zero(c):
    return train_args(c.data, c.root / "o", "--limit", "0"), "--limit must be >= 1, got 0"


def epochs_zero(c):
    return train_args(c.data, c.root / "o", "--epochs", "0"), "--epochs must be >= 1, got 0"


def bad_choice(c):
    return train_args(c.data, c.root / "o", "--loss", "hinge"), "Invalid value for '--loss'"


def unknown_option(c):
    return train_args(c.data, c.root / "o", "--nce-kk", "3"), "No such option '--nce-kk'"


def resume_bank_mismatch(c):
    return train_args(c.data, c.run(), "--resume", "--limit", "50"), \
        "the checkpoint's memory bank has 96 slots but the dataset now has 50 images"


def resume_config_differs(c):
    return train_args(c.data, c.run(), "--resume", "--nce-t", "0.2"), "setting 'nce_t' is 0.2"


def resume_other_images_same_size(c):
    other = make_fake_mnist(c.root / "other", seed=1)  # also 96 images, other pixels
    return train_args(other, c.run(), "--resume"), "the dataset's content changed since the run started"


def ckpt_random_bytes(c):
    run = c.run()
    (run / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    return train_args(c.data, run, "--resume"), "is not a readable instdisc checkpoint"


def ckpt_unrelated_torch_file(c):
    run = c.run()
    torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    return train_args(c.data, run, "--resume"), "is a torch file but not an instdisc checkpoint"


def ckpt_truncated(c):
    run = c.run()
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return train_args(c.data, run, "--resume"), "is not a readable instdisc checkpoint"


def ckpt_future_format(c):
    run = c.run()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save(dict(ckpt, format_version=99), run / "checkpoint.pt")
    return train_args(c.data, run, "--resume"), "has checkpoint format 99"


def run_exists_without_resume(c):
    return train_args(c.data, c.run()), "already holds a checkpoint; pass --resume"


def resume_without_run(c):
    return train_args(c.data, c.root / "o", "--resume"), "--resume: no run directory at"


def resume_without_run_folder_data(c):
    """The folder index cache (OUT/.index-cache) is written before the checks: --resume must still see no run."""
    from _image_helpers import make_mixed_folder

    folder = make_mixed_folder(c.root / "imgs", n_per_class=4)
    return ["train", str(folder), "--out", str(c.root / "typo"), "--resume", "--image-size", "32", "--batch-size", "4",
            "--nce-k", "4"], \
        "--resume: no run directory at"


def out_under_a_file(c):
    (c.root / "afile").write_text("x")
    return train_args(c.data, c.root / "afile" / "run"), "cannot create output directory"


def _read_only_dir(c) -> Path:
    """A folder that root cannot write either: immutable (chattr +i); chmod does not stop root."""
    ro = c.root / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i (immutable directory) is not available here")
    c.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(ro)], check=True))
    return ro


def out_read_only(c):
    return train_args(c.data, _read_only_dir(c)), "output directory is not writable"


def _little_disk(c):
    real = shutil.disk_usage

    def fake(path):
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    c.monkeypatch.setattr(shutil, "disk_usage", fake)


def disk_full_new_run(c):
    _little_disk(c)
    return train_args(c.data, c.root / "o"), "not enough free disk"


def disk_full_resume(c):
    run = c.run()
    _little_disk(c)
    return train_args(c.data, run, "--resume", "--epochs", "2"), "not enough free disk"


def compare_bad_checkpoint(c):
    run = c.run()
    (run / "checkpoint.pt").write_bytes(b"\x00" * 100)
    return ["compare", str(run), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test", "--data-root",
            str(c.data)], "is not a readable instdisc checkpoint"


def export_encoder_exists(c):
    (c.root / "enc").mkdir()
    (c.root / "enc" / "mine.txt").write_text("keep me")
    return ["export-encoder", str(c.run()), "--out", str(c.root / "enc")], "already exists; pass --overwrite"


def export_encoder_bad_checkpoint(c):
    run = c.run()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return ["export-encoder", str(run), "--out", str(c.root / "enc")], "is not a readable instdisc checkpoint"


def export_features_target_exists(c):
    c.copy("enc.h5")
    return ["export-features", str(c.run()), "fashion-mnist:test", "--data-root", str(c.data), "--out",
            str(c.root / "enc.h5")], "already exists (a complete export); pass --overwrite"


def export_features_target_is_other_file(c):
    (c.root / "notes.h5").write_text("my notes")
    return ["export-features", str(c.run()), "fashion-mnist:test", "--data-root", str(c.data), "--out",
            str(c.root / "notes.h5")], "exists and is not an instdisc features file; pass --overwrite"


def export_features_read_only(c):
    return ["export-features", str(c.run()), "fashion-mnist:test", "--data-root", str(c.data), "--out",
            str(_read_only_dir(c) / "f.h5")], "output directory is not writable"


def export_features_disk_full(c):
    args = ["export-features", str(c.run()), "fashion-mnist:test", "--data-root", str(c.data), "--out",
            str(c.root / "f.h5")]
    _little_disk(c)
    return args, "not enough free disk"


def knn_incomplete_features(c):
    f = c.copy("enc.h5")
    with h5py.File(f, "r+") as h:
        h.attrs["complete"], h.attrs["n_written"] = False, 10
    return ["knn", "--train", str(f), "--test", str(f)], "is incomplete: its export stopped after 10 of 40 rows"


def knn_wrong_dimension(c):
    return ["knn", "--train", str(c.copy("enc.h5")), "--test", str(c.copy("emb.h5"))], \
        "feature dimensions differ: train has 16, test has 8"


def knn_not_hdf5(c):
    (c.root / "x.h5").write_bytes(b"plain text, not HDF5")
    return ["knn", "--train", str(c.root / "x.h5"), "--test", str(c.root / "x.h5")], "is not a readable HDF5 file"


CASES = [missing_path, empty_folder, empty_file_list, spec_typo, split_typo, data_root_missing, k_not_below_n,
         tau_zero, tau_negative, m_one, m_negative, batch_larger_than_data, unknown_arch, cuda_without_gpu,
         limit_zero, epochs_zero, bad_choice, unknown_option, resume_bank_mismatch, resume_config_differs,
         resume_other_images_same_size, ckpt_random_bytes, ckpt_unrelated_torch_file, ckpt_truncated,
         ckpt_future_format, run_exists_without_resume, resume_without_run, resume_without_run_folder_data,
         out_under_a_file, out_read_only,
         disk_full_new_run, disk_full_resume, compare_bad_checkpoint, export_encoder_exists,
         export_encoder_bad_checkpoint, export_features_target_exists, export_features_target_is_other_file,
         export_features_read_only, export_features_disk_full, knn_incomplete_features, knn_wrong_dimension,
         knn_not_hdf5]


def _cache_entries(paths: set[str]) -> set[str]:
    """New paths that are the index cache or the folders made to hold it."""
    cache = {p for p in paths if ".index-cache" in Path(p).parts}
    holders = {p for p in paths if any(q.startswith(p + os.sep) for q in cache)}
    return cache | holders


@pytest.mark.parametrize("case", CASES, ids=[f.__name__ for f in CASES])
def test_bad_argument_one_line_exit_2_nothing_changed(case, golden, tmp_path, monkeypatch):
    ctx = Ctx(tmp_path / "case", golden, monkeypatch)
    ctx.root.mkdir()
    try:
        args, expected = case(ctx)
        before = snapshot(ctx.root)
        r = CliRunner().invoke(cli, args)
        after = snapshot(ctx.root)
    finally:
        for undo in ctx.cleanups:
            undo()
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # not an escaped exception
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    assert expected in errors[0], errors[0]
    assert "Traceback" not in r.output
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert changed == [], f"changed or removed: {changed}"
    new = set(after) - set(before)
    assert sorted(new - _cache_entries(new)) == []
