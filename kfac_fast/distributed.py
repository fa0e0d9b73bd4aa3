"""Data-parallel K-FAC over torch.distributed: factor averaging and shared-out inversions.

Each rank captures statistics of its own shard of the batch; the gradients are averaged
before K-FAC sees them (by DistributedDataParallel, or by the user, e.g. with
`average_gradients_`). What this module adds on top of the single-process preconditioner:

- factor averaging: the packed upper triangles (`ops.pack_triangles`) of all factors are
  averaged with a few flattened, bucketed all-reduces, never one per layer. Per-rank A
  uses 1/R_local and G (with loss_average="batch") is per-example, so the average of
  equal-size shards is exactly the factor of the global batch. Because the zero-debiased
  running average is linear, averaging only before an inversion (`factor_sync="inverse"`,
  as kfac-jax does) gives the same factors at inversion time as averaging after every
  update (`factor_sync="update"`), with `inv_update_steps / factor_update_steps` times
  fewer collectives; the price is that between inversions each rank holds its own local
  factors (a checkpoint then averages them first, which is why `state_dict` is collective).
- inversion work: decompositions are assigned by a greedy least-loaded rule on their
  cost n^3, computed by their owner only.
- two strategies, named after what they save:
  "communication" (communication-optimal): owners broadcast eigenbases / inverses in
  buckets; every rank preconditions every layer (no per-step collective from K-FAC).
  "memory" (memory-optimal): a layer's A and G have one owner, which alone keeps its
  decomposition and preconditions it; the preconditioned gradients are broadcast in
  buckets every step (as much traffic as DDP's gradient all-reduce).

Every collective is issued in the same order on every rank from rank-identical metadata
(registration order, sizes, update counts): no decision depends on tensor values, so a
rank cannot wait on a collective the others skip.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
from contextlib import contextmanager
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .health import Health

STRATEGIES = ("communication", "memory")
FACTOR_SYNCS = ("inverse", "update")
DEFAULT_BUCKET_CAP_MB = 25.0


def _dist():
    import torch.distributed as dist
    return dist


def resolve_group(process_group=None):
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


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How KFACPreconditioner runs under torch.distributed (see the module docstring).

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


def setup(model: nn.Module, layers: dict, method: str, process_group=None,
          distributed: Union[None, bool, DistributedOptions] = None, *,
          health: Optional[Health] = None, eigh_tol: Optional[float] = None) -> Optional["DataParallelKFAC"]:
    """The preconditioner's distributed driver, or None to run single-process.

    distributed: None (on when torch.distributed is initialised), False (off), True or
    a DistributedOptions (on; torch.distributed must be initialised). A group of one
    rank always runs single-process: the exact single-process code path.
    health, eigh_tol: the preconditioner's solver fallbacks / counters and warm-refresh
    tolerance, used by the owner of each decomposition (see DataParallelKFAC).
    """
    if distributed is False:
        if process_group is not None:
            raise ValueError("process_group was given but distributed=False")
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
    check_unsharded(model)
    opts = distributed if isinstance(distributed, DistributedOptions) else DistributedOptions()
    return DataParallelKFAC(layers, method, group, strategy=opts.strategy, factor_sync=opts.factor_sync,
                            bucket_cap_mb=opts.bucket_cap_mb, profile=opts.profile,
                            health=health, eigh_tol=eigh_tol)


def check_unsharded(model: nn.Module) -> None:
    """Raise NotImplementedError naming the first FSDP-wrapped module or DTensor parameter.

    K-FAC needs each rank to hold whole layers and whole gradients; sharded parameters
    would need factor and gradient gathers this module does not do.
    """
    fsdp_types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp_types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule
        fsdp_types.append(FSDPModule)
    except ImportError:
        pass
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = None
    for name, module in model.named_modules():
        if fsdp_types and isinstance(module, tuple(fsdp_types)):
            raise NotImplementedError(
                f"kfac_fast.distributed: module {name or '<root>'!r} is FSDP-wrapped "
                f"({type(module).__name__}); FSDP-sharded parameters are not supported, "
                "use DistributedDataParallel or plain data parallelism")
    if DTensor is not None:
        for name, p in model.named_parameters():
            if isinstance(p, DTensor):
                raise NotImplementedError(
                    f"kfac_fast.distributed: parameter {name!r} is a DTensor (FSDP2 or tensor "
                    "parallel sharding); sharded parameters are not supported, use "
                    "DistributedDataParallel or plain data parallelism")


# ---------------------------------------------------------------------------------------
# work assignment
# ---------------------------------------------------------------------------------------
def assign_work(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: greedy least-loaded (largest cost first, ties to the
    lower item index and the lower rank), deterministic on every rank."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign_work: world_size must be an int >= 1, got {world_size!r}")
    for i, c in enumerate(costs):
        if not c >= 0:
            raise ValueError(f"assign_work: costs[{i}] must be >= 0, got {c!r}")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost assigned to each rank."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners):
        loads[r] += c
    return loads


def load_imbalance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """max load / mean load (1.0 is perfect balance; 1.0 for zero total cost)."""
    loads = rank_loads(costs, owners, world_size)
    mean = sum(loads) / world_size
    return max(loads) / mean if mean > 0 else 1.0


def decomposition_cost(n: int) -> float:
    """Relative cost of one eigendecomposition or inverse of an n x n factor."""
    return float(n) ** 3


# ---------------------------------------------------------------------------------------
# bucketed collectives
# ---------------------------------------------------------------------------------------
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


def allreduce_factors_(factors: Sequence[torch.Tensor], group, bucket_cap_bytes: int) -> int:
    """Average symmetric factors across `group` in place; returns bytes all-reduced per rank.

    Each bucket is one `pack_triangles` buffer and one all-reduce (sum, then 1/world on
    the device: gloo has no AVG); the all-reduces of all buckets are in flight together.
    """
    dist = _dist()
    factors = list(factors)
    if not factors:
        return 0
    item = factors[0].element_size()
    sizes = [f.shape[0] * (f.shape[0] + 1) // 2 * item for f in factors]
    world = dist.get_world_size(group)
    pending = []
    for idx in _buckets(sizes, bucket_cap_bytes):
        bucket = [factors[i] for i in idx]
        flat = ops.pack_triangles(bucket)
        pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    sent = 0
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(world)
        ops.unpack_triangles_(bucket, flat)
        sent += flat.numel() * flat.element_size()
    return sent


def broadcast_from_owners_(tensors: Sequence[torch.Tensor], owners: Sequence[int], group,
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
        sizes = [tensors[i].numel() * tensors[i].element_size() for i in members]
        for idx in _buckets(sizes, bucket_cap_bytes):
            bucket = [tensors[members[j]] for j in idx]
            if owner == me:
                flat = torch.cat([t.reshape(-1) for t in bucket])
            else:
                flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype,
                                   device=bucket[0].device)
            pending.append((owner, bucket, flat, dist.broadcast(flat, src=src, group=group, async_op=True)))
    sent = 0
    for owner, bucket, flat, work in pending:
        work.wait()
        sent += flat.numel() * flat.element_size()
        if owner != me:
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
    return sent


def average_gradients_(parameters, process_group=None, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> int:
    """Average `.grad` of the given parameters across ranks (plain data parallelism, no
    DDP wrapper); returns bytes all-reduced. Call after backward, before K-FAC's step."""
    dist = _dist()
    group = dist.group.WORLD if process_group is None else process_group
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0
    world = dist.get_world_size(group)
    cap = int(bucket_cap_mb * 2 ** 20)
    by_kind: dict = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    pending = []
    for members in by_kind.values():
        for idx in _buckets([g.numel() * g.element_size() for g in members], cap):
            bucket = [members[i] for i in idx]
            flat = torch.cat([g.reshape(-1) for g in bucket])
            pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    sent = 0
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        sent += flat.numel() * flat.element_size()
    return sent


