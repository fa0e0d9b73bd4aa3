"""nn.LayerNorm as a K-FAC layer kind (opt-in: extra_kinds="layernorm").

xhat = (x - mean) / sqrt(var + eps) over the normalised dims (flattened into d features;
var biased, as torch's); weight (and bias, when the module has one) get the per-feature
scale-and-shift blocks of `scale_shift`. A LayerNorm without elementwise_affine has no
parameters and is refused with that reason.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_kind
from .scale_shift import ScaleShift


@register_kind(nn.LayerNorm)
class LayerNorm(ScaleShift):
    """A registered nn.LayerNorm with elementwise_affine (bias or not)."""

    kind = "layernorm"

    def normalise(self, x: Tensor, input_dtype: torch.dtype) -> Tensor:
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.module.eps)
