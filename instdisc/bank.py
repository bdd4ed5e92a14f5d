"""Memory bank of InstDisc: one unit-norm slot per training sample. Covered by tests/test_bank.py.

The bank is a persistent buffer ``memory`` (N x D), so it is saved and restored with the model's ``state_dict``.
It changes only in the named no-grad methods ``update``, ``set_rows`` and ``init_from``; ``sample`` draws slots
uniformly with replacement (Wu et al. 2018, Sec. 3.2), the positive's own slot included, as in the reference code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instdisc.errors import InstdiscError

__all__ = ["MemoryBank", "BANK_DTYPES", "STORAGE_DTYPES", "SAMPLE_MODES", "DEFAULT_K", "auto_k"]

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # --bank-dtype
STORAGE_DTYPES = (*BANK_DTYPES.values(), torch.float64)  # what a bank may hold: float64 too, for reference tests
SAMPLE_MODES = ("per-sample", "shared")
DEFAULT_K = 4096  # InstDisc's number of negatives


def check_storage_dtype(dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in STORAGE_DTYPES)
        raise InstdiscError(f"bank dtype must be one of {names}, got {dtype}")


def auto_k(n_data: int) -> int:
    """K when none is given: DEFAULT_K, or half the slots when that is fewer (K must stay below N)."""
    return max(1, min(DEFAULT_K, int(n_data) // 2))


class MemoryBank(nn.Module):
    """N x D bank of unit rows ``v_j``, one per training sample.

    Args:
        n_data: N, number of slots.
        dim: D, embedding size.
        dtype: storage dtype of ``memory``: float32 (default), float64, float16 or bfloat16. Half storage halves the
            bank; rows are computed in float32 and rounded on write, so they are unit to within the dtype's precision.
        generator: ``torch.Generator`` used to draw the initial rows (standard normal, then L2-normalised, i.e.
            uniform on the sphere). The rows are drawn on the generator's device; ``device`` places the result.
        device: device of ``memory``; default: the generator's device, else CPU.
        draw: False: allocate the rows without drawing them (zeros; for a bank that a state dict fills next).
    """

    memory: torch.Tensor

    def __init__(self, n_data: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 draw: bool = True) -> None:
        super().__init__()
        if int(n_data) < 1:
            raise InstdiscError(f"bank size n_data must be >= 1, got {n_data}")
        if int(dim) < 1:
            raise InstdiscError(f"bank dim must be >= 1, got {dim}")
        check_storage_dtype(dtype)
        self.n_data, self.dim = int(n_data), int(dim)
        if draw:
            draw_device = generator.device if generator is not None else device
            work = torch.float64 if dtype == torch.float64 else torch.float32
            memory = torch.randn(self.n_data, self.dim, generator=generator, device=draw_device, dtype=work)  # N x D
            memory.div_(memory.norm(dim=1, keepdim=True).clamp_(min=1e-12))  # in place: the bank can be GBs
            memory = memory.to(device=device, dtype=dtype)
        else:
            memory = torch.zeros(self.n_data, self.dim, device=device, dtype=dtype)  # N x D, filled by the caller
        self.register_buffer("memory", memory, persistent=True)

    def extra_repr(self) -> str:
        return f"n_data={self.n_data}, dim={self.dim}, dtype={self.memory.dtype}"

    # ------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, k: int, *, mode: str = "per-sample",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw negative slots uniformly with replacement over all N slots.

        ``mode="per-sample"``: an independent draw for every sample -> LongTensor (B, K) (the InstDisc estimator).
        ``mode="shared"``: one draw of K slots for the whole batch -> LongTensor (K,).
        A sample's own slot can be drawn (probability K/N per sample), as in the reference code. The draw happens
        on the generator's device and is moved to the bank's device.
        """
        if mode not in SAMPLE_MODES:
            raise InstdiscError(f"unknown sample mode {mode!r}; expected one of {', '.join(SAMPLE_MODES)}")
        if int(k) < 1:
            raise InstdiscError(f"number of negatives k must be >= 1, got {k}")
        if int(batch_size) < 0:
            raise InstdiscError(f"batch_size must be >= 0, got {batch_size}")
        shape = (int(batch_size), int(k)) if mode == "per-sample" else (int(k),)
        draw_device = generator.device if generator is not None else self.memory.device
        idx = torch.randint(0, self.n_data, shape, generator=generator, device=draw_device)  # (B,K) or (K,)
        return idx.to(self.memory.device)

    # ------------------------------------------------------------------ state changes
    @torch.no_grad()
    def update(self, idx: torch.Tensor, z: torch.Tensor, m: float) -> None:
        """Momentum update of the rows ``idx``: v <- normalise(m v + (1 - m) z).

        Args:
            idx: LongTensor (B,) of slots.
            z: (B, D) new embeddings (detached here).
            m: momentum in [0, 1); m = 0 overwrites (after normalisation).

        Duplicate slots in one batch: the rows of ``z`` that share a slot are averaged, then that slot receives ONE
        update with the mean, v <- normalise(m v + (1 - m) mean(z_dup)). The result is deterministic and, up to the
        rounding of the float sum, independent of the batch order, unlike ``index_copy_`` of per-row updates (the
        reference code), where the last writer wins (on CUDA, an arbitrary one).
        The arithmetic is float32 (float64 for a float64 bank), then rounded to the bank's dtype.
        """
        m = float(m)
        if not 0.0 <= m < 1.0:
            raise InstdiscError(f"bank momentum m must be in [0, 1), got {m}")
        idx, z = self._check_rows(idx, z)
        if idx.numel() == 0:
            return
        work = torch.float64 if self.memory.dtype == torch.float64 else torch.float32
        z = z.to(device=self.memory.device, dtype=work)
        uniq, inverse, counts = torch.unique(idx, return_inverse=True, return_counts=True)  # (U,), (B,), (U,)
        if uniq.numel() == idx.numel():  # every slot once: update the rows in batch order
            uniq, z_mean = idx, z  # B, B x D
        else:
            z_sum = torch.zeros(uniq.numel(), self.dim, dtype=work, device=z.device)  # U x D
            z_sum.index_put_((inverse,), z, accumulate=True)  # sorted-index accumulation: deterministic
            z_mean = z_sum / counts.to(work).unsqueeze(1)  # U x D
        v = self.memory.index_select(0, uniq).to(work)  # U x D
        v = F.normalize(v.mul_(m).add_(z_mean, alpha=1.0 - m), dim=1)
        self.memory.index_copy_(0, uniq, v.to(self.memory.dtype))

    @torch.no_grad()
    def set_rows(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Overwrite rows ``idx`` with normalise(z); same as ``update(idx, z, m=0)`` (duplicates are averaged)."""
        self.update(idx, z, 0.0)

    @torch.no_grad()
    def init_from(self, z_all: torch.Tensor) -> None:
        """Set the whole bank from (N, D) embeddings; rows are L2-normalised (row j <- z_all[j] / |z_all[j]|)."""
        if z_all.dim() != 2 or tuple(z_all.shape) != (self.n_data, self.dim):
            raise InstdiscError(f"init_from expects a ({self.n_data}, {self.dim}) tensor, got {tuple(z_all.shape)}")
        work = torch.float64 if self.memory.dtype == torch.float64 else torch.float32
        z_all = z_all.detach().to(device=self.memory.device, dtype=work)
        self.memory.copy_(F.normalize(z_all, dim=1))

    # ------------------------------------------------------------------ helpers
    def _check_rows(self, idx: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if idx.dim() != 1:
            raise InstdiscError(f"idx must be 1-D (B,), got shape {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise InstdiscError(f"idx must be an integer tensor, got {idx.dtype}")
        if z.dim() != 2 or z.shape[0] != idx.shape[0] or z.shape[1] != self.dim:
            raise InstdiscError(f"z must be ({idx.shape[0]}, {self.dim}) to match idx, got {tuple(z.shape)}")
        idx = idx.to(device=self.memory.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_data):
            raise InstdiscError(f"idx out of range [0, {self.n_data}): min {int(idx.min())}, max {int(idx.max())}")
        return idx, z.detach()
