"""The export formats (instdisc.export.fmt_torchscript, fmt_safetensors, fmt_onnx, formats): --format subsets, the
torch.export fallback for an encoder that does not script, a failing checker leaves no folder, and the three
consumer snippets of docs/evaluation.md run in processes that cannot import instdisc and reproduce the rows of
``export-features``."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_helpers import invoke
from test_train_loop import tiny_cfg

import instdisc.export.encoder as enc_mod
from instdisc.data import build_dataset
from instdisc.errors import InstdiscError
from instdisc.export import export_encoder, export_features
from instdisc.export import fmt_torchscript
from instdisc.export.formats import ExportParityError
from instdisc.export.hdf5 import read_features
from instdisc.training import train

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")
DOC = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"
SNIPPETS = ("timm-torch", "onnxruntime", "safetensors-timm")


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """A timm:resnet10t run on the fake 28 px Fashion-MNIST (32 images, 2 steps): (run dir, data root)."""
    from conftest import make_fake_mnist

    root = make_fake_mnist(tmp_path_factory.mktemp("data") / "fm")
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_cfg(root, out, arch="timm:resnet10t", limit=32, nce_k=16, lr=0.01))
    return out, root


def snippet(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", text, flags=re.S)
    assert m, f"docs/evaluation.md has no snippet {name}"
    return m.group(1)


def test_cli_format_subset_and_files_listed(timm_run, tmp_path):
    out = tmp_path / "enc"
    r = invoke(["export-encoder", timm_run[0], "--out", out, "--format", "onnx", "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "encoder.pt", "metadata.json"]
    meta = json.loads((out / "metadata.json").read_text())
    assert sorted(meta["files"]) == ["encoder.onnx", "encoder.pt"] and list(meta["formats"]) == ["onnx"]
    onnx = meta["formats"]["onnx"]
    assert onnx["opset"] == 17 and onnx["sha256"]["encoder.onnx"] == meta["files"]["encoder.onnx"]
    assert 0 <= onnx["max_abs_diff"]["onnx_features"] < 1e-4
    assert json.loads(r.output.strip().splitlines()[-1])["files"] == ["encoder.onnx", "encoder.pt"]


def test_torch_export_when_the_encoder_does_not_script(timm_run, tmp_path, monkeypatch):
    def no_script(*a, **kw):
        raise torch.jit.frontend.NotSupportedError(None, "pretend this encoder does not script")

    monkeypatch.setattr(fmt_torchscript, "script_encoder", no_script)
    meta = export_encoder(timm_run[0], tmp_path / "enc", with_head=True, formats=("torchscript", "safetensors"))
    assert meta["formats"]["torchscript"]["files"] == ["encoder.pt2"]
    assert not (tmp_path / "enc" / "encoder.torchscript.pt").exists()
    assert meta["parity"]["max_abs_diff"]["torch_export"] < 1e-5
    assert meta["parity"]["max_abs_diff"]["torch_export_embed"] < 1e-5
    prog = torch.export.load(str(tmp_path / "enc" / "encoder.pt2")).module()
    v, z = prog(torch.randn(5, 1, 28, 28))  # another batch size: the batch axis is dynamic
    assert v.shape == (5, meta["feature_dim"]) and z.shape == (5, 16)
    assert meta["formats"]["safetensors"]["files"] == ["encoder.safetensors", "head.safetensors"]


def test_a_failing_checker_leaves_no_folder(timm_run, tmp_path, monkeypatch):
    def bad(ctx):
        raise ExportParityError("export parity check failed: onnx_features differs")

    monkeypatch.setitem(enc_mod.FORMATS, "onnx", (enc_mod.FORMATS["onnx"][0], bad))
    with pytest.raises(ExportParityError):
        export_encoder(timm_run[0], tmp_path / "enc")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(InstdiscError, match="unknown export format 'tflite'"):
        export_encoder(timm_run[0], tmp_path / "enc", formats=("tflite",))


def test_a_format_that_cannot_convert_is_skipped_by_default_refused_when_asked(timm_run, tmp_path, monkeypatch):
    def cannot(ctx):
        (ctx.folder / "encoder.onnx").write_bytes(b"half")  # a partial file: removed
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate")

    monkeypatch.setitem(enc_mod.FORMATS, "onnx", (cannot, enc_mod.FORMATS["onnx"][1]))
    meta = export_encoder(timm_run[0], tmp_path / "enc")
    assert "frobnicate" in meta["formats_skipped"]["onnx"] and "onnx" not in meta["formats"]
    assert not (tmp_path / "enc" / "encoder.onnx").exists() and "encoder.safetensors" in meta["files"]
    with pytest.raises(InstdiscError, match=r"the onnx export of timm:resnet10t failed: .*frobnicate.*--format"):
        export_encoder(timm_run[0], tmp_path / "enc2", formats=("onnx",))
    assert not (tmp_path / "enc2").exists()


@pytest.fixture(scope="module")
def export_and_rows(timm_run, tmp_path_factory):
    """(export folder, images .npy in [0, 1], export-features rows) of the fake test split (40 images)."""
    tmp = tmp_path_factory.mktemp("consumers")
    export_encoder(timm_run[0], tmp / "enc")
    export_features(tmp / "enc", "fashion-mnist:test", tmp / "f.h5", data_root=str(timm_run[1]), batch_size=16)
    rows, _, _, _ = read_features(tmp / "f.h5")
    ds = build_dataset("fashion-mnist:test", data_root=str(timm_run[1]))
    np.save(tmp / "images.npy", (ds.array.numpy().astype(np.float32) / 255.0))  # (40, 1, 28, 28) in [0, 1]
    return tmp / "enc", tmp / "images.npy", rows


@pytest.mark.parametrize("name", SNIPPETS)
def test_doc_snippet_needs_no_instdisc_and_matches_export_features(export_and_rows, tmp_path, name):
    enc, images, rows = export_and_rows
    script = ("import sys\nfor _m in ('instdisc', 'instdisc_cli'):\n    sys.modules[_m] = None  # import fails\n"
              "import numpy as np\nexport_dir, images = sys.argv[1], np.load(sys.argv[2])\n"
              + snippet(name) +
              "\nassert not [m for m in sys.modules if m.startswith('instdisc') and sys.modules[m] is not None]\n"
              "np.save(sys.argv[3], np.asarray(features))\n")
    r = subprocess.run([sys.executable, "-c", script, str(enc), str(images), str(tmp_path / "out.npy")],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "out.npy")
    assert got.shape == rows.shape == (40, 512)
    np.testing.assert_allclose(got, rows, rtol=0, atol=1e-4 * max(1.0, float(np.abs(rows).max())))
