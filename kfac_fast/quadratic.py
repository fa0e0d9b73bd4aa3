"""The paper's local quadratic model: step coefficients and Levenberg-Marquardt damping.

With the update restricted to span{Delta, delta0}, delta = V x (V = [Delta, delta0]),
the damped model of Martens & Grosse (2015), section 6.4,

    M(delta) - M(0) = g^T delta + 1/2 delta^T (F + c I) delta,   c = lambda + eta,

becomes b^T x + 1/2 x^T (V^T F V + c V^T V) x with b = V^T g, minimised by
x = -(V^T F V + c V^T V)^-1 b: a 2x2 solve, or 1x1 when there is no delta0.
Everything here works on small float64 tensors on the device (no host sync), except
the damping rule, which runs every T1 steps on host numbers.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .fvp import dot


def model_change(x: torch.Tensor, b: torch.Tensor, gram_f: torch.Tensor, gram_i: torch.Tensor,
                 c) -> torch.Tensor:
    """M(Vx) - M(0) = b^T x + 1/2 x^T (gram_f + c gram_i) x, a 0-dim tensor."""
    return b @ x + 0.5 * (x @ ((gram_f + c * gram_i) @ x))


def step_coefficients(b: torch.Tensor, gram_f: torch.Tensor, gram_i: torch.Tensor, c) -> torch.Tensor:
    """The minimiser x of the damped model over span V (k = 1 or 2 directions).

    Args:
        b: (k,) V^T g.
        gram_f: (k, k) V^T F V.
        gram_i: (k, k) V^T V.
        c: the isotropic damping lambda + eta (> 0), a number or 0-dim tensor.

    Returns:
        (k,) float64. For k = 2 the 2x2 system is solved in closed form; when it is
        numerically singular (Delta parallel to delta0, or delta0 = 0) the result is
        the 1-D minimiser along Delta with the second coefficient 0, chosen on the
        device with torch.where so no host sync is needed.
    """
    k = b.shape[0]
    if b.dim() != 1 or k not in (1, 2):
        raise ValueError(f"b must have shape (1,) or (2,), got {tuple(b.shape)}")
    if gram_f.shape != (k, k) or gram_i.shape != (k, k):
        raise ValueError(f"gram_f and gram_i must be ({k}, {k}), got {tuple(gram_f.shape)} "
                         f"and {tuple(gram_i.shape)}")
    m = (gram_f + c * gram_i).to(torch.float64)
    b = b.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    # 1-D line search along Delta; a zero curvature (Delta = 0) gives coefficient 0
    a1 = -b[0] / m[0, 0].clamp_min(tiny)
    if k == 1:
        return a1.reshape(1)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    safe = det.clamp_min(tiny)
    alpha = -(m[1, 1] * b[0] - m[0, 1] * b[1]) / safe
    mu = -(m[0, 0] * b[1] - m[1, 0] * b[0]) / safe
    # relative test: det is a difference of products and loses all digits when the
    # two directions are (nearly) parallel
    ok = det > 1e-10 * (m[0, 0] * m[1, 1]).abs()
    return torch.stack([torch.where(ok, alpha, a1), torch.where(ok, mu, torch.zeros_like(mu))])


def reduction_ratio(h_new: float, h_old: float, change: float) -> float:
    """rho = (h(theta+delta) - h(theta)) / (M(delta) - M(0)); -inf when it is undefined.

    A non-finite new loss or a model that predicts no decrease gives -inf, which the
    damping rule treats as the worst fit (raise lambda).
    """
    if not (math.isfinite(h_new) and math.isfinite(h_old) and math.isfinite(change)) or change >= 0:
        return -math.inf
    return (h_new - h_old) / change


def adapt_damping(damping: float, rho: float, omega1: float, *, low: float = 0.25,
                  high: float = 0.75) -> float:
    """Levenberg-Marquardt: rho > high -> damping * omega1, rho < low -> damping / omega1.

    omega1 < 1: a model that predicts the loss well earns less damping (longer steps),
    a poor fit more.
    """
    if not 0 < omega1 < 1:
        raise ValueError(f"omega1 must be in (0, 1), got {omega1!r}")
    if rho > high:
        return damping * omega1
    if rho < low:
        return damping / omega1
    return damping


def solve_in_span(fisher: Any, grads: list, directions: list, prev: Optional[list], c: float, lr: float) -> dict:
    """alpha (and mu) minimising the damped model over span{Delta, delta0} and the update
    they give times lr (`coeffs`: lr * x, or x itself at lr 1, so the default step is
    the paper's bit for bit). fisher: a `fvp.CurvatureProducts` (its one `gram` call)."""
    vectors = [directions] if prev is None else [directions, prev]
    k = len(vectors)
    gram_f = fisher.gram(vectors)
    gram_i = torch.empty_like(gram_f)
    for i in range(k):
        for j in range(i, k):
            gram_i[i, j] = gram_i[j, i] = dot(vectors[i], vectors[j])
    b = torch.stack([dot(grads, v) for v in vectors]).to(gram_f.device)
    x = step_coefficients(b, gram_f, gram_i, c)
    coeffs = x if lr == 1 else x * lr
    update = [d * coeffs[0].to(d.dtype) for d in directions]
    if prev is not None:
        torch._foreach_add_(update, [d * coeffs[1].to(d.dtype) for d in prev])
    return {"x": x, "coeffs": coeffs, "b": b, "gram_f": gram_f, "gram_i": gram_i, "update": update,
            "directions": directions}
