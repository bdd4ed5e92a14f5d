import click
from click.testing import CliRunner

from instdisc.errors import InstdiscError
from instdisc_cli.app import InstdiscGroup


def test_group_turns_instdisc_error_into_exit_2():
    @click.group(cls=InstdiscGroup)
    def g():
        pass

    @g.command()
    def boom():
        raise InstdiscError("the thing at /x is wrong")

    r = CliRunner().invoke(g, ["boom"])
    assert r.exit_code == 2
    assert r.output == "error: the thing at /x is wrong\n"


def test_version_and_help():
    from instdisc_cli.main import cli

    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for cmd in ["train", "knn", "neighbors", "compare", "export-encoder", "export-features", "linear-probe",
                "finetune", "plot", "plot-embedding"]:
        assert cmd in r.output
