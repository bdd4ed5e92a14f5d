import pytest

from instdisc.errors import InstdiscError
from instdisc.training.config import RECIPES, TrainConfig


def test_roundtrip():
    cfg = TrainConfig.from_recipe("paper", epochs=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.loss == "nce" and cfg.positive == "bank" and cfg.negatives == "per-sample" and cfg.views == 1


def test_overrides_win_and_none_ignored():
    cfg = TrainConfig.from_recipe("fast", lr=0.5, nce_k=None)
    assert cfg.lr == 0.5 and cfg.nce_k == 4096


@pytest.mark.parametrize("over,msg", [
    (dict(nce_t=0), "tau"), (dict(nce_t=-1), "tau"), (dict(nce_m=1.0), "momentum"), (dict(nce_m=-0.1), "momentum"),
    (dict(nce_k=0), "nce-k"), (dict(epochs=0), "epochs"), (dict(batch_size=1), "batch-size"), (dict(lr=0), "lr"),
    (dict(loss="ce"), "loss"), (dict(knn_every=1), "knn-data"), (dict(limit=0), "limit"),
])
def test_validation(over, msg):
    with pytest.raises(InstdiscError, match=msg):
        TrainConfig.from_recipe("fast", **over)


def test_data_checks():
    cfg = TrainConfig.from_recipe("fast", nce_k=100, batch_size=16)
    with pytest.raises(InstdiscError, match="nce-k"):
        cfg.validate_for_data(100)
    with pytest.raises(InstdiscError, match="batch-size"):
        cfg.validate_for_data(10)
    cfg.validate_for_data(101)


def test_unknown_recipe_and_keys():
    with pytest.raises(InstdiscError, match="recipe"):
        TrainConfig.from_recipe("best")
    with pytest.raises(InstdiscError, match="unknown config"):
        TrainConfig.from_dict({"bogus": 1})


def test_recipes_are_valid():
    for name in RECIPES:
        TrainConfig.from_recipe(name)
