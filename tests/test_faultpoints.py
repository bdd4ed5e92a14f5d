"""instdisc/faultpoints.py, the test-only fault injection: parsing, counting hits, the kill log, unset = no-op.

The kills themselves are exercised end to end by tests/test_fault_kill.py and tests/test_fault_kill_export.py.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from instdisc import faultpoints
from instdisc.faultpoints import ENV_KILL_AT, ENV_KILL_LOG, ENV_STEP_SLEEP, fault_point, parse_kill_at


@pytest.fixture
def fp(monkeypatch):
    """The module with a clean environment and ``os.kill`` / ``time.sleep`` recorded instead of done."""
    for k in (ENV_KILL_AT, ENV_KILL_LOG, ENV_STEP_SLEEP):
        monkeypatch.delenv(k, raising=False)
    calls = {"kill": [], "sleep": []}
    monkeypatch.setattr(faultpoints.os, "kill", lambda pid, sig: calls["kill"].append((pid, sig)))
    monkeypatch.setattr(faultpoints.time, "sleep", lambda s: calls["sleep"].append(s))
    faultpoints._reset()
    yield monkeypatch, calls
    faultpoints._reset()


@pytest.mark.parametrize("spec, want", [
    ("train.before_first_checkpoint", ("train.before_first_checkpoint", 1)),
    ("checkpoint.temp_written:2", ("checkpoint.temp_written", 2)),
    (" hdf5.flush:10 ", ("hdf5.flush", 10)),
    ("train.step:1", ("train.step", 1)),
])
def test_parse(spec, want):
    assert parse_kill_at(spec) == want


@pytest.mark.parametrize("spec", ["", ":2", "a b:1", "x:0", "x:-1", "x:two", "x:1.5", "x:"])
def test_parse_refuses_malformed(spec):
    with pytest.raises(ValueError, match=ENV_KILL_AT):
        parse_kill_at(spec)


def test_unset_is_a_no_op(fp):
    _, calls = fp
    for i in range(1000):
        fault_point("train.step", index=i)
        fault_point("checkpoint.temp_written", path="x")
    assert calls == {"kill": [], "sleep": []}
    assert faultpoints._state is not None and not faultpoints._state.active


def test_kills_at_the_nth_hit_of_the_named_event_only(fp, tmp_path):
    mp, calls = fp
    log = tmp_path / "hits.jsonl"
    mp.setenv(ENV_KILL_AT, "checkpoint.temp_written:3")
    mp.setenv(ENV_KILL_LOG, str(log))
    for _ in range(5):
        fault_point("checkpoint.temp_partial")  # another event: not counted
    fault_point("checkpoint.temp_written", path="a")
    fault_point("checkpoint.temp_written", path="b")
    assert calls["kill"] == [] and not log.exists()
    fault_point("checkpoint.temp_written", path="c", n=7, obj=object())
    assert calls["kill"] == [(os.getpid(), signal.SIGKILL)]
    rec = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["event"] == "checkpoint.temp_written" and rec[0]["index"] == 3
    assert rec[0]["pid"] == os.getpid() and rec[0]["path"] == "c" and rec[0]["n"] == 7
    assert rec[0]["obj"].startswith("<object")  # other values as text
    fault_point("checkpoint.temp_written")  # (the 4th: were the process still alive, no second kill)
    assert len(calls["kill"]) == 1


def test_event_ordinal_instead_of_a_count(fp):
    mp, calls = fp
    mp.setenv(ENV_KILL_AT, "train.step:5")
    for step in (8, 9, 3, 4):  # a resumed run starts at its checkpoint's step
        fault_point("train.step", index=step)
    assert calls["kill"] == []
    fault_point("train.step", index=5)
    assert len(calls["kill"]) == 1


def test_default_is_the_first_hit_and_no_log_needed(fp):
    mp, calls = fp
    mp.setenv(ENV_KILL_AT, "train.before_first_checkpoint")
    fault_point("train.before_first_checkpoint")
    assert len(calls["kill"]) == 1


def test_partial_file_is_flushed_before_the_kill(fp, tmp_path):
    mp, calls = fp
    mp.setenv(ENV_KILL_AT, "checkpoint.temp_partial")
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.write(b"x" * 100)
        assert p.stat().st_size == 0  # still in the buffer
        fault_point("checkpoint.temp_partial", file=f)
        assert p.stat().st_size == 100 and len(calls["kill"]) == 1


def test_step_sleep_only_at_train_steps(fp):
    mp, calls = fp
    mp.setenv(ENV_STEP_SLEEP, "0.25")
    fault_point("checkpoint.temp_written")
    fault_point("train.step", index=1)
    fault_point("train.step", index=2)
    assert calls == {"kill": [], "sleep": [0.25, 0.25]}


def test_bad_settings_raise(fp):
    mp, _ = fp
    mp.setenv(ENV_STEP_SLEEP, "-1")
    with pytest.raises(ValueError, match=ENV_STEP_SLEEP):
        fault_point("train.step", index=1)
    faultpoints._reset()
    mp.setenv(ENV_STEP_SLEEP, "0")
    mp.setenv(ENV_KILL_AT, "x:0")
    with pytest.raises(ValueError, match=ENV_KILL_AT):
        fault_point("x")


def test_environment_read_once_and_again_after_fork(fp):
    mp, calls = fp
    fault_point("x")  # read: unset
    mp.setenv(ENV_KILL_AT, "x")
    fault_point("x")
    assert calls["kill"] == []  # cached: the variable is read once per process
    pid = os.fork()
    if pid == 0:  # a forked child reads the environment again (it would kill itself here: os.kill is recorded)
        try:
            fault_point("x")
            os._exit(0 if len(calls["kill"]) == 1 else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    faultpoints._reset()
    fault_point("x")
    assert len(calls["kill"]) == 1


def test_really_kills_the_process_and_logs_the_event(tmp_path):
    log = tmp_path / "hits.jsonl"
    code = ("from instdisc.faultpoints import fault_point\n"
            "for i in range(3):\n"
            "    fault_point('hdf5.flush', rows=50 * (i + 1))\n"
            "print('not killed')\n")
    env = dict(os.environ, **{ENV_KILL_AT: "hdf5.flush:2", ENV_KILL_LOG: str(log)})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL and "not killed" not in r.stdout, r.stderr
    rec = json.loads(log.read_text())
    assert (rec["event"], rec["index"], rec["rows"]) == ("hdf5.flush", 2, 100)
    assert rec["pid"] != os.getpid()
