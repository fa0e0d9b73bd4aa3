"""KFACPreconditioner: K-FAC for any nn.Module through the `kfac_fast.ops` API.

This module holds the class's constructor (argument checks, layer registration, the
data-parallel setup) and `step()`, which runs the jobs of this package in order:
factor updates, refresh, EKFAC scales, precondition.

Usage (the familiar three lines; K-FAC rewrites `.grad` between backward and step)::

    precond = KFACPreconditioner(model, lr=0.1, damping=1e-3)
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)      # mean over the batch: loss_average="batch"
        loss.backward()
        precond.step()                           # preconditions .grad in place
        optimizer.step()

The true (MC) Fisher of the paper, `fisher="mc"`: one extra backward with targets
sampled from the model, through `torch.autograd.grad` with respect to the captured
layer outputs (it touches neither `.grad` nor DDP hooks). Call it after the forward and
before the user's backward (or after `loss.backward(retain_graph=True)`)::

    out = model(x)
    precond.sample_fisher(out, "cross_entropy")  # or "bce_with_logits", "gaussian"
    F.cross_entropy(out, y).backward()
    precond.step()

AMP: activations and gradients may be bf16/fp16; factors stay fp32. With a
`torch.amp.GradScaler` pass it as `grad_scaler=` and unscale the grads before K-FAC::

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    precond.step()
    scaler.step(optimizer); scaler.update()

The captured output gradients carry the scale s; G is corrected by 1/s^2 on the device
(the scale is read as a tensor: no host sync), and a step whose gradients overflowed
leaves G unchanged (the update's weight becomes 0 on the device).

Memory: by default the layer inputs and output gradients of a factor-update step are
held until `step()` (one grouped `update_factors_` launch for all layers). Holding the
inputs keeps every layer's activation alive past the backward that would have freed
it (about one activation's worth per registered layer, plus the output gradients).
`update_factors_in_hooks=True` instead updates A and G inside the layer's gradient hook
(one launch per layer and capture), so each input is held only until the layer's own
backward (autograd keeps it that long anyway for the weight gradient), and A is updated
only once its output gradient is known to be finite (EKFAC holds the input until
`step()` on steps that refresh the eigenbasis: the scale update must follow the refresh).

With the empirical Fisher an input counts only when its own output gradient arrives: a
train-mode forward that never reaches a backward (an accuracy check) adds nothing.

Padded sequences: before the forward of a step (of each micro-batch), pass the row
mask of the batch, (N, T) bool with True for real tokens::

    precond.set_row_mask(attention_mask.bool())
    loss = masked_token_loss(model(x), y, attention_mask)
    loss.backward()
    precond.step()                               # clears the mask

Every nn.Linear whose input has leading dims exactly (N, T) then takes its A and G
from the real rows only; A's 1/R and loss_average="tokens"'s S count real rows
(device tensors: no host sync). Other layers (different leading dims, Conv, Embedding)
are unaffected. Methods "eigen" and "inverse", empirical Fisher.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from .. import distributed as data_parallel
from ..health import Health
from ..layer_damping import LayerDamping
from ..layers import KFACLayer, registry
from ..layers.base import METHODS
from ..metrics import StepMetrics
from ..precision import check_precision
from ..schedules import (
    Hyperparameter,
    Schedule,
    at_least_one,
    decay_range,
    non_negative,
    positive,
    require_bool,
    require_int,
    require_number,
)
from .args import (
    FISHERS,
    LOSS_AVERAGES,
    check_arguments,
    compile_skip,
    default_factor_dtype,
    refuses_kfac_pytorch_keywords,
)
from .capture import CaptureMixin
from .extension import Curvature
from .factors import FactorUpdateMixin
from .observe import ObserveMixin
from .precondition import PreconditionMixin
from .refresh import RefreshMixin
from .registration import RegistrationMixin
from .state import StateMixin

__all__ = ["FISHERS", "LOSS_AVERAGES", "METHODS", "KFACPreconditioner"]


class KFACPreconditioner(RegistrationMixin, CaptureMixin, FactorUpdateMixin, RefreshMixin, PreconditionMixin,
                         StateMixin, ObserveMixin):
    """K-FAC preconditioner for the nn.Linear, nn.Conv1d, nn.Conv2d and nn.Embedding layers
    of a model, and opt-in (`extra_kinds`) nn.LayerNorm and nn.RMSNorm (the kinds
    `kfac_fast.layers` registers).

    Args:
        model: the nn.Module whose layers are preconditioned (registered at construction).
        factor_update_steps: update the factors every this many steps (int or schedule).
        inv_update_steps: recompute eigendecompositions / inverses every this many steps;
            the first step always refreshes, and a layer seen for the first time is
            refreshed on the step it first has factors.
        damping: lambda of docs/design.md (> 0). "eigen"/"ekfac" use it at every step;
            "inverse" bakes it into the inverses at refresh steps. Per layer: a dict
            {module name or regex (re.fullmatch): value or schedule}, with the key
            "default" for the rest, or a callable f(name, step) (see
            `kfac_fast.layer_damping`); single-process only.
        factor_decay: decay of the zero-debiased running average of the factors, in [0, 1).
        kl_clip: KL-clip constant c (> 0), or None for no clipping.
        lr: the learning rate the KL clip assumes (> 0; used only by the clip).
        method: "eigen" (exact Kronecker damping), "inverse" (factored Tikhonov with the
            pi correction) or "ekfac" (eigenbasis rescaled by per-example statistics).
        fisher: "empirical" (the user's own backward) or "mc" (see `sample_fisher`).
        loss_average: what the user's loss averages over, the S of docs/design.md's G:
            "batch" (a mean over the N examples of dim 0), "tokens" (a mean over all
            rows of each layer's output, e.g. N*T for a transformer), "sum" (S = 1), or
            a number (S itself, taken literally). With `accumulation_steps=k` the loss
            of each micro-batch is assumed divided by k for "batch" and "tokens".
        skip_layers: regexes (re.search) on module names and class names; a match on a
            module or any of its ancestors skips it (None: none, as kfac-pytorch's default).
        factor_dtype: torch.float32 or torch.float64 (None, kfac-pytorch's default: float32).
        grad_scaler: a torch.amp.GradScaler whose scale the output gradients carry.
        accumulation_steps: micro-batches per `step()` (each loss divided by k). Held
            captures give exactly one k-times larger batch; with
            `update_factors_in_hooks=True` micro-batches are weighted equally (exact for
            equal sizes).
        update_factors_in_hooks: update factors inside the hooks instead of holding the
            captures until `step()` (saves memory, one launch per layer).

        process_group: the torch.distributed group to run data-parallel over (None: the
            world, when torch.distributed is initialised). See docs/distributed.md.
        distributed: None (data-parallel when torch.distributed is initialised), False
            (never), True or a `kfac_fast.distributed.DistributedOptions` (strategy,
            factor_sync, bucket_cap_mb, profile). Construction is then a collective: every
            rank must build the same model with the same settings (checked);
            `state_dict()` is this rank's view, `synced_state_dict()` the collective exact
            one (docs/distributed.md).
        extra_kinds: opt-in layer kinds to precondition as well, by name: 'layernorm'
            (nn.LayerNorm with elementwise_affine), 'rmsnorm' (nn.RMSNorm); their parameters
            are otherwise left to the user's optimizer (docs/design.md, "Normalisation layers").
        max_factor_dim: memory guard: a layer with a factor dimension (a_dim or g_dim)
            above it is skipped (left to the user's optimizer), warned once by name.
        guard_nonfinite: a step with a non-finite capture (e.g. an AMP overflow), or with
            finite captures so large that x^T x would overflow the factor, updates no
            factor and leaves `.grad` unpreconditioned; with update_factors_in_hooks=True
            each capture updates its factor in its hook, so updates made before the first
            bad capture of the step stay (A and G of layers whose backward ran earlier).
            A non-finite `.grad` (finite captures: factors updated) is left as it is, and
            a preconditioned `.grad` that is not finite is replaced by the plain gradient.
            All decided on the device (no host sync); counted, by cause, in `health()` and
            `state_dict()`. Costs one isfinite reduction and one copy of the gradients per
            step; False turns it off. Data-parallel: the flag is all-reduced (MIN, on the
            device) so every rank drops the same steps; one tiny all-reduce per factor step
            (per capture with update_factors_in_hooks).
        eigh_tol: None (default): every eigenbasis refresh is a full eigendecomposition.
            A float >= 0: refreshes are warm (`ops.eigh(..., previous=Q, tol=eigh_tol)`,
            see `kfac_fast.backends.warm_eigh`): a factor whose previous basis Q still nearly
            diagonalises it (off-diagonal ratio ||offdiag(Q^T F Q)||_F / ||F||_F <= tol) is
            kept or refined by a few rotations instead of solved again; the rest are fully
            solved. The trade-off: refreshes cost about two GEMMs per kept factor instead
            of an eigh, while the preconditioned gradient moves by at most
            (r_A + r_G + r_A r_G) ||A||_F ||G||_F / damping relatively (warm_eigh's bound;
            in practice far less: tol=0.03 kept it within 0.75% of the full solve's in
            bench/bench_warm_eigh.py). Eigen and EKFAC methods only. Data-parallel: each
            factor's owner rank refreshes warm from the basis it holds; `refresh_stats`
            (and the solver counters of `health()`) then count this rank's factors only.
        precision: of the preconditioning products (`kfac_fast.precision`). "fp32"
            (default, exact); "tf32": TF32 for those products on CUDA (torch's matmuls
            under allow_tf32, and method "eigen"'s kernels get the ops' precision="tf32";
            the factor updates stay IEEE fp32), a no-op on CPU; "bf16" (eigen/ekfac,
            single-process): eigenvectors and gradient rounded to bf16 for the two GEMM
            sandwiches, fp32 accumulation (emulated by casting on CPU). Measured on the
            demo autoencoder (3 steps, its own gradient): relative error of the
            preconditioned gradient 3.1e-5 in fp32, 0.31 in bf16 (ill-conditioned decoder
            factors dominate; see `kfac_fast.precision`).

    Every numeric hyperparameter also accepts a callable of the step count (the number
    of `step()` calls before the current one). Read back, each is a `Hyperparameter`:
    `precond.lr(step)` is its value at a step, `float(precond.lr)` (`int(...)` for the
    step intervals) its value at the current step, as kfac-pytorch's attributes;
    `float(precond.damping)` raises a TypeError for a per-layer damping (use
    `precond.damping.for_layers(names, step)`).

    kfac-pytorch's keywords that kfac_fast does not have (`compute_method`,
    `update_factors_in_hook`, `inv_dtype`, ...) raise a TypeError naming the equivalent
    here (`kfac_fast.preconditioner.args.KFAC_PYTORCH_KEYWORDS`,
    docs/migration-kfac-pytorch.md).

    Attributes:
        layers: dict from module name to its `KFACLayer` (a_factor, g_factor, counts,
            decompositions).
        steps: number of completed `step()` calls.
        last_nu: the KL-clip factor of the last step (0-dim device tensor) or None.
        refresh_stats: eigenbasis refreshes so far, counted per factor: {"kept",
            "refined", "full"} (see `eigh_tol`; without it every factor is "full").
        last_metrics: the `kfac_fast.metrics.StepMetrics` of the last step (None before
            the first): hyperparameters, whether factors were updated and a refresh ran,
            nu and the health() counters, recorded without a host sync
            (`kfac_fast.preconditioner.observe`); `last_metrics.as_dict()` reads them.
    """

    @refuses_kfac_pytorch_keywords
    def __init__(self, model: nn.Module, *, factor_update_steps: Schedule = 1, inv_update_steps: Schedule = 10,
                 damping: Union[Schedule, dict, Callable[[str, int], float]] = 1e-3,
                 factor_decay: Schedule = 0.95, kl_clip: Optional[Schedule] = 1e-3, lr: Schedule = 0.1,
                 method: str = "eigen", fisher: str = "empirical", loss_average: Union[str, float] = "batch",
                 skip_layers: Union[None, str, Iterable[str]] = (), factor_dtype: Optional[torch.dtype] = torch.float32,
                 grad_scaler: Any = None, accumulation_steps: int = 1,
                 update_factors_in_hooks: bool = False, process_group: Any = None,
                 distributed: Union[None, bool, data_parallel.DistributedOptions] = None,
                 max_factor_dim: Optional[int] = None, guard_nonfinite: bool = True,
                 eigh_tol: Optional[float] = None, precision: str = "fp32",
                 extra_kinds: Union[str, Iterable[str]] = ()) -> None:
        factor_dtype = default_factor_dtype(factor_dtype)
        check_arguments(model, method, fisher, loss_average, factor_dtype, grad_scaler, accumulation_steps,
                        update_factors_in_hooks)

        self.factor_update_steps = Hyperparameter("factor_update_steps", factor_update_steps,
                                                  at_least_one, integer=True)
        self.inv_update_steps = Hyperparameter("inv_update_steps", inv_update_steps,
                                               at_least_one, integer=True)
        self.damping = LayerDamping(damping)
        self.precision = check_precision(precision, method)
        self._row_mask: Optional[torch.Tensor] = None
        self.factor_decay = Hyperparameter("factor_decay", factor_decay, decay_range)
        self.kl_clip = Hyperparameter("kl_clip", kl_clip, positive, optional=True)
        self.lr = Hyperparameter("lr", lr, positive)
        self.method = method
        self.fisher = fisher
        self.loss_average = loss_average
        self.factor_dtype = factor_dtype
        self.grad_scaler = grad_scaler
        self.accumulation_steps = accumulation_steps
        self.update_factors_in_hooks = update_factors_in_hooks
        self.steps = 0
        self.last_nu: Optional[torch.Tensor] = None
        self._factor_step_cache: tuple[int, bool] = (-1, False)
        self._warned: set = set()
        self.max_factor_dim = require_int("max_factor_dim", max_factor_dim, optional=True)
        self.guard_nonfinite = require_bool("guard_nonfinite", guard_nonfinite)
        self.eigh_tol = require_number("eigh_tol", eigh_tol, non_negative, optional=True)
        if self.eigh_tol is not None and method == "inverse":
            raise ValueError("eigh_tol applies to method='eigen' or 'ekfac' (the inverse method "
                             "does not eigendecompose)")
        self.refresh_stats = {"kept": 0, "refined": 0, "full": 0}
        self._health = Health()
        # this step's capture flag (0-dim device bool, ANDed over every checked capture)
        self._captures_ok: Optional[torch.Tensor] = None
        # this step's flag per cause of a dropped step (health.CAUSES), counted by step()
        self._step_causes: dict[str, torch.Tensor] = {}
        self._curvatures: list[Curvature] = []
        self._metrics: Optional[StepMetrics] = None  # last_metrics, built when read
        self._pending_metrics: Optional[tuple] = None
        self._skips_logged: dict[str, int] = {}
        for hyperparameter in (self.factor_update_steps, self.inv_update_steps, self.damping, self.factor_decay,
                               self.kl_clip, self.lr):
            hyperparameter.bind(self)  # float(pc.lr): the value at the current step

        self._skip = compile_skip(skip_layers)
        self._extra_kinds = registry.check_extra_kinds(extra_kinds)
        self.layers: dict[str, KFACLayer] = {}
        self._register(model)
        if not self.layers:
            kinds = registry.known_kinds()
            raise ValueError(f"model has no layer left to precondition (K-FAC knows {kinds}; check skip_layers)")
        self.damping.resolve(self.layers)
        # None when single-process (or a group of one): then nothing below communicates
        self.distributed = data_parallel.setup(model, self.layers, method, process_group, distributed,
                                               health=self._health, eigh_tol=self.eigh_tol,
                                               settings=data_parallel.settings_of(self))
        if self.distributed is not None and (self.damping.per_layer or self.precision == "bf16"):
            raise ValueError("per-layer damping and precision='bf16' are single-process only "
                             "(data-parallel K-FAC takes one damping and the fp32 ops)")
        if self.distributed is not None and self.distributed.sharded_memory is not None and (
                self.update_factors_in_hooks or grad_scaler is not None):
            bad = "update_factors_in_hooks=True" if self.update_factors_in_hooks else "a grad_scaler"
            raise ValueError(f"strategy='memory' on FSDP2-sharded layers does not take {bad} (its factors are "
                             "reduced from the held captures)")
        unsupported = [layer for layer in self.layers.values() if not layer.data_parallel]
        if self.distributed is not None and unsupported:
            what = type(unsupported[0].module).__name__
            fix = ("leave it out of extra_kinds" if unsupported[0].opt_in else f"pass skip_layers='{what}'")
            raise ValueError(f"data-parallel K-FAC does not support nn.{what} layers yet: {fix}")
        for layer in self.layers.values():
            layer.install(self)

    def load_state_dict(self, state: dict) -> None:
        """`StateMixin.load_state_dict`; under strategy "memory" on FSDP2 a rank's plain
        `state_dict()` lacking factors is refused first (use `synced_state_dict()`)."""
        if self.distributed is not None and self.distributed.sharded_memory is not None:
            self.distributed.sharded_memory.check_loadable(state)
        super().load_state_dict(state)

    def remove_hooks(self) -> None:
        """Remove every hook this preconditioner installed (it stops capturing)."""
        for layer in self.layers.values():
            layer.remove()

    def add_curvature(self, curvature: Curvature) -> None:
        """Apply `curvature` (see `kfac_fast.preconditioner.extension`) from now on: the
        factor-update, refresh, precondition and state jobs call it after their own
        per-layer work."""
        self._curvatures.append(curvature)

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def step(self) -> None:
        """Update factors (on factor steps), refresh decompositions (on inverse steps),
        and rewrite `.grad` of every layer whose hooks fired since the last step."""
        step = self.steps
        factor_step = self._is_factor_step()
        fired = [layer for layer in self.layers.values() if layer.fired_forward and layer.fired_backward]
        if self.distributed is not None:  # the layers that fired on any rank (one small all-reduce)
            fired = self.distributed.begin_step(fired, factor_step)
        self._warn_silent_skips()
        try:
            if factor_step and not self.update_factors_in_hooks:
                for layer in fired:
                    layer.drop_unpaired_inputs()
                held = [layer for layer in fired if layer.inputs and layer.grads]
                if self.fisher == "mc" and not held and any(layer.inputs for layer in fired):
                    raise RuntimeError("fisher='mc': call precond.sample_fisher(output, loss) after "
                                       "the forward and before loss.backward() on factor-update steps")
                if held:
                    self._update_factors(held)
            if factor_step and self.distributed is not None:
                self.distributed.factors_updated([layer for layer in fired if layer.a_count > 0 and layer.g_count > 0],
                                                 decay=self.factor_decay(step))
            have_factors = [layer for layer in self.layers.values() if layer.a_count > 0 and layer.g_count > 0]
            if step % self.inv_update_steps(step) == 0:
                stale = have_factors
            else:
                stale = [layer for layer in have_factors if not self._has_inverse_state(layer, self.method)]
            refresh = self._timed_refresh(stale) if stale else None
            if self.method == "ekfac" and factor_step:
                # hooks mode holds pairs only on steps that refresh the basis
                self._update_scales([layer for layer in fired if layer.inputs and layer.grads and layer.qa is not None])
            self._guarded_precondition([layer for layer in fired if layer.a_count > 0 and layer.g_count > 0
                                        and self._has_inverse_state(layer, self.method)])
        finally:
            for layer in self.layers.values():
                layer.clear_captures()
            self._captures_ok = None
            for cause, ok in self._step_causes.items():
                self._health.count(cause, ok)
            self._step_causes = {}
            self._row_mask = None  # a mask describes one batch
            if self.distributed is not None and self.distributed.sharded_memory is not None:
                self.distributed.sharded_memory.restore()  # what a step that raised had set aside
            self.steps += 1
        self._record_step(step, factor_step and bool(fired), refresh)

    def health(self) -> dict:
        """How often the safety nets fired, as Python ints (reads a device counter: one
        host sync, so call it when logging, not every step):
        nonfinite_steps (steps dropped: no factor update, `.grad` left as the plain
        gradient), on refresh steps fp64_retries, damped_retries (solved with added
        damping), kept_previous (the decomposition or inverse in use was kept, or the
        identity when there was none), and one count per cause of a drop
        (`kfac_fast.health.CAUSES`): nonfinite_capture, capture_overflow (finite inputs
        so large that x^T x would overflow the factor), nonfinite_grad, nonfinite_output
        (the preconditioned gradient was not finite: the plain gradient is kept),
        kfac_nonfinite_update (`KFAC` only)."""
        return self._health.report()
