"""Which layers took part in a step on which ranks, agreed so every rank decides alike.

A layer can fire on some ranks only (a data-dependent branch, layer drop, a rank whose
shard skips a module). Every later kfac_fast collective is decided from rank-identical
sets, so the local ones are agreed first, with one small host all-reduce per step
(`begin_step`: fired, holds-factors and ready flags of every layer) or, when the
preconditioner does not call `begin_step`, per factor step (`factors_updated`):

- fired: the layers that fired on any rank are the step's layers on every rank (their
  gradients are averaged everywhere, so every rank preconditions them).
- factors: a layer that holds factors on some ranks only is brought to the same state
  on every rank at once: ranks without statistics contribute zeros, the factors are
  summed and divided by the number of ranks that hold them (the average over the ranks
  that saw the layer), and every rank takes the largest k. The ranks that saw it keep
  the same weight as if every rank had; layers that fire on every rank are untouched,
  so normal training is bit-identical. On FSDP2 under "memory" (`sharded_memory`) no
  resync: the owners' reduce weighs each rank by its rows, 0 where the layer did not fire.
- ready: a layer counts as decomposed only when it is on every rank (e.g. ranks that
  loaded different states re-solve it together).

health() counts each such resynchronisation of a layer as `partial_participation` (and
the driver each step that raised on every rank after a local failure as `rank_failure`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def _has_factors(layer: Any) -> bool:
    return layer.a_count > 0 and layer.g_count > 0


class Participation:
    """The agreement state of one DataParallelKFAC (see the module docstring)."""

    def __init__(self, driver: Any, factor_dtype: Optional[str]) -> None:
        self.driver = driver
        self.dtype = None if factor_dtype is None else getattr(torch, factor_dtype.removeprefix("torch."))
        self._sums: Optional[tuple[list, list]] = None  # (fired, holds factors) summed over ranks

    def _flags(self, fired_names: set, has: list) -> list:
        return [int(n in fired_names) for n in self.driver.layers] + has

    def begin_step(self, fired: list, factor_step: bool) -> list:
        d = self.driver
        names = list(d.layers)
        fired_names = {layer.name for layer in fired}
        has = [int(_has_factors(layer) or (factor_step and n in fired_names)) for n, layer in d.layers.items()]
        ready = [int(n in d._ready) for n in names]
        sums = d._agree(self._flags(fired_names, has) + ready, "the per-step layer agreement")
        n = len(names)
        d._ready = {name for i, name in enumerate(names) if sums[2 * n + i] == d.world_size}
        self._sums = (sums[:n], sums[n:2 * n]) if factor_step else None
        return [d.layers[name] for i, name in enumerate(names) if sums[i] > 0]

    def factors_updated(self, layers: list) -> list:
        """Agree (or reuse `begin_step`'s agreement), resynchronise the layers held by
        some ranks only; returns the layers updated on any rank and held everywhere,
        in registration order (what factor_sync="update" averages)."""
        d = self.driver
        names = list(d.layers)
        if self._sums is None:
            has = [int(_has_factors(layer)) for layer in d.layers.values()]
            sums = d._agree(self._flags({layer.name for layer in layers}, has), "the factor-step layer agreement")
            fired, held = sums[:len(names)], sums[len(names):]
        else:
            fired, held = self._sums
        self._sums = None
        world = d.world_size
        if d.sharded_memory is not None:
            # FSDP2 "memory": the owners' reduce weights every rank by its rows (0 where the
            # layer did not fire), so a layer fired on some ranks only is exact as it is;
            # ShardedMemory.after_update sets the same k everywhere (no resync here)
            return [d.layers[n] for i, n in enumerate(names) if fired[i] > 0]
        partial = [(d.layers[n], held[i]) for i, n in enumerate(names) if 0 < held[i] < world]
        uneven = [d.layers[n] for i, n in enumerate(names) if held[i] == world and 0 < fired[i] < world]
        if partial or uneven:
            self._resync(partial, uneven)
        return [d.layers[n] for i, n in enumerate(names) if fired[i] > 0 and held[i] == world]

    def _resync(self, partial: list, uneven: list) -> None:
        """Same factors (partial) and the same k (partial and uneven) on every rank."""
        d = self.driver
        dtype = self.dtype or next((layer.g_factor.dtype for layer in d.layers.values()
                                    if layer.g_factor is not None), None)
        if dtype is None:  # this rank holds none of them: the preconditioner's settings say
            raise RuntimeError("kfac_fast.distributed: cannot tell the factor dtype (settings were not passed)")
        for layer, _ in partial:
            if not _has_factors(layer):
                device = layer.module.weight.device
                layer.a_factor = torch.zeros(layer.a_shape(), dtype=dtype, device=device)
                layer.g_factor = torch.zeros(layer.g_dim, layer.g_dim, dtype=dtype, device=device)
        if partial:
            d.average_factors([layer for layer, _ in partial])  # sum / world ...
            for layer, held in partial:  # ... rescaled to the average over the ranks that hold it
                for f in (layer.a_factor, layer.g_factor):
                    f.mul_(d.world_size / held)
        for _ in partial:
            d.count_event("partial_participation")
        layers = [layer for layer, _ in partial] + uneven
        counts = [c for layer in layers for c in (layer.a_count, layer.g_count)]
        most = self._max(counts)
        for i, layer in enumerate(layers):
            layer.a_count, layer.g_count = most[2 * i], most[2 * i + 1]

    def _max(self, values: list) -> list:
        import torch.distributed as dist
        d = self.driver
        t = torch.tensor(values, dtype=torch.int64)
        with d._collective("the factor-count agreement"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.meta_group)
        return t.tolist()
