"""Multi-process training (torchrun, DDP) with a memory bank sharded over the processes.

``torchrun --nproc_per_node W instdisc train ...`` runs the ordinary training loop in W processes; the loop asks
:class:`DistributedRun` (None in a single process) for the sharded pieces. Module map (tests: tests/test_distributed.py
without a process group, tests/test_distributed_train.py with 2 CPU processes):

  partition.py  StridedPartition: slot g lives on rank g % W (pure index arithmetic)
  bank.py       ShardedBank: one rank's N/W rows, drawn exactly as rows of the single-process bank
  objective.py  ShardedObjective: the InstDisc losses over a sharded bank (negatives all-reduced / all-gathered)
  comm.py       collectives, with gradients where rows travel between ranks
  data.py       ShardedBatches: each rank trains on its own slots, reshuffled every epoch
  knn.py        per-shard kNN search merged across ranks; the training-time kNN monitor
  session.py    DistributedRun: process group, DDP, checkpoints (bank gathered on rank 0), resume rules
"""
from .bank import ShardedBank, draw_shard
from .knn import DistributedKnnMonitor, merge_topk, sharded_search
from .objective import ShardedObjective
from .partition import StridedPartition
from .session import DistributedRun, launched_world_size, resume_position

__all__ = ["DistributedKnnMonitor", "DistributedRun", "ShardedBank", "ShardedObjective", "StridedPartition",
           "draw_shard", "launched_world_size", "merge_topk", "resume_position", "sharded_search"]
