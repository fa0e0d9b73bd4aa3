"""Shared test helpers: the error rule, float64 copies, random inputs.

The error rule (docs/design.md): an implementation's relative error against the float64
reference must be at most max(2 x the error of torch computing in fp32 from the same
inputs, 1e-6). Relative error = ||actual - expected||_F / ||expected||_F over all
tensors of a result (lists are concatenated).
"""
from __future__ import annotations

import torch


def f64(value):
    """A float64 copy of a tensor (or of every tensor in a list/tuple); other values as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).clone() if value.is_floating_point() else value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(f64(v) for v in value)
    return value


def _flat(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).to(torch.float64)
    return torch.cat([_flat(v) for v in value]) if len(value) else torch.zeros(0, dtype=torch.float64)


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (float64, Frobenius over all tensors; absolute
    error when expected is 0). Non-finite entries give inf."""
    a, e = _flat(actual), _flat(expected).to(_flat(actual).device)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    denom = float(e.norm())
    diff = float((a - e).norm())
    return diff / denom if denom > 0 else diff


def assert_error_rule(actual, expected64, torch_fp32, what: str = "result") -> None:
    """Assert rel_error(actual, expected64) <= max(2 * rel_error(torch_fp32, expected64), 1e-6)."""
    err = rel_error(actual, expected64)
    bound = max(2.0 * rel_error(torch_fp32, expected64), 1e-6)
    assert err <= bound, f"{what}: relative error {err:.3e} exceeds the bound {bound:.3e}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    """Standard normal values (never all zero) in `dtype`, drawn in float32 then rounded."""
    return torch.randn(*shape, generator=gen).to(dtype)


def random_spd(n: int, *, rank: int = None, dtype=torch.float64, gen=None, shift: float = 0.0) -> torch.Tensor:
    """A random symmetric PSD (n, n) matrix X X^T / k (rank min(n, k), k = rank or 2n)
    plus shift*I; exactly symmetric."""
    k = rank if rank is not None else 2 * n
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    m = x @ x.mT / max(k, 1) + shift * torch.eye(n, dtype=torch.float64)
    m = (m + m.mT) / 2
    return m.to(dtype)


def random_orthogonal(n: int, *, dtype=torch.float64, gen=None) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.to(dtype)
