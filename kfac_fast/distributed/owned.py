"""Strategy "memory": an owner preconditions the layers it owns (their decompositions
live on it alone)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import ops
from ..precision import tf32_products


def precondition_owned(method: str, mine: list, damping: float, *, with_inner: bool,
                       precision: Optional[str] = None) -> dict:
    """Precondition the layers this rank owns in place in `.grad`; returns, when
    with_inner, each layer's <P, dW_bar> in float64 (the KL clip's terms). precision:
    the preconditioner's policy ("tf32": tf32 kernels and matmuls, as single-process)."""
    grads = [layer.grad_bar() for layer in mine]
    tf32 = precision == "tf32"
    with tf32_products(grads[0].device) if tf32 and grads else contextlib.nullcontext():
        if method == "eigen":
            ps = ops.precondition_eigen(grads, [layer.qa for layer in mine], [layer.da for layer in mine],
                                        [layer.qg for layer in mine], [layer.dg for layer in mine], damping,
                                        precision="tf32" if tf32 else None)
        else:
            ps = ops.precondition_inverse(grads, [layer.a_inv for layer in mine],
                                          [layer.g_inv for layer in mine])
    inner = {}
    for layer, g, p in zip(mine, grads, ps):
        if with_inner:
            # <P, dW_bar>: for the eigen method this equals the in-place op's
            # sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))
            inner[layer.name] = (p.to(torch.float64) * g.to(torch.float64)).sum()
        layer.write_grad(p)
    return inner
