"""Reference decompositions: eigh, damped_inverse, pi_damping (inverse-refresh steps, so
host reads and Python branches on tensor values are allowed; pi_damping never syncs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._common import Scalar, buckets, eigh_stack, finite_per_matrix, layer_scalar, scalar_tensor, solve_eigh
from ..lapack_threads import cpu_lapack


def _cold_eigh(matrices: Sequence[torch.Tensor]) -> tuple:
    """Unclamped eigendecompositions, one torch.linalg.eigh call per (size, dtype, device)."""
    n = len(matrices)
    vals: list = [None] * n
    vecs: list = [None] * n
    for idx in buckets(matrices, range(n)).values():
        d, q = eigh_stack(torch.stack([matrices[i] for i in idx]), idx)
        for k, i in enumerate(idx):
            # clones, not views of one stack: the custom op refuses outputs that alias
            # each other (hit for 1x1 factors); row-major like the fake implementation
            vals[i], vecs[i] = d[k].clone(), q[k].clone(memory_format=torch.contiguous_format)
    return vals, vecs


def eigh(matrices: Sequence[torch.Tensor], *, previous: Optional[Sequence[Optional[torch.Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True, return_paths: bool = False) -> tuple:
    """Batched eigendecomposition of symmetric matrices of mixed sizes.

    matrices: list of (n_i, n_i) float32/64 tensors (the lower triangle is read).
    Returns (eigenvalues, eigenvectors): lists of (n_i,) ascending and (n_i, n_i) with
    orthonormal columns, M_i = Q_i diag(d_i) Q_i^T, same dtype as M_i; eigenvalues
    clamped at 0 when clamp. Same-size matrices are stacked into one torch.linalg.eigh
    call; fp32 failures (raising or non-finite output) are retried in float64.
    previous: None or one eigenvector matrix (or None) per matrix; with tol, a warm
    refresh (`kfac_fast.backends.warm_eigh`): keep or refine the previous basis when that
    meets tol, else a full solve (which meets any tol). return_paths: also return the CPU
    int64 path per matrix (warm_eigh.KEPT / REFINED / FULL; a cold solve is all FULL).
    """
    return solve_eigh(matrices, previous, tol, clamp, return_paths, _cold_eigh)


def _eigh_inverse(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """(M_sym + damping I)^-1 via eigh with eigenvalues clamped at 0 (last resort)."""
    d, q = eigh([(m + m.mT) / 2], clamp=True)
    denom = (d[0] + damping).clamp(min=torch.finfo(m.dtype).tiny)
    return (q[0] / denom) @ q[0].mT


def _damped_inverse_one(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """Fallback chain for one matrix whose batched Cholesky failed:
    symmetrise -> a little more damping (10 n eps max|diag|) -> eigh."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    sym = (m + m.mT) / 2
    extra = 10 * m.shape[0] * torch.finfo(m.dtype).eps * sym.diagonal().abs().max().clamp(min=1.0)
    for shift in (damping, damping + extra):
        chol, info = torch.linalg.cholesky_ex(sym + shift * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            if bool(torch.isfinite(inv).all()):
                return inv
    return _eigh_inverse(m, damping)


def damped_inverse(matrices: Sequence[torch.Tensor], damping) -> list:
    """(M_i + damping_i I)^-1 for each symmetric PSD M_i (n_i, n_i) float32/64.

    damping: per-layer scalars (1-D tensor of length L). Same-size matrices share one
    batched torch.linalg.cholesky_ex + torch.cholesky_inverse; a matrix whose Cholesky
    fails (or gives non-finite values) goes through `_damped_inverse_one`. Never NaN for
    a finite PSD input with damping > 0. Returns a list of new (n_i, n_i) tensors.
    """
    out: list = [None] * len(matrices)
    for (size, dtype, device), idx in buckets(matrices, range(len(matrices))).items():
        shifts = torch.stack([layer_scalar(damping, i).to(device=device, dtype=dtype) for i in idx])
        eye = torch.eye(size, dtype=dtype, device=device)
        stack = torch.stack([matrices[i] for i in idx]) + shifts[:, None, None] * eye
        with cpu_lapack(stack.device):
            chol, info = torch.linalg.cholesky_ex(stack)
        # a failed factorisation has a zero pivot and would make cholesky_inverse raise
        # for the whole batch: give it the identity, the fallback below replaces it
        chol = torch.where((info != 0)[:, None, None], eye, chol)
        inv = torch.cholesky_inverse(chol)
        bad = ((info != 0).cpu() | ~finite_per_matrix(inv)).tolist()
        for k, i in enumerate(idx):
            if bad[k] and not bool(torch.isfinite(matrices[i]).all()):
                raise ValueError(f"damped_inverse: matrices[{i}] is not finite")
            # clones: no aliasing between the outputs of the custom op
            out[i] = (_damped_inverse_one(matrices[i], shifts[k]) if bad[k]
                      else inv[k].clone(memory_format=torch.contiguous_format))
    return out


def pi_damping(a: torch.Tensor, g: torch.Tensor, damping: Scalar) -> tuple:
    """Factored Tikhonov damping with the paper's pi correction.

    gamma = sqrt(damping), pi = sqrt((tr a / dim a) / (tr g / dim g)), pi = 1 when either
    trace is not positive or not finite (or the ratio is not finite).
    Returns (pi*gamma, gamma/pi) as 0-dim tensors with a's dtype and device. No sync.
    """
    damping = scalar_tensor(damping)
    ta = torch.diagonal(a).sum() / a.shape[0]
    tg = torch.diagonal(g).sum().to(device=a.device, dtype=a.dtype) / g.shape[0]
    usable = (ta > 0) & (tg > 0) & torch.isfinite(ta) & torch.isfinite(tg)
    one = torch.ones((), dtype=a.dtype, device=a.device)
    ratio = torch.where(usable, ta, one) / torch.where(usable, tg, one)
    usable = usable & torch.isfinite(ratio) & (ratio > 0)
    pi = torch.where(usable, torch.sqrt(torch.where(usable, ratio, one)), one)
    gamma = torch.sqrt(damping.to(device=a.device, dtype=a.dtype))
    return pi * gamma, gamma / pi
