"""Bad images end to end through ``instdisc train`` (issue 6, "Bad data").

Covers instdisc/data (bad-image scan, --skip-bad-images, image modes) as the CLI uses it, and instdisc/training/loop.py's
handling of a file that breaks during the run (``training.batches.guarded``: named in one line, progress saved, exact resume).
"""
import shutil

import pytest
import torch
from click.testing import CliRunner

from _image_helpers import make_bad_files, make_mixed_folder
from _kill_helpers import assert_bitwise_equal, metrics_records, snapshot
from instdisc.training import loop
from instdisc.training.checkpoint import read_checkpoint
from instdisc_cli.main import cli


def folder_args(folder, out, *extra):
    args = ["train", folder, "--out", out, "--arch", "convnet-tiny", "--image-size", "32", "--batch-size", "8",
            "--nce-k", "8", "--low-dim", "8", "--epochs", "1", "--log-every", "1", *extra]
    return [str(a) for a in args]


def invoke(args):
    return CliRunner().invoke(cli, args)


@pytest.fixture
def bad_folder(tmp_path):
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=8)  # 24 good images
    bad = make_bad_files(folder / "b", folder / "a" / "000.png")
    return folder, bad


def test_bad_images_stop_before_training_naming_first_and_count(bad_folder, tmp_path):
    folder, bad = bad_folder
    before = snapshot(folder)
    r = invoke(folder_args(folder, tmp_path / "run"))
    assert r.exit_code == 2, r.output
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.output
    assert f"4 unreadable images in {folder}, first: {bad[0]} (empty file)" in err[0]
    assert "--skip-bad-images" in err[0]
    assert snapshot(folder) == before
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("name,reason", [("bad_truncated.png", ""), ("bad_empty.jpg", "empty file"),
                                         ("bad_text.jpg", "not an image"), ("bad_unreadable.png", "file not found")])
def test_each_kind_of_bad_file_alone(tmp_path, name, reason):
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=8)
    bad = [b for b in make_bad_files(tmp_path / "spare", folder / "a" / "000.png") if b.endswith(name)][0]
    (folder / "c" / name).symlink_to(bad) if name != "bad_unreadable.png" else (folder / "c" / name).symlink_to(
        tmp_path / "gone.png")
    r = invoke(folder_args(folder, tmp_path / "run"))
    assert r.exit_code == 2, r.output
    assert f"1 unreadable image in {folder}, first: {folder / 'c' / name} ({reason}" in r.output


def test_skip_bad_images_assigns_bank_slots_to_good_files_only(bad_folder, tmp_path):
    folder, bad = bad_folder
    r = invoke(folder_args(folder, tmp_path / "run", "--skip-bad-images"))
    assert r.exit_code == 0, r.output
    assert f"skipping 4 unreadable images in {folder}, first: {bad[0]}" in r.output
    ckpt = read_checkpoint(tmp_path / "run")
    assert ckpt["data"]["n"] == 24
    assert ckpt["model"]["objective.bank.memory"].shape == (24, 8)
    # --resume with the same flag sees the same 24 files
    r = invoke(folder_args(folder, tmp_path / "run", "--skip-bad-images", "--resume"))
    assert r.exit_code == 0, r.output


def test_mixed_sizes_and_modes_train_end_to_end(tmp_path):
    """Grayscale, RGB, RGBA, palette (with transparency), 16-bit, CMYK; PNG, JPEG, BMP, GIF; 9..60 px sides."""
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=8)
    for workers in ("0", "1"):
        out = tmp_path / f"run{workers}"
        r = invoke(folder_args(folder, out, "--workers", workers, "--epochs", "2"))
        assert r.exit_code == 0, r.output
        ckpt = read_checkpoint(out)
        assert ckpt["data"]["n"] == 24 and ckpt["data"]["channels"] == 3 and ckpt["data"]["image_size"] == 32
        assert torch.isfinite(ckpt["model"]["objective.bank.memory"]).all()


def _put_back_and_resume_to_the_reference(folder, victim, tmp_path, run, args):
    """Restore the moved-away ``victim``, ``--resume`` the run, and check it ends bitwise as the uninterrupted
    ``tmp_path/ref`` (checkpoint and metrics records)."""
    shutil.move(tmp_path / "moved-away.png", victim)
    r = invoke(folder_args(folder, run, *args, "--resume"))
    assert r.exit_code == 0, r.output
    a, b = read_checkpoint(tmp_path / "ref"), read_checkpoint(run)
    for key in ("model", "optimizer", "rng", "epoch", "step", "epoch_losses"):
        assert_bitwise_equal(a[key], b[key], key)
    assert metrics_records(run) == metrics_records(tmp_path / "ref")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_file_deleted_mid_run_is_named_progress_kept_and_resume_exact(tmp_path, monkeypatch, workers):
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=8)
    args = ["--workers", workers, "--epochs", "3", "--augment", "pil"]  # files read at each step, not in memory
    r = invoke(folder_args(folder, tmp_path / "ref", *args))
    assert r.exit_code == 0, r.output

    victim = folder / "b" / "003.png"
    real_step = loop._step_loss
    calls = []

    def delete_after_step_2(*a, **kw):  # the file goes away while the run is going on
        calls.append(1)
        if len(calls) == 2:
            shutil.move(victim, tmp_path / "moved-away.png")
        return real_step(*a, **kw)

    monkeypatch.setattr(loop, "_step_loss", delete_after_step_2)
    run = tmp_path / "run"
    r = invoke(folder_args(folder, run, *args))
    assert r.exit_code == 2, r.output
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.output, r.output
    assert f"cannot read image {victim}: file not found" in err[0] and "--resume" in err[0]
    saved = read_checkpoint(run)
    assert 2 <= saved["step"] < 9  # the steps done before the failure are kept (3 epochs x 3 steps)

    monkeypatch.setattr(loop, "_step_loss", real_step)
    _put_back_and_resume_to_the_reference(folder, victim, tmp_path, run, args)


def test_file_unreadable_at_the_epochs_health_probe_is_saved_and_resume_exact(tmp_path, monkeypatch):
    """An image that goes away after the epoch's last step, when the training-health probe reads it: the epoch's
    steps are saved (step = steps per epoch), the error names the file, and --resume closes the epoch exactly as an
    uninterrupted run does (its epoch record included)."""
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=8)
    args = ["--epochs", "2", "--augment", "pil"]  # the probe reads the files, not an in-memory copy
    r = invoke(folder_args(folder, tmp_path / "ref", *args))
    assert r.exit_code == 0, r.output

    victim = folder / "b" / "003.png"
    real_probe = loop.HealthProbe.__call__

    def vanish_first(self, model, epoch, **kw):
        if epoch == 1 and victim.exists():
            shutil.move(victim, tmp_path / "moved-away.png")
        return real_probe(self, model, epoch, **kw)

    monkeypatch.setattr(loop.HealthProbe, "__call__", vanish_first)
    run = tmp_path / "run"
    r = invoke(folder_args(folder, run, *args))
    assert r.exit_code == 2, r.output
    err = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.output, r.output
    assert f"cannot read image {victim}: file not found" in err[0]
    assert "progress is saved at step 3 of this epoch" in err[0] and "--resume" in err[0]  # 24 images / 8
    saved = read_checkpoint(run)
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (0, 3, 3)

    monkeypatch.setattr(loop.HealthProbe, "__call__", real_probe)
    _put_back_and_resume_to_the_reference(folder, victim, tmp_path, run, args)
