"""DataParallelKFAC: one preconditioner's collectives and work split over a process group.

The preconditioner keeps its single-process math; this driver adds what data
parallelism needs around it: factor averaging, owner-only decompositions and their
broadcast, and (strategy "memory") owner-only preconditioning with the preconditioned
gradients broadcast. See `kfac_fast.distributed` for the strategies and the ordering
rule every collective follows.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .. import ops
from ..health import Health
from .agreement import agree_counts, check_same_setup, collective_error
from .assignment import factor_owners, memory_cost
from .checkpoint_sync import CheckpointSync
from .collectives import (
    DEFAULT_BUCKET_CAP_MB,
    all_reduce_min_,
    allreduce_factors_,
    broadcast_from_owners_,
    rank_and_size,
)
from .options import FACTOR_SYNCS, STRATEGIES
from .owned import precondition_owned
from .participation import Participation
from .weighting import RowWeights, allreduce_weighted_factors_


class DataParallelKFAC(CheckpointSync):
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
        settings: the preconditioner's settings (`settings_of`), checked equal on every rank.
        meta_group: a gloo group over the same ranks for the host-side agreements (`group`
            when None); timeout: the groups' timeout in seconds, for error messages.
    """

    def __init__(self, layers: dict, method: str, group: Any, *, strategy: str = "communication",
                 factor_sync: str = "inverse", bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
                 profile: bool = False, health: Optional[Health] = None,
                 eigh_tol: Optional[float] = None, settings: Optional[dict] = None,
                 meta_group: Any = None, timeout: Optional[float] = None) -> None:
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
        self.layers = layers
        self.method = method
        self.group = group
        self.strategy = strategy
        self.factor_sync = factor_sync
        self.bucket_cap = int(bucket_cap_mb * 2 ** 20)
        self.profile = profile
        self.health = Health() if health is None else health
        self.eigh_tol = eigh_tol
        self.rank, self.world_size = rank_and_size(group)
        self.bytes = {"factors": 0, "decompositions": 0, "gradients": 0}
        self.seconds = {"communication": 0.0, "inversion": 0.0, "preconditioning": 0.0}
        self._owners: Optional[dict] = None  # (layer name, "a"|"g") -> rank
        self._ready: set = set()
        self.meta_group = group if meta_group is None else meta_group
        self.timeout = timeout
        self._broken: Optional[BaseException] = None
        self.row_weights = RowWeights()
        self.sharded: Any = None  # a sharded_grads.ShardedGrads when the layers are FSDP2-sharded
        self.sharded_memory: Any = None  # a sharded_memory.ShardedMemory (strategy "memory" on them)
        self._agreed_ok: Optional[torch.Tensor] = None  # this step's agreed non-finite flag
        own = dict(settings or {}, method=method, strategy=strategy, factor_sync=factor_sync,
                   bucket_cap_mb=bucket_cap_mb, eigh_tol=eigh_tol)
        check_same_setup([(n, layer.kind, layer.a_dim, layer.g_dim, layer.has_bias)
                          for n, layer in layers.items()], own, group)
        self.participation = Participation(self, (settings or {}).get("factor_dtype"))
        self.precision = (settings or {}).get("precision")  # the owners' preconditioning follows it

    # ---- rank agreement -----------------------------------------------------------------
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Run kfac_fast collectives; a timeout or broken group becomes one clear
        RuntimeError, and every later collective of this driver raises it at once."""
        if self._broken is not None:
            raise collective_error(what, self._broken, self.timeout)
        try:
            yield
        except RuntimeError as exc:
            self._broken = exc
            if "cannot continue on this group" in str(exc):  # already ours, from a nested phase
                raise
            raise collective_error(what, exc, self.timeout) from exc

    def _agree(self, values: list, what: str) -> list:
        with self._collective(what):
            return agree_counts(values, self.meta_group)

    def _local_work(self, what: str, work: Callable[[], Any]) -> Any:
        """Run this rank's share of `what`, then agree (one small all-reduce) whether
        every rank's share succeeded: a failure on one rank raises on every rank, after
        the same collectives, so a caller that catches it can go on."""
        error: Optional[BaseException] = None
        result = None
        try:
            result = work()
        except Exception as exc:
            error = exc
        failed = self._agree([int(error is not None and r == self.rank) for r in range(self.world_size)],
                             f"the agreement after {what}")
        bad = [r for r, f in enumerate(failed) if f]
        if bad:
            self.count_event("rank_failure")
            raise RuntimeError(f"kfac_fast.distributed: {what} failed on rank(s) {bad}"
                               + (f": {type(error).__name__}: {error}" if error is not None
                                  else " (its error is raised there)")) from error
        return result

    def count_event(self, cause: str) -> None:
        """One more `cause` in health() (host-side events of refresh or resync steps only)."""
        device = next(iter(self.layers.values())).module.weight.device
        self.health.count(cause, torch.zeros((), dtype=torch.bool, device=device))

    def begin_step(self, fired: list, factor_step: bool) -> list:
        """The layers that fired on any rank this step (registration order); the
        preconditioner calls it at the start of `step()`. One small host all-reduce."""
        fired = self.participation.begin_step(fired, factor_step)
        self._agreed_ok = None
        if factor_step and self.sharded_memory is not None:
            self.sharded_memory.before_update()
        return fired

    def describe_state(self, *, synced: bool) -> dict:
        """What a state dict taken on this rank holds (its "distributed" entry)."""
        return {"rank": self.rank, "world_size": self.world_size, "strategy": self.strategy,
                "factor_sync": self.factor_sync, "synced": synced}

    # ---- bookkeeping --------------------------------------------------------------------
    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
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
        rank (its owner preconditions the layer) and balances their summed cost; on FSDP2
        (only owners hold factors) the cost is the memory held, `assignment.memory_cost`.
        """
        if self._owners is None:
            dims = {name: (layer.a_dim, layer.g_dim) for name, layer in self.layers.items()}
            kw = {"cost": memory_cost} if self.sharded_memory is not None else {}
            self._owners = factor_owners(dims, self.world_size, whole_layers=self.strategy == "memory", **kw)
        return self._owners

    def is_ready(self, layer: Any) -> bool:
        """Whether the layer has been decomposed (somewhere); identical on every rank."""
        return layer.name in self._ready

    # ---- factors ------------------------------------------------------------------------
    def average_factors(self, layers: list, *, weighted: bool = False) -> None:
        """All-reduce-average the A and G factors of `layers` (in their given order);
        weighted: each rank by its rows (A) and examples (G), `weighting.RowWeights`."""
        factors = [f for layer in layers for f in (layer.a_factor, layer.g_factor)]
        with self._timed("communication"), self._collective("the factor all-reduce"):
            if weighted:
                self.bytes["factors"] += allreduce_weighted_factors_(factors, self.row_weights.of(layers),
                                                                     self.group, self.bucket_cap)
            else:
                self.bytes["factors"] += allreduce_factors_(factors, self.group, self.bucket_cap)

    def factors_updated(self, layers: list, *, decay: Optional[float] = None) -> None:
        """After a factor update of `layers` (those updated here): agree which layers
        hold factors, give layers held by some ranks only the same factors and k on every
        rank (`Participation`), and average now under factor_sync="update"."""
        self.row_weights.record(layers)
        updated = self.participation.factors_updated(layers)
        if self.sharded_memory is not None:  # reduced to the owners at every update (decay: this step's)
            self.sharded_memory.after_update(layers, updated, decay, self._agreed_ok)
        elif self.factor_sync == "update" and updated:
            self.average_factors(updated, weighted=True)

    def agree_finite(self, ok: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The non-finite guard's flag, AND-ed over every rank (MIN all-reduce, on device).

        Each rank checks only its own captures; without this a NaN on one rank would drop
        that step's statistics there and keep them elsewhere, and the ranks' factors (and,
        under "memory", their decisions to keep `.grad`) would diverge. ok None (nothing
        to check here) counts as finite but still joins the collective, so every rank
        issues it. No host sync: the flag stays a device tensor.
        """
        # int32: MIN on bool is not supported by every backend
        flag = (torch.ones((), dtype=torch.int32, device=device) if ok is None
                else ok.to(device=device, dtype=torch.int32).reshape(()))
        with self._timed("communication"), self._collective("the non-finite flag all-reduce"):
            all_reduce_min_(flag, self.group)
        self._agreed_ok = flag.bool()
        return self._agreed_ok

    # ---- inversions ---------------------------------------------------------------------
    def refresh(self, layers: list, damping: float) -> tuple[int, Optional[torch.Tensor]]:
        """Decompose the factors of `layers`, each by its owner, and share the results.

        Returns (solved, paths): how many factors this rank decomposed, and what the
        eigh refresh did for each of them (a CPU int64 tensor of `ops.EIGH_PATHS` codes,
        in the order A then G of each owned layer), or None when nothing was solved or
        for method "inverse".
        """
        if not layers:
            return 0, None
        if self.factor_sync == "inverse" and self.sharded_memory is None:
            self.average_factors(layers, weighted=True)
        owners = self.owners()
        items = [(layer, s) for layer in layers for s in ("a", "g")]
        mine = [(layer, s) for layer, s in items if owners[(layer.name, s)] == self.rank]
        with self._timed("inversion"):
            paths = self._local_work("the decomposition of the factors", lambda: self._decompose(mine, damping))
        if self.strategy == "communication":
            self._share_decompositions(layers)
        self._ready.update(layer.name for layer in layers)
        return len(mine), paths

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
        with self._timed("communication"), self._collective("the decomposition broadcast"):
            self.bytes["decompositions"] += broadcast_from_owners_(tensors, item_owners, self.group,
                                                                   self.bucket_cap)

    def _decompose(self, items: list, damping: float) -> Optional[torch.Tensor]:
        """Decompose the (layer, side) factors this rank owns; returns eigh's paths."""
        if not items:
            return None
        factors = [layer.a_factor if s == "a" else layer.g_factor for layer, s in items]
        if self.method == "inverse":
            # the same pi_damping call as the single-process path, so the damping is
            # bit-identical; each owner needs only the two traces
            pis = {}
            for layer, _ in items:
                if layer.name not in pis:
                    pis[layer.name] = ops.pi_damping(layer.a_factor, layer.g_factor, damping)
            # the single-process fallback chain; an owner's previous inverse is its own
            invs = self.health.solve_inverse(factors, [pis[layer.name][0 if s == "a" else 1] for layer, s in items],
                                             [getattr(layer, f"{s}_inv") for layer, s in items])
            for (layer, side), inv in zip(items, invs):
                setattr(layer, f"{side}_inv", inv)
            return None
        previous = [None if getattr(layer, f"q{s}") is None else (getattr(layer, f"d{s}"), getattr(layer, f"q{s}"))
                    for layer, s in items]
        vals, vecs, paths = self.health.solve_eigh(factors, previous, tol=self.eigh_tol)
        for (layer, side), d, q in zip(items, vals, vecs):
            setattr(layer, f"d{side}", d)
            setattr(layer, f"q{side}", q)
        return paths

    def _result_tensors(self, layer: Any, side: str, *, allocate: bool) -> list:
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
        mine = [layer for layer in layers if owners[(layer.name, "a")] == self.rank]
        device = layers[0].module.weight.grad.device
        inner = {layer.name: torch.zeros((), dtype=torch.float64, device=device) for layer in layers}
        with self._timed("preconditioning"):
            if mine:
                inner.update(self._local_work("the owners' preconditioning", lambda: precondition_owned(
                    self.method, mine, damping, with_inner=kl_clip is not None, precision=self.precision)))
            else:
                self._local_work("the owners' preconditioning", lambda: None)
        tensors, item_owners = [], []
        for layer in layers:
            parts = layer.param_grads() + ([inner[layer.name]] if kl_clip is not None else [])
            tensors += parts
            item_owners += [owners[(layer.name, "a")]] * len(parts)
        with self._timed("communication"), self._collective("the preconditioned-gradient broadcast"):
            self.bytes["gradients"] += broadcast_from_owners_(tensors, item_owners, self.group,
                                                              self.bucket_cap)
        nu_dtype = torch.float64 if layers[0].module.weight.grad.dtype == torch.float64 else torch.float32
        if kl_clip is None:
            return torch.ones((), dtype=nu_dtype, device=device)
        with self._timed("preconditioning"):
            terms = torch.stack([inner[layer.name] for layer in layers])  # a non-finite layer counts 0
            total = torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)).sum() * (lr * lr)
            total = total.abs()
            nu = torch.where(total > 0, torch.clamp(torch.sqrt(kl_clip / total.clamp_min(1e-300)), max=1.0),
                             torch.ones_like(total))
            grads = [g for layer in layers for g in layer.param_grads()]
            torch._foreach_mul_(grads, nu.to(grads[0].dtype))
        return nu.to(nu_dtype)
