import json

from click.testing import CliRunner

from instdisc_cli.main import cli

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_knn_json_last_line(tiny_run):  # noqa: F811
    root, out = tiny_run
    r = CliRunner().invoke(cli, ["knn", str(out), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test",
                                 "--data-root", str(root), "--k", "3", "--json", "--retrieval"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output.strip().splitlines()[-1])
    assert {"top1", "top5", "k", "tau", "n_train", "n_test", "index", "seconds"} <= set(payload)
    assert payload["top5"] is None and payload["k"] == 3  # k < 5: no top-5
    assert "recall@1" in payload["retrieval"]


def test_knn_missing_model_exit_2(tmp_path):
    r = CliRunner().invoke(cli, ["knn", str(tmp_path / "nope"), "--train", "fashion-mnist", "--test",
                                 "fashion-mnist:test"])
    assert r.exit_code == 2 and r.output.startswith("error: model not found")


def test_neighbors_cli(tiny_run, tmp_path):  # noqa: F811
    root, out = tiny_run
    r = CliRunner().invoke(cli, ["neighbors", str(out), "--train", "fashion-mnist:train", "--query",
                                 "fashion-mnist:test", "--data-root", str(root), "--n", "2", "--k", "3", "--out",
                                 str(tmp_path / "n.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "n.png").exists() and "same label" in r.output
