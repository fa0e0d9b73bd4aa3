"""The unfused per-layer K-FAC sequence: the baseline kfac_fast is measured against.

Written for this project from the published description of how kfac-pytorch-style
frontends run K-FAC (no code copied): every layer is handled on its own, one small
launch after another, with a host sync per layer while preconditioning.
- factors: in the module hooks, per layer, a covariance GEMM, a symmetrise, a scale
  and an add for the running average (for A and for G);
- inverses: a Python loop of torch.linalg.eigh, one call per factor;
- preconditioning: per layer two eigenbasis GEMM pairs, a divide, and `.item()` of the
  layer's KL term (the host sync), then the KL-clip scale applied layer by layer.

The math follows docs/design.md's conventions exactly (bias as the last column, G from
S * grad_output, zero-debiased running average, eigen damping, KL clip), so its
updates equal KFACPreconditioner's up to rounding and the benchmarks compare equal work.
`UnfusedKFAC` is a drop-in for `kfac_fast.KFACPreconditioner` (subset of its options):
`loss.backward(); precond.step(); optimizer.step()`.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

Scalar = Union[float, Callable[[int], float]]


def _value(x: Scalar, step: int) -> float:
    """Hyperparameters may be callables of the step, as in KFACPreconditioner."""
    return float(x(step)) if callable(x) else float(x)


def cov_update_(factor: torch.Tensor, rows: torch.Tensor, beta: float, scale: float) -> None:
    """factor <- beta*factor + (1-beta)*scale*rows^T rows, as four separate launches."""
    c = rows.t() @ rows  # GEMM
    c = (c + c.t()) / 2  # symmetrise
    c.mul_(scale * (1.0 - beta))  # scale
    factor.mul_(beta).add_(c)  # running average


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A-side rows of a layer input, with the ones column appended when there is a bias."""
    if isinstance(module, nn.Conv2d):
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])  # (N*L, C*kh*kw)
    else:
        x = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x


def grad_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """G-side rows of a layer's output gradient: (N*L, d_out)."""
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


class _Layer:
    """Per-layer state: running factors and their eigendecompositions."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module = module
        w = module.weight
        n_a = w[0].numel() + (module.bias is not None)
        self.a = torch.zeros(n_a, n_a, device=w.device, dtype=dtype)
        self.g = torch.zeros(w.shape[0], w.shape[0], device=w.device, dtype=dtype)
        self.qa = self.da = self.qg = self.dg = None


class UnfusedKFAC:
    """K-FAC (eigen method, empirical Fisher) done layer by layer; see the module doc."""

    def __init__(self, model: nn.Module, *, factor_update_steps: int = 1, inv_update_steps: int = 10,
                 damping: Scalar = 1e-3, factor_decay: float = 0.95, kl_clip: Scalar = 1e-3,
                 lr: Scalar = 0.1, skip_layers=(), factor_dtype: torch.dtype = torch.float32):
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.damping, self.factor_decay, self.kl_clip, self.lr = damping, factor_decay, kl_clip, lr
        self.steps = 0  # completed step() calls
        self.factor_updates = 0  # k of the zero-debiased running average
        self.layers: list[_Layer] = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in skip_layers:
                layer = _Layer(m, factor_dtype)
                self.layers.append(layer)
                m.register_forward_hook(self._make_forward_hook(layer))

    def _updating(self) -> bool:
        return torch.is_grad_enabled() and self.steps % self.factor_update_steps == 0

    def _beta(self) -> float:
        # Zero-debiased average with k = the update this forward/backward belongs to.
        k, d = self.factor_updates + 1, self.factor_decay
        return d * (1 - d ** (k - 1)) / (1 - d ** k)

    def _make_forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not self._updating():
                return
            rows = layer_rows(module, inputs[0].detach()).to(layer.a.dtype)
            cov_update_(layer.a, rows, self._beta(), 1.0 / rows.shape[0])
            # A tensor hook on the output sees grad_output without the full-backward-hook
            # machinery (which also warns when the layer's input needs no grad).
            output.register_hook(lambda g: self._grad_hook(layer, g))
        return hook

    def _grad_hook(self, layer: _Layer, g: torch.Tensor) -> None:
        g = g.detach()
        # d = N * grad_output (batch-mean loss); G = (1/N) sum d d^T = N * sum go go^T.
        rows = grad_rows(layer.module, g).to(layer.g.dtype)
        cov_update_(layer.g, rows, self._beta(), float(g.shape[0]))

    def _update_inverses(self) -> None:
        das, qas = eigh_loop([layer.a for layer in self.layers])
        dgs, qgs = eigh_loop([layer.g for layer in self.layers])
        for layer, da, qa, dg, qg in zip(self.layers, das, qas, dgs, qgs):
            layer.da, layer.qa, layer.dg, layer.qg = da, qa, dg, qg

    @torch.no_grad()
    def step(self) -> None:
        """Precondition every registered layer's .grad in place (nu * P)."""
        if self.steps % self.factor_update_steps == 0:
            self.factor_updates += 1
        if self.steps % self.inv_update_steps == 0:
            self._update_inverses()
        mods = [layer.module for layer in self.layers]
        precondition_layers_(
            [m.weight.grad for m in mods], [None if m.bias is None else m.bias.grad for m in mods],
            [layer.qa for layer in self.layers], [layer.da for layer in self.layers],
            [layer.qg for layer in self.layers], [layer.dg for layer in self.layers],
            _value(self.damping, self.steps), lr=_value(self.lr, self.steps),
            kl_clip=_value(self.kl_clip, self.steps))
        self.steps += 1


