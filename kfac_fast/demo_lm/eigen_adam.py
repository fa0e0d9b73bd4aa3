"""Adam in the K-FAC eigenbasis (the transformer demo's "K-FAC eigen-Adam" row).

SOAP runs Adam in the eigenbasis of Shampoo's factors; this runs it in the eigenbasis
of K-FAC's: for each registered nn.Linear with gradient W_bar = [dW | db] (g_dim, a_dim),
A = Q_A diag(d_A) Q_A^T and G = Q_G diag(d_G) Q_G^T (KFACPreconditioner's running
factors and their eigendecompositions, method "eigen"),

    r_t = Q_G^T W_bar_t Q_A,  m_t = b1 m + (1 - b1) r_t,  v_t = b2 v + (1 - b2) r_t^2,
    W_bar <- W_bar - lr Q_G (m_hat / (sqrt(v_hat) + eps)) Q_A^T      (Adam's bias correction)

so the per-coordinate second moments (EKFAC's idea, with Adam's running v in place of
per-example scales) replace the eigenvalues d_G d_A^T + damping: the K-FAC factors only
choose the basis. When a refresh changes the basis, m is carried into the new one
(Q_G'^T Q_G m Q_A^T Q_A') and v is kept, as SOAP does. The other parameters (embeddings,
LayerNorm, anything the preconditioner did not register as Linear) get AdamW at the
same lr, on their K-FAC-preconditioned gradient when the preconditioner holds a block
for them (embeddings) and the plain one otherwise.

The preconditioner here (`_BasisOnly`) is a KFACPreconditioner that updates factors and
refreshes eigenbases as usual but leaves the Linear layers' `.grad` alone (this
optimizer reads the raw gradient), so no work is spent preconditioning them twice.

A demo optimizer: single-process (no data-parallel or FSDP), and its `state_dict()` does
not hold the moments (`self.moments`) or the preconditioner's state (`self.precond`), so
a checkpoint does not resume it exactly. The lr is `param_groups[0]["lr"]` (schedulers
work) and applies to every parameter.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..preconditioner import KFACPreconditioner


class _BasisOnly(KFACPreconditioner):
    """KFACPreconditioner that does not rewrite the `.grad` of the layers in `owned`."""

    owned: frozenset = frozenset()

    def _guarded_precondition(self, layers: list) -> None:
        super()._guarded_precondition([layer for layer in layers if layer.name not in self.owned])


class EigenAdam(torch.optim.Optimizer):
    """Adam in the eigenbasis of K-FAC's factors for the Linear layers, AdamW elsewhere.

    Args:
        model: the model (its Linear, Embedding layers registered by K-FAC).
        lr, betas, eps: Adam's, for every parameter.
        damping: K-FAC's damping, used only for the layers preconditioned the K-FAC way
            (embeddings); the Linear layers' step has no damping (eps plays its part).
        **kfac: KFACPreconditioner arguments (factor_update_steps, inv_update_steps,
            factor_decay, loss_average, ...); method is "eigen", kl_clip None.
    """

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 damping: float = 0.01, **kfac: Any) -> None:
        self.precond = _BasisOnly(model, lr=lr, damping=damping, method="eigen", kl_clip=None, **kfac)
        self.dense = [layer for layer in self.precond.layers.values()
                      if isinstance(layer.module, nn.Linear) and not layer.diagonal_a]
        self.precond.owned = frozenset(layer.name for layer in self.dense)
        ids = {id(p) for layer in self.dense for p in layer.module.parameters()}
        rest = [p for p in model.parameters() if id(p) not in ids]
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=0.0) if rest else None
        self.betas, self.eps = betas, eps
        self.moments: dict = {}
        super().__init__([p for layer in self.dense for p in layer.module.parameters()], dict(lr=lr))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.adamw is not None:
            self.adamw.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[torch.Tensor]:  # type: ignore[override]
        if closure is not None:
            raise ValueError("EigenAdam.step: closure is not supported (call backward first)")
        self.precond.step()
        lr = self.param_groups[0]["lr"]
        b1, b2 = self.betas
        for layer in self.dense:
            w, b = layer.module.weight, layer.module.bias
            if w.grad is None:
                continue
            g = w.grad if b is None else torch.cat([w.grad, b.grad[:, None]], dim=1)
            qa, qg = layer.qa, layer.qg
            if qa is None:  # no basis yet: the identity (plain Adam)
                qa = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
                qg = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            s = self.moments.get(layer.name)
            if s is None:
                s = self.moments[layer.name] = dict(m=torch.zeros_like(g), v=torch.zeros_like(g), t=0, qa=qa, qg=qg)
            elif qa is not s["qa"] or qg is not s["qg"]:  # a refresh: carry m into the new basis
                s["m"] = (qg.T @ s["qg"]) @ s["m"] @ (s["qa"].T @ qa)
                s["qa"], s["qg"] = qa, qg
            s["t"] += 1
            r = qg.T @ g @ qa
            s["m"].lerp_(r, 1 - b1)
            s["v"].mul_(b2).addcmul_(r, r, value=1 - b2)
            denom = (s["v"] / (1 - b2 ** s["t"])).sqrt_().add_(self.eps)
            u = qg @ (s["m"] / denom) @ qa.T
            u.mul_(lr / (1 - b1 ** s["t"]))
            w.sub_(u[:, :w.shape[1]])
            if b is not None:
                b.sub_(u[:, -1])
        if self.adamw is not None:
            for group in self.adamw.param_groups:
                group["lr"] = lr
            self.adamw.step()
        return None
