"""Shared by the CLI test files: an in-process invoke and the one-line-error check (the tiny trained run is the
``run`` fixture of conftest.py)."""
from click.testing import CliRunner

from instdisc_cli.main import cli


def invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(r, *words):
    """Exit 2 and one `error: ...` line as the last line of stderr (log lines may precede it), no traceback."""
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), r.output
    assert sum(x.startswith("error:") for x in lines) == 1 and "Traceback" not in r.output
    for w in words:
        assert w in lines[-1], (w, lines[-1])
