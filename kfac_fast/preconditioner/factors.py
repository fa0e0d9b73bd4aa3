"""Factor updates: A, G (and EKFAC's scales) as zero-debiased running averages.

Two paths with the same result: held captures are folded in at `step()` by one grouped
`ops.update_factors_` call per round (`_update_factors`), or each capture updates its
factor inside its hook (`update_factors_in_hooks=True`). The host-side weights (beta_k,
1/R, the loss scale S) are Python numbers, or 0-dim device tensors under a row mask;
the non-finite guard and a GradScaler's 1/s^2 are folded into them on the device.
Curvature extensions update their own factors after the layers' (`UpdateContext`).
A layer that owns its block (a norm) is updated from its per-example gradients v, which
its capture already paired and scaled by S (`_block_update`), outside the grouped call.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from .. import row_mask as row_masks
from ..health import all_finite, as_device_tensor, capture_flags, guard_weights
from ..layers import KFACLayer
from ..schedules import running_average_weights
from .base import PreconditionerBase
from .extension import UpdateContext


class FactorUpdateMixin(PreconditionerBase):
    """The factor-update job of KFACPreconditioner."""

    def _loss_scale(self, rows: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> Any:
        """S of docs/design.md for one capture of output-gradient rows (N, ..., d_out); with a
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

    def _scaler_terms(self, grads: list) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(1/s^2, all-finite flag) as 0-dim device tensors, or None without a scaler."""
        scaler = self.grad_scaler
        # the MC backward is our own, never scaled
        if self.fisher == "mc" or scaler is None or not scaler.is_enabled() or not grads:
            return None
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
        if scale is None:  # scale() was never called: the gradients are unscaled
            return None
        device = grads[0].device
        scale = scale.to(device=device, dtype=torch.float64).reshape(())
        finite = all_finite(grads)
        if finite is None:  # only empty gradients: nothing overflowed
            finite = torch.ones((), dtype=torch.bool, device=device)
        return 1.0 / (scale * scale), finite

    def _check_captures(self, tensors: list) -> Optional[torch.Tensor]:
        """0-dim device flag: these and all earlier captures of the step are finite (None
        when unguarded); the caller folds it into its update's weights (no host sync).

        Kept as the step's flag, so step() counts the step and leaves `.grad`
        unpreconditioned. In hooks mode, updates made before the first bad capture of a
        step stay (A, G and EKFAC scales of the layers whose hooks ran earlier); every
        later one is dropped.
        """
        if not self.guard_nonfinite:
            return None
        flags = capture_flags(tensors)
        ok = None
        if flags is not None:
            finite, in_range = flags
            self._note_cause("nonfinite_capture", finite)
            self._note_cause("capture_overflow", in_range)
            ok = finite & in_range
        if self.distributed is not None and tensors:
            # one rank's bad capture drops the step on every rank, else factors diverge
            ok = self.distributed.agree_finite(ok, tensors[0].device)
        if ok is not None:
            self._captures_ok = ok if self._captures_ok is None else self._captures_ok & ok
        return self._captures_ok

    def _note_cause(self, cause: str, ok: torch.Tensor) -> None:
        """AND `ok` into this step's flag for `cause`; step() counts each cause once."""
        prev = self._step_causes.get(cause)
        self._step_causes[cause] = ok if prev is None else prev & ok

    @staticmethod
    def _guarded(ok: Optional[torch.Tensor], beta: Any, alpha: Any, device: torch.device) -> tuple:
        """One layer's (beta, alpha), turned into a no-op (1, 0) on the device when not ok."""
        if ok is None:
            return beta, alpha
        b, a = guard_weights(ok, [beta], [alpha], device)
        return b[0], a[0]

    def _ensure_factors(self, layer: KFACLayer, device: torch.device) -> None:
        # zeros, not empty: beta_1 = 0 multiplies the old value, and 0 * NaN is NaN
        if layer.a_factor is None:
            layer.a_factor = torch.zeros(layer.a_shape(), dtype=self.factor_dtype, device=device)
        if layer.g_factor is None and not layer.owns_block:  # a block lives in a_factor alone
            layer.g_factor = torch.zeros(layer.g_dim, layer.g_dim, dtype=self.factor_dtype, device=device)

    def _next_weights(self, layer: KFACLayer, which: str) -> tuple[float, float]:
        """Advance k of factor `which` ("a", "g" or "scale") and return (beta_k, 1 - beta_k)."""
        attr = f"{which}_count"
        k = getattr(layer, attr) + 1
        setattr(layer, attr, k)
        return running_average_weights(self.factor_decay(self.steps), k)

    def _next_block_weights(self, layer: KFACLayer) -> tuple[float, float]:
        """(beta_k, 1 - beta_k) of an `owns_block` layer's block; its k counts as both a_count
        and g_count (the step's "has factors" tests read both)."""
        beta, w = self._next_weights(layer, "a")
        layer.g_count = layer.a_count
        return beta, w

    def _block_update(self, layer: KFACLayer, vs: list, betas: list, alphas: list,
                      ok: Optional[torch.Tensor]) -> None:
        """An `owns_block` layer's block from its v captures, with G's AMP correction (v
        carries the GradScaler's scale once) and the step's guard, on the device."""
        device = layer.a_factor.device
        weights: tuple = (betas, alphas)
        terms = self._scaler_terms(vs)
        if terms is not None:
            inv_s2, finite = terms
            weights = (torch.where(finite, as_device_tensor(betas, device), torch.ones((), dtype=torch.float64,
                                                                                       device=device)),
                       as_device_tensor(alphas, device) * (inv_s2 * finite))
        betas_, alphas_ = guard_weights(ok, weights[0], weights[1], device)
        for j, v in enumerate(vs):
            layer.update_block_(v, betas_[j], alphas_[j])

    def _update_factors(self, layers: list[KFACLayer]) -> None:
        """Held-capture path: all factor updates of the step.

        Round j updates every layer with its j-th capture; round 0 applies beta_k and
        later rounds (accumulation micro-batches) beta = 1, all normalised by the totals
        over the step, so k micro-batches equal one k-times larger batch. Round 0 is a
        single `update_factors_` call for every grouped A (`a_group_entry`) and every G;
        the other kinds update their A alone (`update_a_`); a block (`owns_block`) is updated
        from its v captures, scaled and paired already. Curvature extensions follow.
        """
        blocks = [layer for layer in layers if layer.owns_block]
        kron = [layer for layer in layers if not layer.owns_block] if blocks else layers
        rounds = max((max(len(layer.inputs), len(layer.grads)) for layer in kron), default=0)
        plan = []
        for layer in kron:
            self._ensure_factors(layer, layer.inputs[0].device)
            beta_a, w_a = self._next_weights(layer, "a")
            beta_g, w_g = self._next_weights(layer, "g")
            # a masked capture counts its real rows (a device tensor: the sum becomes one)
            rows_a = sum(layer.input_row_count(x) if r is None else r
                         for x, r in zip(layer.inputs, _padded(layer.input_rows, len(layer.inputs))))
            n_g = sum(KFACLayer.batch_size(g) for g in layer.grads)
            plan.append((layer, beta_a, row_masks.per_row(w_a, rows_a), beta_g, w_g / max(n_g, 1)))
        # one flag for the whole step: a non-finite capture anywhere drops every update
        ok = self._check_captures([t for layer in layers for t in layer.inputs + layer.grads])
        for layer in blocks:
            self._ensure_factors(layer, layer.grads[0].device)
            beta, w = self._next_block_weights(layer)
            alpha = w / max(sum(KFACLayer.batch_size(v) for v in layer.grads), 1)
            self._block_update(layer, layer.grads, [beta] + [1.0] * (len(layer.grads) - 1),
                               [alpha] * len(layer.grads), ok)

        for j in range(rounds):
            a_fac, a_x, a_beta, a_alpha, a_ones = [], [], [], [], []
            g_fac, g_x, g_beta, g_alpha = [], [], [], []
            for layer, beta_a, alpha_a, beta_g, alpha_g in plan:
                if j < len(layer.inputs):
                    x, beta = layer.inputs[j], (beta_a if j == 0 else 1.0)
                    masked = j < len(layer.input_rows) and layer.input_rows[j] is not None
                    entry = layer.a_group_entry(x, masked)
                    if entry is None:  # outside update_factors_: guarded here
                        beta, alpha_a = self._guarded(ok, beta, alpha_a, layer.a_factor.device)
                        layer.update_a_(x, beta, alpha_a)
                    else:
                        a_fac.append(entry[0])
                        a_x.append(entry[1])
                        a_beta.append(beta)
                        a_alpha.append(alpha_a)
                        a_ones.append(entry[2])
                if j < len(layer.grads):
                    g = layer.grads[j]
                    s = self._loss_scale(g, layer.grad_tokens[j] if j < len(layer.grad_tokens) else None)
                    g_fac.append(layer.g_factor)
                    g_x.append(g)
                    g_beta.append(beta_g if j == 0 else 1.0)
                    g_alpha.append(alpha_g * s * s)
            self._grouped_update(a_fac, a_x, a_beta, a_alpha, a_ones, g_fac, g_x, g_beta, g_alpha, ok=ok)
        if self._curvatures:
            context = UpdateContext(decay=self.factor_decay(self.steps), dtype=self.factor_dtype,
                                    ok=self._captures_ok, loss_scale=self._loss_scale)
            for curvature in self._curvatures:
                curvature.update(layers, context)

    def _grouped_update(self, a_fac: list, a_x: list, a_beta: list, a_alpha: list, a_ones: list,
                        g_fac: list, g_x: list, g_beta: list, g_alpha: list,
                        ok: Optional[torch.Tensor] = None) -> None:
        """One `update_factors_` call for A and G entries; G weights corrected for AMP.

        ok: the step's finite flag when the caller checked the captures; else they are
        checked here (the in-hook path)."""
        factors, xs = a_fac + g_fac, a_x + g_x
        if not factors:
            return
        if ok is None:
            ok = self._check_captures(xs)
        betas: Any = a_beta + g_beta
        alphas: Any = a_alpha + g_alpha
        ones = a_ones + [False] * len(g_fac)
        if any(isinstance(a, torch.Tensor) for a in alphas):  # masked row counts
            betas, alphas = as_device_tensor(betas, factors[0].device), as_device_tensor(alphas, factors[0].device)
        terms = self._scaler_terms(g_x)
        if terms is not None:
            inv_s2, finite = terms
            device = factors[0].device
            betas_t = as_device_tensor(betas, device)
            alphas_t = as_device_tensor(alphas, device)
            n_a = len(a_fac)
            # an overflowed step leaves G as it was: weight 0 (the op then never reads the
            # non-finite rows) and beta 1
            alphas_t[n_a:] *= inv_s2 * finite
            betas_t[n_a:] = torch.where(finite, betas_t[n_a:], torch.ones_like(betas_t[n_a:]))
            betas, alphas = betas_t, alphas_t
        betas, alphas = guard_weights(ok, betas, alphas, factors[0].device)
        ops.update_factors_(factors, xs, betas, alphas, append_ones=ones)

    def _hook_update_a(self, layer: KFACLayer, x: torch.Tensor, rows: Optional[torch.Tensor] = None,
                       grad_rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """In-hook A update; the first capture of a step applies beta_k. rows: the real
        rows of a masked x_bar (its ones-column already in it), else None. grad_rows: the
        output gradient this input is paired with, when the update waits for it (x was
        checked at the forward; a NaN loss with finite inputs must not update A). Returns
        the step's finite flag (None when unguarded)."""
        self._ensure_factors(layer, x.device)
        beta: Any
        if layer._a_step != self.steps:
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
        ok = self._check_captures([x] if grad_rows is None else [grad_rows])
        beta, alpha = self._guarded(ok, beta, alpha, layer.a_factor.device)
        layer.update_a_(x, beta, alpha, masked=rows is not None)
        return ok

    def _capture_block(self, layer: KFACLayer, x: Optional[torch.Tensor], rows: torch.Tensor,
                       tokens: Optional[torch.Tensor]) -> None:
        """An `owns_block` layer's output-gradient rows, paired with the capture's (batched)
        input x into v = S * its per-example gradients: folded into the block now (hooks
        mode) or kept as the capture's gradient until step()."""
        if x is None:
            raise RuntimeError(f"K-FAC: layer {layer.name!r} builds its block from each capture's input, "
                               "and this gradient came without one")
        v = layer.block_grads(x, rows, self.factor_dtype) * self._loss_scale(rows, tokens)
        if self.update_factors_in_hooks:
            self._hook_update_block(layer, v)
        else:
            layer.grads.append(v)
            layer.grad_tokens.append(None)

    def _hook_update_block(self, layer: KFACLayer, v: torch.Tensor) -> None:
        """In-hook update of an `owns_block` layer from one capture's v (already times S);
        the first capture of a step applies beta_k, micro-batches weigh equally (as G)."""
        self._ensure_factors(layer, v.device)
        if layer._a_step != self.steps:
            layer._a_step = self.steps
            layer._a_beta, layer._a_w = self._next_block_weights(layer)
            beta = layer._a_beta
        else:
            beta = 1.0
        n = KFACLayer.batch_size(v) * self.accumulation_steps
        self._block_update(layer, [v], [beta], [layer._a_w / max(n, 1)], self._check_captures([v]))
        layer.fired_backward = True

    def _hook_update_g(self, layer: KFACLayer, rows: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                       ok: Optional[torch.Tensor] = None) -> None:
        """In-hook G update (and EKFAC scales when a basis exists); ok: the step's flag
        when the caller already checked these rows."""
        self._ensure_factors(layer, rows.device)
        first = layer._g_step != self.steps
        if first:
            layer._g_step = self.steps
            layer._g_beta, layer._g_w = self._next_weights(layer, "g")
        beta = layer._g_beta if first else 1.0
        n = KFACLayer.batch_size(rows) * self.accumulation_steps
        s = self._loss_scale(rows, tokens)
        self._grouped_update([], [], [], [], [], [layer.g_factor], [rows], [beta],
                             [layer._g_w * s * s / max(n, 1)], ok=ok)
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
                    ls.append(layer)
                    xs.append(x)
                    gs.append(g)
                    betas.append(beta if j == 0 else 1.0)
                    alphas.append(alpha * s * s)
            self._scales_update(ls, xs, gs, betas, alphas)

    def _scales_update(self, layers: list[KFACLayer], xs: list, gs: list, betas: Any, alphas: Any) -> None:
        if not layers:
            return
        ex = [layer.example_inputs(x) for layer, x in zip(layers, xs)]
        eg = [KFACLayer.example_grads(g) for g in gs]
        terms = self._scaler_terms(gs)
        if terms is not None:
            inv_s2, finite = terms
            device = layers[0].scales.device
            alphas = as_device_tensor(alphas, device) * (inv_s2 * finite)
            betas = torch.where(finite, as_device_tensor(betas, device),
                                torch.ones((), dtype=torch.float64, device=device))
        betas, alphas = guard_weights(self._check_captures(xs + gs), betas, alphas, layers[0].scales.device)
        ops.ekfac_scales_([layer.scales for layer in layers], ex, eg, [layer.qa for layer in layers],
                          [layer.qg for layer in layers], betas, alphas)



def _pair_captures(layer: KFACLayer) -> Optional[list]:
    """(input, output-gradient) pairs of one step for EKFAC, or None when ambiguous."""
    if len(layer.inputs) == len(layer.grads):
        return list(zip(layer.inputs, layer.grads))
    if len(layer.inputs) == 1:  # several MC samples for one forward
        return [(layer.inputs[0], g) for g in layer.grads]
    return None


def _padded(values: list, n: int) -> list:
    """values extended with None to length n (captures recorded without a row count)."""
    return list(values) + [None] * (n - len(values))
