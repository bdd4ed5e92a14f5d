"""SIGTERM and Ctrl-C: a checkpoint at the next step boundary, exit 128 + signal, and a bitwise-exact resume.

Covers the signal path of instdisc/training/loop.py (``_StopFlag``, DataLoader workers ignoring SIGINT) and the exit
status of cli/train.py. The SIGTERM test runs the installed ``instdisc`` console script as a plain subprocess.

The signalled runs do not race the test: every step sleeps (the test-only ``INSTDISC_TEST_STEP_SLEEP`` of
instdisc/faultpoints.py), so the signal sent after step k arrives many seconds before such a run could end, and the
run, stopped at once, costs little.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _image_helpers import make_mixed_folder
from _kill_helpers import CliProcess, assert_bitwise_equal, metrics_records, wait_for
from instdisc.faultpoints import ENV_STEP_SLEEP
from instdisc.training.checkpoint import read_checkpoint

INSTDISC = Path(sys.executable).with_name("instdisc")
SLOW_STEPS = {ENV_STEP_SLEEP: "1.0"}  # a second a step: the signal after step k leaves the run >= 9 s to go


def mnist_args(root, out, *extra, epochs=8):
    args = ["train", "fashion-mnist:train", "--data-root", root, "--out", out, "--arch", "convnet-tiny",
            "--batch-size", "16", "--nce-k", "32", "--low-dim", "16", "--log-every", "1", "--epochs", epochs, *extra]
    return [str(a) for a in args]


def steps_logged(run: Path) -> int:
    p = run / "metrics.jsonl"
    return p.read_text().count('"type": "step"') if p.exists() else 0


def assert_same_run(ref: Path, run: Path) -> None:
    a, b = read_checkpoint(ref), read_checkpoint(run)
    for key in ("model", "optimizer", "rng", "epoch", "step", "step_in_epoch", "epoch_losses"):
        assert_bitwise_equal(a[key], b[key], key)
    assert metrics_records(run) == metrics_records(ref)


def test_sigterm_saves_at_step_boundary_and_resumes_exactly(fake_mnist, tmp_path):
    ref = CliProcess(mnist_args(fake_mnist, tmp_path / "ref"), tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", **SLOW_STEPS)  # one torch thread, as in the reference: bitwise
    with open(tmp_path / "out.txt", "wb") as out, open(tmp_path / "err.txt", "wb") as err:
        proc = subprocess.Popen([str(INSTDISC), *mnist_args(fake_mnist, run)], stdout=out, stderr=err, env=env)
        try:
            wait_for(lambda: steps_logged(run) >= 3 or proc.poll() is not None, timeout=120, what="3 steps")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 128 + signal.SIGTERM, stdout + stderr
    assert "interrupted (resume with --resume)" in stdout
    assert "stopped by signal 15: checkpoint saved" in stderr and "Traceback" not in stderr
    ckpt = read_checkpoint(run)
    assert 3 <= ckpt["step"] < 48

    last = CliProcess(mnist_args(fake_mnist, run, "--resume"), tmp_path / "resume.log")
    assert last.wait() == 0, last.output()
    assert_same_run(tmp_path / "ref", run)


@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_ctrl_c_to_process_group_with_dataloader_workers(tmp_path, start_method):
    """Ctrl-C in a terminal signals the whole foreground process group: the trainer and its DataLoader worker.

    A forked worker inherits the trainer's stop-flag handler; a spawned one (the default start method from Python
    3.14) does not, and died of KeyboardInterrupt, failing the run, until workers were made to ignore SIGINT.
    """
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=16)
    args = ["train", str(folder), "--arch", "convnet-tiny", "--image-size", "32", "--batch-size", "8", "--nce-k",
            "16", "--low-dim", "8", "--log-every", "1", "--epochs", "2", "--workers", "1", "--augment", "pil"]
    run = tmp_path / "run"
    p = CliProcess(args + ["--out", str(run)], tmp_path / "run.log", env=SLOW_STEPS, start_method=start_method)
    wait_for(lambda: steps_logged(run) >= 2 or not p.alive(), timeout=120, what="2 steps")
    p.signal_group(signal.SIGINT)
    assert p.wait() == 128 + signal.SIGINT, p.output()
    assert "stopped by signal 2: checkpoint saved" in p.output() and "Traceback" not in p.output()
    assert 2 <= read_checkpoint(run)["step"] < 12
    if start_method == "spawn":
        return  # the resume is the same as with fork; spawned workers make it slow

    ref = CliProcess(args + ["--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    last = CliProcess(args + ["--out", str(run), "--resume"], tmp_path / "resume.log")
    assert last.wait() == 0, last.output()
    assert_same_run(tmp_path / "ref", run)


class _MaskProbe:
    """A dataset whose items say whether SIGINT is blocked in the process that loads them."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return int(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_forked_workers_start_with_sigint_blocked_and_no_signal_is_lost():
    """A Ctrl-C during a forked worker's start-up (before its init ignores SIGINT) cannot kill it; the main process
    keeps its mask, and a Ctrl-C that arrives while the workers start still reaches the main process's handler."""
    import torch

    from instdisc.training.batches import start_workers

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    got = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        loader = torch.utils.data.DataLoader(_MaskProbe(), batch_size=1, num_workers=1,
                                             multiprocessing_context="fork")
        assert [int(b) for b in start_workers(loader)] == [1, 1]
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        assert [int(b) for b in iter(loader)] == [int(signal.SIGINT in before)] * 2  # plain start: not blocked
        real_iter = torch.utils.data.DataLoader.__iter__

        def iter_and_interrupt(self):
            it = real_iter(self)
            os.kill(os.getpid(), signal.SIGINT)  # while the workers start
            return it

        torch.utils.data.DataLoader.__iter__ = iter_and_interrupt
        try:
            list(start_workers(loader))
        finally:
            torch.utils.data.DataLoader.__iter__ = real_iter
        for _ in range(100):  # another thread may take it; the handler runs in the main thread soon after
            if got:
                break
            time.sleep(0.01)
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)


def test_batches_failing_after_a_stop_request_end_the_epoch_as_a_stop():
    """A worker killed by the same Ctrl-C makes the DataLoader raise: with a stop pending that is the stop."""
    from instdisc.training.batches import guarded

    def batches():
        yield "b0"
        yield "b1"
        raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

    saved = []
    got = list(guarded(batches(), 0, saved.append, stopping=lambda: True))
    assert got == ["b0", "b1", (None, None)] and saved == []
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(guarded(batches(), 0, saved.append, stopping=lambda: False))
