"""Capture: what the layers' hooks hand the preconditioner, and the MC Fisher's backward.

A forward hook reports each registered layer's input and output (`on_forward`); on a
factor-update step the input is held (or consumed at once in hooks mode) and a
gradient hook on the output collects the output gradient in row layout. Row masks of
padded sequences are applied here; `sample_fisher` runs the MC Fisher's extra
backward to the captured outputs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .. import row_mask as row_masks
from ..fisher import ExampleSeed, canonical_loss, sampled_output_grad
from ..layers import KFACLayer
from ..layers.linear import refuse_row_mask
from ..schedules import require_int
from .base import PreconditionerBase


class CaptureMixin(PreconditionerBase):
    """The hooks' side of KFACPreconditioner."""

    if TYPE_CHECKING:  # the factor-update job's (FactorUpdateMixin)
        def _capture_block(self, layer: KFACLayer, x: Optional[torch.Tensor], rows: torch.Tensor,
                           tokens: Optional[torch.Tensor]) -> None: ...

    def _is_factor_step(self) -> bool:
        step, cached = self._factor_step_cache
        if step != self.steps:
            cached = self.steps % self.factor_update_steps(self.steps) == 0
            self._factor_step_cache = (self.steps, cached)
        return cached

    def on_forward(self, layer: KFACLayer, x: torch.Tensor, output: torch.Tensor) -> None:
        """Forward hook body: hold or consume the input, arrange for the output gradient.

        Empirical Fisher: an input counts only once its own output gradient arrives (a
        train-mode forward that never reaches a backward, e.g. an accuracy check, adds
        nothing to A). Held captures are kept in forward order and the unpaired ones are
        dropped at `step()`; in hooks mode A is updated in the gradient hook, guarded by
        the same finite check as G, so a NaN loss with finite inputs leaves A untouched.
        """
        capture = self._is_factor_step()
        empirical = capture and self.fisher == "empirical"
        wants_grad = isinstance(output, torch.Tensor) and output.requires_grad
        mask = rows = None
        slot = -1
        if capture:
            x = layer.batched_input(x)
            mask = row_masks.mask_for(self._row_mask, x) if layer.row_maskable else None
            if mask is not None:  # x_bar with padding rows zeroed: its own ones-column
                x, rows = row_masks.masked_input(x, mask, layer.appends_ones), row_masks.real_rows(mask)
            if self.update_factors_in_hooks:
                if empirical:  # checked now, as every capture of the step: a bad one drops the rest
                    self._check_captures([x])
                elif not layer.owns_block:  # MC: its sampled backward is explicit (sample_fisher);
                    self._hook_update_a(layer, x, rows)  # a block waits for its gradient
                    if self.method == "ekfac":
                        layer.inputs.append(x)
            elif not empirical or wants_grad:
                slot = layer.hold_input(x, rows, paired=not empirical)
        if not wants_grad:
            return
        if capture and self.fisher == "mc":  # with its input: a block pairs the two
            layer.edges.append((torch.autograd.graph.get_gradient_edge(output), x))
        generation = layer.generation

        def grad_hook(g: torch.Tensor) -> None:
            # registered before any in-place op on `output`, so g is the gradient of the
            # layer's own output even when e.g. ReLU(inplace=True) follows
            layer.fired_backward = True
            if not empirical or layer.generation != generation:
                return  # a backward after step() belongs to no step's factors
            g_rows = layer.grad_rows(g.detach())
            tokens = None
            if mask is not None:
                g_rows, tokens = row_masks.masked_rows(g_rows, mask), row_masks.real_rows(mask)
            if layer.owns_block:
                layer.pair_input(slot)
                self._on_grad(layer, g_rows, tokens, x)
            elif self.update_factors_in_hooks:
                ok = self._hook_update_a(layer, x, rows, grad_rows=g_rows)
                if self.method == "ekfac":
                    layer.inputs.append(x)
                self._hook_update_g(layer, g_rows, tokens, ok=ok)
            else:
                layer.pair_input(slot)
                self._on_grad(layer, g_rows, tokens)

        output.register_hook(grad_hook)

    def _on_grad(self, layer: KFACLayer, rows: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                 x: Optional[torch.Tensor] = None) -> None:
        """tokens: the real rows of a masked capture (0-dim device tensor), else None. x:
        the capture's (batched) input, which an `owns_block` layer pairs with the rows
        into its per-example gradients v (times S, so they are kept as they are)."""
        if layer.owns_block:
            self._capture_block(layer, x, rows, tokens)
            return
        if self.update_factors_in_hooks:
            self._hook_update_g(layer, rows, tokens)
        else:
            layer.grads.append(rows)
            layer.grad_tokens.append(tokens)

    def set_row_mask(self, mask: Optional[torch.Tensor]) -> None:
        """The real-token mask of the next forward (see the package docstring): a bool
        (N, T) tensor, True for real tokens, applied to every nn.Linear whose input has
        leading dims exactly (N, T), and to every registered norm (extra_kinds) whose
        input rows are (N, T, d). It holds until `step()` (which clears it) or the next
        call; None clears it. Methods "eigen"/"inverse" with fisher="empirical", and no
        K-FAC-reduce layer (`use_reduce`)."""
        mask = row_masks.check_row_mask(mask)
        if mask is not None:
            refuse_row_mask(self.layers.values())
        if mask is not None and (self.method == "ekfac" or self.fisher == "mc"):
            raise ValueError(f"set_row_mask supports method 'eigen'/'inverse' with fisher='empirical', "
                             f"this preconditioner has method={self.method!r}, fisher={self.fisher!r}")
        self._row_mask = mask

    def sample_fisher(self, output: torch.Tensor, loss: str = "cross_entropy", *,
                      num_samples: int = 1, generator: Optional[torch.Generator] = None,
                      variance: float = 1.0, seed: Optional[ExampleSeed] = None) -> None:
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
            seed: a `kfac_fast.fisher.ExampleSeed` instead: per-example samples that do not
                depend on how the batch is split across ranks (sample i uses seed.nth(i)).
            variance: variance of the "gaussian" predictive distribution.
        """
        if self.fisher != "mc":
            raise RuntimeError("sample_fisher needs KFACPreconditioner(..., fisher='mc'), "
                               f"this one has fisher={self.fisher!r}")
        loss = canonical_loss(loss)
        require_int("num_samples", num_samples)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            raise ValueError("output must be a tensor that requires grad (the model's output)")
        pending = [(layer, edge, x) for layer in self.layers.values() for edge, x in layer.edges]
        for layer in self.layers.values():
            layer.edges.clear()  # a later micro-batch must not revisit a freed graph
        if not pending:
            return
        for i in range(num_samples):
            grad_out = sampled_output_grad(output, loss, generator=generator, variance=variance,
                                           seed=None if seed is None else seed.nth(i))
            grads = torch.autograd.grad([output], [e for _, e, _ in pending], [grad_out],
                                        retain_graph=True, allow_unused=True)
            for (layer, _, x), g in zip(pending, grads):
                if g is not None:
                    self._on_grad(layer, layer.grad_rows(g), x=x)
