"""Reference factor updates and triangle packing (torch, every device and dtype)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from kfac_fast._validate import as_pair

from .._common import Scalar, decay_, is_host_zero, layer_scalar, scalar_tensor, scaled


def with_ones(rows: torch.Tensor) -> torch.Tensor:
    """[rows | 1]: append the ones-column LAST. rows (R, d) -> (R, d+1)."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def update_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar, *,
                   append_ones: bool = False, precision: Optional[str] = None) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar, in place.

    factor: (n, n) float32/64. x: (..., d), any float dtype and strides, flattened to
    R rows and cast to factor's dtype before the product (accumulated in factor's dtype).
    x_bar = [x | 1] when append_ones (n = d+1), else x (n = d). No 1/R: the caller folds
    it into alpha. alpha == 0 keeps NaN/Inf of x out of the factor; a CPU alpha == 0
    skips reading x at all. Returns factor.
    """
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        return decay_(factor, beta)
    # the row count from the shape, not -1: a (R, 0) input (d = 0) is valid
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(factor.dtype)
    if beta.device.type == "cpu" and alpha.device.type == "cpu":
        return _host_update_(factor, rows, float(beta), float(alpha), append_ones)
    if append_ones:
        rows = with_ones(rows)
    decay_(factor, beta)
    factor.add_(scaled(alpha, rows.mT @ rows))
    return factor


def _host_update_(factor: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float,
                  append_ones: bool) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar for host scalars, by blocks of the factor.

    The x^T x block is one BLAS call on a view of the factor (no n x n temporary); with
    append_ones the last row/column is alpha * (column sums of x) and the corner alpha * R,
    so x is never copied to append a ones-column (a full copy of a conv patch matrix).
    beta == 0 never reads the old factor (addmm's rule, kept for the edge), so NaN in it
    cannot leak.
    """
    d = rows.shape[1]
    factor[:d, :d].addmm_(rows.mT, rows, beta=beta, alpha=alpha)
    if append_ones:
        sums = rows.sum(0).mul_(alpha)
        edge = sums if beta == 0 else factor[:d, d].mul(beta).add_(sums)
        factor[:d, d] = edge
        factor[d, :d] = edge
        corner = alpha * rows.shape[0]
        factor[d, d] = corner if beta == 0 else beta * factor[d, d] + corner
    return factor


def update_factors_(factors: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], betas, alphas, *,
                    append_ones: Union[bool, Sequence[bool]] = False, precision: Optional[str] = None) -> list:
    """update_factor_ for every layer i: factors[i] <- betas[i]*factors[i] + alphas[i]*x_bar_i^T x_bar_i.

    betas, alphas: per-layer scalars (1-D tensor of length L). append_ones: a bool or
    one bool per layer. Returns factors.
    """
    for i, (factor, x) in enumerate(zip(factors, xs)):
        ones = append_ones if isinstance(append_ones, bool) else bool(append_ones[i])
        update_factor_(factor, x, layer_scalar(betas, i), layer_scalar(alphas, i), append_ones=ones)
    return factors


def conv_input_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar,
                       kernel_size, stride, padding, dilation, *, append_ones: bool = False,
                       precision: Optional[str] = None) -> torch.Tensor:
    """Conv2d A update straight from its input: factor <- beta*factor + alpha * P_bar^T P_bar.

    x: (N, C, H, W) any float dtype/memory format. P: the N*L im2col patch rows of
    `F.unfold(x, kernel_size, dilation, padding, stride)` (channel-major, then kernel
    rows, then kernel cols), shape (N*L, C*kh*kw); P_bar = [P | 1] when append_ones.
    Returns factor.
    """
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        decay_(factor, beta)
        return factor
    cols = F.unfold(x.to(factor.dtype), as_pair(kernel_size), dilation=as_pair(dilation),
                    padding=as_pair(padding), stride=as_pair(stride))  # (N, C*kh*kw, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return update_factor_(factor, rows, beta, alpha, append_ones=append_ones)


def pack_triangles(factors) -> torch.Tensor:
    """Upper triangles (row-major order of torch.triu_indices(n, n)) of every (n_i, n_i)
    factor concatenated: 1-D, length sum n_i(n_i+1)/2, dtype and device of factors[0]."""
    first = factors[0]
    parts = []
    for f in factors:
        iu = torch.triu_indices(f.shape[0], f.shape[0], device=f.device)
        parts.append(f[iu[0], iu[1]].to(device=first.device, dtype=first.dtype))
    return torch.cat(parts)


def unpack_triangles_(factors, flat) -> list:
    """Inverse of pack_triangles: writes flat's entries into both triangles of each factor."""
    offset = 0
    for f in factors:
        n = f.shape[0]
        count = n * (n + 1) // 2
        iu = torch.triu_indices(n, n, device=f.device)
        values = flat[offset:offset + count].to(device=f.device, dtype=f.dtype)
        f.index_put_((iu[0], iu[1]), values)
        f.index_put_((iu[1], iu[0]), values)
        offset += count
    return factors