def factor_updates_(factors, rows, betas, scales) -> None:
    """cov_update_ for each layer in turn: four launches per factor."""
    for f, r, b, s in zip(factors, rows, betas, scales):
        cov_update_(f, r, b, s)


def _eigh(f: torch.Tensor):
    try:
        d, q = torch.linalg.eigh(f)
        if d.isfinite().all() and q.isfinite().all():  # a host sync, as in per-layer frontends
            return d, q
    except torch.linalg.LinAlgError:
        pass
    # fp32 syevd sometimes fails on these factors, by raising or by returning NaN
    # (many repeated zero eigenvalues: pixels that are always 0). Retry in fp64, then
    # fall back to an SVD, which equals the eigendecomposition of a PSD factor.
    f64 = f.double()
    try:
        d, q = torch.linalg.eigh(f64)
    except torch.linalg.LinAlgError:
        u, s, _ = torch.linalg.svd(f64)
        d, q = s.flip(0), u.flip(1)
    return d.to(f.dtype), q.to(f.dtype)


def eigh_loop(factors):
    """One eigh call per factor (fp64 retry on failure), eigenvalues clamped at 0."""
    out = [_eigh(f) for f in factors]
    return [d.clamp_(min=0) for d, _ in out], [q for _, q in out]


def precondition_layers_(weight_grads, bias_grads, qa, da, qg, dg, damping: float, *,
                         lr: float, kl_clip: float) -> float:
    """Eigen-method preconditioning layer by layer, with a host sync per layer; returns nu."""
    precond, vg_sum = [], 0.0
    for wg, bg, qa_, da_, qg_, dg_ in zip(weight_grads, bias_grads, qa, da, qg, dg):
        grad = wg.reshape(wg.shape[0], -1).to(qa_.dtype)
        if bg is not None:
            grad = torch.cat([grad, bg[:, None].to(grad.dtype)], dim=1)
        v = qg_.t() @ grad @ qa_
        v2 = v / (dg_[:, None] * da_[None, :] + damping)
        precond.append(qg_ @ v2 @ qa_.t())
        vg_sum += (v * v2).sum().item() * lr ** 2  # the per-layer host sync
    nu = min(1.0, math.sqrt(kl_clip / abs(vg_sum))) if vg_sum != 0 else 1.0
    for wg, bg, p in zip(weight_grads, bias_grads, precond):
        if bg is not None:
            bg.copy_(p[:, -1]).mul_(nu)
            p = p[:, :-1]
        wg.copy_(p.reshape(wg.shape)).mul_(nu)
    return nu
