"""The InstDisc model: encoder -> projection head -> objective (memory bank + loss). Covered by tests/test_method.py."""
from __future__ import annotations

import torch
from torch import nn

from .bank import BANK_DTYPES, auto_k
from .models import ProjectionHead, build_encoder
from .objective import Objective
from .seeding import Stream, mix_seed

__all__ = ["InstDiscModel", "build_model", "build_seeded_model", "resolved_k"]


class InstDiscModel(nn.Module):
    """Holds the three parts; the training loop calls them explicitly (no hidden state changes in forward)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, objective: Objective):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.objective = objective

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, feature_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (B, low_dim) unit rows


def resolved_k(cfg, n_data: int) -> int:
    """cfg.nce_k, or the automatic K when it was not given (see TrainConfig.resolve_for_data)."""
    return cfg.nce_k if cfg.nce_k is not None else auto_k(n_data)


def build_model(cfg, *, n_data: int, in_channels: int, image_size: int, generator: torch.Generator | None = None,
                draw_bank: bool = True, objective_cls: type[Objective] = Objective,
                **objective_args) -> InstDiscModel:
    """Build encoder, head and objective from a :class:`~instdisc.training.config.TrainConfig`.

    ``generator`` draws the initial bank rows; ``draw_bank=False`` leaves them undrawn (a checkpoint's rows are
    loaded next). ``objective_cls`` / ``objective_args``: another objective with extra arguments (the sharded one
    of a distributed run takes its ``partition``)."""
    encoder = build_encoder(cfg.arch, in_channels=in_channels, image_size=image_size)
    head = ProjectionHead(encoder.feature_dim, cfg.low_dim, kind=cfg.head)
    objective = objective_cls(n_data, cfg.low_dim, k=resolved_k(cfg, n_data), tau=cfg.nce_t, m=cfg.nce_m,
                              loss=cfg.loss, negatives=cfg.negatives, positive=cfg.positive, in_batch=cfg.in_batch,
                              z_mode=cfg.z_mode, bank_weight=cfg.bank_weight, bank_dtype=BANK_DTYPES[cfg.bank_dtype],
                              neighbours=cfg.neighbours, neighbour_index=cfg.neighbour_index, clusters=cfg.clusters,
                              neighbour_select=cfg.neighbour_select,
                              generator=generator, draw_bank=draw_bank, **objective_args)
    return InstDiscModel(encoder, head, objective)


def build_seeded_model(cfg, *, n_data: int, in_channels: int, image_size: int,
                       objective_cls: type[Objective] = Objective, **objective_args) -> InstDiscModel:
    """The model a run with ``cfg.seed`` starts from. Layer init draws from torch's global RNG, so it runs inside
    ``fork_rng`` under the seed of stream ``MODEL_INIT``; the bank rows come from stream ``BANK_INIT``: the same
    weights every time (every process of a distributed run too), global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, 0, Stream.MODEL_INIT))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, Stream.BANK_INIT))
        return build_model(cfg, n_data=n_data, in_channels=in_channels, image_size=image_size, generator=gen,
                           objective_cls=objective_cls, **objective_args)
