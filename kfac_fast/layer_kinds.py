"""Layer kinds beyond nn.Linear / nn.Conv2d: geometry and the diagonal-A math of nn.Embedding.

Conv1d is a Conv2d of unit height: kernel (1, k), stride (1, s), padding (0, p),
dilation (1, d) on the input (N, C, L) seen as (N, C, 1, L). The unfold patch layout
(channel-major, then kernel cols) equals the weight's (C_out, C, k) layout, so every
Conv2d op serves it unchanged.

nn.Embedding is a Linear layer whose input is one_hot(index): with weight W (V, D) the
output row is W[i] = W^T one_hot(i), so in DESIGN.md's convention d_in = V (the
vocabulary), d_out = D, no bias, and dW_bar = W.grad^T. A = (1/R) sum_r e_r e_r^T is
DIAGONAL: the row frequencies of the R looked-up indices. It is stored as a (V,) vector
(a V^2 matrix would not fit for real vocabularies); its eigenbasis is the identity, so
the eigen form of DESIGN.md reduces to, in W.grad's (V, D) layout,
    P = [(W.grad Q_G) / (d_A d_G^T + lambda)] Q_G^T,   d_A = A's diagonal,
    <P, dW_bar> = sum((W.grad Q_G)^2 / (d_A d_G^T + lambda)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def conv1d_geometry(module: nn.Conv1d) -> dict:
    """Conv2d-of-unit-height kernel_size/stride/padding/dilation pairs of a Conv1d."""
    (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            p = 0
        else:  # "same": symmetric only when the total padding is even
            total = d * (k - 1)
            p = None if total % 2 else total // 2
    else:
        (p,) = module.padding
    return {"kernel_size": (1, k), "stride": (1, s), "dilation": (1, d),
            "padding": None if p is None else (0, p)}


def embedding_unsupported_reason(module: nn.Embedding) -> Optional[str]:
    if module.sparse:
        return "Embedding with sparse=True (sparse gradients cannot be preconditioned in place)"
    return None


def update_frequencies_(factor: torch.Tensor, indices: torch.Tensor, beta, alpha) -> torch.Tensor:
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


def precondition_embedding(grad: torch.Tensor, da: torch.Tensor, qg: torch.Tensor,
                           dg: torch.Tensor, damping) -> torch.Tensor:
    """P in W.grad's (V, D) layout for diagonal A (eigenvalues `da`, clamped at 0)."""
    work = qg.dtype
    rotated = grad.to(work) @ qg
    denom = torch.outer(da.clamp(min=0), dg.clamp(min=0)) + damping
    return (rotated / denom) @ qg.mT
