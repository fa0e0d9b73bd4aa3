"""The paper's optimizer across ranks: one batch's curvature products summed over ranks.

`kfac_fast.KFAC` asks a batch's curvature for its gradient and the Gram matrix
[v_i^T F v_j] of the exact Fisher (`fvp.CurvatureProducts`). Data-parallel, each rank
holds the products of its own shard of n_r examples (its loss the mean over them). The
global batch of N = sum_r n_r examples has the mean loss h = sum_r (n_r / N) h_r, so its
gradient, its Fisher (GGN) and every quadratic form of it are the same n-weighted sums
of the ranks' local values. `ReducedProducts` wraps a local implementation and returns
those sums, so N ranks on N shards equal one process on the whole batch:

- construction: one all-reduce of w g (every requested parameter, zeros where this
  rank's outputs do not reach it; w = n_r / N) in the parameters' dtype (one buffer per
  dtype) and of w h in float64 (in the float64 buffer, or its own), and with it one
  host all-reduce of a flag per parameter (which parameters the outputs reach on some
  rank);
- `gram(vectors)`: one all-reduce of the k x k float64 matrix.

`batch_split` all-gathers the ranks' batch sizes (host ints, over a CPU group), and
`weighted_sum` reduces the losses the optimiser re-evaluates (h(theta + delta)). Every
function here is a collective: every rank calls it in the same order (the optimiser's
branches are decided from the reduced values, so they are the same on every rank).
Each wait on a gloo group is bounded by `timeout` (None: the group's own); on other
backends (NCCL) a plain wait, bounded by the group's own timeout.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional, Sequence

import torch


def _dist() -> Any:
    import torch.distributed as dist
    return dist


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bounded(group: Any) -> bool:
    """Whether a wait on `group`'s work takes the timeout: gloo only. Under NCCL a wait
    with a timeout blocks the host until the kernel ends (a sync per step); plain wait()
    orders the stream, and `own_groups` puts the timeout on the NCCL group itself."""
    return _dist().get_backend(group) == "gloo"


def _wait_all(works: list, timeout: Optional[float], what: str) -> None:
    """Wait on (work, group) pairs; a gloo group's wait bounded by `timeout`."""
    for work, group in works:
        try:
            if timeout is None or not _bounded(group):
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as exc:
            raise RuntimeError(f"kfac_fast.KFAC: {what} failed or timed out ({exc}); another rank raised, hung "
                               "or died, or called KFAC.step a different number of times") from exc


def _all_reduce_sum_(tensors: list, group: Any, timeout: Optional[float], what: str) -> None:
    dist = _dist()
    works = [(dist.all_reduce(t, group=group, async_op=True), group) for t in tensors]
    _wait_all(works, timeout, what)


def batch_split(n_local: int, group: Any, timeout: Optional[float] = None,
                counter: Optional[dict] = None) -> tuple[int, int]:
    """(offset, total): the examples of the lower ranks of `group` (a CPU/gloo group) and
    of all ranks, from one all-gather of the host ints n_r (no device sync). A rank
    without an example is a ValueError on every rank."""
    dist = _dist()
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    _wait_all([(dist.all_gather(sizes, mine, group=group, async_op=True), group)], timeout,
              "the batch-size all-gather")
    if counter is not None:
        counter["batch_sizes"] = counter.get("batch_sizes", 0) + world * _nbytes(mine)
    counts = [int(s) for s in sizes]
    if min(counts) < 1:  # seen alike by every rank: all raise, none waits on the others
        raise ValueError(f"kfac_fast.KFAC: every rank needs at least one example per step (the closure's "
                         f"outputs' dim 0), the ranks' batch sizes are {counts}")
    if sum(counts) > 2 ** 32:  # fisher.ExampleSeed's limit, checked alike on every rank
        raise ValueError(f"kfac_fast.KFAC: at most 2^32 examples per step over all ranks (the per-example "
                         f"MC seed's index), the ranks' batch sizes sum to {sum(counts)}")
    return sum(counts[:dist.get_rank(group)]), sum(counts)


def weighted_sum(values: torch.Tensor, weight: float, group: Any, timeout: Optional[float] = None,
                 counter: Optional[dict] = None) -> torch.Tensor:
    """sum over ranks of weight_r * values (float64, a new tensor): the global batch's
    mean of per-rank means, e.g. the re-evaluated losses h(theta + delta)."""
    out = values.detach().to(torch.float64) * weight
    _all_reduce_sum_([out], group, timeout, "the loss all-reduce")
    if counter is not None:
        counter["loss"] = counter.get("loss", 0) + _nbytes(out)
    return out


