"""cli/prepare.py: ``instdisc prepare`` and caches as the dataset of every command."""
import json

from _cli_helpers import assert_one_line_error, invoke
from test_data_prepare import make_folder


def test_prepare_then_every_command_reads_the_cache(tmp_path):
    src = make_folder(tmp_path / "src", n_per_class=12, size=(24, 20))
    cache = tmp_path / "c.h5"
    r = invoke(["prepare", src, "--out", cache, "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["n"], out["channels"], out["image_size"]) == (36, 3, 20)
    spec = f"cache:{cache}"
    run = tmp_path / "run"
    r = invoke(["train", spec, "--out", run, "--epochs", "1", "--arch", "convnet-tiny", "--batch-size", "12",
                "--nce-k", "16", "--low-dim", "16", "--knn-every", "1", "--knn-data", spec])
    assert r.exit_code == 0, r.output
    conf = json.loads((run / "config.json").read_text())
    assert conf["augment_resolved"] == "batch" and conf["dataset"]["spec"] == spec
    r = invoke(["knn", run, "--train", spec, "--test", str(cache), "--k", "5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_train"] == 36
    r = invoke(["export-features", run, spec, "--out", tmp_path / "f.h5"])
    assert r.exit_code == 0, r.output
    r = invoke(["knn", "--train", tmp_path / "f.h5", "--test", tmp_path / "f.h5", "--k", "5"])  # features files
    assert r.exit_code == 0, r.output
    r = invoke(["linear-probe", run, "--train", spec, "--test", spec, "--epochs", "5"])
    assert r.exit_code == 0, r.output
    r = invoke(["compare", run, "--train", spec, "--test", spec, "--k", "5"])
    assert r.exit_code == 0, r.output
    r = invoke(["neighbors", run, "--train", spec, "--query", spec, "--out", tmp_path / "n.png", "--n", "2",
                "--k", "3"])
    assert r.exit_code == 0, r.output


def test_prepare_errors_are_one_line(tmp_path):
    src = make_folder(tmp_path / "src")
    (src / "a" / "bad.png").write_bytes(b"x")
    assert_one_line_error(invoke(["prepare", src, "--out", tmp_path / "c.h5"]), "unreadable", "--skip-bad-images")
    r = invoke(["prepare", src, "--out", tmp_path / "c.h5", "--skip-bad-images"])
    assert r.exit_code == 0 and "1 bad images skipped" in r.stdout
    assert_one_line_error(invoke(["prepare", src, "--out", tmp_path / "c.h5"]), "already exists")
    assert_one_line_error(invoke(["train", f"cache:{tmp_path / 'nope.h5'}", "--out", tmp_path / "r"]),
                          "image cache not found")
