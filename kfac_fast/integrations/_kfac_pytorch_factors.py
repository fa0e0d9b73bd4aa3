"""kfac-pytorch's factor statistics computed by kfac_fast ops, kept in kfac-pytorch's fields.

A layer's captured input (A side) or output gradient (G side) becomes a pending `Stat`:
the op call that adds its covariance into a target. Pending statistics fold into
kfac-pytorch's own batch sums (`_a_batch`, `_a_count`, ...) or, when a factor update
follows the capture directly, into the update itself (the running average as the op's
beta), so no activation outlives its hook. kfac-pytorch's scalings are kept exactly
(see `kfac_fast.integrations.kfac_pytorch`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops


class Stat:
    """A layer input or output gradient and the op that adds scale * x_bar^T x_bar."""

    __slots__ = ("update", "n", "dtype", "device")

    def __init__(self, update: Callable, n: int, dtype: torch.dtype, device: torch.device):
        self.update = update  # update(target, beta, weight): target <- beta*target + weight*scale*x^T x
        self.n = n
        self.dtype = dtype
        self.device = device


def _factor_dtype(layer, x: torch.Tensor) -> torch.dtype:
    """kfac-pytorch stores factors in factor_dtype, else in the activations' dtype;
    kfac_fast factors are float32/64, so half activations give float32 factors."""
    if layer.factor_dtype is not None:
        return layer.factor_dtype
    return torch.promote_types(x.dtype, torch.float32)


def _linear_stat(layer, x: torch.Tensor, scale: float, append_ones: bool) -> Stat:
    rows = x.numel() // x.shape[-1]
    alpha = scale / rows  # get_cov divides by the row count

    def update(target, beta, weight):
        ops.update_factor_(target, x, beta, weight * alpha, append_ones=append_ones)

    return Stat(update, x.shape[-1] + int(append_ones), _factor_dtype(layer, x), x.device)


def _conv_patch_count(x: torch.Tensor, conv: torch.nn.Conv2d) -> int:
    """Patches per example as kfac-pytorch's _extract_patches counts them (no dilation)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)


def a_stat(layer, x: torch.Tensor) -> Stat:
    helper = layer.module
    bias = helper.has_bias()
    if not isinstance(helper.module, torch.nn.Conv2d):
        return _linear_stat(layer, x, 1.0, bias)
    conv = helper.module
    spatial = _conv_patch_count(x, conv)
    # kfac-pytorch divides every patch (ones column included) by L, then averages over N*L rows.
    alpha = 1.0 / (x.shape[0] * spatial * spatial * spatial)

    def update(target, beta, weight):
        ops.conv_input_factor_(target, x, beta, weight * alpha, conv.kernel_size, conv.stride, conv.padding,
                               1, append_ones=bias)

    return Stat(update, helper.a_factor_shape[0], _factor_dtype(layer, x), x.device)


def g_stat(layer, g: torch.Tensor) -> Stat:
    scale = 1.0
    if layer.grad_scaler is not None:
        scale = 1.0 / layer.grad_scaler() ** 2  # g / s enters the covariance squared
    if isinstance(layer.module.module, torch.nn.Conv2d):
        spatial = g.shape[2] * g.shape[3]
        return _linear_stat(layer, g.permute(0, 2, 3, 1), scale / (spatial * spatial), False)
    return _linear_stat(layer, g, scale, False)


def fold_pending(layer, side: str) -> None:
    """Add the pending statistic into the layer's batch sum (kfac-pytorch's _x_batch)."""
    pending = getattr(layer, f"_kfac_fast_{side}_pending", None)
    if pending is None:
        return
    setattr(layer, f"_kfac_fast_{side}_pending", None)
    batch = getattr(layer, f"_{side}_batch")
    if batch is None:
        batch = torch.empty(pending.n, pending.n, dtype=pending.dtype, device=pending.device)
        pending.update(batch, 0.0, 1.0)  # beta = 0: the buffer is never read
        setattr(layer, f"_{side}_batch", batch)
    else:
        pending.update(batch, 1.0, 1.0)


def save_stat(layer, side: str, stat: Stat, lazy: bool) -> None:
    fold_pending(layer, side)
    setattr(layer, f"_{side}_count", getattr(layer, f"_{side}_count") + 1)
    setattr(layer, f"_kfac_fast_{side}_pending", stat)
    if not lazy:  # the update comes later (step): hold a covariance, never an activation
        fold_pending(layer, side)


def update_factor(layer, side: str, decay: float) -> None:
    """factor <- decay*factor + (1-decay)*mean(batch), identity when there is none yet."""
    pending = getattr(layer, f"_kfac_fast_{side}_pending", None)
    batch = getattr(layer, f"_{side}_batch")
    count = getattr(layer, f"_{side}_count")
    if pending is None and batch is None:
        return
    factor = getattr(layer, f"{side}_factor")
    ref = pending if pending is not None else batch
    if batch is None:
        # One capture since the last update: the running average is the op's beta.
        if factor is None:
            new = torch.eye(ref.n, dtype=ref.dtype, device=ref.device)
        else:
            new = factor.to(dtype=ref.dtype, copy=True, memory_format=torch.contiguous_format)
        pending.update(new, decay, 1.0 - decay)
        setattr(layer, f"_kfac_fast_{side}_pending", None)
    else:
        fold_pending(layer, side)
        batch = getattr(layer, f"_{side}_batch")
        if factor is None:
            factor = torch.eye(batch.shape[0], dtype=batch.dtype, device=batch.device)
        new = torch.add(factor * decay, batch, alpha=(1.0 - decay) / count)
    setattr(layer, f"_{side}_batch", None)
    setattr(layer, f"_{side}_count", 0)
    setattr(layer, f"{side}_factor", new)
