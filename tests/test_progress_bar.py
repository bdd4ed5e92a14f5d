"""instdisc/progress_bar.py: rate, ETA, terminal bar vs periodic log lines, --quiet; and the passes that use it."""
import io
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from instdisc.progress_bar import LOGGER, ProgressBar, format_eta, format_progress, set_quiet


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def _not_quiet():
    set_quiet(False)
    yield
    set_quiet(False)


def test_format_progress_rate_and_eta():
    assert format_progress("scan", 250, 1000, 10.0, unit="files") == "scan: 250/1,000 (25%), 25 files/s, ETA 30s"
    assert "ETA ?" in format_progress("x", 0, 10, 5.0)
    assert format_progress("list", 500, None, 2.0) == "list: 500 img, 250 img/s, 2s"
    bar = format_progress("f", 5, 10, 1.0, bar=True)
    assert "|" + "#" * 12 + "-" * 12 + "|" in bar and "50%" in bar
    assert format_eta(3725) == "1h02m05s" and format_eta(float("inf")) == "?"


def test_lines_every_interval_when_not_a_terminal(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with ProgressBar(100, "features", tty=False, clock=clock, first_s=2, interval_s=10) as bar:
            for _ in range(50):  # one count per 0.5 s: lines at 2 s, then every 10 s
                clock.t += 0.5
                bar.update(2)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[0].startswith("features: 8/100 (8%)") and "ETA" in lines[0]
    assert len(lines) == 1 + 2 + 1  # first, at 12 s and 22 s, done
    assert lines[-1].startswith("features: done, 100 img in 25.0s")


def test_short_pass_is_silent(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with ProgressBar(10, "tiny", tty=False, clock=clock) as bar:
            clock.t = 0.5
            bar.update(10)
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_terminal_bar_redraws_one_line(caplog):
    clock, out = Clock(), io.StringIO()
    with caplog.at_level(logging.INFO, logger=LOGGER):  # shown when progress logging is on (the CLI's default)
        bar = ProgressBar(4, "scan", tty=True, stream=out, clock=clock, first_s=0.0, redraw_s=1.0)
        for _ in range(4):
            clock.t += 0.6
            bar.update(1)
        bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\x1b[K\n") and "4/4 100%" in text


def test_quiet_silences_everything(caplog):
    set_quiet(True)
    clock, out = Clock(), io.StringIO()
    with caplog.at_level(logging.INFO, logger="instdisc"):
        with ProgressBar(10, "q", tty=True, stream=out, clock=clock, first_s=0) as bar:
            clock.t = 100
            bar.update(10)
        with ProgressBar(10, "q", tty=False, clock=clock, first_s=0) as bar:
            clock.t = 200
            bar.update(10)
    assert out.getvalue() == "" and not [r for r in caplog.records if r.name == LOGGER]


def test_passes_report_progress(tmp_path, caplog, monkeypatch):
    """Feature extraction and the bad-image scan go through ProgressBar (first line forced at once)."""
    import instdisc.progress_bar as pb
    from instdisc.data.images import find_bad_images
    from instdisc.features import extract_features
    from PIL import Image

    monkeypatch.setattr(pb.ProgressBar.__init__, "__kwdefaults__",
                        dict(pb.ProgressBar.__init__.__kwdefaults__, first_s=0.0))
    paths = []
    for k in range(3):
        p = tmp_path / f"{k}.png"
        Image.new("L", (8, 8)).save(p)
        paths.append(str(p))
    with caplog.at_level(logging.INFO, logger="instdisc"):
        find_bad_images(paths, workers=1)

        class DS:
            array = None

        import torch
        from instdisc.data.dataset import IndexedDataset
        ds = IndexedDataset(spec="m", labels=np.zeros(4), classes=["a"], channels=1, image_size=8, mean=(0.5,),
                            std=(0.5,), array=torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
        extract_features(lambda x: x.flatten(1), ds, batch_size=2, desc="my features")
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any(m.startswith("bad-image scan: done, 3 files") for m in msgs)
    assert any(m.startswith("my features: done, 4 img") for m in msgs)


def test_cli_quiet_flag(fake_mnist, tmp_path):
    from instdisc_cli.main import cli

    res = CliRunner().invoke(cli, ["train", "fashion-mnist:train", "--data-root", str(fake_mnist), "--out",
                                   str(tmp_path / "r"), "--quiet", "--epochs", "1", "--arch", "convnet-tiny",
                                   "--batch-size", "16", "--nce-k", "16", "--limit", "32"])
    assert res.exit_code == 0, res.output
    assert logging.getLogger(LOGGER).level == logging.WARNING
