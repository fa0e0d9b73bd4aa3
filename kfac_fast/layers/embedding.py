"""nn.Embedding as a K-FAC layer: a Linear on one-hot rows with a diagonal A.

With weight W (V, D) the output row is W[i] = W^T one_hot(i), so in docs/design.md's
convention d_in = V (the vocabulary), d_out = D, no bias, and dW_bar = W.grad^T.
A = (1/R) sum_r e_r e_r^T is DIAGONAL: the row frequencies of the R looked-up indices.
It is stored as a (V,) vector (a V^2 matrix would not fit for real vocabularies); its
eigenbasis is the identity, so the eigen form reduces to, in W.grad's (V, D) layout,
    P = [(W.grad Q_G) / (d_A d_G^T + lambda)] Q_G^T,   d_A = A's diagonal,
    <P, dW_bar> = sum((W.grad Q_G)^2 / (d_A d_G^T + lambda)).
The layer therefore keeps W.grad's own layout for `grad_bar` / `write_grad`, and is
preconditioned by `precondition_eigen` rather than the grouped ops (method "eigen" only).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .base import KFACLayer
from .registry import register_kind


def update_frequencies_(factor: Tensor, indices: Tensor, beta: Any, alpha: Any) -> Tensor:
    """factor <- beta*factor + alpha*counts(indices): the diagonal A update of an embedding.

    Counts are accumulated as exact integers (index_add_ of ones) before the scale, so
    the result does not depend on the order the device adds them in. beta == 0
    overwrites without reading the old value, as `ops.update_factor_` does.
    """
    idx = indices.reshape(-1)
    counts = torch.zeros_like(factor).index_add_(0, idx, torch.ones_like(idx, dtype=factor.dtype))
    if isinstance(beta, (int, float)) and beta == 0:
        factor.copy_(counts.mul_(alpha))
    else:
        factor.mul_(beta).add_(counts.mul_(alpha))
    return factor


def precondition_embedding(grad: Tensor, da: Tensor, qg: Tensor, dg: Tensor, damping: Any) -> Tensor:
    """P in W.grad's (V, D) layout for diagonal A (eigenvalues `da`, clamped at 0)."""
    work = qg.dtype
    rotated = grad.to(work) @ qg
    denom = torch.outer(da.clamp(min=0), dg.clamp(min=0)) + damping
    return (rotated / denom) @ qg.mT


@register_kind(nn.Embedding)
class Embedding(KFACLayer):
    """A registered nn.Embedding (dense gradients, method "eigen")."""

    kind = "embedding"
    diagonal_a = True
    methods = ("eigen",)
    data_parallel = False

    @classmethod
    def unsupported_reason(cls, module: nn.Module, method: str) -> Optional[str]:
        if module.sparse:
            return "Embedding with sparse=True (sparse gradients cannot be preconditioned in place)"
        return super().unsupported_reason(module, method)

    @property
    def in_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def g_dim(self) -> int:
        return self.module.embedding_dim

    def a_shape(self) -> tuple[int, ...]:
        return (self.a_dim,)  # the diagonal

    def input_row_count(self, x: Tensor) -> int:
        return x.numel()  # one row per looked-up index

    def update_a_(self, x: Tensor, beta: Any, alpha: Any, *, masked: bool = False) -> None:
        update_frequencies_(self.a_factor, x, beta, alpha)

    def diagonal_eigenvalues(self) -> Tensor:
        """A's eigenvalues (its diagonal, clamped at 0); its eigenbasis is the identity."""
        return self.a_factor.clamp(min=0)

    def precondition_eigen(self, grad: Tensor, damping: Any) -> Tensor:
        return precondition_embedding(grad, self.da, self.qg, self.dg, damping)

    def grad_bar(self) -> Tensor:
        """W.grad itself, (V, D): the transposed dW_bar, the layout P is formed in."""
        return self.module.weight.grad

    def write_grad(self, p: Tensor, scale: Optional[Tensor] = None) -> None:
        w = self.module.weight.grad
        w.copy_(p if scale is None else p * scale)
