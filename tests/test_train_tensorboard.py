"""instdisc/training/tensorboard.py: the metrics records as TensorBoard scalars, read back from the event files."""
import json
import math
import sys

import pytest

from instdisc.errors import InstdiscError
from instdisc.training import train
from instdisc.training.tensorboard import TensorBoardSink, require_tensorboard, scalars_of

from test_train_loop import tiny_cfg


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_of_takes_every_finite_number():
    rec = {"type": "step", "epoch": 1, "step": 3, "global_step": 3, "loss": 2.5, "log_z": None, "eta_s": math.inf,
           "note": "x", "flag": True}
    assert scalars_of(rec) == {"step/epoch": 1.0, "step/step": 3.0, "step/loss": 2.5}
    assert scalars_of({"type": "epoch", "epoch": 2, "global_step": 8, "knn_top1": 0.5}) == {
        "epoch/epoch": 2.0, "epoch/knn_top1": 0.5}
    assert scalars_of({"type": "other", "loss": 1.0}) == {}


def test_sink_writes_scalars_at_global_step(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for s in (1, 2):
        sink.write({"type": "step", "global_step": s, "loss": 10.0 - s})
    sink.write({"type": "epoch", "epoch": 1, "global_step": 2, "loss": 8.5})
    sink.close()
    got = read_scalars(tmp_path / "tb")
    assert got["step/loss"] == [(1, 9.0), (2, 8.0)]
    assert got["epoch/loss"] == [(2, 8.5)]


def test_sink_after_resume_replaces_the_replayed_steps(tmp_path):
    """A resumed run writes steps again from its checkpoint on; TensorBoard drops the old events from there."""
    first = TensorBoardSink(tmp_path / "tb")
    for s in (1, 2, 3, 4):
        first.write({"type": "step", "global_step": s, "loss": float(s)})
    first.close()
    second = TensorBoardSink(tmp_path / "tb")
    for s in (3, 4, 5):
        second.write({"type": "step", "global_step": s, "loss": 100.0 + s})
    second.close()
    assert read_scalars(tmp_path / "tb")["step/loss"] == [(1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0), (5, 105.0)]


def test_training_writes_the_metrics_scalars(fake_mnist, tmp_path):
    out, tb = tmp_path / "run", tmp_path / "tb"
    train(tiny_cfg(fake_mnist, out, limit=32, nce_k=16, tensorboard=str(tb)))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = read_scalars(tb)
    steps = [r for r in records if r["type"] == "step"]
    assert got["step/loss"] == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert got["step/lr"] == [(r["global_step"], pytest.approx(r["lr"], rel=1e-6)) for r in steps]
    assert "step/log_z" not in got  # null on every step (InfoNCE)
    ep = [r for r in records if r["type"] == "epoch"]
    assert got["epoch/loss"] == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in ep]
    numeric = {k for r in steps for k, v in r.items() if isinstance(v, (int, float)) and k != "global_step"}
    assert {t.split("/", 1)[1] for t in got if t.startswith("step/")} == numeric


def test_missing_tensorboard_is_one_line_error(monkeypatch, fake_mnist, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(InstdiscError, match=r"tensorboard package: pip install 'instdisc\[plot\]'"):
        require_tensorboard()
    with pytest.raises(InstdiscError, match="tensorboard"):
        tiny_cfg(fake_mnist, tmp_path / "run", tensorboard=str(tmp_path / "tb"))
    assert not (tmp_path / "run").exists()


def test_tensorboard_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InstdiscError, match="must be a folder"):
        TensorBoardSink(tmp_path / "f")


def test_tensorboard_may_be_added_on_resume(fake_mnist, tmp_path):
    out, tb = tmp_path / "run", tmp_path / "tb"
    train(tiny_cfg(fake_mnist, out, limit=32, nce_k=16))
    train(tiny_cfg(fake_mnist, out, limit=32, nce_k=16, epochs=2, tensorboard=str(tb)), resume=True)
    got = read_scalars(tb)
    assert [s for s, _ in got["epoch/loss"]] == [4]  # the second epoch only (2 steps of 16 per epoch)
