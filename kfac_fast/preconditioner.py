"""KFACPreconditioner: K-FAC for any nn.Module through the `kfac_fast.ops` API.

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
`update_factors_in_hooks=True` instead updates each factor inside its hook (one launch
per layer and capture) and holds nothing (EKFAC still holds each input until the
layer's backward, and on steps that refresh the eigenbasis until `step()`, whose scale
update must follow the refresh).

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

import contextlib
import re
import warnings
from typing import Iterable, Optional, Union

import torch
from torch import nn

from . import distributed as data_parallel
from . import ops
from .fisher import canonical_loss, sampled_output_grad
from .health import Health, all_finite, guard_weights
from .layer_kinds import precondition_embedding, update_frequencies_
from . import row_mask as row_masks
from .layer_damping import LayerDamping
from .layers import KFACLayer, is_layer, unsupported_reason
from .precision import (check_precision, eigen_denominators, ekfac_denominators,
                        precondition_bf16, tf32_products)
from .reference import record_warm_paths
from .warm_eigh import PATH_NAMES
from .schedules import (Hyperparameter, at_least_one, decay_range, positive,
                        running_average_weights)

METHODS = ("eigen", "inverse", "ekfac")
FISHERS = ("empirical", "mc")
LOSS_AVERAGES = ("batch", "tokens", "sum")


class KFACPreconditioner:
    """K-FAC preconditioner for the nn.Linear and nn.Conv2d layers of a model.

    Args:
        model: the nn.Module whose layers are preconditioned (registered at construction).
        factor_update_steps: update the factors every this many steps (int or schedule).
        inv_update_steps: recompute eigendecompositions / inverses every this many steps;
            the first step always refreshes, and a layer seen for the first time is
            refreshed on the step it first has factors.
        damping: lambda of DESIGN.md (> 0). "eigen"/"ekfac" use it at every step;
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
        loss_average: what the user's loss averages over, the S of DESIGN.md's G:
            "batch" (a mean over the N examples of dim 0), "tokens" (a mean over all
            rows of each layer's output, e.g. N*T for a transformer), "sum" (S = 1), or
            a number (S itself, taken literally). With `accumulation_steps=k` the loss
            of each micro-batch is assumed divided by k for "batch" and "tokens".
        skip_layers: regexes (re.search) on module names and class names; a match on a
            module or any of its ancestors skips it.
        factor_dtype: torch.float32 or torch.float64.
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
            rank must build the same model, and `state_dict()` is called on every rank.
        max_factor_dim: memory guard: a layer with a factor dimension (a_dim or g_dim)
            above it is skipped (left to the user's optimizer), warned once by name.
        guard_nonfinite: a step with a non-finite capture or gradient (e.g. an AMP
            overflow) updates no factor, keeps the decompositions and leaves `.grad`
            unpreconditioned, all decided on the device (no host sync); counted in
            `health()` and `state_dict()`. Costs one isfinite reduction and one copy of
            the gradients per step; False turns it off. Data-parallel: the flag is
            all-reduced (MIN, on the device) so every rank drops the same steps; one
            tiny all-reduce per factor step (per capture with update_factors_in_hooks).
        eigh_tol: None (default): every eigenbasis refresh is a full eigendecomposition.
            A float >= 0: refreshes are warm (`ops.eigh(..., previous=Q, tol=eigh_tol)`,
            see `kfac_fast.warm_eigh`): a factor whose previous basis Q still nearly
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
            (default, exact); "tf32": allow_tf32 for those products on CUDA (a no-op on
            CPU); "bf16" (eigen/ekfac, single-process): eigenvectors and gradient
            rounded to bf16 for the two GEMM sandwiches, fp32 accumulation (emulated by
            casting on CPU). Measured on the demo autoencoder (3 steps, its own
            gradient): relative error of the preconditioned gradient 3.1e-5 in fp32,
            0.31 in bf16 (ill-conditioned decoder factors dominate; see
            `kfac_fast.precision`).

    Every numeric hyperparameter also accepts a callable of the step count (the number
    of `step()` calls before the current one).

    Attributes:
        layers: dict from module name to its `KFACLayer` (a_factor, g_factor, counts,
            decompositions).
        steps: number of completed `step()` calls.
        last_nu: the KL-clip factor of the last step (0-dim device tensor) or None.
        refresh_stats: eigenbasis refreshes so far, counted per factor: {"kept",
            "refined", "full"} (see `eigh_tol`; without it every factor is "full").
    """

    def __init__(self, model: nn.Module, *, factor_update_steps=1, inv_update_steps=10,
                 damping=1e-3, factor_decay=0.95, kl_clip=1e-3, lr=0.1, method: str = "eigen",
                 fisher: str = "empirical", loss_average: Union[str, float] = "batch",
                 skip_layers: Union[str, Iterable[str]] = (), factor_dtype: torch.dtype = torch.float32,
                 grad_scaler=None, accumulation_steps: int = 1,
                 update_factors_in_hooks: bool = False, process_group=None,
                 distributed: Union[None, bool, "data_parallel.DistributedOptions"] = None,
                 max_factor_dim: Optional[int] = None, guard_nonfinite: bool = True,
                 eigh_tol: Optional[float] = None, precision: str = "fp32") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        if isinstance(loss_average, str):
            if loss_average not in LOSS_AVERAGES:
                raise ValueError(f"loss_average must be one of {LOSS_AVERAGES} or a number > 0, "
                                 f"got {loss_average!r}")
        elif isinstance(loss_average, bool) or not isinstance(loss_average, (int, float)) \
                or not loss_average > 0 or loss_average == float("inf"):
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES} or a finite number > 0, "
                             f"got {loss_average!r}")
        if factor_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"factor_dtype must be torch.float32 or torch.float64, got {factor_dtype}")
        if grad_scaler is not None and not (hasattr(grad_scaler, "scale") and hasattr(grad_scaler, "unscale_")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if not isinstance(update_factors_in_hooks, bool):
            raise TypeError(f"update_factors_in_hooks must be a bool, got {update_factors_in_hooks!r}")

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
        if max_factor_dim is not None and (isinstance(max_factor_dim, bool) or not isinstance(max_factor_dim, int)
                                           or max_factor_dim < 1):
            raise ValueError(f"max_factor_dim must be None or an int >= 1, got {max_factor_dim!r}")
        if not isinstance(guard_nonfinite, bool):
            raise TypeError(f"guard_nonfinite must be a bool, got {guard_nonfinite!r}")
        self.max_factor_dim = max_factor_dim
        self.guard_nonfinite = guard_nonfinite
        if eigh_tol is not None:
            if isinstance(eigh_tol, bool) or not isinstance(eigh_tol, (int, float)) \
                    or not 0 <= eigh_tol < float("inf"):
                raise ValueError(f"eigh_tol must be None or a finite number >= 0, got {eigh_tol!r}")
            if method == "inverse":
                raise ValueError("eigh_tol applies to method='eigen' or 'ekfac' (the inverse method "
                                 "does not eigendecompose)")
            eigh_tol = float(eigh_tol)
        self.eigh_tol = eigh_tol
        self.refresh_stats = {"kept": 0, "refined": 0, "full": 0}
        self._health = Health()
        # this step's capture flag (0-dim device bool, ANDed over every checked capture)
        self._captures_ok: Optional[torch.Tensor] = None

        self._skip = _compile_skip(skip_layers)
        self.layers: dict[str, KFACLayer] = {}
        self._register(model)
        if not self.layers:
            raise ValueError("model has no nn.Linear or nn.Conv2d layer left to precondition "
                             "(check skip_layers)")
        self.damping.resolve(self.layers)
        # None when single-process (or a group of one): then nothing below communicates
        self.distributed = data_parallel.setup(model, self.layers, method, process_group, distributed,
                                               health=self._health, eigh_tol=self.eigh_tol)
        if self.distributed is not None and (self.damping.per_layer or self.precision == "bf16"):
            raise ValueError("per-layer damping and precision='bf16' are single-process only "
                             "(data-parallel K-FAC takes one damping and the fp32 ops)")
        if self.distributed is not None and any(l.kind == "embedding" for l in self.layers.values()):
            raise ValueError("data-parallel K-FAC does not support nn.Embedding layers yet: "
                             "pass skip_layers='Embedding'")
        for layer in self.layers.values():
            layer.install(self)

    # ------------------------------------------------------------------------------------
    # registration
    # ------------------------------------------------------------------------------------
    def _register(self, model: nn.Module) -> None:
        def visit(module: nn.Module, name: str, skipped: bool) -> None:
            skipped = skipped or any(p.search(name) or p.search(type(module).__name__)
                                     for p in self._skip)
            if is_layer(module) and not skipped:
                why = unsupported_reason(module)
                if why is None and isinstance(module, nn.Embedding) and self.method != "eigen":
                    why = f"Embedding with method={self.method!r} (embeddings support 'eigen' only)"
                why = why or self._too_large(name, module)
                if why is None:
                    self.layers[name] = KFACLayer(name, module)
                else:
                    warnings.warn(f"KFACPreconditioner: skipping layer {name!r}: {why}", stacklevel=4)
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name, skipped)

        visit(model, "", False)

    def _too_large(self, name: str, module: nn.Module) -> Optional[str]:
        """Why max_factor_dim skips the layer (None when it fits or there is no limit)."""
        if self.max_factor_dim is None:
            return None
        layer = KFACLayer(name, module)
        # an embedding's A is a diagonal (V,) vector: only G is quadratic in memory
        a_dim = 0 if layer.kind == "embedding" else layer.a_dim
        if max(a_dim, layer.g_dim) <= self.max_factor_dim:
            return None
        return (f"factor dims {layer.a_dim} (A) and {layer.g_dim} (G) exceed max_factor_dim="
                f"{self.max_factor_dim} (its gradient is left to the optimizer)")

    def remove_hooks(self) -> None:
        """Remove every hook this preconditioner installed (it stops capturing)."""
        for layer in self.layers.values():
            layer.remove()

    # ------------------------------------------------------------------------------------
    # capture (called from the layers' hooks)
    # ------------------------------------------------------------------------------------
    def _is_factor_step(self) -> bool:
        step, cached = self._factor_step_cache
        if step != self.steps:
            cached = self.steps % self.factor_update_steps(self.steps) == 0
            self._factor_step_cache = (self.steps, cached)
        return cached

    def on_forward(self, layer: KFACLayer, x: torch.Tensor, output: torch.Tensor) -> None:
        """Forward hook body: hold or consume the input, arrange for the output gradient."""
        capture = self._is_factor_step()
        mask = None
        if capture:
            x = layer.batched_input(x)
            mask = row_masks.mask_for(self._row_mask, x) if layer.kind == "linear" else None
            rows = None
            if mask is not None:  # x_bar with padding rows zeroed: its own ones-column
                x, rows = row_masks.masked_input(x, mask, layer.has_bias), row_masks.real_rows(mask)
            if self.update_factors_in_hooks:
                self._hook_update_a(layer, x, rows)
                if self.method == "ekfac":
                    layer.inputs.append(x)
            else:
                layer.inputs.append(x)
                layer.input_rows.append(rows)
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if capture and self.fisher == "mc":
            layer.edges.append(torch.autograd.graph.get_gradient_edge(output))
        empirical = capture and self.fisher == "empirical"

        def grad_hook(g: torch.Tensor) -> None:
            # registered before any in-place op on `output`, so g is the gradient of the
            # layer's own output even when e.g. ReLU(inplace=True) follows
            layer.fired_backward = True
            if empirical:
                rows = layer.grad_rows(g.detach())
                if mask is None:
                    self._on_grad(layer, rows)
                else:
                    self._on_grad(layer, row_masks.masked_rows(rows, mask), row_masks.real_rows(mask))

        output.register_hook(grad_hook)

    def _on_grad(self, layer: KFACLayer, rows: torch.Tensor,
                 tokens: Optional[torch.Tensor] = None) -> None:
        """tokens: the real rows of a masked capture (0-dim device tensor), else None."""
        if self.update_factors_in_hooks:
            self._hook_update_g(layer, rows, tokens)
        else:
            layer.grads.append(rows)
            layer.grad_tokens.append(tokens)

    def set_row_mask(self, mask: Optional[torch.Tensor]) -> None:
        """The real-token mask of the next forward (see the module docstring): a bool
        (N, T) tensor, True for real tokens, applied to every nn.Linear whose input has
        leading dims exactly (N, T). It holds until `step()` (which clears it) or the next
        call; None clears it. Methods "eigen"/"inverse" with fisher="empirical"."""
        mask = row_masks.check_row_mask(mask)
        if mask is not None and (self.method == "ekfac" or self.fisher == "mc"):
            raise ValueError(f"set_row_mask supports method 'eigen'/'inverse' with fisher='empirical', "
                             f"this preconditioner has method={self.method!r}, fisher={self.fisher!r}")
        self._row_mask = mask

    def sample_fisher(self, output: torch.Tensor, loss: str = "cross_entropy", *,
                      num_samples: int = 1, generator: Optional[torch.Generator] = None,
                      variance: float = 1.0) -> None:
        """The MC Fisher's extra backward (needs `fisher="mc"`).

        Samples targets from the model's predictive distribution at `output` (see
        `kfac_fast.fisher`) and back-propagates sum_rows -log p(y|output) to the outputs
        of the layers captured since the last call, with `torch.autograd.grad`
        (retain_graph=True; no `.grad` is touched, no DDP hook fires). Call it after the
        forward and before the user's `loss.backward()`. On steps that do not update
        factors it does nothing.

        Args:
            output: the model's output (logits, or the mean for "gaussian").
            loss: "cross_entropy" (classes last), "bce_with_logits" or "gaussian"/"mse".
            num_samples: independent samples; G averages over them.
            generator: optional torch.Generator for reproducible sampling.
            variance: variance of the "gaussian" predictive distribution.
        """
        if self.fisher != "mc":
            raise RuntimeError("sample_fisher needs KFACPreconditioner(..., fisher='mc'), "
                               f"this one has fisher={self.fisher!r}")
        loss = canonical_loss(loss)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise ValueError("output must be a tensor that requires grad (the model's output)")
        pending = [(layer, edge) for layer in self.layers.values() for edge in layer.edges]
        for layer in self.layers.values():
            layer.edges.clear()  # a later micro-batch must not revisit a freed graph
        if not pending:
            return
        for _ in range(num_samples):
            grad_out = sampled_output_grad(output, loss, generator=generator, variance=variance)
            grads = torch.autograd.grad([output], [e for _, e in pending], [grad_out],
                                        retain_graph=True, allow_unused=True)
            for (layer, _), g in zip(pending, grads):
                if g is not None:
                    self._on_grad(layer, layer.grad_rows(g))

    # ------------------------------------------------------------------------------------
    # host-side weights (integers and Python floats: no device work)
    # ------------------------------------------------------------------------------------
    def _loss_scale(self, rows: torch.Tensor, tokens: Optional[torch.Tensor] = None):
        """S of DESIGN.md for one capture of output-gradient rows (N, ..., d_out); with a
        row mask's real-row count `tokens`, "tokens" gives a 0-dim device tensor."""
        if self.fisher == "mc":
            return 1.0  # the MC loss is a sum over rows
        avg = self.loss_average
        if avg == "batch":
            return float(rows.shape[0] * self.accumulation_steps)
        if avg == "tokens":
            if tokens is not None:
                return tokens * self.accumulation_steps
            return float(KFACLayer.row_count(rows) * self.accumulation_steps)
        if avg == "sum":
            return 1.0
        return float(avg)

    def _scaler_terms(self, grads: list) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(1/s^2, all-finite flag) as 0-dim device tensors, or (None, None) without a scaler."""
        scaler = self.grad_scaler
        # the MC backward is our own, never scaled
        if self.fisher == "mc" or scaler is None or not scaler.is_enabled() or not grads:
            return None, None
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
        if scale is None:  # scale() was never called: the gradients are unscaled
            return None, None
        device = grads[0].device
        scale = scale.to(device=device, dtype=torch.float64).reshape(())
        finite = _all_finite(grads)
        return 1.0 / (scale * scale), finite

    def _check_captures(self, tensors: list) -> Optional[torch.Tensor]:
        """0-dim device flag: these and all earlier captures of the step are finite (None
        when unguarded); the caller folds it into its update's weights (no host sync).

        Kept as the step's flag, so step() counts the step and leaves `.grad`
        unpreconditioned. In hooks mode, updates made before the first bad capture of a
        step stay (A of earlier layers); every later one is dropped.
        """
        if not self.guard_nonfinite:
            return None
        ok = all_finite(tensors)
        if self.distributed is not None and tensors:
            # one rank's bad capture drops the step on every rank, else factors diverge
            ok = self.distributed.agree_finite(ok, tensors[0].device)
        if ok is not None:
            self._captures_ok = ok if self._captures_ok is None else self._captures_ok & ok
        return self._captures_ok

    @staticmethod
    def _guarded(ok: Optional[torch.Tensor], beta, alpha, device: torch.device) -> tuple:
        """One layer's (beta, alpha), turned into a no-op (1, 0) on the device when not ok."""
        if ok is None:
            return beta, alpha
        b, a = guard_weights(ok, [beta], [alpha], device)
        return b[0], a[0]

    # ------------------------------------------------------------------------------------
    # factor updates
    # ------------------------------------------------------------------------------------
    def _ensure_factors(self, layer: KFACLayer, device: torch.device) -> None:
        # zeros, not empty: beta_1 = 0 multiplies the old value, and 0 * NaN is NaN
        if layer.a_factor is None:
            # an embedding's A is diagonal: its (V,) vector (layer_kinds)
            shape = (layer.a_dim,) if layer.kind == "embedding" else (layer.a_dim, layer.a_dim)
            layer.a_factor = torch.zeros(shape, dtype=self.factor_dtype, device=device)
        if layer.g_factor is None:
            layer.g_factor = torch.zeros(layer.g_dim, layer.g_dim, dtype=self.factor_dtype, device=device)

    def _next_weights(self, layer: KFACLayer, which: str) -> tuple[float, float]:
        """Advance k of factor `which` ("a", "g" or "scale") and return (beta_k, 1 - beta_k)."""
        attr = f"{which}_count"
        k = getattr(layer, attr) + 1
        setattr(layer, attr, k)
        return running_average_weights(self.factor_decay(self.steps), k)

    def _update_factors(self, layers: list[KFACLayer]) -> None:
        """Held-capture path: all factor updates of the step.

        Round j updates every layer with its j-th capture; round 0 applies beta_k and
        later rounds (accumulation micro-batches) beta = 1, all normalised by the totals
        over the step, so k micro-batches equal one k-times larger batch. Round 0 is a
        single `update_factors_` call for every Linear A and every G (Conv2d A goes
        through `conv_input_factor_`).
        """
        rounds = max(max(len(l.inputs), len(l.grads)) for l in layers)
        plan = []
        for layer in layers:
            self._ensure_factors(layer, layer.inputs[0].device)
            beta_a, w_a = self._next_weights(layer, "a")
            beta_g, w_g = self._next_weights(layer, "g")
            # a masked capture counts its real rows (a device tensor: the sum becomes one)
            rows_a = sum(layer.input_row_count(x) if r is None else r
                         for x, r in zip(layer.inputs, _padded(layer.input_rows, len(layer.inputs))))
            n_g = sum(KFACLayer.batch_size(g) for g in layer.grads)
            plan.append((layer, beta_a, row_masks.per_row(w_a, rows_a), beta_g, w_g / max(n_g, 1)))
        # one flag for the whole step: a non-finite capture anywhere drops every update
        ok = self._check_captures([t for l in layers for t in l.inputs + l.grads])

        for j in range(rounds):
            a_fac, a_x, a_beta, a_alpha, a_ones = [], [], [], [], []
            g_fac, g_x, g_beta, g_alpha = [], [], [], []
            for layer, beta_a, alpha_a, beta_g, alpha_g in plan:
                if j < len(layer.inputs):
                    x, beta = layer.inputs[j], (beta_a if j == 0 else 1.0)
                    if layer.kind in ("conv2d", "embedding"):  # outside update_factors_
                        beta, alpha_a = self._guarded(ok, beta, alpha_a, layer.a_factor.device)
                    if layer.kind == "conv2d":
                        ops.conv_input_factor_(layer.a_factor, x, beta, alpha_a, layer.kernel_size,
                                               layer.stride, layer.padding, layer.dilation,
                                               append_ones=layer.has_bias)
                    elif layer.kind == "embedding":
                        update_frequencies_(layer.a_factor, x, beta, alpha_a)
                    else:
                        masked = j < len(layer.input_rows) and layer.input_rows[j] is not None
                        a_fac.append(layer.a_factor); a_x.append(x); a_beta.append(beta)
                        a_alpha.append(alpha_a); a_ones.append(layer.has_bias and not masked)
                if j < len(layer.grads):
                    g = layer.grads[j]
                    s = self._loss_scale(g, layer.grad_tokens[j] if j < len(layer.grad_tokens) else None)
                    g_fac.append(layer.g_factor); g_x.append(g)
                    g_beta.append(beta_g if j == 0 else 1.0); g_alpha.append(alpha_g * s * s)
            self._grouped_update(a_fac, a_x, a_beta, a_alpha, a_ones, g_fac, g_x, g_beta, g_alpha, ok=ok)

    def _grouped_update(self, a_fac, a_x, a_beta, a_alpha, a_ones, g_fac, g_x, g_beta, g_alpha,
                        ok: Optional[torch.Tensor] = None) -> None:
        """One `update_factors_` call for A and G entries; G weights corrected for AMP.

        ok: the step's finite flag when the caller checked the captures; else they are
        checked here (the in-hook path)."""
        factors, xs = a_fac + g_fac, a_x + g_x
        if not factors:
            return
        if ok is None:
            ok = self._check_captures(xs)
        betas, alphas = a_beta + g_beta, a_alpha + g_alpha
        ones = a_ones + [False] * len(g_fac)
        if any(isinstance(a, torch.Tensor) for a in alphas):  # masked row counts
            betas, alphas = _to_device(betas, factors[0].device), _to_device(alphas, factors[0].device)
        inv_s2, finite = self._scaler_terms(g_x)
        if inv_s2 is not None:
            device = factors[0].device
            betas_t = _to_device(betas, device)
            alphas_t = _to_device(alphas, device)
            n_a = len(a_fac)
            # an overflowed step leaves G as it was: weight 0 (the op then never reads the
            # non-finite rows) and beta 1
            alphas_t[n_a:] *= inv_s2 * finite
            betas_t[n_a:] = torch.where(finite, betas_t[n_a:], torch.ones_like(betas_t[n_a:]))
            betas, alphas = betas_t, alphas_t
        betas, alphas = guard_weights(ok, betas, alphas, factors[0].device)
        ops.update_factors_(factors, xs, betas, alphas, append_ones=ones)

    def _hook_update_a(self, layer: KFACLayer, x: torch.Tensor,
                       rows: Optional[torch.Tensor] = None) -> None:
        """In-hook A update; the first capture of a step applies beta_k. rows: the real
        rows of a masked x_bar (its ones-column already in it), else None."""
        self._ensure_factors(layer, x.device)
        if getattr(layer, "_a_step", None) != self.steps:
            layer._a_step = self.steps
            layer._a_beta, layer._a_w = self._next_weights(layer, "a")
            beta = layer._a_beta
        else:
            beta = 1.0
        count = layer.input_row_count(x) if rows is None else rows
        alpha = row_masks.per_row(layer._a_w, count * self.accumulation_steps)
        if rows is not None:  # alpha is a device tensor: keep beta there too (no host copy)
            beta = torch.full((), beta, dtype=torch.float64, device=rows.device)
        # in hooks mode each capture is guarded on its own: A is already updated when a
        # later backward overflows (the held path drops the whole step instead)
        beta, alpha = self._guarded(self._check_captures([x]), beta, alpha, layer.a_factor.device)
        if layer.kind == "conv2d":
            ops.conv_input_factor_(layer.a_factor, x, beta, alpha, layer.kernel_size, layer.stride,
                                   layer.padding, layer.dilation, append_ones=layer.has_bias)
        elif layer.kind == "embedding":
            update_frequencies_(layer.a_factor, x, beta, alpha)
        else:
            ops.update_factor_(layer.a_factor, x, beta, alpha, append_ones=layer.has_bias and rows is None)

    def _hook_update_g(self, layer: KFACLayer, rows: torch.Tensor,
                       tokens: Optional[torch.Tensor] = None) -> None:
        """In-hook G update (and EKFAC scales when a basis exists)."""
        self._ensure_factors(layer, rows.device)
        first = getattr(layer, "_g_step", None) != self.steps
        if first:
            layer._g_step = self.steps
            layer._g_beta, layer._g_w = self._next_weights(layer, "g")
        beta = layer._g_beta if first else 1.0
        n = KFACLayer.batch_size(rows) * self.accumulation_steps
        s = self._loss_scale(rows, tokens)
        self._grouped_update([], [], [], [], [], [layer.g_factor], [rows], [beta],
                             [layer._g_w * s * s / max(n, 1)])
        layer.fired_backward = True
        if self.method == "ekfac" and layer.inputs:
            if layer.qa is None or self.steps % self.inv_update_steps(self.steps) == 0:
                # the basis changes in this step(): keep the pair for the scale update
                # that step() makes after the refresh (as the held path does)
                layer.grads.append(rows)
                return
            x = layer.inputs.pop(0)
            if first:
                layer._s_beta, layer._s_w = self._next_weights(layer, "scale")
            self._scales_update([layer], [x], [rows], [layer._s_beta if first else 1.0],
                                [layer._s_w * s * s / max(n, 1)])

    # ------------------------------------------------------------------------------------
    # EKFAC scales
    # ------------------------------------------------------------------------------------
    def _update_scales(self, layers: list[KFACLayer]) -> None:
        """Held-capture path: the running average of per-example squared gradients."""
        plan = []
        for layer in layers:
            pairs = _pair_captures(layer)
            if pairs is None:
                self._warn_once(layer.name, f"EKFAC: layer {layer.name!r} has {len(layer.inputs)} "
                                f"inputs but {len(layer.grads)} output gradients this step; its "
                                "scales are not updated (a module called several times per forward?)")
                continue
            beta, w = self._next_weights(layer, "scale")
            n = sum(KFACLayer.batch_size(g) for _, g in pairs)
            plan.append((layer, pairs, beta, w / max(n, 1)))
        rounds = max((len(p[1]) for p in plan), default=0)
        for j in range(rounds):
            ls, xs, gs, betas, alphas = [], [], [], [], []
            for layer, pairs, beta, alpha in plan:
                if j < len(pairs):
                    x, g = pairs[j]
                    s = self._loss_scale(g)
                    ls.append(layer); xs.append(x); gs.append(g)
                    betas.append(beta if j == 0 else 1.0); alphas.append(alpha * s * s)
            self._scales_update(ls, xs, gs, betas, alphas)

    def _scales_update(self, layers, xs, gs, betas, alphas) -> None:
        if not layers:
            return
        ex = [l.example_inputs(x) for l, x in zip(layers, xs)]
        eg = [KFACLayer.example_grads(g) for g in gs]
        inv_s2, finite = self._scaler_terms(gs)
        if inv_s2 is not None:
            device = layers[0].scales.device
            alphas = _to_device(alphas, device) * (inv_s2 * finite)
            betas = torch.where(finite, _to_device(betas, device), torch.ones((), dtype=torch.float64,
                                                                               device=device))
        betas, alphas = guard_weights(self._check_captures(xs + gs), betas, alphas, layers[0].scales.device)
        ops.ekfac_scales_([l.scales for l in layers], ex, eg, [l.qa for l in layers],
                          [l.qg for l in layers], betas, alphas)

    # ------------------------------------------------------------------------------------
    # refresh (host syncs allowed here)
    # ------------------------------------------------------------------------------------
    def _refresh(self, layers: list[KFACLayer]) -> None:
        if self.distributed is not None:
            # factors averaged across ranks, decompositions shared out (kfac_fast.distributed)
            with record_warm_paths() as paths:
                solved = self.distributed.refresh(layers, self.damping(self.steps))
            if self.method != "inverse" and solved:
                self._count_refresh(paths[0] if paths else None, solved)
            return
        if not layers:
            return
        if self.method == "inverse":
            damping = self._layer_damping(layers)
            per = damping if isinstance(damping, list) else [damping] * len(layers)
            pis = [ops.pi_damping(l.a_factor, l.g_factor, d) for l, d in zip(layers, per)]
            # failures fall back to fp64, more damping, then the inverse in use (counted)
            invs = self._health.solve_inverse([l.a_factor for l in layers] + [l.g_factor for l in layers],
                                              [p[0] for p in pis] + [p[1] for p in pis],
                                              [l.a_inv for l in layers] + [l.g_inv for l in layers])
            for i, layer in enumerate(layers):
                layer.a_inv, layer.g_inv = invs[i], invs[len(layers) + i]
            return
        # an embedding's diagonal A is its own eigendecomposition (Q_A = I, never stored)
        dense = [l for l in layers if l.kind != "embedding"]
        # failures fall back to fp64, more damping, then the decomposition in use (counted)
        factors = [l.a_factor for l in dense] + [l.g_factor for l in layers]
        with record_warm_paths() as paths:  # what a warm refresh (eigh_tol) did per factor
            vals, vecs = self._health.solve_eigh(
                factors,
                [None if l.qa is None else (l.da, l.qa) for l in dense]
                + [None if l.qg is None else (l.dg, l.qg) for l in layers], tol=self.eigh_tol)
        self._count_refresh(paths[0] if paths else None, len(factors))
        for i, layer in enumerate(dense):
            layer.da, layer.qa = vals[i], vecs[i]
        for j, layer in enumerate(layers, start=len(dense)):
            layer.dg, layer.qg = vals[j], vecs[j]
            if layer.kind == "embedding":
                layer.da = layer.a_factor.clamp(min=0)
            if self.method == "ekfac":
                # a new basis restarts the scales; until their first update they are
                # K-FAC's own (S = d_G d_A^T), so the step stays well defined
                layer.scales = torch.outer(layer.dg, layer.da).contiguous()
                layer.scale_count = 0

    def _count_refresh(self, paths: Optional[torch.Tensor], count: int) -> None:
        """Add one refresh's per-factor paths to refresh_stats (None: all fully solved)."""
        if paths is None or len(paths) != count:
            self.refresh_stats["full"] += count
            return
        for name, n in zip(PATH_NAMES, torch.bincount(paths, minlength=len(PATH_NAMES)).tolist()):
            self.refresh_stats[name] += n

    def _has_inverse_state(self, layer: KFACLayer, method: str) -> bool:
        if self.distributed is not None:
            # rank-identical (under "memory" only the owner holds the decomposition)
            return self.distributed.is_ready(layer)
        if method == "inverse":
            return layer.a_inv is not None
        if method == "ekfac":
            return layer.qa is not None and layer.scales is not None
        return layer.dg is not None  # embeddings never hold a qa

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    def step(self) -> None:
        """Update factors (on factor steps), refresh decompositions (on inverse steps),
        and rewrite `.grad` of every layer whose hooks fired since the last step."""
        step = self.steps
        factor_step = self._is_factor_step()
        fired = [l for l in self.layers.values() if l.fired_forward and l.fired_backward]
        try:
            if factor_step and not self.update_factors_in_hooks:
                held = [l for l in fired if l.inputs and l.grads]
                if self.fisher == "mc" and not held and any(l.inputs for l in fired):
                    raise RuntimeError("fisher='mc': call precond.sample_fisher(output, loss) after "
                                       "the forward and before loss.backward() on factor-update steps")
                if held:
                    self._update_factors(held)
            if factor_step and self.distributed is not None:
                self.distributed.factors_updated([l for l in fired if l.a_count > 0 and l.g_count > 0])
            have_factors = [l for l in self.layers.values() if l.a_count > 0 and l.g_count > 0]
            if step % self.inv_update_steps(step) == 0:
                stale = have_factors
            else:
                stale = [l for l in have_factors if not self._has_inverse_state(l, self.method)]
            if stale:
                self._refresh(stale)
            if self.method == "ekfac" and factor_step:
                # hooks mode holds pairs only on steps that refresh the basis
                self._update_scales([l for l in fired if l.inputs and l.grads and l.qa is not None])
            self._guarded_precondition([l for l in fired if l.a_count > 0 and l.g_count > 0
                                        and self._has_inverse_state(l, self.method)])
        finally:
            for layer in self.layers.values():
                layer.clear_captures()
            self._captures_ok = None
            self._row_mask = None  # a mask describes one batch
            self.steps += 1

    def _guarded_precondition(self, layers: list[KFACLayer]) -> None:
        """`_precondition`, except that a step with a non-finite capture or gradient
        leaves `.grad` as it was and is counted; decided on the device (no host sync)."""
        if not self.guard_nonfinite:
            self._precondition(layers)
            return
        grads = [g for l in layers for g in (l.module.weight.grad, l.module.bias.grad if l.has_bias else None)
                 if g is not None]
        ok = all_finite(grads)
        if self._captures_ok is not None:
            ok = self._captures_ok if ok is None else ok & self._captures_ok.to(ok.device)
        if ok is None:
            self._precondition(layers)
            return
        originals = [g.clone() for g in grads]
        self._precondition(layers)
        for g, original in zip(grads, originals):
            g.copy_(torch.where(ok, g, original))
        if self.last_nu is not None:
            self.last_nu = torch.where(ok, self.last_nu, torch.ones_like(self.last_nu))
        self._health.count_nonfinite(ok)

    def health(self) -> dict:
        """How often the safety nets fired, as Python ints (reads a device counter: one
        host sync, so call it when logging, not every step):
        nonfinite_steps (steps whose captures or gradients were not finite: no factor
        update, `.grad` left unpreconditioned), and on refresh steps fp64_retries,
        damped_retries (solved with added damping), kept_previous (the decomposition or
        inverse in use was kept, or the identity when there was none)."""
        return self._health.report()

    def repeat_precondition(self, *, refresh: bool = False) -> None:
        """Precondition `.grad` again with the stored state, without touching factors or
        the step count; with refresh=True rebuild the decompositions / inverses first.

        For a caller that changes `damping` after `step()` and wants the new direction
        (KFAC's gamma search); a refresh is a host-sync step.
        """
        have = [l for l in self.layers.values() if l.a_count > 0 and l.g_count > 0]
        if refresh and have:
            self._refresh(have)
        self._precondition([l for l in have if self._has_inverse_state(l, self.method)])

    def _precondition(self, layers: list[KFACLayer]) -> None:
        # frozen parameters (no grad): nothing to precondition
        chosen = [l for l in layers if l.module.weight.grad is not None
                  and (not l.has_bias or l.module.bias.grad is not None)]
        if not chosen:
            self.last_nu = None
            return
        kl_clip = self.kl_clip(self.steps)
        kw = {"lr": self.lr(self.steps), "kl_clip": kl_clip} if kl_clip is not None else {}

        def local(chosen: list[KFACLayer]) -> torch.Tensor:
            wgs = [l.module.weight.grad for l in chosen]
            bgs = [l.module.bias.grad if l.has_bias else None for l in chosen]
            if self.method == "eigen":
                return ops.precondition_eigen_(wgs, bgs, [l.qa for l in chosen], [l.da for l in chosen],
                                               [l.qg for l in chosen], [l.dg for l in chosen],
                                               self._layer_damping(chosen), **kw)
            if self.method == "inverse":
                return ops.precondition_inverse_(wgs, bgs, [l.a_inv for l in chosen],
                                                 [l.g_inv for l in chosen], **kw)
            return ops.precondition_ekfac_(wgs, bgs, [l.qa for l in chosen], [l.qg for l in chosen],
                                           [l.scales for l in chosen], self._layer_damping(chosen), **kw)

        if self.precision == "bf16" or any(l.kind == "embedding" for l in chosen):
            self.last_nu = self._precondition_mixed(chosen, kl_clip)
        elif self.distributed is None:
            with tf32_products(chosen[0].module.weight.grad.device) if self.precision == "tf32" \
                    else contextlib.nullcontext():
                self.last_nu = local(chosen)
        else:
            self.last_nu = self.distributed.precondition(chosen, local, damping=self.damping(self.steps),
                                                         lr=self.lr(self.steps), kl_clip=kl_clip)

    def _layer_damping(self, layers: list[KFACLayer]):
        """This step's damping of `layers`: a float, or one per layer (per-layer damping)."""
        return self.damping.for_layers([l.name for l in layers], self.steps)

    def _dense_products(self, dense: list[KFACLayer], grads: list, damping) -> list:
        """P of dense layers, out of place: the functional op, or bf16 GEMM sandwiches."""
        if self.precision != "bf16":
            return ops.precondition_eigen(grads, [l.qa for l in dense], [l.da for l in dense],
                                          [l.qg for l in dense], [l.dg for l in dense], damping)
        if self.method == "ekfac":
            dens = ekfac_denominators([l.scales for l in dense], damping)
        else:
            dens = eigen_denominators([l.da for l in dense], [l.dg for l in dense], damping)
        return precondition_bf16(grads, [l.qa for l in dense], [l.qg for l in dense], dens)

    def _precondition_mixed(self, chosen: list[KFACLayer], kl_clip) -> torch.Tensor:
        """Eigen preconditioning when embeddings (diagonal A) are among the layers, or
        with precision="bf16".

        The KL clip needs one sum over every layer, and the fused in-place op cannot take
        a diagonal A, so this path forms each P out of place (the functional op for the
        dense layers, `layer_kinds.precondition_embedding` for embeddings), reduces nu
        on the device and writes nu * P into `.grad`: one extra gradient-sized buffer.
        """
        dense = [l for l in chosen if l.kind != "embedding"]
        emb = [l for l in chosen if l.kind == "embedding"]
        damping = self._layer_damping(dense + emb)
        per = damping if isinstance(damping, list) else [damping] * len(chosen)
        grads = [_grad_bar(l) for l in dense] + [l.module.weight.grad for l in emb]
        dense_damping = per[:len(dense)] if isinstance(damping, list) else damping
        ps = self._dense_products(dense, grads[:len(dense)], dense_damping) if dense else []
        ps += [precondition_embedding(l.module.weight.grad, l.da, l.qg, l.dg, d)
               for l, d in zip(emb, per[len(dense):])]
        device = chosen[0].module.weight.grad.device
        if kl_clip is None:
            nu = torch.ones((), dtype=torch.float32, device=device)
        else:
            nu = ops.kl_clip_scale(grads, ps, self.lr(self.steps), kl_clip)
        for layer, p in zip(dense + emb, ps):
            w = layer.module.weight.grad
            if layer.kind == "embedding":
                w.copy_(p * nu)
                continue
            w.copy_((p[:, :layer.in_dim] * nu).reshape(w.shape))
            if layer.has_bias:
                layer.module.bias.grad.copy_(p[:, -1] * nu)
        return nu

    # ------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------
    _TENSORS = ("a_factor", "g_factor", "qa", "da", "qg", "dg", "a_inv", "g_inv", "scales")
    _COUNTS = ("a_count", "g_count", "scale_count")

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: step count, and per layer the
        factors, their k, and the decompositions (or EKFAC scales) in use.

        Data-parallel: a collective (call it on every rank, save rank 0's result).
        """
        if self.distributed is None:
            return self._state_dict()
        self.distributed.before_state_dict()
        try:
            return self._state_dict()
        finally:
            self.distributed.after_state_dict()

    def _state_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            entry = {c: getattr(layer, c) for c in self._COUNTS}
            entry.update({t: getattr(layer, t).clone() for t in self._TENSORS
                          if getattr(layer, t) is not None})
            layers[name] = entry
        return {"steps": self.steps, "method": self.method, "layers": layers,
                "health": self._health.state_dict(), "refresh_stats": dict(self.refresh_stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; tensors move to each layer's weight device.

        A layer with factors but no stored decomposition is refreshed at its next step.
        Data-parallel: load the same state (rank 0's) on every rank.
        """
        if not isinstance(state, dict) or "layers" not in state or "steps" not in state:
            raise ValueError("state must be a dict from KFACPreconditioner.state_dict()")
        if state.get("method", self.method) != self.method:
            raise ValueError(f"state was saved with method={state['method']!r}, "
                             f"this preconditioner has method={self.method!r}")
        unknown = set(state["layers"]) - set(self.layers)
        missing = set(self.layers) - set(state["layers"])
        resized = sorted(f"{n} ({side} factor {tuple(entry[f'{side}_factor'].shape)}, model needs {dim})"
                         for n, entry in state["layers"].items() if n in self.layers
                         for side, dim in (("a", self.layers[n].a_dim), ("g", self.layers[n].g_dim))
                         if isinstance(entry.get(f"{side}_factor"), torch.Tensor)
                         and entry[f"{side}_factor"].shape[0] != dim)
        if unknown or missing or resized:
            parts = [f"state has layers this model does not register: {sorted(unknown)}" if unknown else "",
                     f"model layers missing from the state: {sorted(missing)}" if missing else "",
                     f"layers whose size differs: {resized}" if resized else ""]
            raise ValueError("state does not match this model's layers: " + "; ".join(p for p in parts if p))
        for name, entry in state["layers"].items():
            layer = self.layers[name]
            device = layer.module.weight.device
            for c in self._COUNTS:
                setattr(layer, c, int(entry.get(c, 0)))
            for t in self._TENSORS:
                v = entry.get(t)
                setattr(layer, t, None if v is None else v.detach().to(device).clone())
        self.steps = int(state["steps"])
        self._factor_step_cache = (-1, False)
        if "health" in state:
            self._health.load_state_dict(state["health"], next(iter(self.layers.values())).module.weight.device)
        self.refresh_stats = {k: int(v) for k, v in state.get("refresh_stats", self.refresh_stats).items()}
        if self.distributed is not None:
            self.distributed.after_load_state_dict()

    def memory_usage(self) -> dict[str, int]:
        """Bytes held per layer name (state tensors plus captures held right now)."""
        return {name: sum(layer.memory_usage().values()) for name, layer in self.layers.items()}

    def total_memory_usage(self) -> int:
        """Bytes held by all layers together (the sum of `memory_usage()`)."""
        return sum(self.memory_usage().values())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def _compile_skip(skip_layers) -> list:
    if isinstance(skip_layers, str):
        skip_layers = (skip_layers,)
    try:
        patterns = list(skip_layers)
    except TypeError:
        raise TypeError(f"skip_layers must be a regex or an iterable of regexes, "
                        f"got {type(skip_layers).__name__}") from None
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip_layers entries must be strings, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"skip_layers: bad regex {p!r}: {exc}") from None
    return out


def _grad_bar(layer: KFACLayer) -> torch.Tensor:
    """dW_bar = [dW | db] of a dense layer (a copy; the bias column last)."""
    w = layer.module.weight.grad.reshape(layer.g_dim, -1)
    if not layer.has_bias:
        return w
    return torch.cat([w, layer.module.bias.grad.reshape(-1, 1)], dim=1)


def _pair_captures(layer: KFACLayer):
    """(input, output-gradient) pairs of one step for EKFAC, or None when ambiguous."""
    if len(layer.inputs) == len(layer.grads):
        return list(zip(layer.inputs, layer.grads))
    if len(layer.inputs) == 1:  # several MC samples for one forward
        return [(layer.inputs[0], g) for g in layer.grads]
    return None


def _padded(values: list, n: int) -> list:
    """values extended with None to length n (captures recorded without a row count)."""
    return list(values) + [None] * (n - len(values))


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """Host floats as a float64 device tensor without a host sync (pinned, non-blocking);
    0-dim device tensors among them (masked row counts) are stacked in place."""
    if any(isinstance(v, torch.Tensor) for v in values):
        # floats filled on the device: a pageable host-to-device copy would sync
        return torch.stack([v.to(device=device, dtype=torch.float64).reshape(())
                            if isinstance(v, torch.Tensor)
                            else torch.full((), float(v), dtype=torch.float64, device=device)
                            for v in values])
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _all_finite(tensors: list) -> torch.Tensor:
    """0-dim bool device tensor: every entry of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]
