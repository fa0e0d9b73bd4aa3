"""nn.Linear as a K-FAC layer: rows are the last dim, every leading dim is a row.

The input (..., d_in) is R = prod(...) rows, the output gradient (..., d_out) the same
R rows; the batch is dim 0 (N = shape[0], or 1 for an unbatched 1-D input). Its A
update joins the step's grouped `ops.update_factors_` call, and it is the one kind a
row mask applies to (token rows (N, T, d) of a padded batch). This is K-FAC-expand
(Eschenhagen et al., NeurIPS 2023) for a Linear applied over a sequence: every token a
row.

`LinearReduce` is K-FAC-reduce, opt-in per preconditioner (`use_reduce(precond)` before
the first step turns its registered Linear layers, or the named ones, into it): per
example n, the input is averaged and the output gradient summed over the
L = prod(shape[1:-1]) shared positions before the outer products,

    A = (1/N) sum_n abar_n abar_n^T,   abar_n = (1/L) sum_l [a_{n,l}; 1]
    G = (1/N) sum_n (S gsum_n)(S gsum_n)^T,   gsum_n = sum_l d_{n,l}

(S: the loss scale of docs/design.md, the same as expand's). Both approximate the
Fisher of the per-sequence loss; reduce is exact for one example whose L inputs are
equal. An (N, d) input (no sequence) gives the same factors as expand. The output
gradient reaches the factor update as the L rows gsum_n / sqrt(L) (a broadcast view),
so the row count behind S stays expand's N*L and G costs what expand's does; A costs
1/L of it. Not with `set_row_mask` (padded tokens would count in the means, the sums
and the "tokens" scale: `set_row_mask` and `use_reduce` refuse each other) and not with
method "ekfac" (its per-example gradients are not the reduced rows'). The sequence must
be a leading dim of the layer's input: a model that flattens its tokens to (N*T, d)
before a Linear gets expand's factors for it (each row its own example).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Optional

from torch import Tensor, nn

from .. import ops
from ..schedules import require_names
from .base import KFACLayer
from .registry import register_kind


@register_kind(nn.Linear)
class Linear(KFACLayer):
    """A registered nn.Linear (any leading dims)."""

    kind = "linear"
    row_maskable = True

    @property
    def in_dim(self) -> int:
        return self.module.in_features

    @property
    def g_dim(self) -> int:
        return self.module.out_features

    def batched_input(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0) if x.dim() == 1 else x

    def input_row_count(self, x: Tensor) -> int:
        return x.numel() // self.in_dim if self.in_dim else 0

    def a_group_entry(self, x: Tensor, masked: bool) -> Optional[tuple[Tensor, Tensor, bool]]:
        return self.a_factor, x, self.has_bias and not masked

    def update_a_(self, x: Tensor, beta: Any, alpha: Any, *, masked: bool = False) -> None:
        ops.update_factor_(self.a_factor, x, beta, alpha, append_ones=self.has_bias and not masked)


class LinearReduce(Linear):
    """A registered nn.Linear under K-FAC-reduce (the module docstring); see `use_reduce`."""

    kind = "linear_reduce"
    row_maskable = False
    methods: ClassVar[tuple[str, ...]] = ("eigen", "inverse")

    def batched_input(self, x: Tensor) -> Tensor:
        """(N, d_in): each example's inputs averaged over its positions."""
        x = super().batched_input(x)
        if x.dim() <= 2:
            return x
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return rows.mean(dim=1) if rows.shape[1] else rows.sum(dim=1)  # L = 0: zeros, not mean's NaN

    def grad_rows(self, g: Tensor) -> Tensor:
        """(N, L, d_out): each example's summed output gradient / sqrt(L), broadcast to
        its L rows (sum over rows of the outer products: gsum gsum^T; row count N*L)."""
        g = super().grad_rows(g)
        if g.dim() <= 2:
            return g
        rows = g.reshape(g.shape[0], -1, g.shape[-1])
        positions = rows.shape[1]
        summed = rows.sum(dim=1, keepdim=True) * (1.0 / math.sqrt(positions) if positions else 1.0)
        return summed.expand(rows.shape)


def use_reduce(precond: Any, layers: Optional[Iterable[str]] = None) -> list[str]:
    """Switch the registered nn.Linear layers of `precond` (a KFACPreconditioner), or those
    named in `layers`, to K-FAC-reduce; returns their names. Call it after construction
    and before the first `step()` (a factor must not mix expand and reduce statistics).

    The sequence must be a leading dim of each layer's input, (N, ..., d_in): a model that
    flattens its tokens to (N*T, d_in) before a Linear gets K-FAC-expand's factors for that
    layer (every row is taken for an example of its own), silently.

    ValueError: a step was taken, a layer to switch already holds captures or factor
    updates (a forward/backward since construction: they would mix expand and reduce
    statistics), a row mask is set (`set_row_mask`: not supported with K-FAC-reduce), the
    method is not "eigen"/"inverse", or a name in `layers` is not a registered (expand)
    Linear layer of `precond`.
    """
    if precond.steps:
        raise ValueError(f"use_reduce: call it before the first step (precond has taken {precond.steps})")
    if precond._row_mask is not None:
        raise ValueError("use_reduce: a row mask is set (set_row_mask): masks are not supported with "
                         "K-FAC-reduce; clear it (set_row_mask(None)) first")
    if precond.method not in LinearReduce.methods:
        raise ValueError(f"use_reduce: method={precond.method!r} is not supported (K-FAC-reduce supports "
                         f"{' or '.join(map(repr, LinearReduce.methods))})")
    linear = [name for name, layer in precond.layers.items() if type(layer) is Linear]
    if layers is None:
        names = linear
    else:
        names = list(require_names("layers", layers, "a layer name", "layer names"))
        bad = [name for name in names if name not in linear]
        if bad:
            raise ValueError(f"use_reduce: layers {bad} are not registered nn.Linear layers (K-FAC-expand) "
                             f"of this preconditioner; those are {linear}")
    held = [name for name in names if _holds_captures(precond.layers[name])]
    if held:
        raise ValueError(f"use_reduce: layers {held} already hold captures or factor updates (a forward or "
                         "backward ran since construction): call use_reduce before the first forward")
    for name in names:
        precond.layers[name].__class__ = LinearReduce  # same state, reduced captures from now on
    return names


def _holds_captures(layer: Linear) -> bool:
    return bool(layer.inputs or layer.grads or layer.edges or layer.a_count or layer.g_count
                or layer.fired_forward or layer.fired_backward)


def refuse_row_mask(layers: Iterable[Any]) -> None:
    """ValueError naming the first K-FAC-reduce layer among `layers` (set_row_mask's check)."""
    for layer in layers:
        if isinstance(layer, LinearReduce):
            raise ValueError(f"set_row_mask: layer {layer.name!r} is K-FAC-reduce (use_reduce): row masks are "
                             "not supported with K-FAC-reduce (padded positions would enter its input mean, "
                             "summed output gradient and scale)")
