"""instdisc/atomic.py under faults: stale temp files of killed writers; a write check that probes the directory."""
import os
import subprocess
import sys

import pytest

from instdisc.atomic import atomic_write_text, check_writable_dir, remove_stale_temps
from instdisc.errors import InstdiscError


def test_remove_stale_temps_keeps_live_writers_and_other_files(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            ".checkpoint.pt.tmp-999999999": True,  # no such process: stale
            f".config.json.tmp-{os.getpid()}": True,  # ourselves: not writing it now
            f".checkpoint.pt.tmp-{live.pid}": False,  # a live writer
            "checkpoint.pt": False, "notes.tmp-1": False, ".x.tmp-abc": False,
        }
        for n in names:
            (tmp_path / n).write_text("x")
        (tmp_path / ".d.tmp-999999999").mkdir()  # folders are not ours to remove here
        removed = remove_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [n for n, stale in names.items() if not stale] + [".d.tmp-999999999"])
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_check_writable_dir_refuses_a_directory_root_cannot_write(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(InstdiscError, match="output directory is not writable"):
            check_writable_dir(ro)
        with pytest.raises(InstdiscError, match="cannot create output directory"):
            check_writable_dir(ro / "sub")
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    assert check_writable_dir(ro) == ro and list(ro.iterdir()) == []  # the probe file is removed
