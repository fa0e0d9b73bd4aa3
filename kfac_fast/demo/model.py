"""The CURVES autoencoder of the demo: its layers, sparse initialisation and loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENCODER = (784, 400, 200, 100, 50, 25, 6)
SPARSE_NONZERO = 15


def sparse_init_(layer: nn.Linear, nonzero: int, generator: torch.Generator) -> None:
    """Martens (2010)'s sparse init: `nonzero` N(0,1) incoming weights per unit, zero bias.

    Few large weights keep logistic units out of saturation while still breaking
    symmetry; dense N(0,1) would saturate every unit of the 784-wide layers.
    """
    d_out, d_in = layer.weight.shape
    k = min(nonzero, d_in)
    with torch.no_grad():
        cols = torch.rand(d_out, d_in, generator=generator).argsort(dim=1)[:, :k]
        w = torch.zeros(d_out, d_in)
        w.scatter_(1, cols, torch.randn(d_out, k, generator=generator))
        layer.weight.copy_(w)
        layer.bias.zero_()


def build_autoencoder(seed: int = 0) -> nn.Sequential:
    """The CURVES autoencoder: 12 Linear layers; logistic everywhere but the 6-unit code.

    The output layer returns logits: its logistic is folded into the loss (`bce_loss`).
    """
    sizes = list(ENCODER) + list(reversed(ENCODER))[1:]
    code = len(ENCODER) - 2  # index of the layer producing the linear code
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(d_in, d_out)
        sparse_init_(lin, SPARSE_NONZERO, gen)
        layers.append(lin)
        if i != code and i != len(sizes) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def bce_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-case binary cross-entropy summed over pixels, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


@torch.no_grad()
def training_error(model: nn.Module, x: torch.Tensor, chunk: int = 4096) -> float:
    """bce_loss over all of x, computed in chunks (one host sync at the end)."""
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        total += F.binary_cross_entropy_with_logits(model(xb), xb, reduction="sum").double()
    return total.item() / x.shape[0]
