import pytest
import torch

from instdisc.device import DEVICES, resolve_device
from instdisc.errors import InstdiscError


def test_auto_is_cuda_only_with_a_gpu(monkeypatch):
    assert DEVICES == ("auto", "cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InstdiscError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_inferred_size_cap_is_lower_on_cpu():
    from instdisc.device import SIZE_CAP, inferred_size_cap

    assert inferred_size_cap("cpu") == SIZE_CAP["cpu"] == 96 and inferred_size_cap("cuda") == 224
    assert inferred_size_cap(torch.device("cpu")) == 96 and inferred_size_cap("meta") == 224
