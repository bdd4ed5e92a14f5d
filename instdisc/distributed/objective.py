"""The InstDisc objective over a bank sharded across ranks. Covered by tests/test_distributed_train.py (against the
single-process :class:`~instdisc.objective.Objective` on the concatenated batch) and tests/test_distributed.py.

Every rank holds the slots of its partition (``ShardedBank``, ``N / W`` rows) and trains on exactly those samples,
so positives are local. Negatives are drawn with the generator the loop seeds identically on every rank, with the
same call a single process makes for the global batch, so the negative SLOTS are identical to a single-process run;
only the rows travel:

    shared       K slots (K,). Each rank fills the rows it owns into a zero (K, D) buffer; one all-reduce (sum; one
                 rank contributes each row, so the sum is exact) gives every rank the K x D rows. Traffic: K x D.
    per-sample   (W*B, K) slots for the global batch. The W*B queries are all-gathered (with gradient); each rank
                 scores the entries whose slot it owns (ragged embedding-bag kernels, nothing B x K x D is gathered)
                 into a zero (W*B, K) grid; an all-reduce sums the grids and each rank keeps its B rows. Traffic:
                 W*B x D queries and W*B x K logits (and the same again in backward), never bank rows.
    softmax      the W*B queries are all-gathered; each rank scores them against its N/W rows and the per-rank
                 log-sum-exps are combined (with gradient) into the log-sum-exp over all N slots.
    in-batch     (infonce) the other views of the GLOBAL batch are all-gathered with gradient: every sample sees the
                 W*B - 1 other samples as extra negatives, as in a single process with batch W*B.
    NCE's Z      estimated from the logits of the global batch (per-rank log-sum-exps combined), so log Z is the
                 same on every rank.
    neighbours   the (N, k_nb) table is held whole by every rank. A refresh all-gathers the shards into the full
                 N x D bank (global slot order) and every rank runs the same search on it, so every rank holds the
                 table a single process computes. The neighbour rows of a step are scored like per-sample
                 negatives: the global batch's (W*B, k_nb) slots, each entry by the rank that owns it.

The loss each rank returns is the mean over its own B samples; with DDP averaging the parameter gradients, the
update is that of the global-batch mean loss. ``stats`` are averaged over ranks (global-batch values).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch.autograd.function import once_differentiable

from ..errors import InstdiscError
from ..normaliser import NormaliserZ
from ..objective import GATHER_BLOCK_ROWS, NEAREST_BLOCK_ROWS, Objective, _fused_available
from . import comm
from .bank import ShardedBank
from .partition import StridedPartition

__all__ = ["ShardedObjective", "ShardedNormaliserZ", "owned_logits"]


class ShardedNormaliserZ(NormaliserZ):
    """NormaliserZ whose batch estimate pools the logits of every rank (same log Z everywhere)."""

    @torch.no_grad()
    def observe(self, logits, n_data: int) -> None:
        if self.mode == "first-batch" and self.is_set:
            return
        parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        parts = [p.detach().reshape(-1) for p in parts if p.numel() > 0]
        work = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        lse = torch.stack([torch.logsumexp(p.to(work), dim=0) for p in parts]).logsumexp(dim=0)  # 0-dim, local
        local = torch.stack([lse.double(), torch.tensor(float(sum(p.numel() for p in parts)), dtype=torch.float64,
                                                          device=lse.device)])  # (2,) [lse, count]
        every = comm.all_gather_tensor(local[None])  # (W, 2)
        count = float(every[:, 1].sum())
        # log(N mean exp(l)) over all ranks' logits = lse_all - log(count) + log(N); handed to NormaliserZ as the
        # one-entry "batch" [lse_all - log(count)], whose estimate is exactly that, so the update rule is shared.
        pooled = (every[:, 0].logsumexp(dim=0) - math.log(count)).reshape(1)
        super().observe(pooled, n_data)


class _OwnedLogits(torch.autograd.Function):
    """(R, K) grid: entry (i, k) = zs[i] . bank[local(neg[i, k])] where this rank owns the slot, else 0."""

    @staticmethod
    def forward(ctx, zs, memory, rows, cols, flat, offsets, shape):  # noqa: D102 - see owned_logits
        ctx.save_for_backward(memory, rows, flat, offsets, cols)
        ctx.shape = shape
        out = zs.new_zeros(shape)  # R x K
        if flat.numel() == 0:
            return out
        if memory.dtype == zs.dtype and _fused_available():
            vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                zs.detach().contiguous(), memory, flat, offsets, rows, 0, -1)  # (M,) dot products, one kernel
        else:
            vals = torch.empty(flat.numel(), dtype=zs.dtype, device=zs.device)
            for s in range(0, flat.numel(), GATHER_BLOCK_ROWS):
                e = s + GATHER_BLOCK_ROWS
                v = memory.index_select(0, flat[s:e]).to(zs.dtype)  # c x D
                vals[s:e] = (zs.detach().index_select(0, rows[s:e]) * v).sum(dim=1)
        out[rows, cols] = vals
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        memory, rows, flat, offsets, cols = ctx.saved_tensors
        r = ctx.shape[0]
        g = grad[rows, cols].contiguous()  # (M,)
        if flat.numel() == 0:
            return grad.new_zeros(r, memory.shape[1]), None, None, None, None, None, None
        if memory.dtype == g.dtype:
            # grad_zs[i] = sum over owned k of g[i, k] v_{neg[i, k]}: one ragged embedding bag per query
            grad_zs = F.embedding_bag(flat, memory, offsets, mode="sum", per_sample_weights=g)  # R x D
        else:
            grad_zs = torch.zeros(r, memory.shape[1], dtype=g.dtype, device=g.device)
            for s in range(0, flat.numel(), GATHER_BLOCK_ROWS):
                e = s + GATHER_BLOCK_ROWS
                v = memory.index_select(0, flat[s:e]).to(g.dtype)  # c x D
                grad_zs.index_add_(0, rows[s:e], v * g[s:e, None])
        return grad_zs, None, None, None, None, None, None


def owned_logits(zs: torch.Tensor, memory: torch.Tensor, neg_idx: torch.Tensor,
                 partition: StridedPartition) -> torch.Tensor:
    """(R, K) logits zs[i] . v_{neg_idx[i, k]} for the slots this rank owns, 0 elsewhere; autograd w.r.t. zs.

    zs: (R, D) queries; memory: this rank's (n_r, D) shard; neg_idx: (R, K) GLOBAL slots."""
    mask = partition.owner(neg_idx) == partition.rank  # R x K
    rows, cols = mask.nonzero(as_tuple=True)  # (M,) each, row-major: the bags are contiguous
    flat = partition.to_local(neg_idx[rows, cols]).contiguous()  # (M,) local rows
    counts = mask.sum(dim=1)  # (R,)
    offsets = torch.cumsum(counts, 0) - counts  # (R,) start of every query's bag
    return _OwnedLogits.apply(zs, memory, rows, cols, flat, offsets, tuple(neg_idx.shape))


