import pytest

from instdisc.data import build_dataset
from instdisc.errors import InstdiscError
from instdisc.source import open_model

from test_evaluation import tiny_run  # noqa: F401  (fixture)


def test_open_run_and_export(tiny_run, tmp_path):  # noqa: F811
    from instdisc.export import export_encoder

    root, out = tiny_run
    run = open_model(out)
    assert run.kind == "run" and run.meta["channels"] == 1 and run.head is not None
    export_encoder(out, tmp_path / "enc")
    exp = open_model(tmp_path / "enc")
    assert exp.kind == "export" and exp.meta["feature_dim"] == run.meta["feature_dim"]
    with pytest.raises(InstdiscError, match="no projection head"):
        exp.fn("embedding")
    with pytest.raises(InstdiscError, match="unknown layer"):
        run.fn("logits")


def test_prepare_takes_model_normalisation(tiny_run):  # noqa: F811
    root, out = tiny_run
    src = open_model(out)
    ds = build_dataset("fashion-mnist:test", data_root=str(root))
    ds.mean = (0.0,)
    assert src.prepare(ds).mean == tuple(src.meta["mean"])


def test_missing_model(tmp_path):
    with pytest.raises(InstdiscError, match="model not found"):
        open_model(tmp_path / "none")
