"""KFAC across ranks: what its step communicates, and the MC seed every rank shares.

`kfac_fast.KFAC` runs data-parallel when its preconditioner does (the same
`process_group` / `distributed` rules as KFACPreconditioner): every rank builds the same
model, each step's closure evaluates this rank's shard of the batch (a mean over its
examples, dim 0 of the outputs), and KFAC itself reduces what its quadratic model needs,
weighted by n_rank / n_total, so that N ranks on N shards equal one process on the
concatenated batch (`kfac_fast.distributed.products`). Per step:

- one host all-gather of the batch sizes (gives the weights and this shard's global
  example offset for the MC samples, `fisher.ExampleSeed`);
- one all-reduce of the gradients (parameters' dtype) and the loss (float64), with a host
  all-reduce of one flag per parameter;
- one k x k float64 all-reduce per quadratic-model solve (k = 1 or 2; three solves on a
  gamma-search step);
- on damping-adaptation and gamma-search steps, one float64 all-reduce of the
  re-evaluated losses (all candidates at once);
- the preconditioner's own collectives (factors, decompositions: `kfac_fast.distributed`).

Everything that decides a branch (rho, the gamma winner, an undone step, the update
guard) comes from reduced values, so every rank takes the same branch.

Gradients: KFAC takes them from its own backward (`torch.autograd.grad` on the closure's
graph), which DistributedDataParallel's hooks never see, and averages them itself
weighted by batch size; a DDP-wrapped model is refused (pass `model.module`). FSDP2
(`fully_shard`) models run the step on their unsharded parameters (`optimizer_fsdp`);
FSDP1 and other DTensor parameters are refused.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .distributed.products import ReducedProducts, batch_split, weighted_sum
from .fisher import ExampleSeed
from .optimizer_fsdp import fsdp2_modules


def _sharded(model: nn.Module) -> Optional[str]:
    """The first FSDP1-wrapped module of `model`, or its first DTensor parameter when no
    FSDP2 module holds them (tensor parallelism), named; None otherwise."""
    fsdp1: Any = None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp1 = FullyShardedDataParallel
    except ImportError:
        pass
    for name, module in model.named_modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            return f"module {name or '<root>'!r} (FullyShardedDataParallel, FSDP1)"
    if fsdp2_modules(model):
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return next((f"parameter {n!r} (a DTensor)" for n, p in model.named_parameters() if isinstance(p, DTensor)), None)


def refuse_wrappers(model: nn.Module) -> None:
    """TypeError for a DistributedDataParallel-wrapped model, NotImplementedError for an
    FSDP1 one or DTensor parameters outside FSDP2 (docs/optimizer.md, "Across ranks")."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        raise TypeError(
            "model: kfac_fast.KFAC takes the unwrapped module, not DistributedDataParallel (pass model.module "
            "and call it in the closure): KFAC computes the gradients from its own backward, which DDP's hooks "
            "do not see, and averages them over the ranks itself, weighted by each rank's batch size")
    where = _sharded(model)
    if where is not None:
        raise NotImplementedError(
            f"model: kfac_fast.KFAC supports FSDP2 (fully_shard) and unsharded models, not {where}: use "
            "torch.distributed.fsdp.fully_shard, DistributedDataParallel's bare module or plain data parallelism")


def draw_seed(generator: Optional[torch.Generator]) -> int:
    """The base seed of the per-example MC samples: one draw from `generator` (torch's
    global generator when None) at construction; a host read, once."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2 ** 62, (), generator=generator, device=device))


class DataParallelSteps:
    """KFAC's side of data parallelism over the groups of its preconditioner's driver.

    Attributes:
        bytes: bytes communicated by KFAC's own collectives so far, per kind
            ("batch_sizes", "gradient", "flags", "gram", "loss"); the preconditioner's
            are `opt.preconditioner.distributed.bytes`.
    """

    def __init__(self, driver: Any) -> None:
        self.group = driver.group
        self.meta_group = driver.meta_group
        self.timeout = driver.timeout
        self.bytes: dict = {"batch_sizes": 0, "gradient": 0, "flags": 0, "gram": 0, "loss": 0}
        self.weight = 1.0
        self.n_local = self.n_total = 0

    def agree_seed(self, seed: int) -> int:
        """Rank 0's base seed on every rank (construction; one host broadcast)."""
        import torch.distributed as dist
        value = torch.tensor([seed], dtype=torch.int64)
        dist.broadcast(value, src=dist.get_global_rank(self.meta_group, 0), group=self.meta_group)
        return int(value)

    def split(self, outputs: torch.Tensor) -> int:
        """This step's global example offset of the local shard (one host all-gather)."""
        n = outputs.shape[0] if outputs.dim() > 0 else 1
        offset, total = batch_split(n, self.meta_group, self.timeout, self.bytes)
        self.n_local, self.n_total, self.weight = n, total, n / total
        return offset

    def products(self, local: Any, requested: list, loss: torch.Tensor) -> ReducedProducts:
        """The global batch's products (one gradient all-reduce now, one per gram)."""
        return ReducedProducts(local, requested, loss, self.n_local, self.n_total, self.group,
                               meta_group=self.meta_group, timeout=self.timeout, counter=self.bytes)

    def losses(self, values: torch.Tensor) -> torch.Tensor:
        """The global batch's losses from this rank's (float64; one all-reduce)."""
        return weighted_sum(values, self.weight, self.group, self.timeout, self.bytes)


def example_seed(seed: int, step: int, offset: int) -> ExampleSeed:
    """The per-example seed of a step's MC samples."""
    return ExampleSeed(seed=seed, step=step, offset=offset)
