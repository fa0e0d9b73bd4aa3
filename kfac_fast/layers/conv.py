"""nn.Conv2d and nn.Conv1d (groups=1, zero padding) as K-FAC layers.

A rows are the N*L im2col patches of `F.unfold` (never materialised for the factor:
`ops.conv_input_factor_` reads the NCHW input); G rows are the output gradient
(N, C_out, H', W') seen as (N, H', W', C_out), a view, not a copy.

Conv1d is a Conv2d of unit height: kernel (1, k), stride (1, s), padding (0, p),
dilation (1, d) on the input (N, C, L) seen as (N, C, 1, L). The unfold patch layout
(channel-major, then kernel cols) equals the weight's (C_out, C, k) layout, so every
Conv2d op serves it unchanged.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._validate import pair
from .base import KFACLayer
from .registry import register_kind

Pair = tuple[int, int]


def _pair(name: str, value: Any) -> Pair:
    first, second = pair("Conv2d", name, value)
    return (first, second)


def _same_padding(kernel_size: Pair, dilation: Pair) -> Optional[Pair]:
    """Explicit symmetric padding of padding='same' (None when it pads asymmetrically)."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return (pads[0], pads[1])


class Geometry(NamedTuple):
    kernel_size: Pair
    stride: Pair
    dilation: Pair
    padding: Optional[Pair]  # None: a string padding that pads asymmetrically


def conv_geometry(module: Any) -> Geometry:
    """kernel_size/stride/dilation/padding pairs of the Conv2d the module runs as
    (padding None when a string padding pads asymmetrically, which unfold cannot)."""
    if isinstance(module, nn.Conv1d):
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        kernel_size, stride, dilation = (1, k), (1, s), (1, d)
        explicit = None if isinstance(module.padding, str) else (0, module.padding[0])
    else:
        kernel_size = _pair("kernel_size", module.kernel_size)
        stride, dilation = _pair("stride", module.stride), _pair("dilation", module.dilation)
        explicit = None if isinstance(module.padding, str) else _pair("padding", module.padding)
    if explicit is not None:
        padding: Optional[Pair] = explicit
    elif module.padding == "valid":
        padding = (0, 0)
    else:
        padding = _same_padding(kernel_size, dilation)
    return Geometry(kernel_size, stride, dilation, padding)


@register_kind(nn.Conv2d, nn.Conv1d)
class Conv(KFACLayer):
    """A registered nn.Conv2d or nn.Conv1d (the latter as a Conv2d of unit height)."""

    kind = "conv2d"

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        # Conv1d runs as a Conv2d of unit height; conv1d remembers the reshape
        self.conv1d = isinstance(module, nn.Conv1d)
        geometry = conv_geometry(module)
        if geometry.padding is None:
            raise ValueError(f"{name!r}: {self.unsupported_reason(module, 'eigen')}")
        self.kernel_size, self.stride, self.dilation = geometry.kernel_size, geometry.stride, geometry.dilation
        self.padding: Pair = geometry.padding

    @classmethod
    def unsupported_reason(cls, module: nn.Module, method: str) -> Optional[str]:
        what = "Conv1d" if isinstance(module, nn.Conv1d) else "Conv2d"
        if module.groups != 1:
            return f"{what} with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"{what} with padding_mode={module.padding_mode!r} (only 'zeros')"
        if conv_geometry(module).padding is None:
            return (f"{what} with padding={module.padding!r} that pads asymmetrically "
                    "(unfold pads both sides equally)")
        return super().unsupported_reason(module, method)

    @property
    def in_dim(self) -> int:
        return self.module.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def g_dim(self) -> int:
        return self.module.out_channels

    def batched_input(self, x: Tensor) -> Tensor:
        """Unbatched (C, H, W) inputs get a batch dim; Conv1d (N, C, L) becomes (N, C, 1, L)."""
        if self.conv1d:
            return (x.unsqueeze(0) if x.dim() == 2 else x).unsqueeze(2)
        return x.unsqueeze(0) if x.dim() == 3 else x

    def grad_rows(self, g: Tensor) -> Tensor:
        if g.dim() == (2 if self.conv1d else 3):
            g = g.unsqueeze(0)
        return g.movedim(1, -1)

    def input_row_count(self, x: Tensor) -> int:
        n, _, h, w = x.shape
        return n * self._out_size(h, 0) * self._out_size(w, 1)

    def _out_size(self, size: int, i: int) -> int:
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    def example_inputs(self, x: Tensor) -> Tensor:
        """Per-example unfold patches (N, L, in_dim) (a copy)."""
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation,
                           padding=self.padding, stride=self.stride)
        return patches.transpose(1, 2)

    def update_a_(self, x: Tensor, beta: Any, alpha: Any, *, masked: bool = False) -> None:
        ops.conv_input_factor_(self.a_factor, x, beta, alpha, self.kernel_size, self.stride,
                               self.padding, self.dilation, append_ones=self.has_bias)
