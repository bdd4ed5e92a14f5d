"""``instdisc export-encoder`` / ``export-features`` through click's CliRunner."""
import json

import h5py
from _cli_helpers import assert_one_line_error, invoke


def test_export_encoder_cli(run, tmp_path):
    out = tmp_path / "enc"
    r = invoke(["export-encoder", run[0], "--out", out, "--with-head", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    assert info["has_head"] is True and info["parity_max_abs_diff"] < 1e-5 and (out / "head.pt").exists()
    assert_one_line_error(invoke(["export-encoder", run[0], "--out", out]), "--overwrite")
    assert invoke(["export-encoder", run[0], "--out", out, "--overwrite"]).exit_code == 0
    assert_one_line_error(invoke(["export-encoder", tmp_path / "nope", "--out", tmp_path / "e2"]), "nope")


def test_export_features_cli(run, tmp_path):
    enc = tmp_path / "enc"
    assert invoke(["export-encoder", run[0], "--out", enc]).exit_code == 0
    out = tmp_path / "f.h5"
    base = ["export-features", enc, "fashion-mnist:test", "--data-root", run[1], "--out", out, "--batch-size", 16]
    r = invoke(base + ["--dtype", "float16", "--compression", "gzip", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["n"] == 40
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == "float16" and f.attrs["complete"]
    assert_one_line_error(invoke(base), "already exists", "--overwrite")
    assert invoke(base + ["--overwrite"]).exit_code == 0
    assert_one_line_error(invoke(base + ["--overwrite", "--layer", "embedding"]), "no projection head")
    assert_one_line_error(invoke(["export-features", tmp_path / "missing", "fashion-mnist:test", "--out",
                                  tmp_path / "g.h5"]), "model not found")


def test_incomplete_file_resumes_or_is_refused(run, tmp_path):
    out = tmp_path / "f.h5"
    base = ["export-features", run[0], "fashion-mnist:test", "--data-root", run[1], "--out", out, "--batch-size", 8]
    assert invoke(base).exit_code == 0
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = False
        f.attrs["n_written"] = 24
    assert_one_line_error(invoke(base + ["--layer", "embedding"]), "cannot resume", "--overwrite")
    r = invoke(base)
    assert r.exit_code == 0 and "resumed after 24 rows" in r.output, r.output
    (tmp_path / "junk.h5").write_text("not hdf5")
    junk = ["export-features", run[0], "fashion-mnist:test", "--data-root", run[1], "--out", tmp_path / "junk.h5"]
    assert_one_line_error(invoke(junk), "not an instdisc features file")
