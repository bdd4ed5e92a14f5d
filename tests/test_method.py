import torch

from instdisc.method import InstDiscModel, build_model
from instdisc.training import TrainConfig


def test_build_model_parts_and_shapes():
    cfg = TrainConfig.from_recipe("paper", arch="convnet-tiny", low_dim=8, nce_k=4)
    m = build_model(cfg, n_data=20, in_channels=1, image_size=28, generator=torch.Generator().manual_seed(0))
    assert isinstance(m, InstDiscModel)
    x = torch.randn(3, 1, 28, 28)
    assert m.features(x).shape == (3, m.encoder.feature_dim)
    z = m.embed(x)
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert m.objective.bank.memory.shape == (20, 8)
    assert {"objective.bank.memory", "objective.z.log_z"} <= set(m.state_dict())


def test_bank_dtype_from_config():
    cfg = TrainConfig.from_recipe("fast", arch="convnet-tiny", low_dim=8, nce_k=4, bank_dtype="float16")
    m = build_model(cfg, n_data=10, in_channels=3, image_size=32)
    assert m.objective.bank.memory.dtype == torch.float16
