"""Strategy "memory" on FSDP2-sharded layers: a layer's factors, decomposition and
preconditioning live on its owner alone.

Owners are `factor_owners(..., whole_layers=True, cost=memory_cost)` (A and G of a layer on
one rank, balanced by the elements held, not by decomposition time).

Factors, reduced to the owner at every factor update (so between steps no other rank
holds them). At the start of a factor step (`before_update`) every rank sets each layer's
factors aside (the owner keeps its previous F, the others hold none) and its counts to 0,
so the preconditioner's own update writes this rank's plain statistic of the step,
X_r (beta_1 = 0: no decay applied; a dropped non-finite step leaves zeros). `after_update`
restores the counts (k + 1 for the layers updated) and reduces w_r X_r and w_r (rows for
A, examples for G, `weighting.RowWeights`) to the owner in bucketed `dist.reduce` calls
(packed upper triangles);
the owner applies the running average itself, F = beta_k F_prev + (1 - beta_k) X with
X = sum_r w_r X_r / sum_r w_r, kept at F_prev where the agreed non-finite flag drops the
step. This is the single-process update on the concatenated batch. It needs the held
captures (not `update_factors_in_hooks`) and no GradScaler (refused by the preconditioner).

Preconditioning (`precondition`): each layer's sharded gradient is gathered to its
owner (one bucketed `dist.gather` per owner), the owner preconditions its layers; one
all-reduce of [<P, dW_bar> per layer, non-finite count] gives every rank nu and the
step's finiteness; the owner's P is scattered back (one bucketed `dist.scatter` per
owner), each rank writing nu * its rows into its shard, or keeping the plain gradient on
a non-finite step.

Memory per rank between steps: the factors and decomposition of its own layers, at most
total / world + the largest layer's (greedy least-loaded assignment of whole layers on
their memory, so the list-scheduling bound holds for memory). During a factor step every
rank briefly holds one statistic buffer per layer and the owner its previous factors too.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from ..health import all_finite
from ..schedules import running_average_weights
from .collectives import _buckets, _dist, _nbytes, _wait
from .owned import precondition_owned
from .sharded_grads import _rest, chunk_rows, layer_parameters
from .weighting import weight_vector


class ShardedMemory:
    """The memory strategy of one DataParallelKFAC over FSDP2-sharded layers."""

    def __init__(self, driver: Any) -> None:
        from .sharded_grads import _dtensor_type
        dtensor = _dtensor_type()
        for name, layer in driver.layers.items():
            if not layer.grouped:
                raise NotImplementedError(f"kfac_fast.distributed: strategy='memory' on FSDP2-sharded layers "
                                          f"supports layers with dense A and G only; {name!r} "
                                          f"({type(layer.module).__name__}) is not one: skip it or use "
                                          "strategy='communication'")
            for p in layer_parameters(layer):
                if dtensor is None or not isinstance(p, dtensor):
                    raise NotImplementedError(f"kfac_fast.distributed: strategy='memory' on FSDP2 needs every "
                                              f"registered layer sharded, but {name!r} has a parameter that is "
                                              "not a DTensor: fully_shard it (or its parent) or skip it")
        self.driver = driver
        self.grad_ok: Optional[torch.Tensor] = None  # the latest precondition's agreed flags
        self.output_ok: Optional[torch.Tensor] = None
        self._prev: dict = {}  # layer name -> (a_count, g_count, owner's previous (A, G) or None)

    def _factor_dtype(self, saved: dict) -> torch.dtype:
        """The factors' dtype, as `Participation._resync` tells it (the settings, else a
        factor this rank holds, or one set aside in `saved`), so every rank's buffers agree;
        RuntimeError where this rank can tell neither."""
        d = self.driver
        held = [layer.g_factor for layer in d.layers.values()]
        held += [prev[1] for _, _, prev in saved.values() if prev is not None]
        dtype = d.participation.dtype or next((f.dtype for f in held if f is not None), None)
        if dtype is None:
            raise RuntimeError("kfac_fast.distributed: cannot tell the factor dtype (settings were not passed)")
        return dtype

    def _mine(self, layer: Any) -> bool:
        return self.driver.owners()[(layer.name, "a")] == self.driver.rank

    def _src(self, owner: int) -> int:
        dist = _dist()
        g = self.driver.group
        return owner if g is dist.group.WORLD else dist.get_global_rank(g, owner)

    # ---- factors --------------------------------------------------------------------------
    def before_update(self) -> None:
        """Set every layer's factors aside and its counts to 0 (module docstring)."""
        self.restore()  # a step that raised between before_update and after_update
        for name, layer in self.driver.layers.items():
            prev = (layer.a_factor, layer.g_factor) if self._mine(layer) and layer.a_count > 0 else None
            self._prev[name] = (layer.a_count, layer.g_count, prev)
            layer.a_factor = layer.g_factor = None
            layer.a_count = layer.g_count = 0

    def restore(self) -> None:
        """Put back what `before_update` set aside (the counts and the owner's factors)."""
        for name, (ka, kg, prev) in self._prev.items():
            layer = self.driver.layers[name]
            layer.a_count, layer.g_count = ka, kg
            layer.a_factor, layer.g_factor = prev if prev is not None else (None, None)
        self._prev = {}

    def after_update(self, here: list, updated: list, decay: Optional[float], ok: Optional[torch.Tensor]) -> None:
        """Reduce the step's statistics of `updated` (the layers updated on any rank, in
        registration order, the same on every rank; `here`: those updated on this rank)
        to their owners, who apply the running average with this step's `decay`; every
        other layer gets back what `before_update` set aside."""
        if decay is None:
            raise ValueError("kfac_fast.distributed: the memory strategy on FSDP2-sharded layers needs the "
                             "step's factor decay (factors_updated(..., decay=...))")
        d = self.driver
        mine_here = {layer.name for layer in here}
        names = {layer.name for layer in updated}
        saved, self._prev = self._prev, {}
        for name in d.layers:
            if name not in names:
                self._prev[name] = saved[name]
        self.restore()  # the layers not updated anywhere
        dtype = self._factor_dtype(saved)
        factors, weights, dsts = [], [], []
        owners = d.owners()
        for layer in updated:
            if layer.name not in mine_here:  # updated elsewhere only: it contributes nothing here
                device = layer.module.weight.device
                layer.a_factor = torch.zeros(layer.a_shape(), dtype=dtype, device=device)
                layer.g_factor = torch.zeros(layer.g_dim, layer.g_dim, dtype=dtype, device=device)
            factors += [layer.a_factor, layer.g_factor]
            weights += d.row_weights.of([layer]) if layer.name in mine_here else [0, 0]
            dsts += [owners[(layer.name, "a")]] * 2
        with d._timed("communication"), d._collective("the factor reduce to the owners"):
            self._reduce(factors, weights, dsts)
        for layer in updated:
            ka, kg, prev = saved[layer.name]
            layer.a_count, layer.g_count = ka + 1, kg + 1
            if not self._mine(layer):
                layer.a_factor = layer.g_factor = None
                continue
            for side, k, old in (("a", ka + 1, None if prev is None else prev[0]),
                                 ("g", kg + 1, None if prev is None else prev[1])):
                stat = getattr(layer, f"{side}_factor")
                beta = running_average_weights(decay, k)[0]
                new = stat if old is None else old * beta + stat * (1.0 - beta)
                if ok is not None:  # a dropped step keeps the factor (zeros at k = 1)
                    new = torch.where(ok, new, torch.zeros_like(new) if old is None else old)
                setattr(layer, f"{side}_factor", new)

    def _reduce(self, factors: list, weights: list, dsts: list) -> None:
        """factor <- sum_r w_r factor_r / sum_r w_r on its owner (`dsts`), bucketed per owner;
        each bucket is the `ops.pack_triangles` buffer of the weighted factors, then the weights."""
        d = self.driver
        dist = _dist()
        by_owner: dict = {}
        for i, dst in enumerate(dsts):
            by_owner.setdefault(dst, []).append(i)
        pending = []
        for owner in sorted(by_owner):
            members = by_owner[owner]
            for idx in _buckets([(_triangle(factors[i]) + 1) * factors[i].element_size() for i in members],
                                d.bucket_cap):
                ids = [members[j] for j in idx]
                ws = weight_vector([weights[i] for i in ids], factors[ids[0]])
                flat = torch.cat([ops.pack_triangles([factors[i] * weights[i] for i in ids]), ws])
                pending.append((owner, ids, flat, dist.reduce(flat, dst=self._src(owner), group=d.group,
                                                              async_op=True)))
        for owner, ids, flat, work in pending:
            if not _wait(work, d.timeout, flat):
                raise RuntimeError(f"the factor reduce timed out after {d.timeout:g} s")
            d.bytes["factors"] += _nbytes(flat)
            if owner != d.rank:
                continue
            start = flat.numel() - len(ids)  # the summed weights follow the triangles
            parts, offset = [], 0
            for k, i in enumerate(ids):
                n = _triangle(factors[i])
                total = flat[start + k]  # 0: no rank had rows, a zero statistic as in one process
                parts.append(torch.where(total > 0, flat[offset:offset + n] / total.clamp_min(1e-30),
                                         torch.zeros_like(flat[offset:offset + n])))
                offset += n
            ops.unpack_triangles_([factors[i] for i in ids], torch.cat(parts))

    # ---- checkpoints ----------------------------------------------------------------------
    def check_loadable(self, state: Any) -> None:
        """Refuse (ValueError, the same on every rank: every rank loads the same state) a
        rank's plain `state_dict()` whose layers have k > 0 but no factors: it holds only
        the factors its rank owned, and the other layers' owners could not refresh them."""
        entry = state.get("distributed") if isinstance(state, dict) else None
        layers = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(entry, dict) or entry.get("synced", True) or not isinstance(layers, dict):
            return
        missing = [name for name, e in layers.items() if isinstance(e, dict) and int(e.get("a_count", 0) or 0) > 0
                   and (e.get("a_factor") is None or e.get("g_factor") is None)]
        if missing:
            raise ValueError(f"load_state_dict: state is rank {entry.get('rank')}'s state_dict(), not synced: under "
                             f"strategy='memory' on FSDP2 it holds only the factors that rank owns, and layers "
                             f"{missing[:4]} have k > 0 but no factors; save precond.synced_state_dict() (a "
                             "collective, on every rank) or use kfac_fast.distributed.KFACState")

    def drop_unowned_factors(self) -> None:
        for layer in self.driver.layers.values():
            if not self._mine(layer):
                layer.a_factor = layer.g_factor = None

    def share_factors(self) -> None:
        """Every layer's factors from its owner to every rank (for a synced state dict)."""
        from .collectives import broadcast_from_owners_
        d = self.driver
        owners = d.owners()
        dtype = self._factor_dtype(self._prev)
        tensors, item_owners = [], []
        for layer in d.layers.values():
            if layer.a_count == 0:
                continue
            if not self._mine(layer):
                device = layer.module.weight.device
                layer.a_factor = torch.empty(layer.a_shape(), dtype=dtype, device=device)
                layer.g_factor = torch.empty(layer.g_dim, layer.g_dim, dtype=dtype, device=device)
            tensors += [layer.a_factor, layer.g_factor]
            item_owners += [owners[(layer.name, "a")]] * 2
        with d._collective("the factor broadcast"):
            d.bytes["factors"] += broadcast_from_owners_(tensors, item_owners, d.group, d.bucket_cap)

    # ---- preconditioning ------------------------------------------------------------------
    def precondition(self, layers: list, damping: float, lr: float, kl_clip: Optional[float],
                     captures_ok: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Precondition the sharded `.grad` of `layers` (module docstring); returns (nu,
        ok): ok False leaves every shard as it was (nu then 1)."""
        d = self.driver
        owners = d.owners()
        order = sorted(range(len(layers)), key=lambda i: owners[(layers[i].name, "a")])
        by_owner: dict = {}
        for i in order:
            by_owner.setdefault(owners[(layers[i].name, "a")], []).append(layers[i])
        device = layers[0].module.weight.device
        with d._timed("communication"), d._collective("the gradient gather to the owners"):
            wholes = self._gather(by_owner)
        mine = by_owner.get(d.rank, [])
        swapped = []
        for layer in mine:
            for p, w in zip(layer_parameters(layer), wholes[layer.name]):
                swapped.append((p, p.grad))
                p.grad = w
        inner = {layer.name: torch.zeros((), dtype=torch.float64, device=device) for layer in layers}
        bad = torch.zeros((), dtype=torch.float64, device=device)  # non-finite outputs
        bad_grad = torch.zeros((), dtype=torch.float64, device=device)  # non-finite gradients
        try:
            if mine:
                before = all_finite(wholes_of(mine, wholes))
                with d._timed("preconditioning"):
                    inner.update(d._local_work("the owners' preconditioning", lambda: precondition_owned(
                        d.method, mine, damping, with_inner=True, precision=d.precision)))
                after = all_finite(wholes_of(mine, wholes))
                if before is not None:
                    bad_grad = bad_grad + (~before).to(torch.float64)
                if after is not None:
                    bad = bad + (~after).to(torch.float64)
            else:
                d._local_work("the owners' preconditioning", lambda: None)
        finally:
            for p, g in swapped:
                p.grad = g
        terms = torch.stack([inner[layer.name] for layer in layers] + [bad_grad, bad])
        with d._timed("communication"), d._collective("the KL-clip all-reduce"):
            _dist().all_reduce(terms, group=d.group)
        self.grad_ok, self.output_ok = terms[-2] == 0, terms[-1] == 0  # health's causes, rank-identical
        ok = self.grad_ok & self.output_ok
        if captures_ok is not None:
            ok = ok & captures_ok.to(device)
        nu = torch.ones((), dtype=torch.float64, device=device)
        if kl_clip is not None:
            total = terms[:-2].sum().abs() * (lr * lr)
            nu = torch.where(total > 0, torch.clamp(torch.sqrt(kl_clip / total.clamp_min(1e-300)), max=1.0), nu)
        nu = torch.where(ok, nu, torch.ones_like(nu))
        with d._timed("communication"), d._collective("the gradient scatter from the owners"):
            self._scatter(by_owner, wholes, nu, ok)
        f64 = layers[0].module.weight.grad.dtype == torch.float64
        return nu.to(torch.float64 if f64 else torch.float32), ok

    def _gather(self, by_owner: dict) -> dict:
        """layer name -> whole (weight, bias) gradients, on the owner of each layer."""
        d = self.driver
        dist = _dist()
        world, rank = d.world_size, d.rank
        out: dict = {}
        pending = []
        for owner, layers in sorted(by_owner.items()):
            params = [p for layer in layers for p in layer_parameters(layer)]
            for idx in _buckets([_padded(p.shape, world) * p.grad.element_size() for p in params], d.bucket_cap):
                ps = [params[i] for i in idx]
                send = torch.cat([_pad(p.grad.to_local(), p.shape, world) for p in ps])
                recv = [torch.empty_like(send) for _ in range(world)] if owner == rank else None
                pending.append((owner, ps, send, recv, dist.gather(send, recv, dst=self._src(owner), group=d.group,
                                                                   async_op=True)))
        grads: dict = {}
        for owner, ps, send, recv, work in pending:
            if not _wait(work, d.timeout, send):
                raise RuntimeError(f"the gradient gather timed out after {d.timeout:g} s")
            d.bytes["gradients"] += _nbytes(send) * (world if owner == rank else 1)
            if owner != rank:
                continue
            offset = 0
            for p in ps:
                grads[id(p)] = _unpad(recv, offset, p.shape, world)
                offset += _padded(p.shape, world)
        for owner, layers in by_owner.items():
            if owner == rank:
                for layer in layers:
                    out[layer.name] = [grads[id(p)] for p in layer_parameters(layer)]
        return out

    def _scatter(self, by_owner: dict, wholes: dict, nu: torch.Tensor, ok: torch.Tensor) -> None:
        """Each rank's rows of its owners' preconditioned gradients, times nu, into its shards."""
        d = self.driver
        dist = _dist()
        world, rank = d.world_size, d.rank
        pending = []
        for owner, layers in sorted(by_owner.items()):
            params = [p for layer in layers for p in layer_parameters(layer)]
            src = [w for layer in layers for w in wholes[layer.name]] if owner == rank else None
            for idx in _buckets([_padded(p.shape, world) * p.grad.element_size() for p in params], d.bucket_cap):
                ps = [params[i] for i in idx]
                recv = torch.empty(sum(_padded(p.shape, world) for p in ps), dtype=ps[0].grad.dtype,
                                   device=ps[0].grad.device)
                chunks = None
                if src is not None:  # one padded copy per parameter, one cat per bucket
                    chunks = list(torch.cat([_by_rank(src[i], world) for i in idx], dim=1).unbind(0))
                pending.append((ps, recv, dist.scatter(recv, chunks, src=self._src(owner), group=d.group,
                                                       async_op=True)))
        for ps, recv, work in pending:
            if not _wait(work, d.timeout, recv):
                raise RuntimeError(f"the gradient scatter timed out after {d.timeout:g} s")
            d.bytes["gradients"] += _nbytes(recv)
            offset = 0
            with torch.no_grad():
                for p in ps:
                    local = p.grad.to_local()
                    new = recv[offset:offset + local.numel()].view_as(local) * nu.to(local.dtype)
                    local.copy_(torch.where(ok, new, local))
                    offset += _padded(p.shape, world)


def _triangle(f: torch.Tensor) -> int:
    return f.shape[0] * (f.shape[0] + 1) // 2


def wholes_of(layers: list, wholes: dict) -> list:
    return [w for layer in layers for w in wholes[layer.name]]


def _padded(shape: Any, world: int) -> int:
    """Elements of one rank's shard padded to ceil(n / world) rows."""
    return chunk_rows(shape[0], world, 0)[1] * _rest(tuple(shape))


def _pad(local: torch.Tensor, shape: Any, world: int) -> torch.Tensor:
    flat = local.reshape(-1)
    n = _padded(shape, world)
    return flat if flat.numel() == n else torch.cat([flat, flat.new_zeros(n - flat.numel())])


def _unpad(recv: list, offset: int, shape: Any, world: int) -> torch.Tensor:
    """The whole tensor from the ranks' padded shares (rows in rank order, padding last): one copy."""
    n = _padded(shape, world)
    size = chunk_rows(shape[0], world, 0)[1]
    return torch.cat([buf[offset:offset + n] for buf in recv]).view(world * size, *shape[1:])[:shape[0]]


def _by_rank(whole: torch.Tensor, world: int) -> torch.Tensor:
    """(world, padded share) rows of `whole`, zero-padded to world * ceil(n / world) rows."""
    size = chunk_rows(whole.shape[0], world, 0)[1]
    flat = whole.reshape(whole.shape[0], -1) if whole.dim() > 1 else whole.reshape(-1, 1)
    if world * size != whole.shape[0]:
        flat = torch.cat([flat, flat.new_zeros(world * size - whole.shape[0], flat.shape[1])])
    return flat.reshape(world, size * flat.shape[1])
