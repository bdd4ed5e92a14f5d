"""``instdisc linear-probe`` / ``finetune`` through click's CliRunner."""
import json

from _cli_helpers import assert_one_line_error, invoke


def test_linear_probe_cli(run):
    data = ["--train", "fashion-mnist:train", "--test", "fashion-mnist:test", "--data-root", run[1]]
    r = invoke(["linear-probe", run[0], *data, "--json", "--limit", 60, "--epochs", 50])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["n_train"] == 60 and res["n_test"] == 40 and 0 <= res["top1"] <= 100
    assert "top-1" in r.stdout.splitlines()[0]
    r = invoke(["linear-probe", run[0], *data, "--optimizer", "adam", "--epochs", 3, "--batch-size", 32])
    assert r.exit_code == 0 and "top-1" in r.output
    assert_one_line_error(invoke(["linear-probe", run[0].parent / "missing", *data]), "model not found")
    assert_one_line_error(invoke(["linear-probe", run[0], *data, "--weight-decay", -1]), "--weight-decay")


def test_finetune_cli(run, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", run[0], "--train", "fashion-mnist:train", "--test", "fashion-mnist:test", "--data-root",
            run[1], "--out", out, "--epochs", 1, "--batch-size", 32, "--limit", 64]
    r = invoke(args + ["--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["n_train"] == 64 and res["epochs"] == 1 and (out / "classifier.pt").exists()
    assert_one_line_error(invoke(args), "already exists", "--overwrite")
    assert invoke(args + ["--overwrite", "--no-augment"]).exit_code == 0
    # the fine-tuned folder is a MODEL for the other commands
    r = invoke(["export-features", out, "fashion-mnist:test", "--data-root", run[1], "--out", tmp_path / "f.h5"])
    assert r.exit_code == 0, r.output
