"""kill -9 anywhere, resume, and end bitwise identical to a run that was never killed (issue 6, "Crashes").

Covers the crash paths of instdisc/atomic.py (temp file + rename, stale temp clean-up) and instdisc/training/loop.py
(``--resume`` from a checkpoint, or from scratch when the run was killed before its first checkpoint). The processes
are real (see tests/_kill_helpers.py: forked from a server that imported instdisc once, one torch thread each).
"""
import json
import random
import time

import pytest
import torch

from _kill_helpers import CliProcess, assert_bitwise_equal, metrics_records, wait_for
from instdisc.training.checkpoint import read_checkpoint

EPOCHS = 8  # 6 steps an epoch (96 images, batch 16): 48 steps, a checkpoint after every one (--save-every 1)
N_KILLS = 12


def train_args(data_root, out, *extra):
    args = ["train", "fashion-mnist:train", "--data-root", data_root, "--out", out, "--arch", "convnet-tiny",
            "--batch-size", "16", "--nce-k", "32", "--low-dim", "16", "--log-every", "1", "--save-every", "1",
            "--epochs", str(EPOCHS), *extra]
    return [str(a) for a in args]


def temp_files(run):
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name) if run.exists() else []


def checkpoint_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def test_sigkill_anywhere_then_resume_is_bitwise_identical(fake_mnist, tmp_path):
    t_start = time.monotonic()
    rng = random.Random(6)
    ref_dir, run = tmp_path / "ref", tmp_path / "run"

    ref = CliProcess(train_args(fake_mnist, ref_dir), tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    ref_wall = time.monotonic() - ref.t0
    # Time to the first checkpoint: start-up (imports are shared, dataset, model, bank init) plus one step.
    first_save = json.loads((ref_dir / "metrics.jsonl").read_text().splitlines()[0])
    step_s = max(0.01, 1.0 / max(first_save["steps_per_s"], 1e-3))

    kinds = ["before-first-checkpoint"] + [("save", "step", "startup")[i % 3] for i in range(N_KILLS - 1)]
    kills, during_save, log_i = [], 0, 0
    for kind in kinds:
        log_i += 1
        args = train_args(fake_mnist, run, *([] if kind == "before-first-checkpoint" else ["--resume"]))
        # Renames onto checkpoint.pt wait: a kill aimed into the write lands there even if this process stalls.
        slow = {"save": 1.0, "before-first-checkpoint": 5.0}.get(kind, 0.0)
        p = CliProcess(args, tmp_path / f"kill{log_i}.log", slow_save=slow)
        if kind == "before-first-checkpoint":
            wait_for(lambda: (run / "config.json").exists() or not p.alive(), what="config.json")
        elif kind == "startup":  # anywhere from fork to the first step: imports done, dataset, model, resume load
            time.sleep(rng.uniform(0, 0.3))
        elif kind == "step":  # a random moment in the steps after the j-th save (forward, backward, bank, save)
            j = rng.randint(1, 3)
            wait_for(lambda: p.n_saves() >= j or not p.alive(), what=f"save {j}")
            time.sleep(rng.uniform(0, 1.5 * step_s))
        else:  # inside the j-th checkpoint write: the temp file is complete, the rename has not happened
            j = rng.randint(1, 2)
            wait_for(lambda: p.n_saves() >= j or not p.alive(), what=f"save {j}")
            time.sleep(rng.uniform(0, 0.2))
        p.kill()
        assert p.proc.exitcode in (-9, 0), f"{kind}: exit {p.proc.exitcode}\n{p.output()}"
        if p.proc.exitcode == 0:  # it finished before the kill
            break
        kills.append(kind)
        assert "Traceback" not in p.output() and "error:" not in p.output(), p.output()

        # Never half-written under the final name: whatever checkpoint.pt holds loads and is older than a temp file
        # that was complete but not yet renamed.
        ckpt = run / "checkpoint.pt"
        if kind == "before-first-checkpoint":
            assert (run / "config.json").exists() and not ckpt.exists()
        if ckpt.exists():
            read_checkpoint(ckpt)
        if (run / "config.json").exists():
            json.loads((run / "config.json").read_text())
        tmp = run / f".checkpoint.pt.tmp-{p.pid}"
        if kind == "save":
            assert tmp.exists(), f"the kill missed the checkpoint write; left: {temp_files(run)}"
        if tmp.exists():
            during_save += 1
            if ckpt.exists():
                assert read_checkpoint(ckpt)["step"] < checkpoint_step(tmp)

    assert len(kills) >= 10, kills
    assert during_save >= kills.count("save") >= 3

    last = CliProcess(train_args(fake_mnist, run, "--resume"), tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    assert f"done: {EPOCHS} epochs, {EPOCHS * 6} steps" in last.output()
    assert temp_files(run) == []  # stale temps of killed writers were removed by the next start

    a, b = read_checkpoint(ref_dir), read_checkpoint(run)
    for key in ("model", "optimizer", "rng", "epoch", "step", "step_in_epoch", "epoch_losses", "data"):
        assert_bitwise_equal(a[key], b[key], key)
    assert dict(a["config"], out=None) == dict(b["config"], out=None)
    assert a["model"]["objective.bank.memory"].shape == (96, 16)  # the bank and Z are in "model"
    assert any(k.startswith("objective.z") for k in a["model"])
    # Nothing lost, nothing twice: the resumed run's metrics are the uninterrupted run's, record for record.
    assert metrics_records(run) == metrics_records(ref_dir)
    elapsed = time.monotonic() - t_start
    print(f"{len(kills)} kills ({during_save} inside a checkpoint write), reference run {ref_wall:.1f}s, "
          f"test {elapsed:.1f}s")


def test_resume_without_run_directory_is_refused(fake_mnist, tmp_path):
    from click.testing import CliRunner

    from instdisc_cli.main import cli

    r = CliRunner().invoke(cli, train_args(fake_mnist, tmp_path / "nowhere", "--resume"))
    assert r.exit_code == 2 and "no run directory" in r.output
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("same", [True, False])
def test_resume_before_first_checkpoint_checks_config(fake_mnist, tmp_path, same):
    """A run killed before its first checkpoint: --resume starts it again only if config.json matches."""
    from click.testing import CliRunner

    from instdisc_cli.main import cli

    run = tmp_path / "run"
    p = CliProcess(train_args(fake_mnist, run), tmp_path / "a.log", slow_save=5.0)
    wait_for(lambda: (run / "config.json").exists() or not p.alive(), what="config.json")
    p.kill()
    assert not (run / "checkpoint.pt").exists()
    (run / ".checkpoint.pt.tmp-999999999").write_bytes(b"half a checkpoint")  # a writer that no longer exists
    args = train_args(fake_mnist, run, "--resume", *([] if same else ["--nce-t", "0.2"]))
    args[args.index("--epochs") + 1] = "1"
    r = CliRunner().invoke(cli, args)
    if same:
        assert r.exit_code == 0, r.output
        assert "done: 1 epochs, 6 steps" in r.output
        assert temp_files(run) == []
    else:
        assert r.exit_code == 2 and "nce_t" in r.output, r.output
        assert temp_files(run) == [".checkpoint.pt.tmp-999999999"]  # a refused run changes nothing
