"""Multi-process training (torchrun, DDP) with a memory bank sharded over the processes.

``torchrun --nproc_per_node W instdisc train ...`` runs the ordinary training loop in W processes with
:class:`DistributedRun` as its run strategy (instdisc.training.strategy), which supplies the sharded pieces. Module map (tests: tests/test_distributed.py
without a process group, tests/test_distributed_train.py with 2 CPU processes):

  partition.py  StridedPartition: slot g lives on rank g % W (pure index arithmetic)
  bank.py       ShardedBank: one rank's N/W rows, drawn exactly as rows of the single-process bank
  objective.py  ShardedObjective: the InstDisc losses over a sharded bank (negatives all-reduced / all-gathered)
  comm.py       collectives, with gradients where rows travel between ranks
  data.py       ShardedBatches: training.batches.Batches for one rank (its slots, its seeds)
  knn.py        per-shard kNN search merged across ranks; training.knn_monitor.KnnMonitor over a sharded bank
  session.py    DistributedRun: training.strategy.SingleProcess for W processes (process group, DDP, collectives,
                checkpoints with the bank gathered on rank 0)
"""
from .bank import ShardedBank, draw_shard
from .knn import DistributedKnnMonitor, merge_topk, sharded_search
from .objective import ShardedObjective
from .partition import StridedPartition
from .session import DistributedRun

__all__ = ["DistributedKnnMonitor", "DistributedRun", "ShardedBank", "ShardedObjective", "StridedPartition",
           "draw_shard", "merge_topk", "sharded_search"]
