"""kill -9 anywhere, resume, and end bitwise identical to a run that was never killed (issue 6, "Crashes").

Covers the crash paths of instdisc/atomic.py (temp file + rename, stale temp clean-up) and instdisc/training/loop.py
(``--resume`` from a checkpoint, or from scratch when the run was killed before its first checkpoint). The processes
are real (see tests/_kill_helpers.py: forked from a server that imported instdisc once, one torch thread each).

The kills are deterministic: each process SIGKILLs itself at a named event (the library's test-only fault points,
instdisc/faultpoints.py), and the test checks which event it hit. One more test kills at random moments, with
assertions that hold wherever the kill lands.
"""
import json
import random
import time

import pytest

from _kill_helpers import CliProcess, assert_bitwise_equal, kill_at, metrics_records, read_hits
from instdisc.errors import InstdiscError
from instdisc.training.checkpoint import read_checkpoint

EPOCHS = 8  # 6 steps an epoch (96 images, batch 16): 48 steps, a checkpoint after every one (--save-every 1)
STEPS = EPOCHS * 6

# (kill at, checkpoint step after the kill, step in the temp file or "partial" or None). The checkpoint before each
# kill is the one after the previous kill; "train.step:s" is global step s trained, its checkpoint not yet written;
# "checkpoint.temp_*:j" is the j-th checkpoint write of that process. Steps 6, 12, ... end an epoch (their checkpoint
# is the epoch's end, written after the epoch record).
KILLS = [
    ("train.before_first_checkpoint", None, None),
    ("train.step:2", 1, None),  # a restart from scratch (no checkpoint yet), killed after step 2
    ("checkpoint.temp_written:1", 1, 2),
    ("checkpoint.temp_partial:2", 2, "partial"),
    ("train.step:6", 5, None),  # the last step of epoch 1, before the epoch record
    ("checkpoint.temp_written:1", 5, 6),  # the end-of-epoch checkpoint
    ("checkpoint.temp_partial:1", 5, "partial"),
    ("train.step:9", 8, None),
    ("checkpoint.temp_written:3", 10, 11),
    ("train.step:12", 11, None),
    ("checkpoint.temp_partial:3", 13, "partial"),
    ("train.step:20", 19, None),
    ("checkpoint.temp_written:2", 20, 21),
]


def train_args(data_root, out, *extra):
    args = ["train", "fashion-mnist:train", "--data-root", data_root, "--out", out, "--arch", "convnet-tiny",
            "--batch-size", "16", "--nce-k", "32", "--low-dim", "16", "--log-every", "1", "--save-every", "1",
            "--epochs", str(EPOCHS), *extra]
    return [str(a) for a in args]


def temp_files(run):
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name) if run.exists() else []


def assert_same_as_reference(ref_dir, run):
    a, b = read_checkpoint(ref_dir), read_checkpoint(run)
    for key in ("model", "optimizer", "rng", "epoch", "step", "step_in_epoch", "epoch_losses", "data"):
        assert_bitwise_equal(a[key], b[key], key)
    assert dict(a["config"], out=None) == dict(b["config"], out=None)
    assert a["model"]["objective.bank.memory"].shape == (96, 16)  # the bank and Z are in "model"
    assert any(k.startswith("objective.z") for k in a["model"])
    # Nothing lost, nothing twice: the resumed run's metrics are the uninterrupted run's, record for record.
    assert metrics_records(run) == metrics_records(ref_dir)