class ReducedProducts:
    """A `fvp.CurvatureProducts` of the global batch from each rank's local one.

    Args:
        local: this rank's products (e.g. `fvp.FisherProducts`), on its n_local examples.
        requested: the parameters the optimiser asked for, the same list on every rank
            (`local.params` is the subsequence its outputs reach).
        loss: this rank's loss h_r (0-dim), the mean over its examples.
        n_local, n_total: this rank's and every rank's examples (`batch_split`).
        group: the process group of the data collectives (its device's backend).
        meta_group: a CPU (gloo) group over the same ranks for the host flags (`group`
            when None, which must then be gloo).
        timeout: seconds per wait (None: the group's own); counter: a dict to which the
            bytes all-reduced are added ("gradient", "flags", "gram").

    Attributes:
        params: the requested parameters the outputs reach on at least one rank, in
            order (the same on every rank).
        gradient: the global gradient sum_r (n_r / N) g_r for them (detached).
        loss: the global loss sum_r (n_r / N) h_r, 0-dim float64 (reduced in float64
            whatever the parameters' dtype, like the re-evaluated losses).
    """

    def __init__(self, local: Any, requested: Sequence[torch.Tensor], loss: torch.Tensor, n_local: int,
                 n_total: int, group: Any, *, meta_group: Any = None, timeout: Optional[float] = None,
                 counter: Optional[dict] = None) -> None:
        dist = _dist()
        self.local = local
        self.group = group
        self.timeout = timeout
        self.counter = counter if counter is not None else {}
        self.weight = n_local / n_total
        requested = list(requested)
        where = {id(p): i for i, p in enumerate(local.params)}
        local_grad = [None if id(p) not in where else local.gradient[where[id(p)]] for p in requested]
        # which parameters some rank's outputs reach: host flags over the CPU group, in
        # flight with the gradients (no device sync)
        used = torch.tensor([int(g is not None) for g in local_grad], dtype=torch.int64)
        host = group if meta_group is None else meta_group
        works = [(dist.all_reduce(used, group=host, async_op=True), host)]
        # one flat buffer per dtype: w g (zeros where this rank's outputs do not reach),
        # and w h in float64 (the float64 one, or its own)
        by_dtype: dict = {}
        for i, p in enumerate(requested):
            by_dtype.setdefault(p.dtype, []).append(i)
        scalar_dtype = torch.float64
        scaled = loss.detach().reshape(1).to(torch.float64) * self.weight
        buffers, layout = [], []
        for dtype, idx in by_dtype.items():
            parts = [(torch.zeros_like(requested[i]) if local_grad[i] is None else local_grad[i] * self.weight)
                     .reshape(-1) for i in idx]
            if dtype == scalar_dtype:
                parts.append(scaled.to(dtype=dtype, device=parts[0].device))
            buffers.append(torch.cat(parts))
            layout.append(idx)
        if scalar_dtype not in by_dtype:
            buffers.append(scaled)
            layout.append([])
        works += [(dist.all_reduce(b, group=group, async_op=True), group) for b in buffers]
        _wait_all(works, timeout, "the gradient all-reduce")
        self.counter["gradient"] = self.counter.get("gradient", 0) + sum(_nbytes(b) for b in buffers)
        self.counter["flags"] = self.counter.get("flags", 0) + _nbytes(used)
        grads: list = [None] * len(requested)
        for flat, idx in zip(buffers, layout):
            offset = 0
            for i in idx:
                n = requested[i].numel()
                grads[i] = flat[offset:offset + n].view_as(requested[i])
                offset += n
            if flat.dtype == scalar_dtype:
                self.loss = flat[-1]
        live = [i for i, count in enumerate(used.tolist()) if count > 0]  # a CPU tensor: no sync
        self.params = [requested[i] for i in live]
        self.gradient = [grads[i] for i in live]
        self._local_index = [k for k, i in enumerate(live) if local_grad[i] is not None]

    def gram(self, vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """The k x k float64 [v_i^T F v_j] of the global batch's Fisher: the n-weighted sum
        of the ranks' local Gram matrices (one all-reduce)."""
        mine = [[v[k] for k in self._local_index] for v in vectors]
        out = self.local.gram(mine) * self.weight
        _all_reduce_sum_([out], self.group, self.timeout, "the Gram all-reduce")
        self.counter["gram"] = self.counter.get("gram", 0) + _nbytes(out)
        return out
