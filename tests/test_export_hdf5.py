"""instdisc.export.hdf5: layout and attributes, dtypes and compression, resume identical to an uninterrupted
export, incomplete files refused, overwrite semantics, paths for file datasets."""
import h5py
import numpy as np
import pytest
import torch
from _image_helpers import make_mixed_folder
from test_train_loop import tiny_cfg

from instdisc.data import build_dataset
from instdisc.errors import InstdiscError
from instdisc.export.encoder import export_encoder
from instdisc.export.hdf5 import export_features, read_features, read_features_attrs
from instdisc.features import extract_features
from instdisc.source import open_model
from instdisc.training import train
from instdisc.training.checkpoint import file_sha256


class Stop(Exception):
    pass


def _export(run, out, **kw):
    kw.setdefault("batch_size", 8)
    return export_features(run[0], "fashion-mnist:test", out, data_root=str(run[1]), **kw)


def _stop_after(k):
    def cb(done, n):
        cb.calls += 1
        if cb.calls == k:
            raise Stop()
    cb.calls = 0
    return cb


def _all(path):
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}


def test_layout_attributes_and_values(run, tmp_path):
    out = tmp_path / "f.h5"
    res = _export(run, out)
    assert res.n == 40 and res.resumed_from == 0
    # Reference, independent of the exporter's feature iterator: the checkpoint's encoder weights in a freshly
    # built encoder (eval mode), run image by image on the eval-transformed test images ((x / 255 - mean) / std).
    import _reference
    ckpt, enc, _ = _reference.load_parts(run[0])
    ds = build_dataset("fashion-mnist:test", data_root=str(run[1]))
    x = _reference.eval_inputs(ds, ckpt["data"]["mean"], ckpt["data"]["std"])  # (40, 1, 28, 28)
    with torch.no_grad():
        want = torch.cat([enc(x[i:i + 1]) for i in range(len(x))]).numpy()  # (40, 16)
    with h5py.File(out, "r") as f:  # plain h5py
        assert set(f) == {"features", "labels", "indices", "source_indices"}  # in-memory data: no paths
        feats = f["features"]
        assert feats.shape == (40, 16) and feats.dtype == np.float32 and feats.chunks is not None
        assert f["labels"].dtype == np.int64 and f["indices"].dtype == np.int64
        np.testing.assert_allclose(feats[()], want, rtol=1e-5, atol=1e-6)
        dist = np.abs(feats[()][:, None, :] - want[None, :, :]).max(axis=2)  # (40, 40)
        np.testing.assert_array_equal(dist.argmin(axis=1), np.arange(40))  # each row is nearest its own image
        assert (np.sort(dist, axis=1)[:, 1] > 1e-4).all()  # and far from every other: a row mix-up would show
        np.testing.assert_array_equal(f["labels"][()], ds.labels)
        np.testing.assert_array_equal(f["indices"][()], np.arange(40))
        a = dict(f.attrs)
    assert bool(a["complete"]) and int(a["n_written"]) == 40 and a["layer"] == "encoder" and a["dim"] == 16
    assert a["arch"] == "convnet-tiny" and not bool(a["normalised"]) and a["dataset_spec"] == "fashion-mnist:test"
    assert a["model_sha256"] == file_sha256(run[0] / "checkpoint.pt") and a["instdisc_version"] and a["created"]
    assert a["format_version"] == 1 and a["kind"] == "instdisc-features"
    feats, labels, indices, attrs = read_features(out)
    assert feats.dtype == np.float32 and feats.shape == (40, 16) and attrs["complete"] is True
    np.testing.assert_array_equal(indices, np.arange(40))


def test_limit_records_source_indices(run, tmp_path):
    out = tmp_path / "f.h5"
    _export(run, out, limit=10, layer="embedding")
    feats, labels, indices, attrs = read_features(out)
    assert feats.shape == (10, 16) and attrs["dataset_limit"] == 10 and attrs["normalised"] is True
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    ds = build_dataset("fashion-mnist:test", data_root=str(run[1]), limit=10)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["source_indices"][()], ds.source_indices)


@pytest.mark.parametrize("dtype,compression", [("float16", "gzip"), ("float32", "lzf"), ("float16", "none")])
def test_dtype_and_compression(run, tmp_path, dtype, compression):
    ref = tmp_path / "ref.h5"
    _export(run, ref)
    out = tmp_path / "f.h5"
    _export(run, out, dtype=dtype, compression=compression)
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.dtype(dtype)
        assert f["features"].compression == (None if compression == "none" else compression)
        assert f.attrs["dtype"] == dtype and f.attrs["compression"] == compression
    feats, _, _, _ = read_features(out)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(feats, read_features(ref)[0], rtol=1e-3 if dtype == "float16" else 0, atol=1e-3)


def test_rows_do_not_depend_on_batch_boundaries(run):
    """Eval-mode BatchNorm is per-sample: a row's features are the same whatever batch it is computed in."""
    src = open_model(run[0])
    ds = src.prepare(build_dataset("fashion-mnist:test", data_root=str(run[1])))
    a = extract_features(src.fn("encoder"), ds, batch_size=40).features
    for bs in (1, 7, 13):
        np.testing.assert_allclose(extract_features(src.fn("encoder"), ds, batch_size=bs).features, a,
                                   rtol=0, atol=1e-6)


