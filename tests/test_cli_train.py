import json

from click.testing import CliRunner

from instdisc_cli.main import cli


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_train_and_resume_cli(fake_mnist, tmp_path):
    out = tmp_path / "run"
    base = ["train", "fashion-mnist:train", "--data-root", str(fake_mnist), "--out", str(out), "--arch",
            "convnet-tiny", "--batch-size", "16", "--nce-k", "32", "--low-dim", "8", "--epochs", "1"]
    r = run(base)
    assert r.exit_code == 0, r.output
    assert "done: 1 epochs" in r.output
    r = run(base[:-1] + ["2", "--resume"])
    assert r.exit_code == 0, r.output
    assert "done: 2 epochs" in r.output
    assert json.loads((out / "config.json").read_text())["arch"] == "convnet-tiny"


def test_paper_recipe_flags(fake_mnist, tmp_path):
    r = run(["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out", str(tmp_path / "p"), "--recipe",
             "paper", "--arch", "convnet-tiny", "--batch-size", "32", "--nce-k", "16", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["loss"], cfg["positive"], cfg["negatives"], cfg["nce_t"], cfg["nce_m"]) == (
        "nce", "bank", "per-sample", 0.07, 0.5)


def test_bad_input_one_line_exit_2(fake_mnist, tmp_path):
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out",
                                 str(tmp_path / "x"), "--nce-t", "0"])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and "tau" in r.output and len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_bank_flags_reach_the_config(fake_mnist, tmp_path):
    common = ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--arch", "convnet-tiny", "--batch-size",
              "16", "--low-dim", "8", "--epochs", "1"]
    r = run(common + ["--out", str(tmp_path / "w"), "--bank-weight", "0.3", "--nce-k", "24"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (cfg["positive"], cfg["bank_weight"], cfg["nce_k"]) == ("view+bank", 0.3, 24)
    r = run(common + ["--out", str(tmp_path / "c"), "--nce-k", "0"])  # the no-bank control
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["nce_k"] == 0
    r = run(common + ["--out", str(tmp_path / "a")])  # K not given: half the 96 images
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["nce_k"] == 48


def test_k_that_cannot_work_is_refused_before_training(fake_mnist, tmp_path):
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out",
                                 str(tmp_path / "x"), "--nce-k", "500", "--batch-size", "16"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: --nce-k (500) must be smaller than the number of images (96)"
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out",
                                 str(tmp_path / "y"), "--bank-weight", "0"])
    assert r.exit_code == 2 and "--bank-weight must be in (0, 1], got 0.0" in r.output
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out",
                                 str(tmp_path / "z"), "--neighbours", "3", "--neighbour-select", "1.5"])
    assert r.exit_code == 2 and r.output.strip() == "error: --neighbour-select must be in (0, 1], got 1.5"
    assert not (tmp_path / "z").exists()

def test_tensorboard_without_the_package_one_line_exit_2(fake_mnist, tmp_path, monkeypatch):
    import sys

    from _cli_helpers import assert_one_line_error

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out",
                                 str(tmp_path / "x"), "--tensorboard", str(tmp_path / "tb")])
    assert_one_line_error(r, "tensorboard", "instdisc[plot]")
    assert not (tmp_path / "x").exists()


def test_tensorboard_option_writes_event_files(fake_mnist, tmp_path):
    r = run(["train", "fashion-mnist", "--data-root", str(fake_mnist), "--out", str(tmp_path / "r"), "--arch",
             "convnet-tiny", "--batch-size", "16", "--nce-k", "16", "--low-dim", "8", "--epochs", "1", "--limit", "32",
             "--tensorboard", str(tmp_path / "tb")])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