def check_same_layers(signature: list, group) -> None:
    """Raise ValueError on every rank unless every rank registered the same layers.

    One all_gather of each rank's (name, kind, a_dim, g_dim) list; every rank compares
    all of them, so a mismatch is an error everywhere instead of a later hang.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, signature, group=group)
    for rank, other in enumerate(gathered):
        if other == gathered[0]:
            continue
        diff = next((i for i, (x, y) in enumerate(zip(gathered[0], other)) if x != y),
                    min(len(gathered[0]), len(other)))
        first = gathered[0][diff] if diff < len(gathered[0]) else "<none>"
        theirs = other[diff] if diff < len(other) else "<none>"
        raise ValueError(
            f"kfac_fast.distributed: the model differs across ranks: rank {rank} registers "
            f"{len(other)} layers and rank 0 {len(gathered[0])}; first difference at layer "
            f"#{diff}: rank 0 has {first}, rank {rank} has {theirs} "
            "(every rank must build the same model)")


# ---------------------------------------------------------------------------------------
# the per-preconditioner driver
# ---------------------------------------------------------------------------------------
class DataParallelKFAC:
    """The collectives and work split of one KFACPreconditioner over one process group.

    The preconditioner calls, in this order per step: `factors_updated` after its
    factor update, `refresh` with the stale layers on refresh steps, `precondition`
    with the layers to precondition. `is_ready(layer)` replaces its local "has a
    decomposition" check (under "memory" only owners hold one; the answer must be
    the same on every rank).

    Args:
        layers: the preconditioner's registered layers (name -> KFACLayer), same order
            on every rank.
        method: "eigen" or "inverse" ("ekfac" is refused: its scales would need an
            all-reduce the size of the gradients at every step).
        group: a process group of size > 1 (see `resolve_group`).
        strategy: "communication" or "memory" (module docstring).
        factor_sync: "inverse" (average before each inversion) or "update" (after every
            factor update).
        bucket_cap_mb: bytes per flattened collective, in MiB.
        profile: accumulate wall time per phase in `seconds` (synchronises CUDA around
            each phase: for measurements, not for training).
        health: the `kfac_fast.health.Health` whose fallback chain (fp64 retry, added
            damping, previous result) serves the decompositions, as in the
            single-process refresh; its solver counters then count only the factors this
            rank owns (a fresh one when None).
        eigh_tol: the warm-refresh tolerance (KFACPreconditioner's `eigh_tol`): an owner
            refreshes from the eigenbasis it holds (ownership is fixed, so it is its own
            previous solve, or the broadcast copy of it); without one, a full solve.
    """

    def __init__(self, layers: dict, method: str, group, *, strategy: str = "communication",
                 factor_sync: str = "inverse", bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
                 profile: bool = False, health: Optional[Health] = None,
                 eigh_tol: Optional[float] = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if factor_sync not in FACTOR_SYNCS:
            raise ValueError(f"factor_sync must be one of {FACTOR_SYNCS}, got {factor_sync!r}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        if method == "ekfac":
            raise NotImplementedError("method='ekfac' is not supported under torch.distributed: its "
                                      "scales change every step and would need an all-reduce as large "
                                      "as the gradients; use method='eigen' or 'inverse'")
        if method not in ("eigen", "inverse"):
            raise ValueError(f"method must be 'eigen' or 'inverse', got {method!r}")
        dist = _dist()
        self.layers = layers
        self.method = method
        self.group = group
        self.strategy = strategy
        self.factor_sync = factor_sync
        self.bucket_cap = int(bucket_cap_mb * 2 ** 20)
        self.profile = profile
        self.health = Health() if health is None else health
        self.eigh_tol = eigh_tol
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes = {"factors": 0, "decompositions": 0, "gradients": 0}
        self.seconds = {"communication": 0.0, "inversion": 0.0, "preconditioning": 0.0}
        self._owners: Optional[dict] = None  # (layer name, "a"|"g") -> rank
        self._ready: set = set()
        check_same_layers([(n, l.kind, l.a_dim, l.g_dim, l.has_bias) for n, l in layers.items()], group)

    # ---- bookkeeping --------------------------------------------------------------------
    @contextmanager
    def _timed(self, phase: str):
        if not self.profile:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def owners(self) -> dict:
        """(layer name, "a" or "g") -> owning rank; fixed at the first refresh.

        "communication" balances single factors; "memory" keeps a layer's A and G on one
        rank (its owner preconditions the layer) and balances their summed cost.
        """
        if self._owners is None:
            names = list(self.layers)
            if self.strategy == "memory":
                costs = [decomposition_cost(self.layers[n].a_dim) + decomposition_cost(self.layers[n].g_dim)
                         for n in names]
                owner = assign_work(costs, self.world_size)
                self._owners = {(n, s): r for n, r in zip(names, owner) for s in ("a", "g")}
            else:
                items = [(n, s) for n in names for s in ("a", "g")]
                costs = [decomposition_cost(self.layers[n].a_dim if s == "a" else self.layers[n].g_dim)
                         for n, s in items]
                self._owners = dict(zip(items, assign_work(costs, self.world_size)))
        return self._owners

    def is_ready(self, layer) -> bool:
        """Whether the layer has been decomposed (somewhere); identical on every rank."""
        return layer.name in self._ready

    # ---- factors ------------------------------------------------------------------------
    def average_factors(self, layers: list) -> None:
        """All-reduce-average the A and G factors of `layers` (in their given order)."""
        factors = [f for l in layers for f in (l.a_factor, l.g_factor)]
        with self._timed("communication"):
            self.bytes["factors"] += allreduce_factors_(factors, self.group, self.bucket_cap)

    def factors_updated(self, layers: list) -> None:
        """After a factor update of `layers`: average now under factor_sync="update"."""
        if self.factor_sync == "update" and layers:
            self.average_factors(layers)

    def agree_finite(self, ok: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The non-finite guard's flag, AND-ed over every rank (MIN all-reduce, on device).

        Each rank checks only its own captures; without this a NaN on one rank would drop
        that step's statistics there and keep them elsewhere, and the ranks' factors (and,
        under "memory", their decisions to keep `.grad`) would diverge. ok None (nothing
        to check here) counts as finite but still joins the collective, so every rank
        issues it. No host sync: the flag stays a device tensor.
        """
        dist = _dist()
        # int32: MIN on bool is not supported by every backend
        flag = (torch.ones((), dtype=torch.int32, device=device) if ok is None
                else ok.to(device=device, dtype=torch.int32).reshape(()))
        with self._timed("communication"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return flag.bool()

    # ---- inversions ---------------------------------------------------------------------
    def refresh(self, layers: list, damping: float) -> int:
        """Decompose the factors of `layers`, each by its owner, and share the results;
        returns how many factors this rank decomposed."""
        if not layers:
            return 0
        if self.factor_sync == "inverse":
            self.average_factors(layers)
        owners = self.owners()
        items = [(l, s) for l in layers for s in ("a", "g")]
        mine = [(l, s) for l, s in items if owners[(l.name, s)] == self.rank]
        with self._timed("inversion"):
            self._decompose(mine, damping)
        if self.strategy == "communication":
            self._share_decompositions(layers)
        self._ready.update(l.name for l in layers)
        return len(mine)

    def _share_decompositions(self, layers: list) -> None:
        """Broadcast every factor's decomposition from its owner to all ranks."""
        owners = self.owners()
        tensors, item_owners = [], []
        for layer in layers:
            for side in ("a", "g"):
                owner = owners[(layer.name, side)]
                parts = self._result_tensors(layer, side, allocate=owner != self.rank)
                tensors += parts
                item_owners += [owner] * len(parts)
        with self._timed("communication"):
            self.bytes["decompositions"] += broadcast_from_owners_(tensors, item_owners, self.group,
                                                                   self.bucket_cap)

    def _decompose(self, items: list, damping: float) -> None:
        if not items:
            return
        factors = [l.a_factor if s == "a" else l.g_factor for l, s in items]
        if self.method == "inverse":
            # the same pi_damping call as the single-process path, so the damping is
            # bit-identical; each owner needs only the two traces
            pis = {}
            for layer, _ in items:
                if layer.name not in pis:
                    pis[layer.name] = ops.pi_damping(layer.a_factor, layer.g_factor, damping)
            # the single-process fallback chain; an owner's previous inverse is its own
            invs = self.health.solve_inverse(factors, [pis[l.name][0 if s == "a" else 1] for l, s in items],
                                             [getattr(l, f"{s}_inv") for l, s in items])
            for (layer, side), inv in zip(items, invs):
                setattr(layer, f"{side}_inv", inv)
            return
        previous = [None if getattr(l, f"q{s}") is None else (getattr(l, f"d{s}"), getattr(l, f"q{s}"))
                    for l, s in items]
        vals, vecs = self.health.solve_eigh(factors, previous, tol=self.eigh_tol)
        for (layer, side), d, q in zip(items, vals, vecs):
            setattr(layer, f"d{side}", d)
            setattr(layer, f"q{side}", q)

    def _result_tensors(self, layer, side: str, *, allocate: bool) -> list:
        """The decomposition tensors of one factor (allocated empty on non-owners)."""
        factor = layer.a_factor if side == "a" else layer.g_factor
        n = factor.shape[0]
        names = (f"{side}_inv",) if self.method == "inverse" else (f"q{side}", f"d{side}")
        out = []
        for name in names:
            if allocate:
                shape = (n,) if name.startswith("d") else (n, n)
                setattr(layer, name, torch.empty(shape, dtype=factor.dtype, device=factor.device))
            out.append(getattr(layer, name))
        return out

    # ---- preconditioning ------------------------------------------------------------------
    def precondition(self, layers: list, local: Callable[[list], Optional[torch.Tensor]], *,
                     damping: float, lr: float, kl_clip: Optional[float]) -> Optional[torch.Tensor]:
        """Precondition `.grad` of `layers` (all with gradients); returns nu.

        "communication": every rank runs `local` (the single-process preconditioning).
        "memory": owners precondition their layers, then the preconditioned gradients
        and each layer's <P, dW_bar> are broadcast, and every rank applies the same KL
        clip factor (sums taken in the same order everywhere).
        """
        if self.strategy == "communication":
            with self._timed("preconditioning"):
                return local(layers)
        if not layers:
            return None
        owners = self.owners()
        mine = [l for l in layers if owners[(l.name, "a")] == self.rank]
        device = layers[0].module.weight.grad.device
        inner = {l.name: torch.zeros((), dtype=torch.float64, device=device) for l in layers}
        with self._timed("preconditioning"):
            if mine:
                grads = [_grad_bar(l) for l in mine]
                if self.method == "eigen":
                    ps = ops.precondition_eigen(grads, [l.qa for l in mine], [l.da for l in mine],
                                                [l.qg for l in mine], [l.dg for l in mine], damping)
                else:
                    ps = ops.precondition_inverse(grads, [l.a_inv for l in mine], [l.g_inv for l in mine])
                for l, g, p in zip(mine, grads, ps):
                    if kl_clip is not None:
                        # <P, dW_bar>: for the eigen method this equals the in-place op's
                        # sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))
                        inner[l.name] = (p.to(torch.float64) * g.to(torch.float64)).sum()
                    _write_grad(l, p)
        tensors, item_owners = [], []
        for l in layers:
            owner = owners[(l.name, "a")]
            parts = [l.module.weight.grad] + ([l.module.bias.grad] if l.has_bias else [])
            if kl_clip is not None:
                parts.append(inner[l.name])
            tensors += parts
            item_owners += [owner] * len(parts)
        with self._timed("communication"):
            self.bytes["gradients"] += broadcast_from_owners_(tensors, item_owners, self.group,
                                                              self.bucket_cap)
        nu_dtype = torch.float64 if layers[0].module.weight.grad.dtype == torch.float64 else torch.float32
        if kl_clip is None:
            return torch.ones((), dtype=nu_dtype, device=device)
        with self._timed("preconditioning"):
            total = torch.stack([inner[l.name] for l in layers]).sum() * (lr * lr)
            total = total.abs()
            nu = torch.where(total > 0, torch.clamp(torch.sqrt(kl_clip / total.clamp_min(1e-300)), max=1.0),
                             torch.ones_like(total))
            grads = [g for l in layers for g in ([l.module.weight.grad] +
                                                 ([l.module.bias.grad] if l.has_bias else []))]
            torch._foreach_mul_(grads, nu.to(grads[0].dtype))
        return nu.to(nu_dtype)

    # ---- checkpoints ------------------------------------------------------------------------
    def before_state_dict(self) -> None:
        """Make this rank's state global before a checkpoint (collective): average the
        factors under factor_sync="inverse"; under "memory" gather every decomposition
        (until `after_state_dict`), so rank 0's checkpoint resumes exactly."""
        if self.factor_sync == "inverse":
            self.average_factors([l for l in self.layers.values()
                                  if l.a_factor is not None and l.g_factor is not None])
        if self.strategy == "memory":
            self._share_decompositions([l for l in self.layers.values() if l.name in self._ready])

    def after_state_dict(self) -> None:
        """Release the decompositions `before_state_dict` gathered."""
        self._drop_unowned()

    def after_load_state_dict(self) -> None:
        """Rebuild the rank-identical ready set from the loaded state (the same on every
        rank, since every rank loads rank 0's checkpoint); under "memory" keep only the
        decompositions this rank owns."""
        self._ready = {n for n, l in self.layers.items() if all(getattr(l, a) is not None
                                                                for a in self._result_names())}
        self._drop_unowned()

    def _result_names(self) -> tuple:
        return ("a_inv", "g_inv") if self.method == "inverse" else ("qa", "da", "qg", "dg")

    def _drop_unowned(self) -> None:
        if self.strategy != "memory":
            return
        owners = self.owners()
        for name, layer in self.layers.items():
            if owners[(name, "a")] != self.rank:
                for attr in self._result_names():
                    setattr(layer, attr, None)


def _grad_bar(layer) -> torch.Tensor:
    """dW_bar = [dW | db] as a (d_out, n_a) matrix (a copy when the layer has a bias)."""
    w = layer.module.weight.grad
    w2 = w.reshape(w.shape[0], -1)
    if layer.has_bias:
        return torch.cat([w2, layer.module.bias.grad.unsqueeze(1)], dim=1)
    return w2


def _write_grad(layer, p: torch.Tensor) -> None:
    w = layer.module.weight.grad
    d_in = w[0].numel()
    w.copy_(p[:, :d_in].reshape_as(w))
    if layer.has_bias:
        layer.module.bias.grad.copy_(p[:, d_in])
