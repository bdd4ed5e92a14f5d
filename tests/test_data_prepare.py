"""instdisc/data/prepare.py: decoding a folder / list into an image cache; atomic, resumable, bad images."""
import json
import logging
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import instdisc.data.prepare as prep
from instdisc.data import build_dataset
from instdisc.data.images import decode_square
from instdisc.data.prepare import prepare_cache
from instdisc.errors import InstdiscError


def make_folder(root, n_per_class=6, classes=("a", "b", "c"), size=(50, 40), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a, "RGB").convert(mode).save(root / c / f"{i:03d}{'.jpg' if i % 2 else '.png'}")
    return root


def _contents(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][:] for k in f}
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return data, attrs


def test_rows_are_the_folder_samples_resized(tmp_path):
    src = make_folder(tmp_path / "src")
    res = prepare_cache(str(src), tmp_path / "c.h5")
    folder = build_dataset(str(src))
    assert (res.n, res.channels, res.image_size) == (len(folder), 3, 40)
    data, attrs = _contents(tmp_path / "c.h5")
    assert data["images"].shape == (18, 3, 40, 40) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], folder.labels)
    np.testing.assert_array_equal(data["source_indices"], folder.source_indices)
    assert [p.decode() for p in data["paths"]] == list(folder.paths)
    for i in (0, 5, 17):
        want = np.asarray(decode_square(folder.paths[i], "RGB", 40)).transpose(2, 0, 1)
        np.testing.assert_array_equal(data["images"][i], want)
    assert attrs["complete"] and attrs["n_written"] == 18 and attrs["source_fingerprint"] == folder.fingerprint()
    assert "short side resized to S" in attrs["resize_rule"]
    assert json.loads(attrs["geometry_json"])["image_size"] == 40


def test_grayscale_and_given_size(tmp_path):
    src = make_folder(tmp_path / "g", mode="L")
    res = prepare_cache(str(src), tmp_path / "g.h5", image_size=16)
    assert (res.channels, res.image_size) == (1, 16)
    ds = build_dataset(f"cache:{tmp_path / 'g.h5'}")
    assert (ds.channels, ds.image_size, tuple(ds.array.shape)) == (1, 16, (18, 1, 16, 16))


