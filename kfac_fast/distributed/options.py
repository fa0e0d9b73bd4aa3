"""What a user can ask of data-parallel K-FAC: strategy, factor sync, bucket size."""
from __future__ import annotations

import dataclasses

from .collectives import DEFAULT_BUCKET_CAP_MB

STRATEGIES = ("communication", "memory")
FACTOR_SYNCS = ("inverse", "update")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How KFACPreconditioner runs under torch.distributed (see `kfac_fast.distributed`).

    strategy: "communication" (broadcast eigenbases / inverses; every rank preconditions)
        or "memory" (owners precondition and broadcast the preconditioned gradients).
    factor_sync: "inverse" (average the factors only before an inversion; fewest
        collectives) or "update" (after every factor update; every rank's factors are
        global at all times).
    bucket_cap_mb: MiB per flattened collective.
    profile: accumulate wall time per phase (adds CUDA syncs: measurement only).
    """

    strategy: str = "communication"
    factor_sync: str = "inverse"
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    profile: bool = False
