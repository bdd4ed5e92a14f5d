"""The InstDisc objective: memory bank + normaliser Z + loss. Covered by tests/test_objective.py.

Symbols follow Wu et al. 2018: f = z (B x D, unit rows), bank rows v_j (N x D), K negatives, temperature tau, bank
momentum m. Every logit is s / tau with s = z . v, computed as (z / tau) . v.

    positive  "bank": s_pos = z_i . v_{idx_i}           (reference code)
              "view": s_pos = z_i . z_pos_i             (the other augmented view)
              "view+bank": two InfoNCE terms, (1 - w) [z_i . z_pos_i | in-batch z_i . z_pos_j]
                           + w [z_i . v_{idx_i} | K bank rows z_i . v_k]: fresh columns compete with fresh ones,
                           stored rows with stored rows (docs/bank.md: one softmax mixing them lets the encoder
                           win by drifting away from its own stale rows); K = 0 leaves the view term alone
    neighbours (``neighbours`` = k_nb > 0, loss "infonce", positive "bank" or "view+bank"): the bank term's
              positive is the SET P_i = {idx_i} ∪ N(idx_i), the sample's own row and the k_nb nearest other stored
              rows of its row (instdisc.bank_neighbours, refreshed by ``refresh_neighbours``), scored as one
              positive with the log-sum-exp of their logits (AND, Huang et al. 2019):
                  bank term_i = -log( sum_{j in P_i} e^{s_ij} / (sum_{j in P_i} e^{s_ij} + sum_k e^{s_ik}) )
              Until the first refresh P_i = {idx_i} (the plain bank term).
    clusters  (``clusters`` = C > 0, loss "infonce" with in-batch negatives, positive "view" or "view+bank"): the
              view term's positive is the set Q_i = {z_pos_i} ∪ {z_pos_j : j in the batch, cluster(j) = cluster(i),
              slot j != slot i}, the clusters from k-means over the bank at every refresh (PCL's clusters, scored
              in the batch as supervised contrastive learning scores labels, AND's log-sum form):
                  view term_i = -log( sum_{q in Q_i} e^{s_iq} / (e^{s_i,pos} + sum_j e^{s_ij}) )
              Fresh columns against fresh columns, as in the plain view term.
              "neighbour": NNCLR (Dwibedi et al. 2021): anchor a_i = the stored row nearest to z_i other than
                           v_{idx_i}, InfoNCE [a_i . z_pos_i | a_i . z_pos_j]; "view+neighbour" mixes it with the
                           view term, weights 1 - w and w (the NNCLR anchor search is exact, in torch, per batch)
    negatives "per-sample": K slots drawn for every sample, (B, K) indices, s_ik = z_i . v_{n_ik}
              "shared":     K slots drawn once per batch, (K,) indices, S = z V^T, one matmul
    loss      "nce":     NCE with Pn = 1/N and the estimated Z (instdisc.losses.nce_loss)
              "infonce": cross entropy with the positive at column 0 (optionally + in-batch negatives)
              "softmax": non-parametric softmax over all N slots, logits = z V^T / tau (reference LinearAverage)

Per-sample negatives never build the reference's B x K x D gather (512 MiB at B = 256, K = 4096, D = 128):
``per_sample_logits`` computes the (B, K) dot products in one fused kernel (the one autograd uses for the gradient
of ``embedding_bag`` w.r.t. ``per_sample_weights``), or, on a single CPU thread, tile by tile (at most
GATHER_BLOCK_ROWS gathered rows at once, then matrix-vector products); its backward is one ``embedding_bag``,
grad_zs_i = sum_k g_ik v_{n_ik}. Only the bank (by reference) and the (B, K) indices are kept for backward. For a bank
stored in another dtype than z, the tiled path is used and each tile is re-gathered in backward.

State changes: the bank only changes in ``update``/``init_bank`` (called explicitly by the training loop after
``optimizer.step()``). The one exception is the Z estimate: with loss "nce" and ``observe_z=True`` (default),
``forward`` folds the batch's logits into ``z.log_z`` under no_grad ("first-batch": only while it is unset;
"running": every call). Pass ``observe_z=False`` for evaluation passes that must not touch the state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from instdisc.bank import SAMPLE_MODES, MemoryBank
from instdisc.bank_neighbours import BankNeighbours
from instdisc.errors import InstdiscError
from instdisc.losses import full_softmax_loss, info_nce_loss, nce_loss
from instdisc.normaliser import NormaliserZ

__all__ = ["Objective", "per_sample_logits", "LOSSES", "NEGATIVES", "POSITIVES", "GATHER_BLOCK_ROWS"]

LOSSES = ("nce", "infonce", "softmax")
NEGATIVES = SAMPLE_MODES  # how the bank draws K: per sample, or one draw shared by the batch
POSITIVES = ("bank", "view", "view+bank", "neighbour", "view+neighbour")
NEAREST_BLOCK_ROWS = 65536  # neighbour search: bank rows scored at once (B x 65536 similarities)
GATHER_BLOCK_ROWS = 4096  # tiled per-sample path: bank rows gathered at once (2 MiB at D = 128, float32)


# ---------------------------------------------------------------------------------------------------------------
# per-sample negatives: (B, K) logits without a B x K x D gather
# ---------------------------------------------------------------------------------------------------------------
def _fused_available() -> bool:
    return hasattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward")


def _fused_gather_dot(zs: torch.Tensor, memory: torch.Tensor, neg_idx: torch.Tensor) -> torch.Tensor:
    """out[i, k] = zs[i] . memory[neg_idx[i, k]] in one kernel, nothing gathered.

    It is the kernel autograd uses for the gradient of ``embedding_bag`` w.r.t. ``per_sample_weights``: for every
    (bag i, entry k) the dot product of the upstream gradient row i (here zs[i]) with the table row neg_idx[i, k].
    """
    b, k = neg_idx.shape
    flat = neg_idx.reshape(-1)  # B*K
    offsets = torch.arange(0, b * k, k, device=flat.device)  # B, start of every bag
    offset2bag = torch.arange(b, device=flat.device).repeat_interleave(k)  # B*K, bag of every entry
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        zs.contiguous(), memory, flat, offsets, offset2bag, 0, -1)  # mode 0 = sum, no padding index
    return out.view(b, k)


def _blocks(b: int, k: int, block_rows: int):
    """Tiles of the (B, K) index grid holding at most ``block_rows`` entries: (r0, r1, c0, c1).

    K >= block_rows: one batch row per tile, its K columns split; else block_rows // K whole rows per tile."""
    if k >= block_rows:
        for r in range(b):
            for c0 in range(0, k, block_rows):
                yield r, r + 1, c0, min(k, c0 + block_rows)
    else:
        rows = max(1, block_rows // k)
        for r0 in range(0, b, rows):
            yield r0, min(b, r0 + rows), 0, k


def _tiled_gather_dot(zs: torch.Tensor, memory: torch.Tensor, neg_idx: torch.Tensor,
                      block_rows: int) -> torch.Tensor:
    """out[i, k] = zs[i] . memory[neg_idx[i, k]], tile by tile (never more than block_rows gathered rows)."""
    b, k = neg_idx.shape
    d = memory.shape[1]
    out = torch.empty(b, k, dtype=zs.dtype, device=zs.device)  # B x K
    if out.numel() == 0:
        return out
    buf = torch.empty(min(block_rows, b * k), d, dtype=memory.dtype, device=memory.device)  # reused per tile
    conv = buf if memory.dtype == zs.dtype else torch.empty(buf.shape, dtype=zs.dtype, device=zs.device)
    on_cpu = zs.device.type == "cpu"
    for r0, r1, c0, c1 in _blocks(b, k, block_rows):
        rows, cols = r1 - r0, c1 - c0
        ids = neg_idx[r0:r1, c0:c1].reshape(-1)  # rows*cols
        w = torch.index_select(memory, 0, ids, out=buf[: ids.numel()])  # (rows*cols) x D
        if conv is not buf:
            w = conv[: ids.numel()].copy_(w)
        w = w.view(rows, cols, d)  # rows x cols x D
        if on_cpu:  # matrix-vector per batch row is the fastest CPU kernel for this shape
            for j in range(rows):
                torch.mv(w[j], zs[r0 + j], out=out[r0 + j, c0:c1])
        else:
            out[r0:r1, c0:c1] = torch.bmm(w, zs[r0:r1, :, None]).squeeze(-1)
    return out


def _tiled_gather_dot_grad(grad: torch.Tensor, memory: torch.Tensor, neg_idx: torch.Tensor,
                           block_rows: int) -> torch.Tensor:
    """d loss / d zs[i] = sum_k grad[i, k] memory[neg_idx[i, k]], recomputing each tile's gather -> (B, D)."""
    b, k = neg_idx.shape
    d = memory.shape[1]
    out = torch.zeros(b, d, dtype=grad.dtype, device=grad.device)  # B x D
    for r0, r1, c0, c1 in _blocks(b, k, block_rows) if k else ():
        ids = neg_idx[r0:r1, c0:c1].reshape(-1)
        w = memory.index_select(0, ids).to(grad.dtype).view(r1 - r0, c1 - c0, d)  # rows x cols x D
        out[r0:r1] += torch.bmm(grad[r0:r1, None, c0:c1], w).squeeze(1)  # rows x D
    return out


class _PerSampleLogits(torch.autograd.Function):
    """logits[i, k] = zs[i] . memory[neg_idx[i, k]]; gradient w.r.t. zs only (the bank is not a parameter).

    Forward: fused=True is one dot-product kernel over the (i, k) pairs; fused=False gathers at most ``block_rows``
    bank rows per tile into a reused buffer and takes matrix-vector products. Backward, bank dtype == zs dtype: one
    ``embedding_bag`` (weighted row sums, grad_zs[i] = sum_k g[i, k] v_{n_ik}); otherwise each tile's gather is
    recomputed. No gathered rows are kept: only the bank (by reference) and the indices are saved for backward.
    """

    @staticmethod
    def forward(ctx, zs, memory, neg_idx, block_rows, fused):  # noqa: D102 - see class docstring
        ctx.save_for_backward(memory, neg_idx)  # the version counter catches an in-place bank update before backward
        ctx.block_rows = block_rows
        if neg_idx.numel() == 0:
            return zs.new_empty(neg_idx.shape)
        if fused:
            return _fused_gather_dot(zs.detach(), memory, neg_idx)
        return _tiled_gather_dot(zs.detach(), memory, neg_idx, block_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        memory, neg_idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_out = grad_out.contiguous()
        if memory.dtype == grad_out.dtype and neg_idx.numel():
            grad_zs = F.embedding_bag(neg_idx, memory, mode="sum", per_sample_weights=grad_out)  # B x D
        else:
            grad_zs = _tiled_gather_dot_grad(grad_out, memory, neg_idx, ctx.block_rows)
        return grad_zs, None, None, None, None


def per_sample_logits(zs: torch.Tensor, memory: torch.Tensor, neg_idx: torch.Tensor, *,
                      block_rows: int = GATHER_BLOCK_ROWS, impl: str = "auto") -> torch.Tensor:
    """(B, K) logits zs[i] . memory[neg_idx[i, k]] with autograd w.r.t. zs, without a B x K x D gather.

    Args:
        zs: (B, D) queries (z / tau).
        memory: (N, D) bank, no grad; any float dtype.
        neg_idx: (B, K) int64 slots.
        block_rows: tiled path: most bank rows gathered at once (extra memory: block_rows x D).
        impl: "fused" (needs memory.dtype == zs.dtype), "tiled", or "auto": fused, except on a CPU limited to one
            thread (``torch.get_num_threads() == 1``), where the tiled gather + matrix-vector path is faster, and for
            a bank stored in another dtype (tiled). The fused kernel is one parallel region, so it also degrades
            least when other processes compete for the cores.
    """
    if memory.requires_grad:
        raise InstdiscError("per_sample_logits: the bank must not require grad")
    if zs.dim() != 2 or neg_idx.dim() != 2 or neg_idx.shape[0] != zs.shape[0] or memory.shape[1] != zs.shape[1]:
        raise InstdiscError(f"per_sample_logits: expected zs (B, D), memory (N, D), neg_idx (B, K), got "
                            f"{tuple(zs.shape)}, {tuple(memory.shape)}, {tuple(neg_idx.shape)}")
    if int(block_rows) < 1:
        raise InstdiscError(f"block_rows must be >= 1, got {block_rows}")
    if impl not in ("auto", "fused", "tiled"):
        raise InstdiscError(f"unknown impl {impl!r}; expected auto, fused or tiled")
    can_fuse = memory.dtype == zs.dtype and _fused_available()
    if impl == "fused" and not can_fuse:
        raise InstdiscError(f"impl='fused' needs the bank dtype ({memory.dtype}) to equal zs dtype ({zs.dtype})")
    if impl == "auto":
        fused = can_fuse and not (zs.device.type == "cpu" and torch.get_num_threads() == 1)
    else:
        fused = impl == "fused"
    return _PerSampleLogits.apply(zs, memory, neg_idx.to(torch.int64).contiguous(), int(block_rows), fused)


def _finite_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the finite entries (masked in-batch columns are -inf); nan when there are none."""
    keep = torch.isfinite(logits)
    return logits.masked_fill(~keep, 0.0).sum() / keep.sum()


def _softmax_weight(pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
    """(B,) softmax probability of the positive column in [pos | neg] (1 where there is no negative)."""
    if neg is None or neg.shape[1] == 0:
        return torch.ones_like(pos)
    return (pos - torch.logaddexp(pos, torch.logsumexp(neg, dim=1))).exp()


# ---------------------------------------------------------------------------------------------------------------
# the objective
# ---------------------------------------------------------------------------------------------------------------
class Objective(nn.Module):
    """Memory bank + normaliser Z + loss (see the module docstring for the formulas).

    Args:
        n_data: N, bank slots (training-set size).
        dim: D, embedding size.
        k: K negatives per sample (ignored by loss "softmax"); 1 <= K < N.
        tau: temperature > 0.
        m: bank momentum in [0, 1).
        loss: "nce" | "infonce" | "softmax".
        negatives: "per-sample" (exact InstDisc estimator) | "shared" (one draw per batch).
        positive: "bank" (z . v_idx, reference) | "view" (z . z_pos).
        in_batch: loss "infonce" only: add the other samples of the batch as negatives (z_pos_j for positive
            "view", z_j for "bank"; samples sharing a slot with i are masked).
        z_mode, z_momentum: the normaliser Z (loss "nce"); see instdisc.normaliser.
        bank_dtype: storage dtype of the bank (float32, float64, float16, bfloat16).
        generator: only used to draw the initial bank rows.
        draw_bank: False: leave the rows undrawn (zeros), for a model whose state dict is loaded next.

    Buffers (persistent): ``bank.memory`` (N x D), ``z.log_z`` (0-dim float64, nan = unset).
    """

    def __init__(self, n_data: int, dim: int, *, k: int = 4096, tau: float = 0.07, m: float = 0.5,
                 loss: str = "nce", negatives: str = "per-sample", positive: str = "bank", in_batch: bool = False,
                 z_mode: str = "first-batch", z_momentum: float = 0.99, bank_dtype: torch.dtype = torch.float32,
                 bank_weight: float = 0.5, neighbours: int = 0, neighbour_index: str = "auto", clusters: int = 0,
                 neighbour_select: float = 1.0, generator: torch.Generator | None = None, draw_bank: bool = True) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise InstdiscError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
        if negatives not in NEGATIVES:
            raise InstdiscError(f"unknown negatives {negatives!r}; expected one of {', '.join(NEGATIVES)}")
        if positive not in POSITIVES:
            raise InstdiscError(f"unknown positive {positive!r}; expected one of {', '.join(POSITIVES)}")
        n_data, dim, k = int(n_data), int(dim), int(k)
        if n_data < 2:
            raise InstdiscError(f"n_data must be >= 2, got {n_data}")
        if loss != "softmax" and not 0 <= k < n_data:
            raise InstdiscError(f"k must satisfy 0 <= k < n_data, got k={k} with n_data={n_data}")
        if k == 0 and loss != "softmax" and not (
                loss == "infonce" and in_batch and positive in ("view", "view+bank", "neighbour", "view+neighbour")):
            raise InstdiscError("k=0 (no bank negatives) needs loss='infonce' with positive='view' and in_batch=True: "
                                "the in-batch negatives are then the only ones")
        if positive in ("neighbour", "view+neighbour") and not (loss == "infonce" and in_batch):
            raise InstdiscError(f"positive={positive!r} needs loss='infonce' and in_batch=True (its candidates are the "
                                "batch's other views)")
        if positive == "view+bank" and loss != "infonce":
            raise InstdiscError(f"positive='view+bank' needs loss='infonce', got loss={loss!r}")
        if positive == "view+bank" and not in_batch:
            raise InstdiscError("positive='view+bank' needs in_batch=True (the negatives of its view term)")
        bank_weight = float(bank_weight)
        if not 0.0 < bank_weight <= 1.0:
            raise InstdiscError(f"bank_weight must be in (0, 1], got {bank_weight}")
        tau, m = float(tau), float(m)
        if not (tau > 0.0 and math.isfinite(tau)):
            raise InstdiscError(f"tau must be a finite number > 0, got {tau}")
        if not 0.0 <= m < 1.0:
            raise InstdiscError(f"m must be in [0, 1), got {m}")
        if in_batch and loss != "infonce":
            raise InstdiscError(f"in_batch=True needs loss='infonce', got loss={loss!r} (NCE's noise must come from "
                                f"the uniform bank sampler; softmax already scores every slot)")
        self.n_data, self.dim, self.k, self.tau, self.m = n_data, dim, k, tau, m
        self.loss_name, self.negatives, self.positive, self.in_batch = loss, negatives, positive, bool(in_batch)
        self.bank_weight = bank_weight
        neighbours = int(neighbours)
        if neighbours < 0:
            raise InstdiscError(f"neighbours must be >= 0, got {neighbours}")
        if neighbours and not (loss == "infonce" and positive in ("bank", "view+bank") and k > 0):
            raise InstdiscError("neighbours > 0 needs loss='infonce', positive 'bank' or 'view+bank' and k > 0 (they "
                                "join the bank term's positive)")
        self.bank = self._make_bank(n_data, dim, bank_dtype, generator, draw_bank)
        self.z = NormaliserZ(z_mode, z_momentum)
        # N x k_nb table of each slot's nearest stored rows (GLOBAL N: every process holds all of it)
        clusters = int(clusters)
        if clusters and not (loss == "infonce" and in_batch and positive in ("view", "view+bank")):
            raise InstdiscError("clusters > 0 needs loss='infonce', in_batch=True and positive 'view' or 'view+bank' "
                                "(same-cluster samples of the batch join the view term's positive)")
        self.neighbours = (BankNeighbours(n_data, neighbours, index=neighbour_index, clusters=clusters,
                                          select=neighbour_select) if neighbours or clusters else None)

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, dim={self.dim}, k={self.k}, tau={self.tau}, m={self.m}, "
                f"loss={self.loss_name!r}, negatives={self.negatives!r}, positive={self.positive!r}, "
                f"in_batch={self.in_batch}, neighbours={self.neighbours.k if self.neighbours is not None else 0}")

    def _make_bank(self, n_data: int, dim: int, dtype: torch.dtype, generator: torch.Generator | None,
                   draw: bool) -> MemoryBank:
        """The bank module. A hook: instdisc.distributed.ShardedObjective returns one rank's shard instead."""
        return MemoryBank(n_data, dim, dtype=dtype, generator=generator, draw=draw)

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor, idx: torch.Tensor, *, z_pos: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                observe_z: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one batch.

        Args:
            z: (B, D) unit embeddings (with grad).
            idx: (B,) int64 bank slots of the samples.
            z_pos: (B, D) the other view's embeddings; required unless positive == "bank".
            generator: draws the negatives.
            observe_z: loss "nce" only: update the Z estimate from this batch (see module docstring).

        Returns:
            (loss, stats) with stats as floats: ``pos_sim`` the mean positive cosine z . v (or z . z_pos; for
            "neighbour" the anchor's), ``neg_sim`` the mean over the bank negatives (all non-target slots for
            "softmax"; nan without bank negatives), ``log_z`` the current log Z (nan when unset or unused),
            ``own_sim`` the mean cosine z_i . v_idx_i with the sample's own row before this step's update (how
            stale the bank is for this batch), ``inbatch_sim`` the mean over the in-batch negatives (nan without),
            ``bank_share`` per sample the share of the softmax weight on negatives (the negatives' side of the
            gradient) that falls on bank rows, averaged over the batch (1 for NCE and softmax, 0 with K = 0).
        """
        idx = self._check_inputs(z, idx, z_pos)
        rows = self._bank_rows(idx)  # (B,) the batch's rows in this bank
        zs = z * (1.0 / self.tau)  # B x D, every logit is zs . v
        own = (zs * self.bank.memory.index_select(0, rows).to(z.dtype)).sum(dim=1)  # B, z_i . v_idx_i / tau
        if self.positive in ("neighbour", "view+neighbour"):  # anchor: the nearest other bank row to z (NNCLR)
            anchor = self._nearest_rows(z.detach(), idx).to(z.dtype) * (1.0 / self.tau)  # B x D, no grad
            loss, stats = self._neighbour_loss(anchor, zs, z_pos, own, idx)
            if self.positive == "view+neighbour":
                view = info_nce_loss((zs * z_pos).sum(dim=1), self._in_batch_logits(zs, z_pos, idx))
                loss = (1.0 - self.bank_weight) * view + self.bank_weight * loss
            return loss, stats
        nan = zs.new_tensor(float("nan"))
        own_set, nb_sum, nb_count = own, nan, nan  # own_set (B): the bank term's positive, z_i . v_idx_i or
        # log-sum-exp over {i} ∪ N(i); nb_sum / nb_count: the mean logit of the neighbours present
        if self.neighbours is not None and self.neighbours.ready and self.neighbours.k:
            nb_slots = self.neighbours.of(idx)  # B x k_nb GLOBAL slots, -1: none (not found or not selected)
            nb_logits = self._slot_logits(zs, nb_slots.clamp(min=0))  # B x k_nb, z_i . v_j / tau, j in N(idx_i)
            present = nb_slots >= 0  # B x k_nb
            nb_logits = nb_logits.masked_fill(~present, -float("inf"))  # absent neighbours leave the set
            own_set = torch.logsumexp(torch.cat([own[:, None], nb_logits], dim=1), dim=1)  # B
            nb_sum = nb_logits.detach().masked_fill(~present, 0.0).sum() / present.shape[0]  # per sample
            nb_count = present.sum() / present.shape[0]  # per sample: a ratio of two means sums over ranks exactly
        pos = own_set if self.positive == "bank" else (zs * z_pos).sum(dim=1)  # B
        inb_mean, bank_share = nan, zs.new_tensor(1.0)

        if self.loss_name == "softmax":
            loss, neg_mean = self._softmax(zs, pos, rows)
        else:
            neg = self._negative_logits(zs, generator) if self.k else zs.new_empty(zs.shape[0], 0)  # B x K
            if self.loss_name == "nce":
                if observe_z:
                    self.z.observe((pos.detach(), neg.detach()), self.n_data)
                if not self.z.is_set:
                    raise InstdiscError("the NCE normaliser Z is unset (log_z is nan); call forward with "
                                        "observe_z=True at least once or load a checkpoint that has it")
                loss = nce_loss(pos, neg, self.z.log_z, self.n_data)
            else:
                inb = None
                if self.in_batch:
                    other = z if self.positive == "bank" else z_pos  # B x D
                    inb = self._in_batch_logits(zs, other, idx)  # B x B' (-inf: the sample itself)
                    inb_mean = _finite_mean(inb.detach())
                    if self.neighbours is not None and self.neighbours.clusters and self.neighbours.ready:
                        pos, inb = self._cluster_positives(pos, inb, idx)  # B (set positive), B x B' (the rest)
                if self.positive == "view+bank" and self.k:  # two softmaxes: fresh vs fresh, bank vs bank
                    w = self.bank_weight
                    loss = (1.0 - w) * info_nce_loss(pos, inb) + w * info_nce_loss(own_set, neg)
                    with torch.no_grad():
                        neg_w_bank = w * (1.0 - _softmax_weight(own_set, neg))  # B, the bank term's negative weight
                        neg_w_view = (1.0 - w) * (1.0 - _softmax_weight(pos, inb))  # B
                        bank_share = (neg_w_bank / (neg_w_bank + neg_w_view).clamp(min=1e-30)).mean()
                else:
                    all_neg = neg if inb is None else torch.cat([neg, inb], dim=1)  # B x (K + B')
                    loss = info_nce_loss(pos, all_neg)
                    if inb is not None:
                        with torch.no_grad():
                            lse_bank = torch.logsumexp(neg.detach(), dim=1) if self.k else None  # B
                            lse_all = torch.logsumexp(all_neg.detach(), dim=1)  # B
                            bank_share = (lse_bank - lse_all).exp().mean() if self.k else zs.new_tensor(0.0)
            neg_mean = neg.detach().mean() if self.k else nan

        values = torch.stack([loss.detach().float(), pos.detach().float().mean(), neg_mean.float(),
                              own.detach().float().mean(), inb_mean.float(), bank_share.float(), nb_sum.float(),
                              nb_count.float()])
        loss_v, pos_v, neg_v, own_v, inb_v, share_v, nb_s, nb_c = self._mean_stats(values).tolist()
        nb_v = nb_s / nb_c if nb_c > 0 else float("nan")
        log_z = float(self.z.log_z) if self.loss_name == "nce" else float("nan")
        stats = {"loss": loss_v, "pos_sim": pos_v * self.tau, "neg_sim": neg_v * self.tau, "log_z": log_z,
                 "own_sim": own_v * self.tau, "inbatch_sim": inb_v * self.tau, "bank_share": share_v,
                 "neighbour_sim": nb_v * self.tau}
        return loss, stats

    def _cluster_positives(self, pos: torch.Tensor, inb: torch.Tensor, idx: torch.Tensor):
        """Move the in-batch columns of the sample's cluster into its positive: (log-sum-exp over {pos} ∪ same-
        cluster columns (B,), the other columns (B, B') with the moved ones at -inf)."""
        assign = self.neighbours.assign
        mine = assign.index_select(0, idx)  # B
        cols = assign.index_select(0, self._batch_slots(idx))  # B', the cluster of every in-batch column
        same = (mine[:, None] == cols[None, :]) & (mine[:, None] >= 0) & torch.isfinite(inb)  # B x B'
        pos_set = torch.logsumexp(torch.cat([pos[:, None], inb.masked_fill(~same, float("-inf"))], dim=1), dim=1)
        return pos_set, inb.masked_fill(same, float("-inf"))

    def _neighbour_loss(self, anchor, zs, z_pos, own, idx):
        """InfoNCE of the anchor NN(z_i) against the batch's other views: target z_pos_i, candidates z_pos_j."""
        pos = (anchor * z_pos).sum(dim=1)  # B
        inb = self._in_batch_logits(anchor, z_pos, idx)  # B x B'
        loss = info_nce_loss(pos, inb)
        nan = zs.new_tensor(float("nan"))
        values = torch.stack([loss.detach().float(), pos.detach().float().mean(), nan.float(),
                              own.detach().float().mean(), _finite_mean(inb.detach()).float(), nan.float()])
        loss_v, pos_v, _, own_v, inb_v, _ = self._mean_stats(values).tolist()
        return loss, {"loss": loss_v, "pos_sim": pos_v * self.tau, "neg_sim": float("nan"), "log_z": float("nan"),
                      "own_sim": own_v * self.tau, "inbatch_sim": inb_v * self.tau, "bank_share": float("nan"),
                      "neighbour_sim": float("nan")}

    @torch.no_grad()
    def _nearest_rows(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, D): for each query q_i (B x D) the bank row most similar to it among the slots other than idx_i
        (ties: the lowest slot), scored NEAREST_BLOCK_ROWS rows at a time."""
        memory = self.bank.memory
        work = torch.float64 if memory.dtype == torch.float64 else torch.float32
        q = q.to(device=memory.device, dtype=work)
        best = torch.full((q.shape[0],), float("-inf"), dtype=work, device=memory.device)  # B
        arg = torch.zeros(q.shape[0], dtype=torch.int64, device=memory.device)  # B
        for s in range(0, memory.shape[0], NEAREST_BLOCK_ROWS):
            block = memory[s:s + NEAREST_BLOCK_ROWS].to(work)  # R x D
            sims = q @ block.T  # B x R
            own = idx - s  # B, the own slot's column in this block
            inside = (own >= 0) & (own < block.shape[0])
            sims[inside.nonzero().squeeze(1), own[inside]] = float("-inf")
            val, col = sims.max(dim=1)  # B, first maximum: the lowest slot among ties
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, col + s, arg)
        return memory.index_select(0, arg).to(work)

    # Hooks that instdisc.distributed.ShardedObjective overrides for one rank's shard of the bank.
    def _slot_logits(self, zs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, J) logits zs_i . v_{slots[i, j]} with autograd w.r.t. zs; ``slots`` (B, J) GLOBAL slots."""
        return per_sample_logits(zs, self.bank.memory, slots)

    def _batch_slots(self, idx: torch.Tensor) -> torch.Tensor:
        """(B',) the slots of the in-batch columns (a sharded objective's columns are the global batch)."""
        return idx

    def _whole_bank(self) -> torch.Tensor:
        """The (N, D) bank in global slot order (a sharded objective gathers it from every rank)."""
        return self.bank.memory

    def _bank_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) rows of this module's bank holding slots ``idx``."""
        return idx

    def _softmax(self, zs: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor):
        """(loss, mean non-target logit) of the cross entropy over all N slots, the target being the own slot."""
        logits = zs @ self.bank.memory.to(zs.dtype).T  # B x N
        if self.positive == "view":
            logits = logits.scatter(1, rows[:, None], pos[:, None])
        loss = full_softmax_loss(logits, rows)
        with torch.no_grad():
            n_other = max(self.n_data - 1, 1)
            neg_mean = (logits.sum() - logits.gather(1, rows[:, None]).sum()) / (rows.numel() * n_other)
        return loss, neg_mean

    def _in_batch_logits(self, zs: torch.Tensor, other: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, B) logits zs . other_j, -inf where sample j has the same slot as i (itself and duplicates)."""
        extra = zs @ other.T  # B x B
        same = idx[:, None] == idx[None, :]  # B x B
        return extra.masked_fill(same, float("-inf"))

    def _mean_stats(self, values: torch.Tensor) -> torch.Tensor:
        """Batch statistics (loss, mean positive, mean negative logit) as reported: this batch's."""
        return values

    def _negative_logits(self, zs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        memory = self.bank.memory
        b = zs.shape[0]
        if self.negatives == "shared":
            neg_idx = self.bank.sample(b, self.k, mode="shared", generator=generator)  # K
            v_neg = memory.index_select(0, neg_idx).to(zs.dtype)  # K x D
            return zs @ v_neg.T  # B x K
        neg_idx = self.bank.sample(b, self.k, mode="per-sample", generator=generator)  # B x K
        return per_sample_logits(zs, memory, neg_idx)  # B x K

    def _check_inputs(self, z: torch.Tensor, idx: torch.Tensor, z_pos: torch.Tensor | None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise InstdiscError(f"z must be (B, {self.dim}), got {tuple(z.shape)}")
        if idx.dim() != 1 or idx.shape[0] != z.shape[0]:
            raise InstdiscError(f"idx must be ({z.shape[0]},) to match z, got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise InstdiscError(f"idx must be an integer tensor, got {idx.dtype}")
        if z.shape[0] == 0:
            raise InstdiscError("empty batch: z has 0 rows")
        lo, hi = torch.aminmax(idx)
        if int(lo) < 0 or int(hi) >= self.n_data:
            raise InstdiscError(f"idx out of range [0, {self.n_data}): min {int(lo)}, max {int(hi)}")
        if self.positive != "bank":
            if z_pos is None:
                raise InstdiscError(f"positive={self.positive!r} needs z_pos (the other view's embeddings)")
            if tuple(z_pos.shape) != tuple(z.shape):
                raise InstdiscError(f"z_pos must have the shape of z {tuple(z.shape)}, got {tuple(z_pos.shape)}")
        elif z_pos is not None:
            raise InstdiscError("z_pos was given but positive='bank' (the positive is the bank row)")
        return idx.to(device=self.bank.memory.device, dtype=torch.int64)

    # ------------------------------------------------------------------ state changes
    @torch.no_grad()
    def update(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Bank rows idx <- normalise(m v + (1 - m) z); call after ``optimizer.step()`` (see MemoryBank.update)."""
        self.bank.update(idx, z, self.m)

    @torch.no_grad()
    def refresh_neighbours(self, *, seed: int = 0) -> dict:
        """Search the bank for every slot's k_nb nearest other rows and replace the neighbour table (see
        BankNeighbours.refresh for the returned stats). A collective in a distributed run."""
        if self.neighbours is None:
            raise InstdiscError("refresh_neighbours: this objective has no neighbour table (neighbours=0)")
        return self.neighbours.refresh(self._whole_bank(), seed=seed)

    @torch.no_grad()
    def init_bank(self, z_all: torch.Tensor) -> None:
        """Set every bank row from (N, D) embeddings (normalised)."""
        self.bank.init_from(z_all)
