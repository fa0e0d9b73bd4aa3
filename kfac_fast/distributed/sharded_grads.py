"""Whole gradients of FSDP2-sharded parameters while the preconditioner works on them.

`torch.distributed.fsdp.fully_shard` (FSDP2) keeps each parameter, and its `.grad` after
the backward, as a DTensor sharded on dim 0 over a 1-D device mesh, split as torch.chunk
splits: ceil(n / world) rows per rank, the last ranks short or empty (a layer whose dim 0
is smaller than the world). The layer inputs and output gradients its hooks capture are
whole per rank, so factors are as under DDP; only the gradient needs gathering.

`ShardedGrads.whole(layers)` is a context: on entry one bucketed all-gather (each rank's
shard padded to ceil(n / world) rows, one all-gather into one tensor per bucket, never one
per parameter) gives every rank the whole averaged gradient of each sharded parameter,
and `.grad` is pointed at it (a plain tensor of the parameter's global shape), so the
single-process code reads and rewrites whole gradients (the KL clip and every norm see
the whole gradient). On a clean exit each rank copies its own rows back into its shard
and `.grad` is the DTensor again; on an exception the shards are left as they were.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .collectives import _buckets, _dist, _nbytes, _wait


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be sharded
        return None
    return DTensor


def chunk_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of `rank`'s torch.chunk share of n rows over `world` ranks."""
    size = -(-n // world) if n else 0
    start = min(rank * size, n)
    return start, min(start + size, n) - start


def layer_parameters(layer: Any) -> list:
    """The parameters whose gradients a layer rewrites: weight, then bias with one."""
    return [layer.module.weight] + ([layer.module.bias] if layer.has_bias else [])


def check_sharding(model: nn.Module, layers: dict, group: Any) -> bool:
    """Whether K-FAC's layers hold FSDP2-sharded parameters it can precondition.

    FSDP1 (`FullyShardedDataParallel`, flat parameters), a DTensor parameter of a
    registered layer outside every fully_shard'ed module (tensor parallelism, a bare
    distribute_tensor), or one placed other than Shard(0) on a 1-D mesh over exactly the
    ranks of `group` (in order) raise NotImplementedError naming the module or parameter.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    except ImportError:
        fsdp1 = None
    for name, module in model.named_modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            raise NotImplementedError(
                f"kfac_fast.distributed: module {name or '<root>'!r} is wrapped by FSDP1 "
                "(FullyShardedDataParallel, flat parameters); use FSDP2 (torch.distributed.fsdp.fully_shard), "
                "DistributedDataParallel or plain data parallelism")
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    dist = _dist()
    ranks = dist.get_process_group_ranks(group)
    under_fsdp = _under_fully_shard(model)
    sharded = False
    for lname, layer in layers.items():
        for pname, p in zip(("weight", "bias"), layer_parameters(layer)):
            if not isinstance(p, dtensor):
                continue
            if id(layer.module) not in under_fsdp:
                raise NotImplementedError(
                    f"kfac_fast.distributed: module {lname or '<root>'!r} ({type(layer.module).__name__}) has "
                    "DTensor parameters but neither it nor a parent is fully_shard'ed (FSDPModule): only "
                    "FSDP2 sharding is supported (no tensor parallelism such as ColwiseParallel, no bare "
                    "distribute_tensor); skip the layer or use fully_shard")
            where = f"parameter {lname + '.' if lname else ''}{pname!s}"
            mesh = p.device_mesh
            if mesh.ndim != 1 or len(p.placements) != 1 or not p.placements[0].is_shard(0):
                raise NotImplementedError(
                    f"kfac_fast.distributed: {where} is a DTensor placed {tuple(p.placements)} on a "
                    f"{mesh.ndim}-D mesh; only FSDP2's Shard(0) on a 1-D mesh is supported (no HSDP, "
                    "tensor parallelism or replicated DTensors)")
            mesh_ranks = dist.get_process_group_ranks(mesh.get_group())
            if mesh_ranks != ranks:
                raise NotImplementedError(
                    f"kfac_fast.distributed: {where} is sharded over ranks {mesh_ranks}, but K-FAC runs "
                    f"over ranks {ranks}; pass the mesh's group as process_group")
            sharded = True
    return sharded


def _under_fully_shard(model: nn.Module) -> set:
    """ids of the modules that are, or are inside, an FSDP2 module (fully_shard)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return set()
    return {id(m) for top in model.modules() if isinstance(top, FSDPModule) for m in top.modules()}


def refuse_multi_device(layer: Any, t: Any) -> None:
    """ValueError when DTensor `t` (a parameter of `layer` or its gradient) lives on a mesh
    of more than one device: without the distributed driver nothing gathers its shards."""
    if t.device_mesh.size() != 1:
        raise ValueError(
            f"kfac_fast: a parameter of {type(layer.module).__name__} is a DTensor on a mesh of "
            f"{t.device_mesh.size()} devices (FSDP2), but the preconditioner runs single-process: pass "
            "distributed=None or True (not distributed=False) so that its sharded gradients are gathered")


@contextmanager
def local_whole(layers: list) -> Iterator[None]:
    """Without a distributed driver (a group of one rank, or distributed=False): point
    `.grad` of the parameters of `layers` that is a DTensor on a 1-device mesh (FSDP2 on a
    world of one: whole already) at its `.to_local()` (the same storage, so writes go
    through) and restore the DTensor on exit. A DTensor `.grad` on a larger mesh raises
    ValueError: sharded gradients need the distributed driver. Without
    torch.distributed.tensor imported no DTensor can exist: nothing is looked at (and
    that package is not imported on a single-process step)."""
    if "torch.distributed.tensor" not in sys.modules:
        yield
        return
    dtensor = _dtensor_type()
    swapped = []
    if dtensor is not None:
        for layer in layers:
            for p in layer_parameters(layer):
                g = p.grad
                if not isinstance(g, dtensor):
                    continue
                refuse_multi_device(layer, g)
                swapped.append((p, g))
    try:
        for p, g in swapped:  # a failed swap restores those done (and resets the rest to themselves)
            p.grad = g.to_local()
        yield
    finally:
        for p, g in swapped:
            p.grad = g


class ShardedGrads:
    """Gathers and scatters the sharded gradients of one DataParallelKFAC (its `group`,
    bucket cap, timeout and `bytes`, to which it adds "gradient_gather")."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.dtensor = _dtensor_type()
        self.last_ok: Optional[torch.Tensor] = None  # the latest gather's: every rank's shards well-formed
        driver.bytes.setdefault("gradient_gather", 0)

    def sharded_params(self, layers: list) -> list:
        """The parameters of `layers` whose `.grad` is a DTensor (registration order)."""
        return [p for layer in layers for p in layer_parameters(layer)
                if self.dtensor is not None and isinstance(p.grad, self.dtensor)]

    @contextmanager
    def whole(self, layers: list) -> Iterator[None]:
        """Point `.grad` of the sharded parameters of `layers` at whole gradients (module
        docstring); each rank's rows go back into its shard on a clean exit."""
        params = self.sharded_params(layers)
        self.last_ok = None
        if not params:
            yield
            return
        shards = [p.grad for p in params]
        d = self.driver
        with d._timed("communication"), d._collective("the sharded-gradient all-gather"):
            wholes = self.gather([g.to_local() for g in shards], [tuple(g.shape) for g in shards])
        for p, w in zip(params, wholes):
            p.grad = w
        try:
            yield
            with torch.no_grad():
                for g, w in zip(shards, wholes):
                    start, rows = chunk_rows(w.shape[0], d.world_size, d.rank)
                    g.to_local().copy_(w[start:start + rows])
        finally:
            for p, g in zip(params, shards):
                p.grad = g

    def gather(self, local: list, shapes: list) -> list:
        """Whole tensors of the given global shapes from every rank's dim-0 shard `local`
        (bucketed all-gathers, by dtype and device); adds the bytes received to `bytes`.
        A shard that is not this rank's torch.chunk share still joins the all-gather (zeros,
        and a NaN flag each bucket carries: `last_ok` is then False on every rank and the
        preconditioner's non-finite guard drops the step, instead of waiting for a rank
        that raised) and raises ValueError here after it (the group stays usable)."""
        d = self.driver
        world, rank = d.world_size, d.rank
        local = list(local)
        padded = []
        wrong = []  # shards that are not this rank's torch.chunk share: sent as NaN, raised after
        for i, (t, shape) in enumerate(zip(local, shapes)):
            rows = chunk_rows(shape[0], world, rank)[1]
            if tuple(t.shape) != (rows, *shape[1:]):
                wrong.append(f"a gradient shard of shape {tuple(t.shape)} is not rank {rank}'s torch.chunk share "
                             f"of {shape} over {world} ranks")
                local[i] = t.new_zeros((rows, *shape[1:]))
            padded.append(chunk_rows(shape[0], world, 0)[1] * _rest(shape))  # rows padded to ceil(n / world)
        dist = _dist()
        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there)
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        out: list = [None] * len(local)
        pending = []
        kinds: dict = {}
        for i, t in enumerate(local):
            kinds.setdefault((t.dtype, t.device), []).append(i)
        for members in kinds.values():
            item = local[members[0]].element_size()
            for idx in _buckets([padded[i] * item for i in members], d.bucket_cap):
                ids = [members[j] for j in idx]
                total = sum(padded[i] for i in ids) + 1  # + this rank's flag: NaN for a wrong shard
                send = torch.zeros(total, dtype=local[ids[0]].dtype, device=local[ids[0]].device)
                if wrong:
                    send[-1] = float("nan")
                offset = 0
                for i in ids:
                    send[offset:offset + local[i].numel()] = local[i].reshape(-1)
                    offset += padded[i]
                recv = send.new_empty(world * total)
                pending.append((ids, total, recv, gather_into(recv, send, group=d.group, async_op=True)))
        flags = []
        pending.reverse()
        while pending:  # each bucket's receive buffer is freed once its whole tensors are copied out
            ids, total, recv, work = pending.pop()
            if not _wait(work, d.timeout, recv):
                raise RuntimeError(f"the sharded-gradient all-gather timed out after {d.timeout:g} s")
            d.bytes["gradient_gather"] += _nbytes(recv)
            offset = 0
            by_rank = recv.view(world, total)
            flags.append(by_rank[:, -1].clone())
            for i in ids:
                shape = shapes[i]
                # the ranks' padded shares in rank order are the rows, padding last: one copy
                size = chunk_rows(shape[0], world, 0)[1]
                whole = recv.new_empty((world * size, *shape[1:]))  # its own storage (in-place ops)
                whole.view(world, padded[i]).copy_(by_rank[:, offset:offset + padded[i]])
                out[i] = whole[:shape[0]]
                offset += padded[i]
        self.last_ok = torch.isfinite(torch.cat(flags)).all() if flags else None
        if wrong:  # every rank joined the all-gather; the others see the flag and drop the step
            raise ValueError(f"kfac_fast.distributed: {wrong[0]} (the other ranks drop this step as non-finite)")
        return out


def _rest(shape: tuple) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n
