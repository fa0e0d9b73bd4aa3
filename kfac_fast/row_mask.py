"""Row masks for padded sequences: which token rows are real.

A batch of sequences padded to length T is an (N, T, d) input; the padding rows must
add nothing to A or G and must not be counted in A's 1/R or in the S of
loss_average="tokens". Everything here stays on the device: the counts are 0-dim
tensors (mask.sum()), never Python ints, so a masked step adds no host sync.

A masked input is handed to the factor update as x_bar = [x | 1] with the padding rows
zeroed, ones-column included (so append_ones=False for it): the bias row of A then
counts real rows only, since m^2 = m for a 0/1 mask.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_row_mask(mask) -> Optional[torch.Tensor]:
    """The mask as given, validated (None clears it)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"set_row_mask: mask must be a bool tensor (N, T) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"set_row_mask: mask must have dtype torch.bool (True = real token), got {mask.dtype}")
    if mask.dim() < 1:
        raise ValueError("set_row_mask: mask must have at least one dim, e.g. (N, T), got a 0-dim tensor")
    return mask


def mask_for(mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask on x's device when x's leading dims are exactly mask's shape, else None."""
    if mask is None or x.dim() != mask.dim() + 1 or tuple(x.shape[:-1]) != tuple(mask.shape):
        return None
    return mask.to(x.device, non_blocking=True)


def masked_input(x: torch.Tensor, mask: torch.Tensor, append_ones: bool) -> torch.Tensor:
    """x (or [x | 1] when append_ones) with the padding rows zeroed (a new tensor)."""
    if append_ones:
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    # where, not a multiply: NaN/Inf in a padding row must not leak (0 * NaN = NaN)
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_rows(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Output-gradient rows (..., d) with the padding rows zeroed."""
    return torch.where(mask.unsqueeze(-1), g, torch.zeros((), dtype=g.dtype, device=g.device))


def real_rows(mask: torch.Tensor) -> torch.Tensor:
    """Number of real rows as a 0-dim float64 device tensor (no host sync)."""
    return mask.sum(dtype=torch.float64)


def per_row(weight: float, rows) -> object:
    """weight / max(rows, 1) for an int row count or a 0-dim device count."""
    if isinstance(rows, torch.Tensor):
        return weight / rows.clamp(min=1)
    return weight / max(rows, 1)
