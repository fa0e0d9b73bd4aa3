"""nn.RMSNorm as a K-FAC layer kind (opt-in: extra_kinds="rmsnorm").

xhat = x / sqrt(mean(x^2) + eps) over the normalised dims (flattened into d features),
with torch's eps=None rule (`scale_shift.default_eps`); the weight gets the per-feature
scale blocks of `scale_shift` (1 x 1: RMSNorm has no bias). An RMSNorm without
elementwise_affine has no parameters and is refused with that reason.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_kind
from .scale_shift import ScaleShift, default_eps


@register_kind(nn.RMSNorm)
class RMSNorm(ScaleShift):
    """A registered nn.RMSNorm with elementwise_affine."""

    kind = "rmsnorm"

    def normalise(self, x: Tensor, input_dtype: torch.dtype) -> Tensor:
        eps = self.module.eps if self.module.eps is not None else default_eps(input_dtype)
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