class ShardedObjective(Objective):
    """:class:`~instdisc.objective.Objective` for one rank of a sharded bank (see the module docstring).

    Same arguments as Objective (``n_data`` is the GLOBAL N) plus ``partition``. ``forward``/``update`` take
    GLOBAL slot numbers, which must belong to this rank. ``forward`` needs the ``generator`` (seeded identically on
    every rank) and is a collective: every rank calls it in the same order with the same batch size.
    """

    def __init__(self, n_data: int, dim: int, *, partition: StridedPartition, **kwargs) -> None:
        if partition.n != int(n_data):
            raise InstdiscError(f"partition of {partition.n} slots does not match n_data={n_data}")
        self._init_partition = partition  # read by _make_bank during Objective.__init__
        super().__init__(n_data, dim, **kwargs)
        self.partition = partition
        self.z = ShardedNormaliserZ(self.z.mode, self.z.momentum)

    def _make_bank(self, n_data, dim, dtype, generator, draw):
        return ShardedBank(self._init_partition, dim, dtype=dtype, generator=generator, draw=draw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shard={self.partition.size} rows on rank {self.partition.rank} " \
                                      f"of {self.partition.world}"

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor, idx: torch.Tensor, *, z_pos: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                observe_z: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of this rank's batch (mean over its B samples) and stats averaged over ranks; see Objective.

        ``idx`` are GLOBAL slots owned by this rank; a collective (every rank calls it alike)."""
        if generator is None and self.loss_name != "softmax":
            raise InstdiscError("a sharded objective needs the negatives' generator, seeded alike on every rank")
        return super().forward(z, idx, z_pos=z_pos, generator=generator, observe_z=observe_z)

    def _slot_logits(self, zs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(B, J) logits zs_i . v_{slots[i, j]} for this rank's B samples (``slots`` GLOBAL); a collective."""
        p, b = self.partition, zs.shape[0]
        slots_all = comm.all_gather_tensor(slots.to(self.bank.memory.device))  # (W*B, J) global slots
        zs_all = comm.gather_with_grad(zs)  # W*B x D
        grid = owned_logits(zs_all, self.bank.memory, slots_all, p)  # W*B x J, this rank's entries
        grid = comm.all_reduce_with_grad(grid)  # every entry from its one owner
        return grid[p.rank * b:(p.rank + 1) * b]  # B x J

    @torch.no_grad()
    def _whole_bank(self) -> torch.Tensor:
        """(N, D) the full bank in global slot order on every rank (the shards all-gathered); a collective."""
        p, memory = self.partition, self.bank.memory
        padded = memory.new_zeros(p.max_size, memory.shape[1])  # max_size x D
        padded[:memory.shape[0]] = memory
        every = comm.all_gather_tensor(padded).view(p.world, p.max_size, memory.shape[1])  # W x max_size x D
        return p.interleave(every)

    def _bank_rows(self, idx: torch.Tensor) -> torch.Tensor:
        self.partition.check_owned(idx)
        return self.partition.to_local(idx)  # (B,) rows of this rank's shard

    def _in_batch_logits(self, zs: torch.Tensor, other: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, W*B): the other views of the GLOBAL batch, gathered with gradient, as extra negatives."""
        other = comm.gather_with_grad(other)  # W*B x D
        idx_all = comm.all_gather_tensor(idx)  # (W*B,)
        extra = zs @ other.T  # B x W*B
        same = idx[:, None] == idx_all[None, :]  # B x W*B, the sample itself (and duplicates)
        return extra.masked_fill(same, float("-inf"))

    def _batch_slots(self, idx: torch.Tensor) -> torch.Tensor:
        return comm.all_gather_tensor(idx)  # (W*B,) the global batch's slots, the columns of _in_batch_logits

    def _mean_stats(self, values: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_(values) / self.partition.world  # global-batch values

    @torch.no_grad()
    def _nearest_rows(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The single-process search over the whole bank (nearest other slot, ties: the lowest slot): every rank
        scores the GLOBAL batch's queries against its shard, then the best (similarity, slot) wins across ranks and
        its owner supplies the row (the others add +0: exact). A collective."""
        p, b, memory = self.partition, q.shape[0], self.bank.memory
        work = torch.float64 if memory.dtype == torch.float64 else torch.float32
        q_all = comm.all_gather_tensor(q.to(device=memory.device, dtype=work))  # W*B x D
        idx_all = comm.all_gather_tensor(idx.to(memory.device))  # (W*B,) global slots
        slots = p.owned(device=memory.device)  # (n_r,) global slots in local-row order (increasing)
        best = torch.full((q_all.shape[0],), float("-inf"), dtype=work, device=memory.device)  # W*B
        arg = torch.full((q_all.shape[0],), p.n, dtype=torch.int64, device=memory.device)  # W*B, global slot
        for s in range(0, memory.shape[0], NEAREST_BLOCK_ROWS):
            block = memory[s:s + NEAREST_BLOCK_ROWS].to(work)  # R x D
            sims = q_all @ block.T  # W*B x R
            sims.masked_fill_(slots[s:s + block.shape[0]][None, :] == idx_all[:, None], float("-inf"))
            val, col = sims.max(dim=1)  # first maximum: the lowest slot of this block among ties
            better = val > best
            best = torch.where(better, val, best)
            arg = torch.where(better, slots[s:s + block.shape[0]][col], arg)
        top = best.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)  # W*B, the best similarity over every shard
        win = torch.where(best == top, arg, torch.full_like(arg, p.n))
        dist.all_reduce(win, op=dist.ReduceOp.MIN)  # W*B, the lowest slot holding it
        rows = torch.zeros(q_all.shape[0], memory.shape[1], dtype=work, device=memory.device)  # W*B x D
        mine = p.owner(win) == p.rank
        rows[mine] = memory.index_select(0, p.to_local(win[mine])).to(work)
        comm.all_reduce_(rows)
        return rows[p.rank * b:(p.rank + 1) * b]

    def _draw(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Global slots, uniform with replacement: the very call MemoryBank.sample makes in a single process."""
        return torch.randint(0, self.n_data, shape, generator=generator,
                             device=generator.device).to(self.bank.memory.device)

    def _negative_logits(self, zs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        memory, p = self.bank.memory, self.partition
        b = zs.shape[0]
        if self.negatives == "shared":
            neg_idx = self._draw((self.k,), generator)  # (K,) global
            mine = p.owner(neg_idx) == p.rank  # (K,)
            v_neg = torch.zeros(self.k, self.dim, dtype=zs.dtype, device=memory.device)  # K x D
            v_neg[mine] = memory.index_select(0, p.to_local(neg_idx[mine])).to(zs.dtype)
            comm.all_reduce_(v_neg)  # every row from its one owner, the others add +0: exact
            return zs @ v_neg.to(zs.device).T  # B x K
        neg_idx = self._draw((p.world * b, self.k), generator)  # (W*B, K) global, the global batch's draw
        zs_all = comm.gather_with_grad(zs)  # W*B x D
        grid = owned_logits(zs_all, memory, neg_idx, p)  # W*B x K, this rank's entries
        grid = comm.all_reduce_with_grad(grid)  # every entry from its one owner
        return grid[p.rank * b:(p.rank + 1) * b]  # B x K

    def _softmax(self, zs: torch.Tensor, pos: torch.Tensor, local: torch.Tensor):  # local: this shard's rows
        """Cross entropy over all N slots; the partition function combines every rank's shard."""
        p, b = self.partition, zs.shape[0]
        zs_all = comm.gather_with_grad(zs)  # W*B x D
        logits = zs_all @ self.bank.memory.to(zs.dtype).T  # W*B x n_r
        mine = torch.arange(p.rank * b, (p.rank + 1) * b, device=logits.device)  # this rank's rows
        if self.positive == "view":  # the positive column of a sample lives on its own rank
            logits = logits.index_put((mine, local), pos)
        lse_all = comm.gather_with_grad(torch.logsumexp(logits, dim=1)[None])  # W x W*B
        lse = torch.logsumexp(lse_all, dim=0)[p.rank * b:(p.rank + 1) * b]  # (B,) over all N slots
        tgt = logits[mine, local]  # (B,)
        loss = (lse - tgt).mean()
        with torch.no_grad():  # this rank's share of the mean non-target logit over the global batch
            n_other = max(self.n_data - 1, 1)
            neg_mean = (logits.sum() - tgt.sum()) / (b * n_other)  # averaged over ranks: the global mean
        return loss, neg_mean

    # ------------------------------------------------------------------ state changes
    @torch.no_grad()
    def update(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """Rows of the GLOBAL slots idx (this rank's) <- normalise(m v + (1 - m) z)."""
        idx = idx.to(device=self.bank.memory.device, dtype=torch.int64)
        self.partition.check_owned(idx)
        self.bank.update(self.partition.to_local(idx), z, self.m)

    @torch.no_grad()
    def init_bank(self, z_all: torch.Tensor) -> None:
        """Set this rank's rows from (n_r, D) embeddings of its slots, in local-row order (``partition.owned()``)."""
        self.bank.init_from(z_all)
