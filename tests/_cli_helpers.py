"""Shared by the CLI test files: a tiny trained run, an in-process invoke, and the one-line-error check."""
import pytest
from click.testing import CliRunner
from conftest import make_fake_mnist
from test_train_loop import tiny_cfg

from instdisc.training import train
from instdisc_cli.main import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_fake_mnist(tmp_path_factory.mktemp("data") / "fmnist")
    out = tmp_path_factory.mktemp("run") / "run"
    train(tiny_cfg(root, out, limit=32, nce_k=16))
    return out, root


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