def test_interrupted_export_is_incomplete_and_resumes_identically(run, tmp_path):
    full = tmp_path / "full.h5"
    _export(run, full, compression="gzip")
    out = tmp_path / "f.h5"
    with pytest.raises(Stop):
        _export(run, out, compression="gzip", on_batch=_stop_after(2))
    attrs = read_features_attrs(out)
    assert attrs["complete"] is False and attrs["n_written"] == 16
    with pytest.raises(InstdiscError, match="incomplete.*16 of 40 rows.*again"):
        read_features(out)
    part = read_features(out, allow_incomplete=True)[0]
    assert part.shape == (16, 16)
    res = _export(run, out, compression="gzip", batch_size=5)  # the file's batch size (8) wins on resume
    assert res.resumed_from == 16
    a, b = _all(out), _all(full)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert read_features_attrs(out)["complete"] is True


def test_truncated_counter_recomputes_from_batch_boundary(run, tmp_path):
    full = tmp_path / "full.h5"
    _export(run, full)
    out = tmp_path / "f.h5"
    _export(run, out)
    with h5py.File(out, "r+") as f:  # as if the process died after row 13 was counted, rows after it lost
        f.attrs["complete"] = False
        f.attrs["n_written"] = 13
        f["features"][13:] = np.nan
        f["labels"][13:] = -7
    res = _export(run, out)
    assert res.resumed_from == 13
    a, b = _all(out), _all(full)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_different_settings(run, tmp_path):
    out = tmp_path / "f.h5"
    with pytest.raises(Stop):
        _export(run, out, on_batch=_stop_after(1))
    with pytest.raises(InstdiscError, match="cannot resume.*layer.*--overwrite"):
        _export(run, out, layer="embedding")
    res = _export(run, out, layer="embedding", overwrite=True)
    assert res.resumed_from == 0 and read_features_attrs(out)["layer"] == "embedding"


def test_complete_file_refused_and_overwrite_is_atomic(run, tmp_path):
    out = tmp_path / "f.h5"
    _export(run, out)
    before = out.read_bytes()
    with pytest.raises(InstdiscError, match="already exists.*--overwrite"):
        _export(run, out)
    with pytest.raises(Stop):
        _export(run, out, overwrite=True, dtype="float16", on_batch=_stop_after(2))
    assert out.read_bytes() == before  # the old file survives an interrupted overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]
    _export(run, out, overwrite=True, dtype="float16")
    assert read_features_attrs(out)["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_not_a_features_file(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(InstdiscError, match="not a readable HDF5"):
        read_features(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["features"] = np.zeros((2, 2))
    with pytest.raises(InstdiscError, match="not an instdisc features file"):
        read_features(tmp_path / "y.h5")
    with pytest.raises(InstdiscError, match="not found"):
        read_features(tmp_path / "z.h5")


def test_embedding_without_head_on_export_refused(run, tmp_path):
    export_encoder(run[0], tmp_path / "enc")
    with pytest.raises(InstdiscError, match="no projection head"):
        export_features(tmp_path / "enc", "fashion-mnist:test", tmp_path / "f.h5", data_root=str(run[1]),
                        layer="embedding")
    assert not (tmp_path / "f.h5").exists()


def test_float16_overflow_is_reported(run, tmp_path):
    src = open_model(run[0])
    src.encoder.register_forward_hook(lambda m, i, o: o * 1e6)
    with pytest.raises(InstdiscError, match="non-finite.*--dtype float32"):
        export_features(src, "fashion-mnist:test", tmp_path / "f.h5", data_root=str(run[1]), dtype="float16")
    assert not (tmp_path / "f.h5").exists()  # nothing was written: no half file to resume or overwrite


def test_paths_for_file_datasets(tmp_path):
    folder = make_mixed_folder(tmp_path / "imgs", n_per_class=4, classes=("a", "b"))
    run_dir = tmp_path / "run"
    train(tiny_cfg(folder, run_dir, data=str(folder), image_size=16, batch_size=4, nce_k=4, augment="pil"))
    out = tmp_path / "f.h5"
    export_features(run_dir, str(folder), out, batch_size=3)
    ds = build_dataset(str(folder), image_size=16)
    with h5py.File(out, "r") as f:
        paths = [p.decode("utf-8") for p in f["paths"][()]]
        assert paths == list(ds.paths)
        np.testing.assert_array_equal(f["labels"][()], ds.labels)
        assert f["features"].shape == (8, 16)


def test_readme_five_line_example(run, tmp_path):
    out = tmp_path / "features.h5"
    _export(run, out)
    import h5py as plain  # the README example, verbatim
    with plain.File(out, "r") as f:
        assert f.attrs["complete"], "export not finished"
        X, y = f["features"][:], f["labels"][:]
        print(f.attrs["arch"], f.attrs["layer"], X.shape, y[:5])
    assert X.shape == (40, 16)


def test_folder_as_target_refused(run, tmp_path):
    (tmp_path / "d.h5").mkdir()
    for overwrite in (False, True):
        with pytest.raises(InstdiscError, match="not a file"):
            _export(run, tmp_path / "d.h5", overwrite=overwrite)


def test_new_file_appears_only_with_its_layout_and_stale_temps_go(run, tmp_path, monkeypatch):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    stale = tmp_path / f".f.h5.tmp-{p.pid}"  # a process killed while creating the file left this
    stale.write_bytes(b"\x89HDF half")
    seen = []

    def check(done, n):
        if not seen:
            seen.append(read_features_attrs(tmp_path / "f.h5"))  # readable while being written
    _export(run, tmp_path / "f.h5", on_batch=check)
    assert seen[0]["complete"] is False and not stale.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.h5"]
