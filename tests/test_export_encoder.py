"""instdisc.export.encoder: layout, metadata, parity (training-time vs reloaded vs TorchScript), atomic writes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import instdisc.export.encoder as enc_mod
from instdisc.data import batch_eval, build_dataset
from instdisc.errors import InstdiscError
from instdisc.export.encoder import export_encoder, load_torchscript, read_export
from instdisc.source import load_encoder
from instdisc.source import open_model
from instdisc.training import load_run
from instdisc.training.checkpoint import file_sha256


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "enc"
    export_encoder(run[0], out, with_head=True)
    return out


def _images(root, n=12):
    ds = build_dataset("fashion-mnist:test", data_root=str(root))
    return batch_eval(ds.array[:n], ds)  # (n, 1, 28, 28), the training-time eval path


def test_layout_and_metadata(run, tmp_path):
    out = tmp_path / "enc"
    meta = export_encoder(run[0], out)
    assert sorted(os.listdir(out)) == ["encoder.onnx", "encoder.pt", "encoder.safetensors", "encoder.torchscript.pt",
                                       "metadata.json"]
    on_disk = json.loads((out / "metadata.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for key in ("arch", "feature_dim", "image_size", "channels", "mean", "std", "config", "instdisc_version",
                "format_version", "low_dim"):
        assert key in on_disk, key
    assert on_disk["arch"] == "convnet-tiny" and on_disk["channels"] == 1 and on_disk["image_size"] == 28
    assert on_disk["source"]["checkpoint_sha256"] == file_sha256(run[0] / "checkpoint.pt")
    assert on_disk["config"]["nce_k"] == 16 and on_disk["has_head"] is False and on_disk["eval_resize"] == "native"
    state = torch.load(out / "encoder.pt", weights_only=True)
    assert state and not any(k.startswith(("encoder.", "head.", "objective.")) for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_parity_training_reloaded_torchscript(run, exported):
    _, model, _ = load_run(run[0])
    x = _images(run[1])
    encoder, head, meta = read_export(exported)
    scripted = load_torchscript(exported)
    with torch.no_grad():
        ref_v, ref_z = model.features(x), model.embed(x)
        for name, v in (("reloaded", encoder(x)), ("torchscript", scripted(x))):
            assert (v - ref_v).abs().max().item() < 1e-5, name
        assert (head(encoder(x)) - ref_z).abs().max().item() < 1e-5
        assert (scripted.embed(x) - ref_z).abs().max().item() < 1e-5
        raw = x * 0.353 + 0.286  # back to [0, 1]; preprocess() normalises again
        assert (scripted(scripted.preprocess(raw)) - ref_v).abs().max().item() < 1e-4
    assert max(meta["parity"]["max_abs_diff"].values()) < 1e-5


def test_torchscript_needs_only_torch(exported):
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); v = m(torch.zeros(3, 1, 28, 28)); "
            "assert v.shape == (3, m.feature_dim), v.shape; assert m.embed(torch.zeros(2, 1, 28, 28)).shape[1] == 16; "
            "assert not [k for k in sys.modules if k.startswith('instdisc')]; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(exported / "encoder.torchscript.pt")], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_load_encoder_trainable_with_transform(run, exported):
    encoder, transform = load_encoder(exported)
    assert isinstance(encoder, torch.nn.Module) and not isinstance(encoder, torch.jit.ScriptModule)
    assert all(p.requires_grad for p in encoder.parameters()) and not encoder.training
    ds = build_dataset("fashion-mnist:test", data_root=str(run[1]))
    x = torch.stack([transform(ds.load_image(i)) for i in range(4)])
    torch.testing.assert_close(x, batch_eval(ds.array[:4], ds), atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in encoder.parameters()]
    encoder.train()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    encoder(x).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    run_encoder, _ = load_encoder(run[0])  # a run folder works too
    assert run_encoder.feature_dim == encoder.feature_dim


def test_existing_refused_overwrite_replaces_no_leftovers(run, tmp_path):
    out = tmp_path / "enc"
    export_encoder(run[0], out)
    with pytest.raises(InstdiscError, match="already exists.*--overwrite"):
        export_encoder(run[0], out)
    meta = export_encoder(run[0], out, overwrite=True, with_head=True)
    assert meta["has_head"] and (out / "head.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_failure_leaves_old_export_untouched(run, tmp_path, monkeypatch):
    out = tmp_path / "enc"
    export_encoder(run[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(enc_mod, "_sha256", broken)  # after every file of the export was written
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_encoder(run[0], out, overwrite=True)
    with pytest.raises(RuntimeError):
        export_encoder(run[0], tmp_path / "fresh")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_parity_failure_is_reported(run, tmp_path, monkeypatch):
    monkeypatch.setattr(enc_mod, "parity_max_abs_diff", lambda ref, others, x: {k: 1.0 for k in others})
    with pytest.raises(enc_mod.ExportParityError, match="parity"):
        export_encoder(run[0], tmp_path / "enc")
    assert not (tmp_path / "enc").exists()


def test_an_encoder_with_nan_weights_is_refused(run, tmp_path):
    """A NaN difference compares False with the tolerance: the check must refuse it, not write NaN parity."""
    import shutil

    bad_run = tmp_path / "run"
    shutil.copytree(run[0], bad_run)
    ckpt = torch.load(bad_run / "checkpoint.pt", weights_only=True)
    key = next(k for k in ckpt["model"] if k.startswith("encoder.") and k.endswith("weight"))
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    torch.save(ckpt, bad_run / "checkpoint.pt")
    with pytest.raises(enc_mod.ExportParityError, match="not finite"):
        export_encoder(bad_run, tmp_path / "enc")
    assert not (tmp_path / "enc").exists()


def test_tampered_weights_and_bad_inputs(run, exported, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in exported.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    state = torch.load(bad / "encoder.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, bad / "encoder.pt")
    with pytest.raises(InstdiscError, match="SHA-256"):
        read_export(bad)
    with pytest.raises(InstdiscError, match="no checkpoint"):
        export_encoder(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "nojson").mkdir()
    (tmp_path / "nojson" / "metadata.json").write_text("{not json")
    with pytest.raises(InstdiscError, match="not valid JSON"):
        read_export(tmp_path / "nojson")


def test_embedding_layer_needs_head(run, tmp_path):
    export_encoder(run[0], tmp_path / "enc")
    src = open_model(tmp_path / "enc")
    assert src.kind == "export" and src.head is None
    with pytest.raises(InstdiscError, match="no projection head.*--with-head"):
        src.fn("embedding")
