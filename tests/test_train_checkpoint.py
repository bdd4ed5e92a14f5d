import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.training.checkpoint import file_sha256, find_checkpoint, load_run, read_checkpoint, save_checkpoint


def test_roundtrip_and_self_description(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.arange(3), "epoch": 2})
    ck = read_checkpoint(tmp_path)
    assert ck["epoch"] == 2 and ck["format_version"] == 1 and ck["kind"] == "instdisc-checkpoint"
    assert ck["instdisc_version"]


def test_missing(tmp_path):
    with pytest.raises(InstdiscError, match="no checkpoint"):
        find_checkpoint(tmp_path)


def test_random_bytes_and_foreign_torch_file(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(InstdiscError, match="not a readable instdisc checkpoint"):
        read_checkpoint(tmp_path / "a.pt")
    torch.save({"state_dict": {}}, tmp_path / "b.pt")
    with pytest.raises(InstdiscError, match="not an instdisc checkpoint"):
        read_checkpoint(tmp_path / "b.pt")


def test_other_format_version(tmp_path):
    torch.save({"kind": "instdisc-checkpoint", "format_version": 99}, tmp_path / "c.pt")
    with pytest.raises(InstdiscError, match="format 99"):
        read_checkpoint(tmp_path / "c.pt")


def test_load_run_rebuilds_model(fake_mnist, tmp_path):
    from instdisc.training import train

    from test_train_loop import tiny_cfg

    res = train(tiny_cfg(fake_mnist, tmp_path / "r"))
    cfg, model, ck = load_run(tmp_path / "r")
    assert cfg.arch == "convnet-tiny" and not model.training
    for a, b in zip(model.state_dict().values(), res.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert len(file_sha256(tmp_path / "r" / "checkpoint.pt")) == 64
