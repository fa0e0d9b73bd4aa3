"""What a user can ask of data-parallel K-FAC: strategy, factor sync, bucket size."""
from __future__ import annotations

import dataclasses
from typing import Optional

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
    timeout: seconds after which one of kfac_fast's own collectives gives up (None: the
        process group's timeout, 30 minutes by default). kfac_fast then runs on its own
        copy of the group with this timeout (created at construction, every rank of the
        group takes part), so a rank that raised, hung or died surfaces on every other
        rank as a RuntimeError within about this time instead of a hang; DDP's and your
        own collectives keep the process group's timeout (docs/distributed.md).
    """

    strategy: str = "communication"
    factor_sync: str = "inverse"
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    profile: bool = False
    timeout: Optional[float] = None

    def __post_init__(self) -> None:
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
            raise ValueError(f"DistributedOptions: timeout must be None or a number of seconds > 0, got {t!r}")
