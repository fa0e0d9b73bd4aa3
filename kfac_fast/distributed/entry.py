"""Whether a preconditioner runs data-parallel, and its driver when it does (FSDP2-sharded
layers get a `sharded_grads.ShardedGrads`; FSDP1 and other DTensor placements are refused)."""
from __future__ import annotations

import datetime
from typing import Any, Optional, Union

from torch import nn

from ..health import Health
from .collectives import _dist
from .data_parallel import DataParallelKFAC
from .options import DistributedOptions
from .sharded_grads import ShardedGrads, _dtensor_type, check_sharding, layer_parameters, refuse_multi_device
from .sharded_memory import ShardedMemory


def resolve_group(process_group: Optional[Any] = None) -> Optional[Any]:
    """The process group to use, or None for single-process behaviour.

    None means the default (world) group when torch.distributed is initialised; a group
    of size one is single-process too, so a world of one runs exactly the single-process
    code path.
    """
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise RuntimeError("process_group was given but torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def setup(model: nn.Module, layers: dict, method: str, process_group: Optional[Any] = None,
          distributed: Union[None, bool, DistributedOptions] = None, *,
          health: Optional[Health] = None, eigh_tol: Optional[float] = None,
          settings: Optional[dict] = None) -> Optional[DataParallelKFAC]:
    """The preconditioner's distributed driver, or None to run single-process.

    distributed: None (on when torch.distributed is initialised), False (off), True or
    a DistributedOptions (on; torch.distributed must be initialised). A group of one
    rank always runs single-process: the exact single-process code path.
    health, eigh_tol: the preconditioner's solver fallbacks / counters and warm-refresh
    tolerance, used by the owner of each decomposition (see DataParallelKFAC).
    settings: the preconditioner's settings (`settings_of`), checked equal on every rank.
    """
    if distributed is False:
        if process_group is not None:
            raise ValueError("process_group was given but distributed=False")
        dtensor = _dtensor_type()
        for layer in layers.values() if dtensor is not None else ():
            for p in layer_parameters(layer):
                if isinstance(p, dtensor):
                    refuse_multi_device(layer, p)
        return None
    if not (distributed is None or distributed is True or isinstance(distributed, DistributedOptions)):
        raise TypeError(f"distributed must be None, a bool or a DistributedOptions, got {distributed!r}")
    dist = _dist()
    if distributed is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed was requested but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, or pass distributed=False)")
    group = resolve_group(process_group)
    if group is None:
        return None
    opts = distributed if isinstance(distributed, DistributedOptions) else DistributedOptions()
    sharded = check_sharding(model, layers, group)
    group, meta = own_groups(group, opts.timeout)
    driver = DataParallelKFAC(layers, method, group, strategy=opts.strategy, factor_sync=opts.factor_sync,
                              bucket_cap_mb=opts.bucket_cap_mb, profile=opts.profile,
                              health=health, eigh_tol=eigh_tol, settings=settings, meta_group=meta,
                              timeout=opts.timeout)
    if sharded and opts.strategy == "memory":
        driver.sharded_memory = ShardedMemory(driver)
    elif sharded:
        driver.sharded = ShardedGrads(driver)
    return driver


def own_groups(group: Any, timeout: Optional[float]) -> tuple:
    """(the group kfac_fast's collectives use, a CPU (gloo) group for its host-side
    agreements), both new groups over the ranks of `group`, created by those ranks only.

    gloo: two own groups, so kfac_fast's collectives never interleave with DDP's or the
    user's, nor the agreements with the data collectives: a rank that left a step early,
    or ran more captures than another, then meets a timeout and a clear error instead of
    a mismatched collective (which gloo aborts on). NCCL: a new NCCL group only with a
    timeout. `timeout` (seconds) goes to the new groups (None: the default)."""
    dist = _dist()
    backend = str(dist.get_backend(group))
    ranks = dist.get_process_group_ranks(group)
    kw: dict = {"use_local_synchronization": True}
    if timeout is not None:
        kw["timeout"] = datetime.timedelta(seconds=timeout)
    if backend == "gloo" or timeout is not None:
        group = dist.new_group(ranks, backend=backend, **kw)
    meta = dist.new_group(ranks, backend="gloo", **kw)
    return group, meta
