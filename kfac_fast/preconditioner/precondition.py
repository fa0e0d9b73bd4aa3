"""Precondition: rewrite `.grad` of the layers with factors into K-FAC's direction.

The usual path is one fused in-place op for every layer (`ops.precondition_eigen_`,
`_inverse_`, `_ekfac_`), which also applies the KL clip. When some layer is not served
by the grouped ops (a diagonal A, a block of its own), with precision="bf16", or with a curvature
extension, each P is formed out of place (`_precondition_out_of_place`), nu reduced on
the device, and nu * P written back by the layers. A step with a non-finite capture or
gradient leaves `.grad` as it was, decided on the device.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .. import ops
from ..distributed.sharded_grads import local_whole
from ..health import all_finite
from ..layers import KFACLayer
from ..precision import eigen_denominators, ekfac_denominators, precondition_bf16, tf32_products
from .base import PreconditionerBase


class PreconditionMixin(PreconditionerBase):
    """The precondition job of KFACPreconditioner."""

    def repeat_precondition(self, *, refresh: bool = False) -> None:
        """Precondition `.grad` again with the stored state, without touching factors or
        the step count; with refresh=True rebuild the decompositions / inverses first.

        For a caller that changes `damping` after `step()` and wants the new direction
        (KFAC's gamma search); a refresh is a host-sync step.
        """
        have = [layer for layer in self.layers.values() if layer.a_count > 0 and layer.g_count > 0]
        if refresh and have:
            self._refresh(have)
        chosen = [layer for layer in have if self._has_inverse_state(layer, self.method)]
        if self.distributed is not None and self.distributed.sharded_memory is not None:
            self._precondition_on_owners(chosen)
            return
        with self._whole_gradients(chosen):
            self._precondition(chosen)

    def _whole_gradients(self, layers: list[KFACLayer]) -> Any:
        """A context in which `.grad` of FSDP2-sharded parameters of `layers` is the whole
        gradient (`kfac_fast.distributed.sharded_grads`); without a driver, DTensor `.grad`
        on a 1-device mesh (FSDP2 on a world of one) is pointed at its local tensor
        (`sharded_grads.local_whole`); nothing happens otherwise."""
        if self.distributed is None:
            return local_whole(layers)
        if self.distributed.sharded is None:
            return contextlib.nullcontext()
        return self.distributed.sharded.whole(layers)

    def _guarded_precondition(self, layers: list[KFACLayer]) -> None:
        """`_whole_gradients` around `_guarded_precondition_whole`, or, for strategy
        "memory" on FSDP2-sharded layers, `_precondition_on_owners`."""
        if self.distributed is not None and self.distributed.sharded_memory is not None:
            self._precondition_on_owners(layers)
            return
        with self._whole_gradients(layers):
            gathered = None if self.distributed is None or self.distributed.sharded is None \
                else self.distributed.sharded.last_ok  # False: some rank's shard was malformed
            if gathered is not None:
                self._captures_ok = gathered if self._captures_ok is None else self._captures_ok & gathered
            self._guarded_precondition_whole(layers)

    def _precondition_on_owners(self, layers: list[KFACLayer]) -> None:
        """Strategy "memory" on FSDP2-sharded layers (`distributed.sharded_memory`): each
        owner preconditions its layers' gathered gradients and scatters them back; a step
        with a non-finite capture, gradient or result keeps the plain gradient (always
        guarded, counted in health() when guard_nonfinite)."""
        chosen = [layer for layer in layers if layer.has_grads()]
        if not chosen:
            self.last_nu = None
            return
        sharded = self.distributed.sharded_memory
        nu, ok = sharded.precondition(chosen, self.damping(self.steps), self.lr(self.steps), self.kl_clip(self.steps),
                                      self._captures_ok if self.guard_nonfinite else None)
        if self.guard_nonfinite:
            self._step_causes["nonfinite_grad"] = sharded.grad_ok
            self._step_causes["nonfinite_output"] = sharded.output_ok | ~sharded.grad_ok  # as single-process
            self._health.count_nonfinite(ok)
        self.last_nu = nu

    def _guarded_precondition_whole(self, layers: list[KFACLayer]) -> None:
        """`_precondition`, except that a step with a non-finite capture or gradient, or
        whose preconditioned gradient is not finite (a damping that vanishes on a zero
        eigenvalue, a corrupted decomposition), leaves `.grad` as the plain gradient and is
        counted (health: nonfinite_steps, and nonfinite_grad / nonfinite_output);
        decided on the device (no host sync)."""
        if not self.guard_nonfinite:
            self._precondition(layers)
            return
        grads = [g for layer in layers for g in layer.param_grads() if g is not None]
        ok = all_finite(grads)
        if ok is not None:
            self._step_causes["nonfinite_grad"] = ok
        if self._captures_ok is not None:
            ok = self._captures_ok if ok is None else ok & self._captures_ok.to(ok.device)
        if ok is None:
            self._precondition(layers)
            return
        originals = [g.clone() for g in grads]
        self._precondition(layers)
        out_ok = all_finite(grads)
        if out_ok is not None:
            # counted only when the inputs were fine: the output of a bad input is moot
            self._step_causes["nonfinite_output"] = out_ok | ~ok
            ok = ok & out_ok
        for g, original in zip(grads, originals):
            g.copy_(torch.where(ok, g, original))
        if self.last_nu is not None:
            self.last_nu = torch.where(ok, self.last_nu, torch.ones_like(self.last_nu))
        self._health.count_nonfinite(ok)

    def _warn_silent_skips(self) -> None:
        """Warn once per layer about gradients K-FAC leaves as they are without being told:
        a layer trained in eval mode (its forward is not captured), and a trainable weight
        next to a bias without a gradient (K-FAC preconditions [dW | db] together)."""
        for layer in self.layers.values():
            if layer.module.weight.grad is None:
                continue
            if layer.eval_forward and not layer.fired_forward:
                layer.warn_once("eval", f"K-FAC: layer {layer.name!r} has a gradient but ran its forward in "
                                "eval mode (model.eval()): K-FAC captures train-mode forwards only, its "
                                "gradient is left unpreconditioned")
            elif layer.has_bias and layer.module.bias.grad is None:
                layer.warn_once("bias", f"K-FAC: layer {layer.name!r} has a weight gradient but its bias "
                                "has none (frozen bias?): K-FAC preconditions weight and bias together, "
                                "so this layer's gradient is left unpreconditioned")

    def _precondition(self, layers: list[KFACLayer]) -> None:
        # frozen parameters (no grad): nothing to precondition
        chosen = [layer for layer in layers if layer.has_grads()]
        if not chosen:
            self.last_nu = None
            return
        kl_clip = self.kl_clip(self.steps)
        kw = {"lr": self.lr(self.steps), "kl_clip": kl_clip} if kl_clip is not None else {}

        def local(chosen: list[KFACLayer]) -> torch.Tensor:
            wgs = [layer.module.weight.grad for layer in chosen]
            bgs = [layer.module.bias.grad if layer.has_bias else None for layer in chosen]
            qa = [layer.qa for layer in chosen]
            qg = [layer.qg for layer in chosen]
            if self.method == "eigen":
                return ops.precondition_eigen_(wgs, bgs, qa, [layer.da for layer in chosen], qg,
                                               [layer.dg for layer in chosen], self._layer_damping(chosen),
                                               precision=self._kernel_precision(), **kw)
            if self.method == "inverse":
                return ops.precondition_inverse_(wgs, bgs, [layer.a_inv for layer in chosen],
                                                 [layer.g_inv for layer in chosen], **kw)
            return ops.precondition_ekfac_(wgs, bgs, qa, qg, [layer.scales for layer in chosen],
                                           self._layer_damping(chosen), **kw)

        if self.precision == "bf16" or self._curvatures or not all(layer.grouped for layer in chosen):
            self.last_nu = self._precondition_out_of_place(chosen, kl_clip)
        else:
            with tf32_products(chosen[0].module.weight.grad.device) if self.precision == "tf32" \
                    else contextlib.nullcontext():
                if self.distributed is None:
                    self.last_nu = local(chosen)
                else:
                    self.last_nu = self.distributed.precondition(chosen, local, damping=self.damping(self.steps),
                                                                 lr=self.lr(self.steps), kl_clip=kl_clip)

    def _kernel_precision(self) -> Optional[str]:
        """The ops' `precision` for this policy: "tf32" reaches the Triton and CUDA kernels
        (the tf32_products block reaches torch's matmuls only); "fp32" passes nothing (the
        ops as they are); the torch reference ignores it, so CPU results do not change."""
        return "tf32" if self.precision == "tf32" else None

    def _dense_products(self, dense: list[KFACLayer], grads: list, damping: Any) -> list:
        """P of layers served by the grouped ops, out of place: the functional op of the
        method, or bf16 GEMM sandwiches."""
        qa = [layer.qa for layer in dense]
        qg = [layer.qg for layer in dense]
        if self.precision == "bf16":
            if self.method == "ekfac":
                dens = ekfac_denominators([layer.scales for layer in dense], damping)
            else:
                dens = eigen_denominators([layer.da for layer in dense], [layer.dg for layer in dense], damping)
            return precondition_bf16(grads, qa, qg, dens)
        if self.method == "inverse":
            return ops.precondition_inverse(grads, [layer.a_inv for layer in dense], [layer.g_inv for layer in dense])
        if self.method == "ekfac":
            return ops.precondition_ekfac(grads, qa, qg, [layer.scales for layer in dense], damping)
        return ops.precondition_eigen(grads, qa, [layer.da for layer in dense], qg,
                                      [layer.dg for layer in dense], damping, precision=self._kernel_precision())

    def _precondition_out_of_place(self, chosen: list[KFACLayer], kl_clip: Optional[float]) -> torch.Tensor:
        """Each P formed out of place, then nu * P written into `.grad`.

        The KL clip needs one sum over every layer, and the fused in-place op cannot
        take a diagonal A, a block of its own or a curvature extension's coupled layers,
        so this path forms P per layer (curvature extensions first, for the layers they
        take; then the functional op for the rest of the dense layers; each other layer's
        own `precondition_alone`, with its damping under every method), reduces nu on the
        device and lets each layer write nu * P: one extra gradient-sized buffer.
        """
        ordered = [layer for layer in chosen if layer.grouped]
        ordered += [layer for layer in chosen if not layer.grouped]
        grads = [layer.grad_bar() for layer in ordered]
        ps: dict[str, torch.Tensor] = {}
        if self._curvatures:
            by_name = {layer.name: g for layer, g in zip(ordered, grads)}
            for curvature in self._curvatures:
                ps.update(curvature.precondition(by_name))
        per: list = [None] * len(ordered)
        damping: Any = None
        if self.method != "inverse":  # "inverse" baked its damping into the inverses
            damping = self._layer_damping(ordered)
            per = damping if isinstance(damping, list) else [damping] * len(ordered)
        rest = [i for i, layer in enumerate(ordered) if layer.grouped and layer.name not in ps]
        if rest:
            rest_damping = [per[i] for i in rest] if isinstance(damping, list) else damping
            products = self._dense_products([ordered[i] for i in rest], [grads[i] for i in rest], rest_damping)
            ps.update((ordered[i].name, p) for i, p in zip(rest, products))
        alone = [i for i, layer in enumerate(ordered) if not layer.grouped and layer.name not in ps]
        if alone and damping is None:  # "inverse": these layers still take lambda at each step
            own = self._layer_damping([ordered[i] for i in alone])
            per = [None] * len(ordered)
            for k, i in enumerate(alone):
                per[i] = own[k] if isinstance(own, list) else own
        for i in alone:
            ps[ordered[i].name] = ordered[i].precondition_alone(grads[i], per[i])
        products = [ps[layer.name] for layer in ordered]
        if kl_clip is None:
            nu = torch.ones((), dtype=torch.float32, device=chosen[0].module.weight.grad.device)
        else:
            nu = ops.kl_clip_scale(grads, products, self.lr(self.steps), kl_clip)
        for layer, p in zip(ordered, products):
            layer.write_grad(p, scale=nu)
        return nu
