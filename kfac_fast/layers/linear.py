"""nn.Linear as a K-FAC layer: rows are the last dim, every leading dim is a row.

The input (..., d_in) is R = prod(...) rows, the output gradient (..., d_out) the same
R rows; the batch is dim 0 (N = shape[0], or 1 for an unbatched 1-D input). Its A
update joins the step's grouped `ops.update_factors_` call, and it is the one kind a
row mask applies to (token rows (N, T, d) of a padded batch).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from .. import ops
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
