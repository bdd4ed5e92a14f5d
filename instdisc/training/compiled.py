"""``--compile auto|on|off``: torch.compile (inductor) of the training step's encoder + head forward (and so of its
backward). Covered by tests/test_train_compiled.py.

``auto`` turns compile on only where it was measured to pay. Measured so far (docs/benchmarks.md, *The encoder step
against the roofline*; ``benchmarks/bench_encoder_variants.py``): on the 2-core AVX2 CPU the demo step compiled is
0.97x eager's speed in float32 (default mode; 0.96x with ``max-autotune-no-cudagraphs``) after a 25 s cold compile,
and the issue that asked for it measured 1.0x under bf16 on a CPU with native bf16. CUDA has not been measured yet
(``benchmarks/bench_gpu.py`` times eager against compiled, so the first GPU run answers it). So ``auto`` is off on
every device today; ``on`` compiles anyway (the cold compile, seconds to a minute, is paid once per process, and
again by a resumed run). What is computed is the same function; the compiled kernels round differently from eager's,
so a run is bit-exact against its own resume only with the same setting (tests/test_train_compiled.py proves it with
compile on).
"""
from __future__ import annotations

import torch

__all__ = ["COMPILE_MODES", "resolve_compile", "compile_embed"]

COMPILE_MODES = ("auto", "on", "off")

# Devices where compile measured faster than eager (bench_encoder_variants / bench_gpu), for auto. None yet.
_MEASURED_FASTER: frozenset[str] = frozenset()


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether the step's encoder + head run compiled for ``device`` when the config says ``mode``."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return device.type in _MEASURED_FASTER


def compile_embed(embed, enabled: bool):
    """``embed`` (images -> z: the model's embed or its DDP wrapper) through torch.compile when ``enabled``."""
    return torch.compile(embed) if enabled else embed
