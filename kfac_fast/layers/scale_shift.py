"""Scale-and-shift blocks: the curvature of a normalisation layer's affine parameters.

A norm's output is y_i = gamma_i xhat_i + beta_i per feature i (the d = prod(normalized_shape)
normalised features, flattened), with xhat the normalised input ((x - mean) / sqrt(var + eps)
for LayerNorm, x / rms for RMSNorm). Per feature this is kfac-jax's "scale and shift": a
linear layer with input row a_bar = [xhat_i, 1] ([xhat_i] without a bias; k = 1 or 2
columns) and one output. In docs/design.md's convention (d_{n,l} = S * grad_output / s,
the rows l of example n summed) its per-example gradient is

    v_{n,i} = sum_l d_{n,l,i} [xhat_{n,l,i}, 1]                       (k numbers)

and the block kept is the exact per-feature Fisher block, a running average (the same
zero-debiased beta_k rule) of

    F_i = (1/N) sum_n v_{n,i} v_{n,i}^T                               (k x k)

stored as a_factor of shape (k, k, d), a_factor[:, :, i] = F_i. It is the Fisher's own
diagonal 2x2 block of each (gamma_i, beta_i) pair, not the Kronecker product
E[g_i^2] (x) E[a_bar a_bar^T]: at the same cost (O(N L d) per update, O(d) state) it keeps
the correlation between g_i^2 and xhat_i, and the cross-token terms of the per-example sum,
that the product of expectations drops, and it equals the Fisher built by brute force from
per-example gradients. The preconditioned gradient, per feature,

    P_i = (F_i+ + lambda I)^-1 [dgamma_i, dbeta_i],    F_i+: F_i with eigenvalues clamped at 0,

is formed in closed form (F_i = m I + r U with U^2 = I), batched over features, from the
current block at every step: there is no eigendecomposition to amortise, so nothing is
refreshed and a_factor is the whole state. Methods "eigen", "inverse" and "ekfac" give the
same P: the exact damping; the pi split of factored Tikhonov damping needs a Kronecker
product (the block has none: lambda is added whole); EKFAC's rescaling corrects a
Kronecker approximation, and in the block's current eigenbasis its second moments are
the eigenvalues themselves.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import METHODS, KFACLayer


def block_statistics_(block: Tensor, v: Tensor, beta: Any, alpha: Any) -> Tensor:
    """block <- beta block + alpha sum_n v_n v_n^T per feature; block (k, k, d), v (N, k, d).

    beta == 0 (a host number) overwrites without reading the old block; a 0-dim tensor
    alpha that is 0 (a dropped step) never lets v in, even when v is not finite.
    """
    stat = torch.einsum("nid,njd->ijd", v, v)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(block.dtype)
        term = torch.where(alpha != 0, stat * alpha, torch.zeros((), dtype=block.dtype, device=block.device))
    elif alpha == 0:
        term = torch.zeros_like(stat)
    else:
        term = stat * alpha
    if isinstance(beta, Tensor):
        block.mul_(beta.to(block.dtype)).add_(term)
    elif beta == 0:
        block.copy_(term)
    else:
        block.mul_(beta).add_(term)
    return block


def precondition_blocks(block: Tensor, grad: Tensor, damping: Any) -> Tensor:
    """(F_i+ + damping I)^-1 grad_i for every feature i; block (k, k, d), grad (k, d).

    k = 1: grad / (max(F, 0) + damping). k = 2: with F = m I + r U (m the mean of the
    diagonal, r = hypot((a - c) / 2, b), U symmetric with U^2 = I), any function of F is
    (f(m+r) + f(m-r))/2 I + (f(m+r) - f(m-r))/2 U; f(e) = 1 / (max(e, 0) + damping) clamps
    the eigenvalues as the eigen method does. U's entries are bounded by 1, so nothing
    overflows when r is tiny; r == 0 gives U = 0 (then f(m+r) == f(m-r)).
    """
    g = grad.to(block.dtype)
    if block.shape[0] == 1:
        return g / (block[0, 0].clamp(min=0) + damping)
    a, b, c = block[0, 0], block[0, 1], block[1, 1]
    m, h = (a + c) / 2, (a - c) / 2
    r = torch.hypot(h, b)
    f1 = 1 / ((m + r).clamp(min=0) + damping)
    f2 = 1 / ((m - r).clamp(min=0) + damping)
    c0, c1 = (f1 + f2) / 2, (f1 - f2) / 2
    safe = torch.where(r > 0, r, torch.ones_like(r))
    u, w = h / safe, b / safe
    g0, g1 = g[0], g[1]
    return torch.stack([c0 * g0 + c1 * (u * g0 + w * g1), c0 * g1 + c1 * (w * g0 - u * g1)])


class ScaleShift(KFACLayer):
    """The shared part of the norm kinds: an affine norm whose block is its own.

    A subclass defines `normalise(x, input_dtype)`: xhat from the input rows (..., d) in x's dtype,
    with the module's eps. Opt-in (`extra_kinds`): registering the norms changes the
    training of every existing transformer.
    """

    owns_block = True
    opt_in = True
    row_maskable = True  # a masked input is zeroed (xhat = 0), its gradient rows too
    methods = METHODS
    data_parallel = False

    @classmethod
    def unsupported_reason(cls, module: nn.Module, method: str) -> Optional[str]:
        if getattr(module, "weight", None) is None:
            return (f"{type(module).__name__} with elementwise_affine=False "
                    "(it has no parameters to precondition)")
        return super().unsupported_reason(module, method)

    @property
    def features(self) -> int:
        """d: the normalised features (the weight's entries)."""
        return self.module.weight.numel()

    @property
    def in_dim(self) -> int:
        return 1  # per feature: the input xhat_i (and the ones-column of the bias)

    @property
    def g_dim(self) -> int:
        return 1  # per feature: one output

    @property
    def appends_ones(self) -> bool:
        return False  # the ones-column is the block's own, not part of the input rows

    def a_shape(self) -> tuple[int, ...]:
        return (self.a_dim, self.a_dim, self.features)

    def _rows(self, t: Tensor) -> Tensor:
        """(N, ..., *normalized_shape) as (N, ..., d) rows; an unbatched input is N = 1."""
        nd = len(self.module.normalized_shape)
        lead = tuple(t.shape[:t.dim() - nd]) or (1,)
        return t.reshape(*lead, self.features)

    def batched_input(self, x: Tensor) -> Tensor:
        return self._rows(x)

    def grad_rows(self, g: Tensor) -> Tensor:
        return self._rows(g)

    def input_row_count(self, x: Tensor) -> int:
        return x.numel() // self.features if self.features else 0

    def update_a_(self, x: Tensor, beta: Any, alpha: Any, *, masked: bool = False) -> None:
        raise NotImplementedError(f"{type(self).__name__}'s block waits for its output gradient (update_block_)")

    def normalise(self, x: Tensor, input_dtype: torch.dtype) -> Tensor:
        """xhat of the rows x (..., d), computed in x's dtype with the module's eps (its
        default is that of `input_dtype`, the captured input's)."""
        raise NotImplementedError

    def block_grads(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
        """v / S: (N, k, d), the rows of each example summed, in `dtype`. Computed in the
        wider of x's dtype and `dtype` (16-bit inputs in float32), as torch's norms do."""
        work = torch.promote_types(x.dtype, dtype)
        xhat = self.normalise(x.to(work), x.dtype)
        gw = g.to(work)
        n = x.shape[0]
        parts = [(gw * xhat).reshape(n, -1, self.features).sum(1)]
        if self.has_bias:
            parts.append(gw.reshape(n, -1, self.features).sum(1))
        return torch.stack(parts, dim=1).to(dtype)

    def update_block_(self, v: Tensor, beta: Any, alpha: Any) -> None:
        block_statistics_(self.a_factor, v, beta, alpha)

    def precondition_alone(self, grad: Tensor, damping: Any) -> Tensor:
        return precondition_blocks(self.a_factor, grad, damping)

    def grad_bar(self) -> Tensor:
        """[dgamma; dbeta] as a (k, d) matrix (a copy when there is a bias)."""
        w = self.module.weight.grad.reshape(1, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.grad.reshape(1, -1)], dim=0)

    def write_grad(self, p: Tensor, scale: Optional[Tensor] = None) -> None:
        w = self.module.weight.grad
        w.copy_((p[0] if scale is None else p[0] * scale).reshape(w.shape))
        if self.has_bias:
            b = self.module.bias.grad
            b.copy_((p[1] if scale is None else p[1] * scale).reshape(b.shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.kind}, features={self.features}, bias={self.has_bias})"


def default_eps(input_dtype: torch.dtype) -> float:
    """torch's eps=None for a norm: the machine eps of its computation dtype (float64 for
    float64 inputs, float32 for every other floating input)."""
    return float(torch.finfo(torch.float64 if input_dtype == torch.float64 else torch.float32).eps)

