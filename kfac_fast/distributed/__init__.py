"""Data-parallel K-FAC over torch.distributed: factor averaging and shared-out inversions.

Each rank captures statistics of its own shard of the batch; the gradients are averaged
before K-FAC sees them (by DistributedDataParallel, or by the user, e.g. with
`average_gradients_`). What this package adds on top of the single-process preconditioner:

- factor averaging: the packed upper triangles (`ops.pack_triangles`) of all factors are
  averaged with a few flattened, bucketed all-reduces, never one per layer. Per-rank A
  uses 1/R_local and G (with loss_average="batch") is per-example, so the average of
  equal-size shards is exactly the factor of the global batch. Because the zero-debiased
  running average is linear, averaging only before an inversion (`factor_sync="inverse"`,
  as kfac-jax does) gives the same factors at inversion time as averaging after every
  update (`factor_sync="update"`), with `inv_update_steps / factor_update_steps` times
  fewer collectives; the price is that between inversions each rank holds its own local
  factors (a checkpoint then averages them first, which is why `state_dict` is collective).
- inversion work: decompositions are assigned by a greedy least-loaded rule on their
  cost n^3, computed by their owner only.
- two strategies, named after what they save:
  "communication" (communication-optimal): owners broadcast eigenbases / inverses in
  buckets; every rank preconditions every layer (no per-step collective from K-FAC).
  "memory" (memory-optimal): a layer's A and G have one owner, which alone keeps its
  decomposition and preconditions it; the preconditioned gradients are broadcast in
  buckets every step (as much traffic as DDP's gradient all-reduce).

Every collective is issued in the same order on every rank from rank-identical metadata
(registration order, sizes, update counts): no decision depends on tensor values, so a
rank cannot wait on a collective the others skip.

What decides a collective is agreed first: the settings and layers at construction (a
mismatch is a ValueError on every rank), and each step the layers that fired and hold
factors on any rank (one small host all-reduce, `participation`), so a layer that fires
on one rank only, or a local failure inside a step, cannot make the ranks' collectives
differ. `DistributedOptions(timeout=...)` bounds how long a rank waits for the others.

Modules: `collectives` (bucketed all-reduce and broadcast), `assignment` (which rank
decomposes which factor), `options` (DistributedOptions), `entry` (`setup`: whether a
preconditioner runs data-parallel), `data_parallel` (DataParallelKFAC, the driver),
`agreement` (settings check, host-side agreements, error messages), `participation`
(which layers took part on which ranks), `weighting` (ranks weighted by their rows and
examples when factors are averaged), `sharded_grads` (FSDP2: the sharding check, whole
gradients gathered for "communication"), `sharded_memory` (FSDP2 under "memory": factors
reduced to owners, gradients gathered to and scattered from them), `owned` (an owner's
preconditioning), `checkpoint_sync` (what synced state dicts gather and loads keep), `dcp`
(`KFACState`: K-FAC state in torch.distributed.checkpoint checkpoints, sharded under "memory"),
`dcp_planner` (`WeightsOnlyLoadPlanner`: dcp.load without unpickling code, kfac_fast's errors).
"""

from .agreement import check_same_layers, settings_of
from .assignment import assign_work, decomposition_cost, factor_owners, load_imbalance, rank_loads
from .collectives import (
    DEFAULT_BUCKET_CAP_MB,
    allreduce_factors_,
    average_gradients_,
    broadcast_from_owners_,
)
from .data_parallel import DataParallelKFAC
from .dcp import KFACState
from .entry import resolve_group, setup
from .options import FACTOR_SYNCS, STRATEGIES, DistributedOptions
from .sharded_grads import ShardedGrads, check_sharding
from .sharded_memory import ShardedMemory


def __getattr__(name: str) -> type:
    """`WeightsOnlyLoadPlanner` (kfac_fast.distributed.dcp), built on first use: it subclasses
    DCP's DefaultLoadPlanner, and importing torch.distributed.checkpoint costs about 0.6 s."""
    if name == "WeightsOnlyLoadPlanner":
        from . import dcp
        return dcp._weights_only_planner()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "FACTOR_SYNCS",
    "STRATEGIES",
    "ShardedGrads",
    "ShardedMemory",
    "DataParallelKFAC",
    "DistributedOptions",
    "KFACState",
    "WeightsOnlyLoadPlanner",
    "allreduce_factors_",
    "assign_work",
    "average_gradients_",
    "broadcast_from_owners_",
    "check_same_layers",
    "check_sharding",
    "decomposition_cost",
    "factor_owners",
    "load_imbalance",
    "rank_loads",
    "resolve_group",
    "settings_of",
    "setup",
]
