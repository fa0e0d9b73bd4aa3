"""Bucketed collectives over a torch.distributed process group.

Tensors travel flattened, a few buckets at a time, never one collective per tensor: a
bucket is a run of consecutive tensors whose byte sizes sum to at most the cap. Every
collective of a call is issued before the first wait, so the buckets are in flight
together. Every rank must call these with the same tensor shapes in the same order.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .. import ops

DEFAULT_BUCKET_CAP_MB = 25.0

# pack(bucket) -> flat buffer; unpack(bucket, flat) writes the buffer back into the bucket
Pack = Callable[[list], torch.Tensor]
Unpack = Callable[[list, torch.Tensor], Any]


def _dist() -> Any:
    import torch.distributed as dist
    return dist


def _buckets(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most cap (an oversize item alone)."""
    out: list[list[int]] = []
    total = 0
    for i, s in enumerate(sizes):
        if out and total + s <= cap:
            out[-1].append(i)
            total += s
        else:
            out.append([i])
            total = s
    return out


def _flatten(bucket: list) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in bucket])


def _unflatten_(bucket: list, flat: torch.Tensor) -> None:
    offset = 0
    for t in bucket:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bucketed_mean_(groups: Iterable[list], sizes: Callable[[list], list], pack: Pack, unpack: Unpack,
                    group: Any, bucket_cap_bytes: int, timeout: Optional[float] = None) -> int:
    """Average every tensor of `groups` across ranks in place; returns bytes all-reduced.

    Each group (tensors that may share one buffer) is cut into buckets of at most
    `bucket_cap_bytes` by `sizes(group)`; one all-reduce per bucket (sum, then 1/world
    on the device: gloo has no AVG). timeout: seconds to wait for each bucket (None: the
    group's own timeout); past it a RuntimeError says another rank did not join.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    pending = []
    for members in groups:
        for idx in _buckets(sizes(members), bucket_cap_bytes):
            bucket = [members[i] for i in idx]
            flat = pack(bucket)
            pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    sent = 0
    for bucket, flat, work in pending:
        try:
            done = _wait(work, timeout, flat)
        except RuntimeError as exc:  # the group broke (a peer died or timed out)
            raise RuntimeError(f"kfac_fast.distributed: an all-reduce failed: {exc} (another rank raised, hung "
                               "or died)") from exc
        if not done:
            raise RuntimeError(f"kfac_fast.distributed: an all-reduce did not complete within the timeout of "
                               f"{timeout:g} s: another rank did not reach it (it raised, hung or died)")
        flat.div_(world)
        unpack(bucket, flat)
        sent += _nbytes(flat)
    return sent


def _wait(work: Any, timeout: Optional[float], tensor: Optional[torch.Tensor] = None) -> bool:
    """Wait for `work` at most `timeout` seconds (None: the group's timeout); False when
    it timed out. For a collective on a device `tensor` (NCCL) a plain wait(): it only
    orders the current stream after the collective, where wait(timeout) would block the
    host until it completes; the group's own timeout (`own_groups` sets it) then applies."""
    import datetime
    if timeout is None or (tensor is not None and tensor.device.type != "cpu"):
        work.wait()
        return True
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        if "timed out" in str(exc).lower():
            return False
        raise
    return True


def allreduce_factors_(factors: Sequence[torch.Tensor], group: Any, bucket_cap_bytes: int) -> int:
    """Average symmetric factors across `group` in place; returns bytes all-reduced per rank.

    Each bucket is one `ops.pack_triangles` buffer: only the upper triangles travel.
    """
    factors = list(factors)
    if not factors:
        return 0
    item = factors[0].element_size()

    def sizes(members: list) -> list:
        return [f.shape[0] * (f.shape[0] + 1) // 2 * item for f in members]

    return _bucketed_mean_([factors], sizes, ops.pack_triangles, ops.unpack_triangles_, group,
                           bucket_cap_bytes)


def average_gradients_(parameters: Iterable[torch.Tensor], process_group: Optional[Any] = None,
                       bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB, *, timeout: Optional[float] = None) -> int:
    """Average `.grad` of the given parameters across ranks (plain data parallelism, no
    DDP wrapper); returns bytes all-reduced. Call after backward, before K-FAC's step.

    Every parameter that requires grad takes part on every rank: one whose module did
    not run on this rank (a branch, layer drop) has no `.grad` yet and contributes
    zeros (its `.grad` becomes the average of the other ranks'), so the ranks' buffers
    always match (pass the same parameters, in the same order, on every rank).
    timeout: seconds to wait for the other ranks on CPU tensors (gloo; None, and always for
    device tensors, where a timed wait would block the host: the process group's timeout, 30
    minutes by default); past it a RuntimeError instead of a hang when a rank raised or
    stopped before its own call. The group stays usable (the late rank's all-reduce still
    completes), but this call's gradients are not averaged: end the step on every rank."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise ValueError(f"average_gradients_: timeout must be None or a number of seconds > 0, got {timeout!r}")
    dist = _dist()
    group = dist.group.WORLD if process_group is None else process_group
    grads = []
    for p in parameters:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
        if p.grad is not None:
            grads.append(p.grad)
    if not grads:
        return 0
    by_kind: dict = {}  # one flat buffer holds one dtype on one device
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    return _bucketed_mean_(by_kind.values(), lambda members: [_nbytes(g) for g in members],
                           _flatten, _unflatten_, group, int(bucket_cap_mb * 2 ** 20), timeout)


def broadcast_from_owners_(tensors: Sequence[torch.Tensor], owners: Sequence[int], group: Any,
                           bucket_cap_bytes: int) -> int:
    """Copy each tensor from its owner (a rank of `group`) to every rank, in place.

    Tensors must already have their shapes and dtypes on every rank (non-owners' values
    are overwritten). Each owner's tensors go out flattened, one broadcast per bucket
    per dtype; returns the bytes broadcast (what every rank receives or sends).
    """
    dist = _dist()
    tensors = list(tensors)
    if len(tensors) != len(owners):
        raise ValueError(f"broadcast_from_owners_: {len(tensors)} tensors but {len(owners)} owners")
    me = dist.get_rank(group)
    groups: dict = {}
    for i, (t, r) in enumerate(zip(tensors, owners)):
        groups.setdefault((r, t.dtype, t.device), []).append(i)
    pending = []
    for (owner, _, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        src = dist.get_global_rank(group, owner) if group is not dist.group.WORLD else owner
        sizes = [_nbytes(tensors[i]) for i in members]
        for idx in _buckets(sizes, bucket_cap_bytes):
            bucket = [tensors[members[j]] for j in idx]
            if owner == me:
                flat = _flatten(bucket)
            else:
                flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype,
                                   device=bucket[0].device)
            pending.append((owner, bucket, flat, dist.broadcast(flat, src=src, group=group, async_op=True)))
    sent = 0
    for owner, bucket, flat, work in pending:
        work.wait()
        sent += _nbytes(flat)
        if owner != me:
            _unflatten_(bucket, flat)
    return sent


def all_reduce_min_(flag: torch.Tensor, group: Any) -> None:
    """flag <- the minimum of flag over every rank of `group`, in place."""
    dist = _dist()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)


def rank_and_size(group: Any) -> tuple[int, int]:
    """(this process's rank in `group`, the group's size)."""
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)
