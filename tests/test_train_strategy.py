"""instdisc.training.strategy: the run strategy of one process, and the interface a distributed run keeps to."""
from __future__ import annotations

import inspect

import pytest
import torch

from instdisc.errors import InstdiscError
from instdisc.training import loop
from instdisc.training.batches import Batches, DataError
from instdisc.training.knn_monitor import KnnMonitor
from instdisc.training.strategy import SingleProcess, launched_world_size
from test_train_loop import tiny_cfg


def _public(cls) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v) or isinstance(v, classmethod)}


def test_one_process_hooks_are_the_plain_things(fake_mnist, tmp_path):
    from instdisc.data import build_dataset

    cfg = tiny_cfg(fake_mnist, tmp_path / "r", knn_every=1, knn_data="fashion-mnist:test")
    cfg.resolve_for_data(96)
    ds = build_dataset(cfg.data, data_root=cfg.data_root)
    run = SingleProcess(torch.device("cpu"))
    assert (run.rank, run.world, run.is_main) == (0, 1, True)
    model = run.build_model(cfg, n_data=len(ds), in_channels=1, image_size=28)
    assert run.wrap(model) == model.embed
    assert run.any_true(True) and not run.any_true(False) and run.mean(2.5) == 2.5
    assert run.full_state_dict(model).keys() == model.state_dict().keys()
    assert run.run_info(cfg) == {} and run.owned_dataset(ds) is ds
    assert isinstance(run.batches(cfg, ds, True), Batches) and isinstance(run.knn_monitor(cfg, ds), KnnMonitor)
    saved = []
    with pytest.raises(DataError, match="cannot read x.png; progress is saved at step 3"):
        run.on_data_error(saved.append, 3, InstdiscError("cannot read x.png"))
    assert saved == [3]


def test_distributed_run_overrides_only_the_strategy_interface():
    from instdisc.distributed.session import DistributedRun

    assert issubclass(DistributedRun, SingleProcess)
    assert _public(DistributedRun) - _public(SingleProcess) == {"from_env"}


def test_the_loop_holds_no_distributed_branch():
    text = inspect.getsource(loop)
    assert "torch.distributed" not in text and "dist is None" not in text and "dist is not None" not in text
    assert text.count("import DistributedRun") == 1  # the one place that picks the strategy (WORLD_SIZE > 1)


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(InstdiscError, match="WORLD_SIZE must be an integer"):
        launched_world_size()
