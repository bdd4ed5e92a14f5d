import json

from click.testing import CliRunner

from instdisc_cli.main import cli

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_compare_cli_json(tiny_run):  # noqa: F811
    root, out = tiny_run
    r = CliRunner().invoke(cli, ["compare", str(out), "--train", "fashion-mnist:train", "--test", "fashion-mnist:test",
                                 "--data-root", str(root), "--k", "10", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output.strip().splitlines()[-1])
    assert payload["k"] == 10 and len(payload["rows"]) == 4
