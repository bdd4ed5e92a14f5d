import pytest
import torch

from instdisc.atomic import atomic_torch_save, atomic_write, atomic_write_text, check_free_space, check_writable_dir
from instdisc.errors import InstdiscError


def test_write_and_replace(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_failure_keeps_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_torch_save_roundtrip(tmp_path):
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["x"].tolist() == [0, 1, 2]


def test_free_space(tmp_path):
    check_free_space(tmp_path, 1)
    with pytest.raises(InstdiscError, match="not enough free disk"):
        check_free_space(tmp_path, 1 << 62)


def test_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "x" / "y").is_dir()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(InstdiscError, match="cannot create output directory"):
        check_writable_dir(f / "sub")


def test_pid_alive():
    import os
    import subprocess
    import sys

    from instdisc.atomic import pid_alive

    assert pid_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)  # reaped: no such process (pids are not reused this fast)
    assert pid_alive(1)  # init: exists (root may signal it; another user gets PermissionError, also alive)
