"""Mixed precision and memory layout of the encoder + head forward. Covered by tests/test_train_precision.py.

bf16 autocast runs where the hardware computes bf16 natively: every CUDA device this package supports, and CPUs with
AVX512-BF16 or AMX (oneDNN's bf16 kernels; on such a CPU the convnet-s training step is ~3x faster than float32).
Elsewhere bf16 is emulated and slower than float32, so ``--amp`` then stays off. The loss, the memory bank and the
optimizer always work in float32: only the encoder and head run under autocast, and their output is cast back.

Training also keeps conv weights and the batch in channels-last layout: oneDNN's convolutions are faster in it on CPU
(convnet-s forward + backward: 1.4x in float32, 1.2x more under bf16) and cuDNN's under bf16 on CUDA. The values are
the same module, only strided differently; checkpoints and exports load into either layout.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["cpu_has_native_bf16", "resolve_amp", "autocast", "use_channels_last", "as_channels_last"]


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the op: treat as emulated
        return False


def resolve_amp(enabled: bool, device: torch.device) -> bool:
    """Whether bf16 autocast is used for ``device`` when the config asks for ``enabled``."""
    if not enabled:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device, amp: bool):
    """The context the encoder + head forward runs in: bf16 autocast when ``amp``, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def use_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Put every 4-d parameter and buffer (conv weights) of ``module`` in channels-last layout, in place."""
    return module.to(memory_format=torch.channels_last)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) ``x`` in channels-last layout (a copy unless it already is); other ranks unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