@pytest.fixture
def reference(fake_mnist, tmp_path):
    """(run directory, wall time) of the run that is never killed."""
    ref_dir = tmp_path / "ref"
    ref = CliProcess(train_args(fake_mnist, ref_dir), tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    return ref_dir, time.monotonic() - ref.t0


def test_sigkill_at_each_crash_point_then_resume_is_bitwise_identical(fake_mnist, tmp_path, reference):
    t_start = time.monotonic()
    run, hits = tmp_path / "run", tmp_path / "hits.jsonl"
    ckpt = run / "checkpoint.pt"
    kills, during_save, left = [], 0, []  # left: temp files of killed writers
    for i, (spec, ckpt_step, in_temp) in enumerate(KILLS):
        args = train_args(fake_mnist, run, *(["--resume"] if i else []))
        p = CliProcess(args, tmp_path / f"kill{i}.log", env=kill_at(spec, hits))
        assert p.wait() == -9, f"{spec}: exit {p.proc.exitcode}\n{p.output()}"
        assert "Traceback" not in p.output() and "error:" not in p.output(), p.output()
        event, _, n = spec.partition(":")
        hit = read_hits(hits)[-1]
        assert (hit["event"], hit["index"], hit["pid"]) == (event, int(n or 1), p.pid), (spec, hit)
        kills.append(spec)

        # Never half-written under the final name: checkpoint.pt always loads, and holds the last renamed save.
        json.loads((run / "config.json").read_text())
        if ckpt_step is None:
            assert not ckpt.exists()
        else:
            assert read_checkpoint(ckpt)["step"] == ckpt_step, spec
        # The next start removed the temp files that earlier killed writers left; this writer's is there or not.
        tmp = run / f".checkpoint.pt.tmp-{p.pid}"
        assert temp_files(run) == ([tmp.name] if in_temp is not None else []), (spec, temp_files(run), left)
        if in_temp == "partial":  # cut in the middle of the write: its first part is on disk, the rest is missing
            during_save += 1
            assert hit["path"] == str(tmp) and tmp.stat().st_size == hit["bytes_written"] < hit["bytes_total"]
            with pytest.raises(InstdiscError, match="not a readable instdisc checkpoint"):
                read_checkpoint(tmp)  # (the product never reads a temp file; this only shows it is torn)
            left.append(tmp.name)
        elif in_temp is not None:  # complete and fsynced, not renamed: the step after checkpoint.pt's
            during_save += 1
            assert hit["path"] == str(tmp) and read_checkpoint(tmp)["step"] == in_temp == ckpt_step + 1
            left.append(tmp.name)

    assert len(kills) >= 10, kills
    assert during_save >= 3 and during_save == sum(s.startswith("checkpoint.") for s in kills)

    last = CliProcess(train_args(fake_mnist, run, "--resume"), tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    assert f"done: {EPOCHS} epochs, {STEPS} steps" in last.output()
    assert temp_files(run) == []  # stale temps of killed writers were removed by the next start
    assert_same_as_reference(reference[0], run)
    print(f"{len(kills)} kills ({during_save} inside a checkpoint write), test {time.monotonic() - t_start:.1f}s")


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(fake_mnist, tmp_path, reference):
    """Kills at random moments (start-up, steps, inside a checkpoint write, anywhere): wherever one lands, what is
    left is a legal state. A temp file may be complete or cut anywhere, so it is never read; the next start must
    ignore and remove it."""
    rng = random.Random(6)
    run = tmp_path / "run"
    ckpt = run / "checkpoint.pt"
    window = reference[1]  # one whole run; each kill lands in the first quarter of that, or not at all
    kills, with_temp, steps, killed = 0, 0, [], set()
    for i in range(8):
        args = train_args(fake_mnist, run, *(["--resume"] if run.exists() else []))
        p = CliProcess(args, tmp_path / f"kill{i}.log")
        time.sleep(rng.uniform(0, window / 4))
        p.kill()
        assert p.proc.exitcode in (-9, 0), f"exit {p.proc.exitcode}\n{p.output()}"
        assert "Traceback" not in p.output() and "error:" not in p.output(), p.output()
        if p.proc.exitcode == 0:  # it finished before the kill
            break
        kills += 1
        if ckpt.exists():  # complete whenever it exists, and never older than before
            steps.append(read_checkpoint(ckpt)["step"])
            assert steps == sorted(steps), steps
        if (run / "config.json").exists():
            json.loads((run / "config.json").read_text())
        # Temp files are only those of killed writers (one killed during its start-up may not have removed the
        # earlier ones yet); none is read.
        killed.add(p.pid)
        assert {int(x.rpartition("-")[2]) for x in temp_files(run)} <= killed, temp_files(run)
        with_temp += bool(temp_files(run))

    last = CliProcess(train_args(fake_mnist, run, *(["--resume"] if run.exists() else [])), tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    assert f"done: {EPOCHS} epochs, {STEPS} steps" in last.output()
    assert temp_files(run) == []  # whatever the killed writers left was removed
    assert_same_as_reference(reference[0], run)
    print(f"{kills} random kills ({with_temp} left a temp file), checkpoint steps {steps}")


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
    hits = tmp_path / "hits.jsonl"
    p = CliProcess(train_args(fake_mnist, run), tmp_path / "a.log", env=kill_at("train.before_first_checkpoint", hits))
    assert p.wait() == -9, p.output()
    assert [h["event"] for h in read_hits(hits)] == ["train.before_first_checkpoint"]
    assert (run / "config.json").exists() and not (run / "checkpoint.pt").exists()
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