def test_complete_cache_is_refused_unless_overwrite(tmp_path):
    src = make_folder(tmp_path / "src")
    prepare_cache(str(src), tmp_path / "c.h5")
    with pytest.raises(InstdiscError, match="already exists"):
        prepare_cache(str(src), tmp_path / "c.h5")
    before = _contents(tmp_path / "c.h5")
    prepare_cache(str(src), tmp_path / "c.h5", overwrite=True)
    after = _contents(tmp_path / "c.h5")
    np.testing.assert_array_equal(before[0]["images"], after[0]["images"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_in_memory_data_is_refused(fake_mnist, tmp_path):
    with pytest.raises(InstdiscError, match="already an in-memory dataset"):
        prepare_cache("fashion-mnist:train", tmp_path / "x.h5", data_root=str(fake_mnist))


def test_cache_holds_no_timestamps(tmp_path):
    """HDF5 stamps an object's creation / modification time (1 s resolution) into its header unless told not to: a
    cache made in another second would differ in those bytes, so a resumed file would match a fresh one only by luck."""
    src = make_folder(tmp_path / "src")
    prepare_cache(str(src), tmp_path / "c.h5")
    mtime_message = 1 << 0x12  # "Object Modification Time" in an object header's bitmap of message types
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert {k: h5py.h5o.get_info(f[k].id).hdr.mesg.present & mtime_message for k in f} == dict.fromkeys(f, 0)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_prepare_resumes_to_an_identical_file(tmp_path, monkeypatch, stop_after):
    src = make_folder(tmp_path / "src")
    prepare_cache(str(src), tmp_path / "ref.h5", chunk_rows=4, workers=1)
    calls = {"n": 0}
    real = prep._decode_block

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(prep, "_decode_block", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(str(src), tmp_path / "c.h5", chunk_rows=4, workers=1)
    _, attrs = _contents(tmp_path / "c.h5")
    assert not attrs["complete"] and attrs["n_written"] == 4 * stop_after
    with pytest.raises(InstdiscError, match="incomplete"):
        build_dataset(f"cache:{tmp_path / 'c.h5'}")
    monkeypatch.setattr(prep, "_decode_block", real)
    res = prepare_cache(str(src), tmp_path / "c.h5", chunk_rows=4, workers=2)
    assert res.resumed_from == 4 * stop_after
    ref, got = _contents(tmp_path / "ref.h5"), _contents(tmp_path / "c.h5")
    assert ref[1] == got[1]
    for k in ref[0]:
        np.testing.assert_array_equal(ref[0][k], got[0][k])
    assert (tmp_path / "ref.h5").read_bytes() == (tmp_path / "c.h5").read_bytes()


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")
    monkeypatch.setattr(prep, "_decode_block", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(str(src), tmp_path / "c.h5", chunk_rows=4)
    monkeypatch.undo()
    with pytest.raises(InstdiscError, match="cannot resume the incomplete .* image_size is 20"):
        prepare_cache(str(src), tmp_path / "c.h5", chunk_rows=4, image_size=20)


def test_bad_images_reported_or_skipped(tmp_path):
    src = make_folder(tmp_path / "src")
    (src / "b" / "zz_bad.png").write_bytes(b"not a png")
    with pytest.raises(InstdiscError, match="1 unreadable image .* --skip-bad-images"):
        prepare_cache(str(src), tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()
    res = prepare_cache(str(src), tmp_path / "c.h5", skip_bad_images=True)
    assert res.n == 18 and res.skipped == 1
    _, attrs = _contents(tmp_path / "c.h5")
    assert json.loads(attrs["skipped_json"]) == [12]  # a/0..5, b/0..5, then b/zz_bad.png


def test_image_lost_mid_prepare_stops_and_resumes(tmp_path, caplog):
    src = make_folder(tmp_path / "src")
    ds = build_dataset(str(src))
    victim = ds.paths[9]
    saved = open(victim, "rb").read()
    os.remove(victim)
    with pytest.raises(InstdiscError, match=r"cannot read image .*; 8 of 18 images are in .*run the same command"):
        prepare_cache(ds, tmp_path / "c.h5", chunk_rows=4, workers=1)
    with open(victim, "wb") as f:
        f.write(saved)
    res = prepare_cache(ds, tmp_path / "c.h5", chunk_rows=4, workers=1)
    assert res.resumed_from == 8
    prepare_cache(ds, tmp_path / "ref.h5", chunk_rows=4)
    np.testing.assert_array_equal(_contents(tmp_path / "c.h5")[0]["images"], _contents(tmp_path / "ref.h5")[0]["images"])


def test_memory_is_bounded_by_the_chunk():
    assert prep._chunk_rows(3, 128, 1_281_167) * 3 * 128 * 128 <= 64 << 20
    assert prep._chunk_rows(1, 28, 10) == 10


def test_prepare_shows_progress(tmp_path, caplog, monkeypatch):
    import instdisc.progress_bar as pb

    monkeypatch.setattr(pb.ProgressBar.__init__, "__kwdefaults__",
                        dict(pb.ProgressBar.__init__.__kwdefaults__, first_s=0.0))
    src = make_folder(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="instdisc"):
        prepare_cache(str(src), tmp_path / "c.h5", chunk_rows=4)
    assert any(r.getMessage().startswith("prepare c.h5: done, 18 img") for r in caplog.records)


def test_cache_trains_on_the_batch_path_with_the_folder_slots(tmp_path):
    from test_train_loop import tiny_cfg

    from instdisc.training import train

    src = make_folder(tmp_path / "src", n_per_class=12, size=(24, 20))
    prepare_cache(str(src), tmp_path / "c.h5")
    folder, cache = build_dataset(str(src)), build_dataset(f"cache:{tmp_path / 'c.h5'}")
    np.testing.assert_array_equal(folder.labels, cache.labels)
    np.testing.assert_array_equal(folder.source_indices, cache.source_indices)
    assert (folder.image_size, folder.channels) == (cache.image_size, cache.channels) == (20, 3)
    res = train(tiny_cfg(None, tmp_path / "run", data=f"cache:{tmp_path / 'c.h5'}", data_root=None, nce_k=16,
                         arch="convnet-tiny"))
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["augment_resolved"] == "batch" and conf["dataset"]["n"] == 36
    assert np.isfinite(res.last_loss)
    torch.testing.assert_close(res.model.objective.bank.memory.float().norm(dim=1), torch.ones(36), atol=1e-3,
                               rtol=0)


def test_sigkill_prepare_then_rerun_ends_identical(tmp_path):
    """``kill -9`` right after the 1st, then the 2nd flush of each run of ``instdisc prepare`` (the test-only fault
    point ``prepare.flush``), and once at a random moment; re-running the same command continues the file from its
    ``n_written``, which ends byte-identical to an uninterrupted one (and is a readable HDF5 file after every kill)."""
    import random
    import time

    from _kill_helpers import CliProcess, kill_at, read_hits

    src = make_folder(tmp_path / "src")
    base = ["prepare", src, "--chunk-rows", "2", "--workers", "1"]
    ref = CliProcess(base + ["--out", tmp_path / "ref.h5"], tmp_path / "ref.log")
    assert ref.wait() == 0, ref.output()
    out, hits, written = tmp_path / "c.h5", tmp_path / "hits.jsonl", []
    for i, spec in enumerate(["prepare.flush:1", "prepare.flush:2", "prepare.flush:1"]):
        p = CliProcess(base + ["--out", out], tmp_path / f"k{i}.log", env=kill_at(spec, hits))
        assert p.wait() == -9, p.output()  # killed itself at the event, every time
        assert "Traceback" not in p.output(), p.output()
        with h5py.File(out, "r") as f:  # a readable file, not complete, holding what the kill left
            assert not f.attrs["complete"]
            written.append(int(f.attrs["n_written"]))
    events = read_hits(hits)
    assert [e["event"] for e in events] == ["prepare.flush"] * 3
    # each run resumed where the last one stopped: 1 chunk, then 2 more, then 1 more (2 rows a chunk)
    assert written == [2, 6, 8] and [e["rows"] for e in events] == written
    # one kill at a random moment too, wherever it lands (the file must stay usable)
    p = CliProcess(base + ["--out", out], tmp_path / "r.log", slow={"instdisc.data.prepare:_decode_block": 0.15})
    time.sleep(random.Random(3).uniform(0.2, 1.0))
    p.kill()
    assert "Traceback" not in p.output(), p.output()
    last = CliProcess(base + ["--out", out], tmp_path / "final.log")
    assert last.wait() == 0, last.output()
    assert _contents(out)[1]["complete"]
    assert not [x for x in tmp_path.iterdir() if ".tmp-" in x.name]
    assert (tmp_path / "ref.h5").read_bytes() == out.read_bytes()
