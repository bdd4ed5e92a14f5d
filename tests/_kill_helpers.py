"""Test-only helpers: run ``instdisc`` commands in real processes that the tests SIGKILL, SIGTERM or Ctrl-C.

A fresh ``instdisc`` process spends seconds importing torch; a kill test needs a dozen processes. So the commands run in
children of a multiprocessing *forkserver* that has imported ``instdisc_cli.main`` once (and run no torch op, so forking
it is safe). Each child is an ordinary OS process that calls the CLI's entry point (``cli.main(args)``) with its own
pid, its own session (``setsid``: a signal to its process group reaches it and its DataLoader workers, as Ctrl-C in a
terminal does) and stdout/stderr in a log file.

Optional test hooks:

* ``env``: variables set in the child before the command runs, e.g. the library's test-only fault injection
  (``instdisc/faultpoints.py``, docs/reliability.md): ``kill_at("checkpoint.temp_written:2", hits)`` makes the
  process SIGKILL itself at that event and record it in ``hits`` (read back with :func:`read_hits`), so each crash
  case is hit every time; ``INSTDISC_TEST_STEP_SLEEP`` slows every training step.
* ``slow={"module:function": seconds}``: that function sleeps this long before each call (per item for a generator
  function).
* ``start_method``: how the child starts DataLoader workers (default: the platform's, as a real ``instdisc``).
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

__all__ = ["CliProcess", "assert_bitwise_equal", "kill_at", "metrics_records", "read_hits", "snapshot", "wait_for"]

_CTX = None
_PLATFORM_START_METHOD = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def _context():
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["instdisc_cli.main", "_kill_helpers"])
        _CTX = ctx
    return _CTX


def _slow_down(target: str, seconds: float) -> None:
    """Make ``"module:function"`` sleep ``seconds`` before each call (before each item for a generator function)."""
    import importlib
    import inspect

    mod_name, attr = target.split(":")
    mod = importlib.import_module(mod_name)
    real = getattr(mod, attr)
    if inspect.isgeneratorfunction(real):
        def slowed(*a, **kw):
            for item in real(*a, **kw):
                time.sleep(seconds)
                yield item
    else:
        def slowed(*a, **kw):
            time.sleep(seconds)
            return real(*a, **kw)
    setattr(mod, attr, slowed)


def _child(args: list[str], log_path: str, env: dict, slow: dict, threads: int, start_method: str | None) -> None:
    os.setsid()
    os.environ.update(env)  # before the first fault point reads it (instdisc.faultpoints reads it once per process)
    # A child of the forkserver inherits its start method; a real `instdisc` process starts DataLoader workers with
    # the platform default (fork on Linux before Python 3.14), which is also what keeps worker start-up cheap here.
    multiprocessing.set_start_method(start_method or _PLATFORM_START_METHOD, force=True)
    if threads:
        import torch

        torch.set_num_threads(threads)  # the same in every child, so runs compare bitwise; no contention on 2 cores
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for target, seconds in (slow or {}).items():
        _slow_down(target, seconds)
    from instdisc_cli.main import cli

    cli.main(args=list(args), prog_name="instdisc")  # raises SystemExit(status); multiprocessing uses it as exitcode


def kill_at(spec: str, hits: Path, **more: str) -> dict[str, str]:
    """The environment that makes an instdisc process SIGKILL itself at ``spec`` ("EVENT[:N]", see
    instdisc/faultpoints.py) after appending the event it hit to ``hits``."""
    from instdisc.faultpoints import ENV_KILL_AT, ENV_KILL_LOG

    return {ENV_KILL_AT: spec, ENV_KILL_LOG: str(hits), **more}


def read_hits(hits: Path) -> list[dict]:
    """The events recorded by killed processes (one JSON object a line: event, index, pid and the event's context)."""
    import json

    return [json.loads(x) for x in Path(hits).read_text().splitlines()] if Path(hits).exists() else []


class CliProcess:
    """``instdisc ARGS`` in a forked child (see the module docstring). ``exitcode`` is -9 after SIGKILL."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str] | None = None,
                 slow: dict[str, float] | None = None, threads: int = 1, start_method: str | None = None):
        self.log = Path(log)
        if self.log.exists():
            self.log.unlink()
        self.t0 = time.monotonic()
        self.proc = _context().Process(target=_child, args=([str(a) for a in args], str(self.log), dict(env or {}),
                                                            dict(slow or {}), threads, start_method))
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 120.0) -> int:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
            raise AssertionError(f"instdisc did not finish in {timeout}s; log:\n{self.output()}")
        return self.proc.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(cond, timeout: float = 60.0, every: float = 0.005, what: str = "condition"):
    """Poll ``cond()`` until it is truthy; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (directories as "dir")."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "link:" + os.readlink(p)
                continue
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                h.update(fh.read())
            out[os.path.relpath(p, root)] = h.hexdigest()
    return out


def assert_bitwise_equal(a, b, where: str = "checkpoint") -> None:
    """Nested dicts/lists of tensors and plain values are equal exactly (tensors: same dtype, shape and bits)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{b.shape}"
        bits = (lambda t: t.reshape(-1).contiguous().view(torch.uint8)) if a.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(a), bits(b)), f"{where} differs"  # bit patterns: NaN == NaN, -0.0 != 0.0
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


TIMING_KEYS = ("steps_per_s", "images_per_s", "eta_s", "seconds")


def metrics_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (those differ between any two runs)."""
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]
