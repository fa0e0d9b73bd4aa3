"""What the backends share: scalar arguments, the running-average scalings, the KL-clip nu (its dtype rule is the
schema's, `kfac_fast._ops.nu_dtype`), the eigen denominator, finite checks, size buckets,
the torch eigh with its float64 retry, and the warm-refresh driver.

Every function here is math or bookkeeping on torch tensors; none imports a backend, a
kernel or `kfac_fast._C`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence, Union

import torch

from .lapack_threads import cpu_lapack
from .warm_eigh import FULL, warm_eigh

Scalar = Union[float, torch.Tensor]


# ---------------------------------------------------------------------------------------
# scalars
# ---------------------------------------------------------------------------------------
def scalar_tensor(value: Scalar) -> torch.Tensor:
    """A 0-dim tensor for a Python number (float64 on the CPU) or a 0-dim tensor (as is)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


def decay_(t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """t <- beta*t in place, BLAS-style: beta == 0 overwrites without reading t, so an
    uninitialised or NaN-poisoned buffer cannot leak into the first (beta_1 = 0) update.
    A device beta is compared on the device (torch.where, no sync)."""
    if is_host_zero(beta):
        return t.zero_()
    if beta.device.type == "cpu":
        return t.mul_(beta)
    return t.copy_(torch.where(beta == 0, torch.zeros((), dtype=t.dtype, device=t.device), beta * t))


def scaled(alpha: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """alpha * term, exactly 0 where alpha == 0 even when term holds NaN/Inf.

    A device alpha is compared on the device (torch.where, no sync).
    """
    product = alpha * term
    if alpha.device.type == "cpu":
        return product  # alpha != 0 here: the caller skipped the update when it was 0
    return torch.where(alpha == 0, torch.zeros((), dtype=product.dtype, device=product.device), product)


def layer_scalar(values, i: int) -> torch.Tensor:
    """The i-th layer's 0-dim scalar from a 1-D tensor, a sequence, or one shared scalar."""
    if isinstance(values, torch.Tensor):
        return values.reshape(()) if values.dim() == 0 else values[i]
    if isinstance(values, (list, tuple)):
        return scalar_tensor(values[i])
    return scalar_tensor(values)


def is_host_zero(s: torch.Tensor) -> bool:
    """True when s is a CPU scalar equal to 0 (readable without a device sync)."""
    return s.device.type == "cpu" and bool(s == 0)


# ---------------------------------------------------------------------------------------
# preconditioning
# ---------------------------------------------------------------------------------------
def kl_nu(total: Optional[torch.Tensor], lr: Optional[Scalar], kl_clip: Optional[Scalar],
          device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """nu = min(1, sqrt(kl_clip / |lr^2 * total|)); 1 when the sum is 0 or kl_clip is None.

    total: 0-dim tensor sum_i <P_i, dW_bar_i>. Returns a 0-dim tensor (device, dtype).
    """
    if kl_clip is None:
        return torch.ones((), dtype=dtype, device=device)
    lr_t, kl_t = scalar_tensor(lr), scalar_tensor(kl_clip)
    s = (total * lr_t * lr_t).abs()
    positive = s > 0
    safe = torch.where(positive, s, torch.ones_like(s))
    nu = torch.sqrt(kl_t / safe).clamp(max=1.0)
    nu = torch.where(positive, nu, torch.ones_like(nu))
    return nu.to(device=device, dtype=dtype)


def finite_term(term: torch.Tensor) -> torch.Tensor:
    """A layer's <P, dW_bar> for the KL sum: 0 when it is not finite, so one layer's NaN
    gradient or basis does not turn nu into 1 (no clip) for every other layer; that
    layer's own output is non-finite anyway (the frontends then keep its plain gradient)."""
    return torch.where(torch.isfinite(term), term, torch.zeros_like(term))


def eigen_denominator(da: torch.Tensor, dg: torch.Tensor, damping, i: int) -> torch.Tensor:
    """d_G d_A^T + damping_i with eigenvalues clamped at 0 (docs/design.md's eigen method),
    so a slightly negative fp32 eigenvalue can never make the denominator vanish or flip
    sign."""
    return dg.clamp(min=0)[:, None] * da.clamp(min=0)[None, :] + layer_scalar(damping, i).to(da.dtype)


# ---------------------------------------------------------------------------------------
# decompositions (inverse-refresh steps: host reads allowed)
# ---------------------------------------------------------------------------------------
def buckets(matrices: Sequence[torch.Tensor], indices: Sequence[int]) -> dict:
    """Group matrix indices by (size, dtype, device) so each group stacks into one batch."""
    groups = defaultdict(list)
    for i in indices:
        m = matrices[i]
        groups[(m.shape[-1], m.dtype, m.device)].append(i)
    return groups


def finite_per_matrix(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool on the host: whether every entry of batch element b is finite."""
    ok = None
    for t in tensors:
        fin = torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
        ok = fin if ok is None else ok & fin
    return ok.cpu()


def eigh_stack(stack: torch.Tensor, first_index: Sequence[int]) -> tuple:
    """torch.linalg.eigh of a (B, n, n) stack; fp32 failures retried in float64.

    A failure is torch.linalg.eigh raising or returning non-finite values. Retried
    results are cast back to the input dtype. Raises ValueError naming the matrix
    (`first_index[b]` is its index in the caller's list) when an input is not finite, and
    RuntimeError when even float64 fails.
    """
    try:
        with cpu_lapack(stack.device):
            vals, vecs = torch.linalg.eigh(stack)
        bad = ~finite_per_matrix(vals, vecs)
    except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
        vals = vecs = None
        bad = torch.ones(stack.shape[0], dtype=torch.bool)
    if not bool(bad.any()):
        return vals, vecs
    retry = stack[bad.to(stack.device)].to(torch.float64)
    finite = finite_per_matrix(retry)
    if not bool(finite.all()):
        j = int(torch.nonzero(~finite)[0])
        raise ValueError(f"eigh: matrices[{first_index[int(torch.nonzero(bad)[j])]}] is not finite")
    try:
        with cpu_lapack(retry.device):
            vals64, vecs64 = torch.linalg.eigh(retry)
    except RuntimeError as exc:
        raise RuntimeError(f"eigh: torch.linalg.eigh failed even in float64: {exc}") from exc
    if not bool(finite_per_matrix(vals64, vecs64).all()):
        raise RuntimeError("eigh: torch.linalg.eigh returned non-finite values even in float64")
    if vals is None:
        return vals64.to(stack.dtype), vecs64.to(stack.dtype)
    mask = bad.to(stack.device)
    vals, vecs = vals.clone(), vecs.clone()
    vals[mask] = vals64.to(stack.dtype)
    vecs[mask] = vecs64.to(stack.dtype)
    return vals, vecs


ColdSolve = Callable[[list], tuple]


def solve_eigh(matrices: Sequence[torch.Tensor], previous, tol: Optional[float], clamp: bool,
               return_paths: bool, cold: ColdSolve) -> tuple:
    """The eigh driver every backend shares: a warm refresh (`warm_eigh`) when `previous`
    and `tol` are given, with `cold` (list of matrices -> (eigenvalues, eigenvectors),
    ascending, unclamped) solving what cannot be kept or refined; else `cold` on all.

    Returns (eigenvalues, eigenvectors), plus the CPU int64 paths (warm_eigh.KEPT /
    REFINED / FULL per matrix; a cold solve is all FULL) when `return_paths`.
    """
    matrices = list(matrices)
    if previous is not None and len(previous) > 0 and tol is not None:
        prev = [None if q is None else q.to(m.dtype) for m, q in zip(matrices, previous)]
        vals, vecs, paths = warm_eigh(matrices, prev, float(tol), full_solve=cold, clamp=clamp)
    else:
        vals, vecs = cold(matrices) if matrices else ([], [])
        if clamp:  # one fused launch for all matrices on CUDA
            vals = list(torch._foreach_clamp_min(vals, 0.0)) if vals else vals
        paths = torch.full((len(matrices),), FULL, dtype=torch.int64)
    return (vals, vecs, paths) if return_paths else (vals, vecs)

