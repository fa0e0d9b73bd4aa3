"""KFAC: the full optimiser of Martens & Grosse (2015) on top of KFACPreconditioner.

The curvature is KFACPreconditioner's (same layer capture, same factors, same
`kfac_fast.ops` calls), run with the true (MC) Fisher and with its damping tied to
this optimiser's gamma. On top of it, each step:

1. Delta = -(A + pi gamma I)^-1 (x) (G + gamma/pi I)^-1 grad h (factored Tikhonov with
   the pi correction, `method="inverse"`, the default) or the exactly damped
   -(A (x) G + gamma^2 I)^-1 grad h (`method="eigen"`);
2. delta = alpha Delta + mu delta0 (delta0 the previous update), alpha and mu
   minimising the exact quadratic model
   M(delta) = h + g^T delta + 1/2 delta^T (F + (lambda + eta) I) delta on the current
   mini-batch, F the batch's exact Fisher applied through Jacobian-vector products
   (`kfac_fast.fvp`); a 2x2 solve (1x1 on the first step or with momentum=False);
3. every T1 steps, lambda follows the Levenberg-Marquardt rule on
   rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0)) (the loss re-evaluated by
   the closure on the same batch);
4. optionally every T3 steps, gamma is chosen among gamma * {omega2, 1, 1/omega2} by
   the resulting h(theta + delta); otherwise gamma = sqrt(lambda + eta).
Inverses (or eigendecompositions) are recomputed every T2 steps.

Example (a classifier; `loss` names the model's predictive distribution, which the
MC Fisher samples from)::

    model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
    opt = kfac_fast.KFAC(model, loss="cross_entropy")
    for x, y in loader:
        def closure():
            out = model(x)                        # the forward, under the hooks
            return F.cross_entropy(out, y), out   # (loss, outputs)
        loss = opt.step(closure)

The closure runs the forward pass on the current batch and returns `(loss, outputs)`:
the scalar loss h and the model's outputs z it was computed from (logits for
"cross_entropy" and "bce_with_logits", the mean for "gaussian"). It must not call
`backward()` or `zero_grad()`: the optimiser does both. It is called again under
`torch.no_grad()` on damping-adaptation steps to measure h(theta + delta), so it must
use the same batch and be deterministic (no dropout). The loss must depend on the
parameters only through the outputs (regularise with `l2_reg`): the gradient is taken
as J^T dh/dz from the same backward that the Fisher products are built on, which saves
the usual one. Conventions: the loss is the
average over the examples (dim 0) of each example's negative log-likelihood summed
over its outputs, as in the paper (e.g. `bce_with_logits(..., reduction="sum") / N`);
a loss averaged over output units too is fine for the step (the quadratic model is
exact for any scaling) but shifts lambda's meaningful range.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterable, Optional, Union

import torch
from torch import nn

from .fisher import canonical_loss
from .fvp import CurvatureProducts, FisherProducts, dot, twice_differentiable
from .metrics import StepMetrics
from .optimizer_args import check_distributed, learning_rate, positive_float, positive_int, step_lr, unit_interval
from .optimizer_args import exponential_batch_size as exponential_batch_size  # the public name's old home
from .optimizer_damping import adapt_lambda, search_gamma
from .optimizer_distributed import DataParallelSteps, draw_seed, example_seed, refuse_wrappers
from .optimizer_fsdp import sharded_step
from .optimizer_metrics import record_step
from .optimizer_state import split_state, with_preconditioner
from .optimizer_update import average_iterates, guard_update, swap_averaged
from .preconditioner import KFACPreconditioner
from .quadratic import solve_in_span

KFAC_METHODS = ("inverse", "eigen")
KFAC_APPROXIMATIONS = ("blockdiag", "tridiag")


class KFAC(torch.optim.Optimizer):
    """The paper's K-FAC optimiser (adaptive damping, quadratic-model step, momentum).

    Args:
        model: the nn.Module to train; its nn.Linear/nn.Conv2d layers get Kronecker
            curvature, any other parameter the plain gradient direction (scaled by the
            same alpha).
        loss: the predictive distribution behind the loss, for the MC Fisher:
            "cross_entropy", "bce_with_logits" or "gaussian" (alias "mse").
        lr: a multiplier on the quadratic model's step (default 1: the paper's step):
            theta += lr * (alpha Delta + mu delta0), (alpha, mu) the model's minimiser and
            delta0 the previous update as applied; rho is measured for the step taken
            (the model change at lr * (alpha, mu)). Kept in param_groups[0]["lr"], so
            torch's lr schedulers drive it; a scheduler may set 0 (no update, no damping
            adaptation that step). docs/optimizer.md says which schedulers work.
        damping: lambda's initial value (paper: 150).
        l2_reg: eta, the l2 coefficient; the objective is h + eta/2 |theta|^2 (paper 1e-5).
        damping_interval: T1, steps between Levenberg-Marquardt adaptations (paper 5).
        inv_update_steps: T2, steps between inverse refreshes (paper 20); an int or a
            callable of the step count, as in KFACPreconditioner.
        gamma_interval: T3, steps between gamma searches (paper 20); None keeps
            gamma = sqrt(lambda + eta) instead.
        omega1: the LM factor (default (19/20)^T1).
        omega2: the gamma-search factor (default sqrt(19/20)^T3).
        momentum: use delta0 (the 2x2 solve); False gives the 1-D line search.
        method: "inverse" (factored Tikhonov, pi correction; the paper's) or "eigen"
            (exact damping; the factors' eigendecompositions at each refresh, two more
            matmuls per layer per step). On the demo's CURVES autoencoder "eigen" ended
            400 steps at 55.7-60.4 nats against 68.2-77.5 for "inverse" (MC seeds 1-3, 2026-11-28).
            A likely reason (not isolated): there lambda falls towards 0 and factored
            Tikhonov still adds gamma*(pi I (x) G + A (x) I / pi), far more than gamma^2.
        factor_decay: decay of the factors' zero-debiased running average (paper 0.95).
        factor_update_steps: steps between factor updates (and MC backwards).
        damping_in_rho: include lambda in the model M that rho divides by. The paper
            and kfac-jax use the model without lambda (eta included), the default.
        variance: the Gaussian's variance for loss="gaussian" (1 matches 1/2 |y - z|^2).
        average_decay: keep an exponential average of the iterates with this decay
            (None: off); see `swap_averaged`.
        generator: where the base seed of the MC Fisher's samples comes from: one draw
            at construction (default: torch's global generator), none per step. Each
            example's sample is then a hash of (that seed, the step, its global index): see
            `fisher.ExampleSeed`; reseeding `generator` after construction changes nothing.
        skip_layers, factor_dtype: passed to KFACPreconditioner.
        approx: "blockdiag" (the default) or "tridiag", the paper's block-tridiagonal
            inverse (section 4.3) on chains of Linear layers (`kfac_fast.tridiag`;
            method "inverse" only).
        process_group, distributed: data parallelism, as KFACPreconditioner's (None: on
            when torch.distributed is initialised and `process_group`, default the world,
            has more than one rank; False: an independent single-process KFAC per rank;
            True or a `kfac_fast.distributed.DistributedOptions`: on). Every rank builds the
            same model; each closure evaluates this rank's shard (its loss the mean over
            the shard's examples, dim 0 of the outputs, which may differ in number across
            ranks). KFAC then reduces the gradient, the loss, the Fisher Gram matrices and
            the re-evaluated losses, each weighted by n_rank / n_total (n counts examples,
            not tokens: a token-mean loss with per-rank sequence lengths or ignore_index
            counts is not exact), so N ranks equal one process on the concatenated batch,
            and every rank takes the same step
            (docs/optimizer.md, "Across ranks"). Pass the bare module, not a
            DistributedDataParallel wrapper (TypeError): KFAC averages the gradients itself.
            An FSDP2 (fully_shard) model runs its step unsharded (`kfac_fast.optimizer_fsdp`:
            Shard(0) on a 1-D mesh; bf16 param_dtype keeps float32 masters).
            approx="tridiag" is single-process only.

    Attributes:
        preconditioner: the KFACPreconditioner that owns the factors.
        last: diagnostics of the last step: "alpha", "mu" (0-dim tensors, before lr),
            and on adaptation steps "rho" (float), "loss_after" (float).
        last_metrics: the last step's `kfac_fast.metrics.StepMetrics` (loss, lr, lambda,
            gamma, rho, alpha, mu, adaptation flags, skipped updates; no host sync to
            record; `kfac_fast.optimizer_metrics` lists the names), None before the first.
        data_parallel: KFAC's own collectives (`optimizer_distributed.DataParallelSteps`,
            with their byte counts), None when single-process.
    `lr`, `damping` and `gamma` are kept in `param_groups[0]` (saved by `state_dict`).
    """

    def __init__(self, model: nn.Module, loss: str = "cross_entropy", *, lr: float = 1.0, damping: float = 150.0,
                 l2_reg: float = 1e-5, damping_interval: int = 5,
                 inv_update_steps: Union[int, Callable[[int], int]] = 20,
                 gamma_interval: Optional[int] = 20, omega1: Optional[float] = None,
                 omega2: Optional[float] = None, momentum: bool = True, method: str = "inverse",
                 factor_decay: float = 0.95, factor_update_steps: int = 1,
                 damping_in_rho: bool = False, variance: float = 1.0,
                 average_decay: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 skip_layers: Union[str, Iterable[str]] = (),
                 factor_dtype: torch.dtype = torch.float32, approx: str = "blockdiag",
                 process_group: Optional[Any] = None, distributed: Optional[bool] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        refuse_wrappers(model)
        check_distributed(process_group, distributed, approx)
        if method not in KFAC_METHODS:
            raise ValueError(f"method must be one of {KFAC_METHODS}, got {method!r}")
        if approx not in KFAC_APPROXIMATIONS:
            raise ValueError(f"approx must be one of {KFAC_APPROXIMATIONS}, got {approx!r}")
        if approx == "tridiag" and method != "inverse":
            raise ValueError(f"approx='tridiag' needs method='inverse' (factored Tikhonov damping "
                             f"of the diagonal factors), got method={method!r}")
        if not isinstance(momentum, bool):
            raise TypeError(f"momentum must be a bool, got {momentum!r}")
        t1 = positive_int("damping_interval", damping_interval)
        t3 = None if gamma_interval is None else positive_int("gamma_interval", gamma_interval, optional=True)
        params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(
            lr=learning_rate(lr), damping=positive_float("damping", damping),
            l2_reg=positive_float("l2_reg", l2_reg, allow_zero=True),
            damping_interval=t1, gamma_interval=t3,
            omega1=unit_interval("omega1", (19 / 20) ** t1 if omega1 is None else omega1),
            omega2=unit_interval("omega2", math.sqrt(19 / 20) ** (t3 or 20) if omega2 is None else omega2),
            momentum=momentum, damping_in_rho=bool(damping_in_rho),
            average_decay=None if average_decay is None else unit_interval("average_decay", average_decay),
        )
        super().__init__(params, defaults)
        group = self.param_groups[0]
        group["gamma"] = math.sqrt(group["damping"] + group["l2_reg"])
        group["step"] = 0
        self.loss = canonical_loss(loss)
        self.variance = positive_float("variance", variance)
        self.generator = generator
        self.mc_seed = draw_seed(generator)  # saved by state_dict: a resumed run samples alike
        self.last: dict = {}
        self.last_metrics: Optional[StepMetrics] = None
        self._nonfinite_seen = (0, 0)  # (count, from step) the log has reported
        # the preconditioner reads its damping through this callable: gamma^2 is the
        # exact damping of "eigen" and, via ops.pi_damping's sqrt, the factored
        # Tikhonov gamma of "inverse"
        def gamma_squared(_step: int) -> float:
            return self.param_groups[0]["gamma"] ** 2

        precond_cls = KFACPreconditioner
        if approx == "tridiag":
            from .tridiag import TridiagPreconditioner as precond_cls
        self.preconditioner = precond_cls(
            model, factor_update_steps=factor_update_steps, inv_update_steps=inv_update_steps,
            damping=gamma_squared, factor_decay=factor_decay,
            kl_clip=None, method=method, fisher="mc", skip_layers=skip_layers,
            factor_dtype=factor_dtype, process_group=process_group,
            distributed=False if approx == "tridiag" else distributed)
        driver = getattr(self.preconditioner, "distributed", None)
        self.data_parallel = None if driver is None else DataParallelSteps(driver)
        self._fsdp = sharded_step(model, params, driver, strategy=getattr(driver, "strategy", ""),
                                  average_decay=self.defaults["average_decay"])
        if self.data_parallel is not None:
            self.mc_seed = self.data_parallel.agree_seed(self.mc_seed)

    # ------------------------------------------------------------------------------ API
    @property
    def damping(self) -> float:
        """lambda, the damping of the quadratic model."""
        return self.param_groups[0]["damping"]

    @property
    def gamma(self) -> float:
        """gamma, the damping of the Kronecker factors."""
        return self.param_groups[0]["gamma"]

    def step(self, closure: Callable[[], tuple]) -> torch.Tensor:  # type: ignore[override]
        """One K-FAC step on the batch the closure evaluates; returns the loss h(theta)."""
        if closure is None or not callable(closure):
            raise ValueError("KFAC.step needs a closure returning (loss, outputs); see the "
                             "kfac_fast.optimizer docstring")
        group = self.param_groups[0]
        step_lr(group)  # what a scheduler wrote is checked before anything runs
        with contextlib.nullcontext() if self._fsdp is None else self._fsdp.during():  # FSDP2: unsharded inside
            return self._run(closure, group)

    def _run(self, closure: Callable[[], tuple], group: dict) -> torch.Tensor:
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            p.grad = None
        # the graph-bearing forward: attention's math kernel, since the products
        # differentiate its backward (fvp.twice_differentiable)
        with torch.enable_grad(), twice_differentiable():
            loss, outputs = self._evaluate(closure)
            if self._fsdp is not None:  # FSDP2: the step runs on the unsharded parameters
                params = self._fsdp.unsharded()
            dp = self.data_parallel
            offset = 0 if dp is None else dp.split(outputs)
            seed = example_seed(self.mc_seed, group["step"], offset)
            self.preconditioner.sample_fisher(outputs, self.loss, seed=seed, variance=self.variance)
            # one backward gives both the gradient and the Fisher products' graph
            fisher: CurvatureProducts = FisherProducts(loss, outputs, params)
        if dp is not None:  # the global batch's gradient, loss and Gram matrices
            fisher = dp.products(fisher, params, loss)
            loss = fisher.loss
        with torch.no_grad():
            return self._step(closure, group, fisher, loss)

    def _step(self, closure: Callable[[], tuple], group: dict, fisher: CurvatureProducts,
              loss: torch.Tensor) -> torch.Tensor:
        """Everything after the backward: directions, the model solve, the update."""
        step = group["step"]
        lr = group["lr"]
        live = fisher.params
        if not live:
            raise RuntimeError("the closure's outputs do not depend on any parameter of the model")
        current = [g.clone() for g in fisher.gradient]  # the preconditioner rewrites .grad in place
        for p, g in zip(live, current):
            p.grad = g
        eta = group["l2_reg"]
        if eta:
            torch._foreach_add_(current, live, alpha=eta)
        grads = [g.clone() for g in current]
        self.preconditioner.step()
        directions = self._take_directions(live, grads)

        keys = live if self._fsdp is None else [self._fsdp.key(p) for p in live]  # FSDP2: the sharded ones
        previous = [self.state[p].get("prev_update") for p in keys]
        prev = previous if group["momentum"] and all(d is not None for d in previous) else None
        # lr 0 (a scheduler's end point) moves nothing: no rho to measure, no gamma to choose
        adapt = step % group["damping_interval"] == 0 and lr > 0
        search = group["gamma_interval"] is not None and step % group["gamma_interval"] == 0 and lr > 0
        damping, gamma_before = group["damping"], group["gamma"]
        # theta and h(theta) before the update: only the search and the adaptation read them
        theta = [p.detach().clone() for p in live] if search or adapt else []
        h_old = self._loss_value(loss) if adapt else math.nan

        solved = self._solve(fisher, grads, directions, prev, group["damping"] + eta)
        if search:
            solved = search_gamma(self, closure, fisher, live, grads, prev, theta, solved)
        gamma = group["gamma"]
        x, update = guard_update(self, solved)
        torch._foreach_add_(live, update)
        self.last = {"alpha": x[0], "mu": x[1] if x.shape[0] > 1 else torch.zeros_like(x[0])}

        if adapt:
            adapt_lambda(self, closure, h_old, live, theta, solved)
        for p, d in zip(keys, update):
            self.state[p]["prev_update"] = d
        self._average(live)
        if self._fsdp is not None:  # each rank's rows of the update into its shards
            self._fsdp.end(live, update)
        group["step"] = step + 1
        self.last_metrics = record_step(self, step, loss, solved, adapted=adapt, searched=search,
                                        damping=damping, gamma=gamma, gamma_before=gamma_before)
        return loss.detach()

    def swap_averaged(self) -> ContextManager[None]:
        """Within the block the parameters hold their iterate average (average_decay set)."""
        return swap_averaged(self)

    def state_dict(self) -> dict:
        """The optimiser's state with its preconditioner's and the MC seed; data-parallel
        the preconditioner's part is this rank's view (see `synced_state_dict`)."""
        return with_preconditioner(super().state_dict(), self.preconditioner.state_dict(), self.mc_seed)

    def synced_state_dict(self) -> dict:
        """A collective (every rank calls it): the global state, the same on every rank, from
        which a resume continues exactly (KFACPreconditioner.synced_state_dict); single-process
        `state_dict()`."""
        return with_preconditioner(super().state_dict(), self.preconditioner.synced_state_dict(), self.mc_seed)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict, precond = split_state(self, state_dict)
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(precond)
        count = self.preconditioner._health.causes.get("kfac_nonfinite_update")  # (a read: load time)
        self._nonfinite_seen = (0 if count is None else int(count), self.param_groups[0]["step"])

    # ------------------------------------------------------------------------ internals
    @staticmethod
    def _evaluate(closure: Callable[[], tuple]) -> tuple:
        result = closure()
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError("the closure must return (loss, outputs), got "
                            f"{type(result).__name__}")
        loss, outputs = result
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("the closure's loss must be a 0-dim tensor")
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"the closure's outputs must be a tensor, got {type(outputs).__name__}")
        return loss, outputs

    def _evaluate_no_grad(self, closure: Callable[[], tuple]) -> torch.Tensor:
        """The closure's loss at the current parameters (no graph, no capture)."""
        with torch.no_grad():
            return self._evaluate(closure)[0]

    def _loss_value(self, loss: torch.Tensor) -> float:
        """h = loss + eta/2 |theta|^2 at the current parameters (host sync: adaptation only)."""
        return loss.item() + self._l2_term()

    def _global_losses(self, losses: list) -> list:
        """The closure's losses as host floats, of the global batch when data-parallel
        (one all-reduce for all of them; host sync: adaptation and gamma search only)."""
        if self.data_parallel is None:
            return [loss.item() for loss in losses]
        return self.data_parallel.losses(torch.stack([loss.detach() for loss in losses])).tolist()

    def _l2_term(self) -> float:
        eta = self.param_groups[0]["l2_reg"]
        if not eta:
            return 0.0
        ps = [p.detach() for p in (self.param_groups[0]["params"] if self._fsdp is None else self._fsdp.unsharded())]
        return 0.5 * eta * dot(ps, ps).item()

    @staticmethod
    def _take_directions(live: list, grads: list) -> list:
        """Delta = -(preconditioned .grad); .grad goes back to the raw gradient of h."""
        directions = []
        for p, g in zip(live, grads):
            directions.append(p.grad.neg_())
            p.grad = g
        return directions

    def _precondition_again(self, live: list, grads: list) -> list:
        """Delta for the current gamma from the preconditioner's stored state.

        For "inverse" the inverses are rebuilt with the current gamma first.
        """
        for p, g in zip(live, grads):
            p.grad = g.clone()
        self.preconditioner.repeat_precondition(refresh=self.preconditioner.method == "inverse")
        return self._take_directions(live, grads)

    def _solve(self, fisher: CurvatureProducts, grads: list, directions: list, prev: Optional[list], c: float) -> dict:
        """alpha (and mu) minimising the damped model, and the update they give times lr
        (`coeffs`: lr * x, or x itself at lr 1, so the default step is the paper's bit for bit)."""
        return solve_in_span(fisher, grads, directions, prev, c, self.param_groups[0]["lr"])

    def _average(self, live: list) -> None:
        average_iterates(self, live)
