"""CURVES-like data: 28x28 images of a smooth curve through three random points.

The CURVES set of Hinton & Salakhutdinov (2006), used by Martens & Grosse (2015) for
their deep-autoencoder experiments, was made by drawing a curve through three random
points; its exact generator was never published. This module makes data of the same
kind and calls it "CURVES-like": it is not the original data set, and numbers measured
on it are not comparable to the paper's.

Each image: three points drawn uniformly in the inner part of the image, a quadratic
curve interpolating them (parametrised by chord length, so it bends smoothly through
the middle point), rendered as an anti-aliased stroke of random width. Intensities lie
in [0, 1]: pixels well inside the stroke are 1, pixels away from it are 0, and the
stroke's edge is a linear ramp about one pixel wide. Generation is deterministic from
the seed (CPU torch.Generator, elementwise ops only), independent of the device and of
the number of threads.
"""
from __future__ import annotations

import torch

SIDE = 28
_SAMPLES = 96  # points along the curve; spacing stays below ~0.7 px for the longest curves
_CHUNK = 256  # images rendered at once: bounds memory to ~ _CHUNK*784*_SAMPLES floats


def _curve_points(p: torch.Tensor) -> torch.Tensor:
    """Sample the quadratic through p[:, 0], p[:, 1], p[:, 2] at _SAMPLES points.

    p is (n, 3, 2). The middle point's parameter is its chord-length fraction, which
    keeps the curve from looping when the points are unevenly spaced.
    """
    c1 = (p[:, 1] - p[:, 0]).norm(dim=-1)
    c2 = (p[:, 2] - p[:, 1]).norm(dim=-1)
    tm = (c1 / (c1 + c2).clamp_min(1e-9)).clamp(0.2, 0.8)[:, None]
    t = torch.linspace(0.0, 1.0, _SAMPLES, dtype=p.dtype)[None, :]
    # Lagrange basis for the knots 0, tm, 1.
    l0 = (t - tm) * (t - 1) / tm
    l1 = t * (t - 1) / (tm * (tm - 1))
    l2 = t * (t - tm) / (1 - tm)
    return l0[..., None] * p[:, None, 0] + l1[..., None] * p[:, None, 1] + l2[..., None] * p[:, None, 2]


def _render(curve: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Anti-aliased stroke of half-width `width` (n,) along the sampled curve (n, S, 2).

    The distance to the curve is taken to its nearest dense sample rather than to
    exact segments: with samples < 0.7 px apart the error at the stroke's edge is
    < 0.1 px, and plain elementwise float32 ops are fast and bit-reproducible.
    """
    ij = torch.arange(SIDE, dtype=torch.float32)
    rows, cols = torch.meshgrid(ij, ij, indexing="ij")
    c = curve.float()
    d2 = (rows.reshape(1, -1, 1) - c[:, None, :, 0]).square_()
    d2 += (cols.reshape(1, -1, 1) - c[:, None, :, 1]).square_()
    d = d2.amin(-1).sqrt_()  # (n, 784)
    return (width.float()[:, None] + 0.5 - d).clamp_(0.0, 1.0)


def make_curves(n: int, seed: int = 0) -> torch.Tensor:
    """Return n CURVES-like images as a float32 (n, 784) CPU tensor with values in [0, 1]."""
    if n < 0:
        raise ValueError(f"make_curves: n must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(seed)
    # One row of random numbers per image, drawn up front, so image i is the same
    # whatever n is and however the rendering is chunked.
    u = torch.rand(n, 7, generator=gen, dtype=torch.float64)
    pts = 3.0 + (SIDE - 7.0) * u[:, :6].reshape(n, 3, 2)
    width = 0.4 + 0.8 * u[:, 6]
    out = torch.empty(n, SIDE * SIDE, dtype=torch.float32)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        out[s:e] = _render(_curve_points(pts[s:e]), width[s:e]).float()
    return out


def load_curves(n_train: int = 20000, n_test: int = 10000, seed: int = 0):
    """(train, test) CURVES-like sets; the test set uses a different stream of the seed."""
    return make_curves(n_train, seed=2 * seed), make_curves(n_test, seed=2 * seed + 1)


def entropy_floor(x: torch.Tensor) -> float:
    """Mean over images of the per-image summed binary entropy of the pixel intensities.

    This is the BCE of the data with itself: no model can reach a lower per-case
    cross-entropy, so "error above the floor" is what an optimiser can still remove.
    """
    x = x.double().clamp(0.0, 1.0)
    h = -(torch.special.xlogy(x, x) + torch.special.xlogy(1 - x, 1 - x))
    return h.reshape(x.shape[0], -1).sum(1).mean().item()
