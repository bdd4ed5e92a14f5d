"""instdisc.atomic_dir: a folder is complete or absent; an old one survives until the new one is done."""
import os

import pytest

from instdisc.errors import InstdiscError
from instdisc.atomic_dir import atomic_directory


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_creates_folder_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not out.exists() and tmp.parent == tmp_path
    assert (out / "a.txt").read_text() == "a"
    assert _leftovers(tmp_path) == []


def test_refuses_existing_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InstdiscError, match="already exists.*--overwrite"):
        with atomic_directory(out):
            pass


def test_error_removes_temp_and_keeps_old(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # still there while the new one is written
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_existing_file_is_not_a_folder(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(InstdiscError, match="not a directory"):
        with atomic_directory(out, overwrite=True):
            pass


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no such process any more (pid reuse within the test is vanishingly unlikely)


def test_stale_temp_of_killed_writer_is_removed(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "half").write_text("x")
    live = tmp_path / ".out.tmp-1"  # pid 1 is always alive: left alone
    live.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists() and live.exists() and (out / "a").exists()


def test_old_folder_moved_aside_is_restored_when_output_missing(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"  # killed between "move old aside" and "rename new into place"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(InstdiscError, match="already exists"):
        with atomic_directory(out):
            pass
    assert (out / "old.txt").read_text() == "old" and not old.exists()
