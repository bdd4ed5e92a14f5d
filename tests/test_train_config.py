import pytest

from instdisc.errors import InstdiscError
from instdisc.training.config import RECIPES, TrainConfig


def test_roundtrip():
    cfg = TrainConfig.from_recipe("paper", epochs=3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.loss == "nce" and cfg.positive == "bank" and cfg.negatives == "per-sample" and cfg.views == 1


def test_overrides_win_and_none_ignored():
    cfg = TrainConfig.from_recipe("fast", lr=0.5, nce_k=None)
    assert cfg.lr == 0.5 and cfg.nce_k is None  # K is chosen from the dataset size (resolve_for_data)


def test_k_adapts_to_small_datasets_when_not_given():
    cfg = TrainConfig.from_recipe("fast")
    assert cfg.resolve_for_data(60000) == "bank negatives K = 4096 (the default; set --nce-k to choose)"
    assert cfg.nce_k == 4096
    small = TrainConfig.from_recipe("fast")
    line = small.resolve_for_data(1000)
    assert small.nce_k == 500 and "half of the 1000 images" in line
    small.validate_for_data(1000)
    tiny = TrainConfig.from_recipe("fast", batch_size=2)
    tiny.resolve_for_data(3)
    assert tiny.nce_k == 1
    tiny.validate_for_data(3)


def test_explicit_k_is_kept_and_refused_when_it_cannot_work():
    cfg = TrainConfig.from_recipe("fast", nce_k=2000)
    assert cfg.resolve_for_data(1000) is None and cfg.nce_k == 2000
    with pytest.raises(InstdiscError, match=r"--nce-k \(2000\) must be smaller than the number of images \(1000\)"):
        cfg.validate_for_data(1000)


def test_no_bank_control_and_view_plus_bank_settings():
    assert TrainConfig.from_recipe("fast", nce_k=0).nce_k == 0  # in-batch negatives only: the no-bank control
    with pytest.raises(InstdiscError, match="--nce-k 0 \\(no bank negatives\\) needs --loss infonce"):
        TrainConfig.from_recipe("paper", nce_k=0)
    with pytest.raises(InstdiscError, match="--bank-weight must be in \\(0, 1\\], got 1.5"):
        TrainConfig.from_recipe("fast", positive="view+bank", bank_weight=1.5)
    with pytest.raises(InstdiscError, match="--positive view\\+bank needs --loss infonce"):
        TrainConfig.from_recipe("fast", positive="view+bank", loss="nce", in_batch=False)


def test_neighbours_recipe_is_fast_with_bank_neighbours():
    fast, nb = TrainConfig.from_recipe("fast"), TrainConfig.from_recipe("neighbours")
    assert nb.neighbours == 10 and fast.neighbours == 0
    assert {k: v for k, v in nb.to_dict().items() if k not in ("neighbours", "recipe")} == \
        {k: v for k, v in fast.to_dict().items() if k not in ("neighbours", "recipe")}
    assert TrainConfig.from_recipe("neighbours", neighbours=3).neighbours == 3  # a flag wins
    # the no-bank control of this recipe: no bank to search, so no neighbours either (unless asked, then refused)
    assert TrainConfig.from_recipe("neighbours", nce_k=0).neighbours == 0
    with pytest.raises(InstdiscError, match="--neighbours needs .* bank negatives"):
        TrainConfig.from_recipe("neighbours", nce_k=0, neighbours=10)


@pytest.mark.parametrize("n,k_nb", [(60000, 10), (200, 10), (199, 9), (100, 5), (40, 2), (19, 0)])
def test_recipe_neighbours_shrink_on_small_data(n, k_nb):
    cfg = TrainConfig.from_recipe("neighbours", nce_k=1)
    line = cfg.resolve_for_data(n)
    assert cfg.neighbours == k_nb
    if k_nb == 10:
        assert line is None
    else:
        assert f"the recipe's 10 on {n} images" in line and ("off" if k_nb == 0 else f"k = {k_nb}") in line
    cfg.validate_for_data(n)
    explicit = TrainConfig.from_recipe("fast", nce_k=1, neighbours=10)  # an explicit k is kept, and refused if it
    explicit.resolve_for_data(n)  # cannot work
    assert explicit.neighbours == 10


def test_jitter_setting():
    assert TrainConfig.from_recipe("fast").jitter == 0.4 and TrainConfig.from_recipe("paper").jitter == 0.4
    assert TrainConfig.from_recipe("fast", jitter=0.8).jitter == 0.8
    for bad in (-0.1, 1.5):
        with pytest.raises(InstdiscError, match=f"--jitter must be in \\[0, 1\\], got {bad}"):
            TrainConfig.from_recipe("fast", jitter=bad)


@pytest.mark.parametrize("over,msg", [
    (dict(nce_t=0), "tau"), (dict(nce_t=-1), "tau"), (dict(nce_m=1.0), "momentum"), (dict(nce_m=-0.1), "momentum"),
    (dict(nce_k=-1), "nce-k"), (dict(epochs=0), "epochs"), (dict(batch_size=1), "batch-size"), (dict(lr=0), "lr"),
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
    """Every recipe builds a config that passes validation, carries each of the recipe's values (they win over the
    dataclass defaults), names its recipe, survives a to_dict / from_dict round trip and fits a dataset."""
    assert set(RECIPES) == {"fast", "neighbours", "paper"}
    defaults = TrainConfig()
    for name, values in RECIPES.items():
        cfg = TrainConfig.from_recipe(name)
        cfg.validate()  # from_recipe validated it; calling again must not raise either
        assert cfg.recipe == name
        assert {key: getattr(cfg, key) for key in values} == values
        untouched = {f for f in cfg.to_dict() if f not in values and f != "recipe"}
        assert {f: getattr(cfg, f) for f in untouched} == {f: getattr(defaults, f) for f in untouched}
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.resolve_for_data(60000) is not None and cfg.nce_k == 4096
        cfg.validate_for_data(60000)
    assert TrainConfig.from_recipe("paper").loss != TrainConfig.from_recipe("fast").loss  # the recipes differ


@pytest.mark.parametrize("size,crop", [(8, 0.6), (12, 0.4), (16, 0.3), (20, 0.24), (24, 0.2), (28, 0.2), (224, 0.2)])
def test_crop_scale_adapts_to_tiny_images(size, crop):
    from instdisc.training.config import crop_min_for

    assert crop_min_for(size) == crop
    cfg = TrainConfig.from_recipe("fast")
    line = cfg.resolve_for_images(size)
    assert cfg.crop_min == crop and (line is None) == (crop == 0.2)
    given = TrainConfig.from_recipe("fast", crop_min=0.9)
    assert given.resolve_for_images(size) is None and given.crop_min == 0.9


def test_unknown_arch_refused_before_any_data():
    with pytest.raises(InstdiscError, match="unknown arch"):
        TrainConfig.from_recipe("fast", arch="convnet-xl")
    TrainConfig.from_recipe("fast", arch="convnet-s-pool2@2")
    TrainConfig.from_recipe("fast", arch="timm:resnet18")
