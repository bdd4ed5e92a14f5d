"""Untrusted files: a crafted pickle payload in a checkpoint, an exported encoder or a CIFAR batch is refused and never
run (issue 6, "Untrusted files").

The payload is an object whose ``__reduce__`` calls ``os.system("touch MARKER")``; a control shows that loading it the
unsafe way really creates the marker. Covers instdisc/training/checkpoint.py (read_checkpoint / load_run,
``weights_only=True``), instdisc/export/encoder.py (read_export) and instdisc/data/cifar.py (restricted unpickler), and
the commands that open them: ``train --resume``, ``compare``, ``export-encoder``, ``export-features``, ``knn``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_fake_mnist
from instdisc.errors import InstdiscError
from instdisc.export import read_export
from instdisc.source import load_encoder
from instdisc.source import open_model
from instdisc.training.checkpoint import load_run, read_checkpoint
from instdisc_cli.main import cli


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_torch_file(path: Path, marker: Path, *, legacy: bool = False, wrap: dict | None = None) -> Path:
    """A torch file whose (otherwise plausible) contents carry the payload."""
    obj = dict(wrap or {}, payload=Payload(marker))
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    data = make_fake_mnist(root / "fm")
    run, export = root / "run", root / "export"
    for args in (["train", "fashion-mnist:train", "--data-root", data, "--out", run, "--arch", "convnet-tiny",
                  "--batch-size", "16", "--nce-k", "32", "--low-dim", "8", "--epochs", "1"],
                 ["export-encoder", run, "--out", export, "--with-head"]):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "the payload ran"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_control_the_payload_is_live(tmp_path, legacy):
    m = tmp_path / "PWNED"
    f = evil_torch_file(tmp_path / "x.pt", m, legacy=legacy)
    torch.load(f, weights_only=False)  # the unsafe way runs it
    assert m.exists()


def evil_run(golden: Path, tmp_path: Path, marker: Path, legacy: bool) -> Path:
    run = tmp_path / "run"
    shutil.copytree(golden / "run", run)
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    evil_torch_file(run / "checkpoint.pt", marker, legacy=legacy, wrap=good)  # a real checkpoint plus the payload
    return run


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_checkpoint_payload_refused_by_the_api(golden, tmp_path, marker, legacy):
    run = evil_run(golden, tmp_path, marker, legacy)
    for load in (read_checkpoint, load_run, open_model):
        with pytest.raises(InstdiscError, match=r"is refused: it holds pickled Python objects \(posix.system\)"):
            load(run)


@pytest.mark.parametrize("command", ["train --resume", "compare", "export-encoder", "export-features", "knn"])
def test_checkpoint_payload_refused_by_every_command(golden, tmp_path, marker, command):
    run = evil_run(golden, tmp_path, marker, legacy=False)
    data = str(golden / "fm")
    args = {
        "train --resume": ["train", "fashion-mnist:train", "--data-root", data, "--out", str(run), "--arch",
                           "convnet-tiny", "--batch-size", "16", "--nce-k", "32", "--low-dim", "8", "--epochs", "2",
                           "--resume"],
        "compare": ["compare", str(run), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test",
                    "--data-root", data],
        "export-encoder": ["export-encoder", str(run), "--out", str(tmp_path / "enc")],
        "export-features": ["export-features", str(run), "fashion-mnist:test", "--data-root", data, "--out",
                            str(tmp_path / "f.h5")],
        "knn": ["knn", str(run), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test", "--data-root",
                data],
    }[command]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "is refused: it holds pickled Python objects" in errors[0], r.output
    assert not (tmp_path / "enc").exists() and not (tmp_path / "f.h5").exists()


def evil_export(golden: Path, tmp_path: Path, marker: Path, name: str, fix_hash: bool) -> Path:
    export = tmp_path / "export"
    shutil.copytree(golden / "export", export)
    evil_torch_file(export / name, marker, wrap=torch.load(export / name, weights_only=True))
    if fix_hash:  # the attacker also rewrites metadata.json, so only weights_only=True stands in the way
        meta = json.loads((export / "metadata.json").read_text())
        meta["files"][name] = hashlib.sha256((export / name).read_bytes()).hexdigest()
        (export / "metadata.json").write_text(json.dumps(meta))
    return export


@pytest.mark.parametrize("name", ["encoder.pt", "head.pt"])
@pytest.mark.parametrize("fix_hash", [True, False], ids=["hash-rewritten", "hash-mismatch"])
def test_export_payload_refused(golden, tmp_path, marker, name, fix_hash):
    export = evil_export(golden, tmp_path, marker, name, fix_hash)
    expected = "is not a readable state dict" if fix_hash else "does not match the SHA-256 in metadata.json"
    for load in (read_export, open_model, load_encoder):
        with pytest.raises(InstdiscError, match=expected):
            load(export)
    data = str(golden / "fm")
    for args in (["export-features", str(export), "fashion-mnist:test", "--data-root", data, "--out",
                  str(tmp_path / "f.h5")],
                 ["knn", str(export), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test",
                  "--data-root", data]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, r.output
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], r.output


def test_cifar_batch_payload_refused(tmp_path, marker):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(marker), b"labels": [0]}, f, protocol=2)
    r = CliRunner().invoke(cli, ["train", "cifar10:test", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "refusing to load posix.system" in r.output
