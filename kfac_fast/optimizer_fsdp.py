"""KFAC on FSDP2 (`fully_shard`) models: its step on the unsharded parameters.

KFAC's Fisher products differentiate the closure's graph twice. Under `fully_shard` that
graph runs on the unsharded copies FSDP2 all-gathers for the forward, not on the sharded
DTensor parameters, and FSDP2 frees those copies after the forward and the backward
(probed on torch 2.13: the double backward then fails with 'setStorage: ... out of
bounds for storage of size 0'). So KFAC turns FSDP2's resharding off for its modules
(`set_reshard_after_forward(False)`, `set_reshard_after_backward(False)`) and runs the
whole step on the unsharded parameters, exactly as under plain data parallelism: the
products, the n-weighted gradient all-reduce, the preconditioner (its layers then hold
whole gradients), the updates and the closure's re-evaluations. At the end of the step
each rank copies its torch.chunk rows of every updated parameter into its shard and the
modules reshard, so between steps the parameters are sharded as FSDP2 keeps them.

Memory: during the step every rank holds the whole model, its gradient, the directions
and (with momentum) the previous update, as under DDP; KFAC's state (the previous update)
is kept whole, keyed by the sharded parameter.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def fsdp2_modules(model: nn.Module) -> list:
    """The FSDP2 (`fully_shard`) modules of `model`, outermost first (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of `rank`'s torch.chunk share of n rows (FSDP2's split)."""
    size = -(-n // world) if n else 0
    start = min(rank * size, n)
    return start, min(start + size, n) - start


class ShardedStep:
    """KFAC's view of an FSDP2 model: the unsharded parameters of a step, and the write-back.

    Args:
        model: the model; its FSDP2 modules stop resharding by themselves (module docstring).
        sharded: KFAC's parameters (the sharded DTensors, in model.parameters() order).
        world, rank: the size of the data-parallel group and this rank in it (the mesh's).
    """

    def __init__(self, model: nn.Module, sharded: list, world: int, rank: int) -> None:
        self.model = model
        self.modules = fsdp2_modules(model)
        self.sharded = list(sharded)
        self.world, self.rank = world, rank
        for m in self.modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        self._keys: dict = {}
        self._pairs: list = []

    def unsharded(self) -> list:
        """The parameters the closure's forward ran on, unsharded, in KFAC's order (after
        the forward); each is mapped to its sharded parameter for `key`."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len(params) != len(self.sharded) or any(tuple(p.shape) != tuple(s.shape)
                                                   for p, s in zip(params, self.sharded)):
            raise RuntimeError("kfac_fast.KFAC: the FSDP2 model's parameters after the forward are not the "
                               "unsharded copies of KFAC's parameters (did the closure run the model's forward?)")
        self._pairs = list(zip(params, self.sharded))
        self._keys = {id(p): s for p, s in self._pairs}
        return params

    def key(self, p: torch.Tensor) -> torch.Tensor:
        """The sharded parameter KFAC's state for the unsharded `p` is kept under."""
        return self._keys[id(p)]

    @torch.no_grad()
    def end(self) -> None:
        """Write each rank's rows of the unsharded parameters into its shards, drop the
        whole gradients, reshard."""
        for u, s in self._pairs:
            start, rows = _chunk_rows(u.shape[0], self.world, self.rank)
            s.to_local().copy_(u[start:start + rows])
            u.grad = None
        for m in self.modules:
            m.reshard()


def sharded_step(model: nn.Module, params: list, driver: Optional[Any], *, strategy: str,
                 average_decay: Optional[float]) -> Optional[ShardedStep]:
    """A `ShardedStep` for an FSDP2 model (None for any other); NotImplementedError for
    what it does not cover: no data-parallel driver, strategy "memory", average_decay."""
    if not fsdp2_modules(model):
        return None
    if driver is None:
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model needs data parallelism over the mesh's ranks "
                                  "(distributed=None or True, torch.distributed initialised)")
    if strategy != "communication":
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model supports strategy='communication' only")
    if average_decay is not None:
        raise NotImplementedError("kfac_fast.KFAC on an FSDP2 model does not keep an iterate average "
                                  "(average_decay must be None)")
    return ShardedStep(model, params, driver.world_size, driver.rank)
