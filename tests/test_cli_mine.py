"""`instdisc mine`: the command over instdisc.mining (the tiny trained run is conftest's ``run``)."""
import json

from instdisc.mining import read_bank_neighbours

from _cli_helpers import assert_one_line_error, invoke


def test_mine_writes_the_file_and_reports_labels(run, tmp_path):
    run_dir, root = run
    out = tmp_path / "nb.h5"
    r = invoke(["mine", run_dir, "--out", out, "--k", 4, "--clusters", 3, "--data-root", root, "--json"])
    assert r.exit_code == 0, r.output
    assert "wrote 32 x 4 neighbours and 3 clusters (flat search" in r.output and "share a label" in r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["n"] == 32 and res["k"] == 4 and 0 <= res["label_agreement"] <= 1
    got = read_bank_neighbours(out)
    assert got["neighbours"].shape == (32, 4) and got["clusters"].shape == (32,)


def test_mine_without_labels(run, tmp_path):
    run_dir, _ = run
    r = invoke(["mine", run_dir, "--out", tmp_path / "nb.h5", "--no-labels"])
    assert r.exit_code == 0, r.output
    assert "share a label" not in r.output


def test_mine_bad_input_one_line(run, tmp_path):
    run_dir, _ = run
    assert_one_line_error(invoke(["mine", run_dir, "--out", tmp_path / "nb.h5", "--k", 0, "--no-labels"]), "--k")
    # refused before the run or the data are read: a missing run with a bad --k names --k
    assert_one_line_error(invoke(["mine", tmp_path / "missing", "--out", tmp_path / "nb.h5", "--k", 0]), "--k")
    assert_one_line_error(invoke(["mine", tmp_path / "missing", "--out", tmp_path / "nb.h5"]))
    invoke(["mine", run_dir, "--out", tmp_path / "nb.h5", "--no-labels"])
    assert_one_line_error(invoke(["mine", run_dir, "--out", tmp_path / "nb.h5", "--no-labels"]), "--overwrite")
