"""Pure-torch math of every kfac_fast op: the CPU fallback AND the test oracle.

Each function has exactly the signature of its op in docs/ops-api.md and follows the
math conventions of DESIGN.md (vec stacks columns, dW_bar = [dW | db] with the bias as
the LAST column, A of size (d_in+1)^2 with the ones-column last, G of size d_out^2).

Arguments arrive validated by `kfac_fast.ops`, normalised as follows:
- single scalars (`beta`, `alpha`, `damping`, `lr`, `kl_clip`) are 0-dim tensors
  (Python numbers become float64 CPU tensors). A CPU scalar may be read on the host; a
  device scalar is only used in tensor arithmetic (no sync on per-step paths);
- per-layer scalars (`betas`, `alphas`, `damping` of list ops, `beta`/`alpha` of
  `ekfac_scales_`) are a 1-D tensor of length L (CPU or the data's device).
Tests also call these functions directly on float64 copies, so for convenience every
scalar may also be a Python number and every per-layer scalar a number, a 0-dim tensor
or a sequence (see `_scalar` / `_layer_scalar`).

The math is written to be read, batched only where it is natural (eigh and
damped_inverse stack same-size matrices). Host-side checks (`.item()`, Python
branches on tensor values) appear only on inverse-refresh paths (eigh,
damped_inverse), which DESIGN.md allows, and on CPU scalars.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._dispatch import OP_NAMES

Scalar = Union[float, torch.Tensor]

# Per-example EKFAC sums (L > 1) are formed in chunks of at most this many elements of
# the (chunk, d_out, n_a) tensor, to bound memory.
_EKFAC_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------
# scalar helpers
# ---------------------------------------------------------------------------------------
def _scalar(value: Scalar) -> torch.Tensor:
    """A 0-dim tensor for a Python number or a 0-dim tensor (returned as is)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


def _layer_scalar(values, i: int) -> torch.Tensor:
    """The i-th layer's 0-dim scalar from a 1-D tensor, a sequence, or one shared scalar."""
    if isinstance(values, torch.Tensor):
        return values.reshape(()) if values.dim() == 0 else values[i]
    if isinstance(values, (list, tuple)):
        return _scalar(values[i])
    return _scalar(values)


def _is_host_zero(s: torch.Tensor) -> bool:
    """True when s is a CPU scalar equal to 0 (readable without a device sync)."""
    return s.device.type == "cpu" and bool(s == 0)


def _decay_(t: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """t <- beta*t in place, BLAS-style: beta == 0 overwrites without reading t, so an
    uninitialised or NaN-poisoned buffer cannot leak into the first (beta_1 = 0) update.
    A device beta is compared on the device (torch.where, no sync)."""
    if _is_host_zero(beta):
        return t.zero_()
    if beta.device.type == "cpu":
        return t.mul_(beta)
    return t.copy_(torch.where(beta == 0, torch.zeros((), dtype=t.dtype, device=t.device), beta * t))


def _scaled(alpha: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """alpha * term, exactly 0 where alpha == 0 even when term holds NaN/Inf.

    A device alpha is compared on the device (torch.where, no sync).
    """
    product = alpha * term
    if alpha.device.type == "cpu":
        return product  # alpha != 0 here: the caller skipped the update when it was 0
    return torch.where(alpha == 0, torch.zeros((), dtype=product.dtype, device=product.device), product)


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    """[rows | 1]: append the ones-column LAST. rows (R, d) -> (R, d+1)."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def _nu_dtype(t: torch.Tensor) -> torch.dtype:
    """dtype of nu: float32 for 16-/32-bit grads, float64 for float64 grads."""
    return torch.promote_types(t.dtype, torch.float32)


def _kl_nu(total: torch.Tensor, lr: Optional[torch.Tensor], kl_clip: Optional[torch.Tensor],
           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """nu = min(1, sqrt(kl_clip / |lr^2 * total|)); 1 when the sum is 0 or kl_clip is None.

    total: 0-dim tensor sum_i <P_i, dW_bar_i>. Returns a 0-dim tensor (device, dtype).
    """
    if kl_clip is None:
        return torch.ones((), dtype=dtype, device=device)
    s = (total * lr * lr).abs()
    positive = s > 0
    safe = torch.where(positive, s, torch.ones_like(s))
    nu = torch.sqrt(kl_clip / safe).clamp(max=1.0)
    nu = torch.where(positive, nu, torch.ones_like(nu))
    return nu.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# factors
# ---------------------------------------------------------------------------------------
def update_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar, *,
                   append_ones: bool = False) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar, in place.

    factor: (n, n) float32/64. x: (..., d), any float dtype and strides, flattened to
    R rows and cast to factor's dtype before the product (accumulated in factor's dtype).
    x_bar = [x | 1] when append_ones (n = d+1), else x (n = d). No 1/R: the caller folds
    it into alpha. alpha == 0 keeps NaN/Inf of x out of the factor; a CPU alpha == 0
    skips reading x at all. Returns factor.
    """
    beta, alpha = _scalar(beta), _scalar(alpha)
    if _is_host_zero(alpha):
        return _decay_(factor, beta)
    # the row count from the shape, not -1: a (R, 0) input (d = 0) is valid
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).to(factor.dtype)
    if beta.device.type == "cpu" and alpha.device.type == "cpu":
        return _host_update_(factor, rows, float(beta), float(alpha), append_ones)
    if append_ones:
        rows = _with_ones(rows)
    _decay_(factor, beta)
    factor.add_(_scaled(alpha, rows.mT @ rows))
    return factor


def _host_update_(factor: torch.Tensor, rows: torch.Tensor, beta: float, alpha: float,
                  append_ones: bool) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar for host scalars, by blocks of the factor.

    The x^T x block is one BLAS call on a view of the factor (no n x n temporary); with
    append_ones the last row/column is alpha * (column sums of x) and the corner alpha * R,
    so x is never copied to append a ones-column (a full copy of a conv patch matrix).
    beta == 0 never reads the old factor (addmm's rule, kept for the edge), so NaN in it
    cannot leak.
    """
    d = rows.shape[1]
    factor[:d, :d].addmm_(rows.mT, rows, beta=beta, alpha=alpha)
    if append_ones:
        sums = rows.sum(0).mul_(alpha)
        edge = sums if beta == 0 else factor[:d, d].mul(beta).add_(sums)
        factor[:d, d] = edge
        factor[d, :d] = edge
        corner = alpha * rows.shape[0]
        factor[d, d] = corner if beta == 0 else beta * factor[d, d] + corner
    return factor


def update_factors_(factors: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], betas, alphas, *,
                    append_ones: Union[bool, Sequence[bool]] = False) -> list:
    """update_factor_ for every layer i: factors[i] <- betas[i]*factors[i] + alphas[i]*x_bar_i^T x_bar_i.

    betas, alphas: per-layer scalars (1-D tensor of length L). append_ones: a bool or
    one bool per layer. Returns factors.
    """
    for i, (factor, x) in enumerate(zip(factors, xs)):
        ones = append_ones if isinstance(append_ones, bool) else bool(append_ones[i])
        update_factor_(factor, x, _layer_scalar(betas, i), _layer_scalar(alphas, i), append_ones=ones)
    return factors


def _pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_input_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar,
                       kernel_size, stride, padding, dilation, *, append_ones: bool = False) -> torch.Tensor:
    """Conv2d A update straight from its input: factor <- beta*factor + alpha * P_bar^T P_bar.

    x: (N, C, H, W) any float dtype/memory format. P: the N*L im2col patch rows of
    `F.unfold(x, kernel_size, dilation, padding, stride)` (channel-major, then kernel
    rows, then kernel cols), shape (N*L, C*kh*kw); P_bar = [P | 1] when append_ones.
    Returns factor.
    """
    beta, alpha = _scalar(beta), _scalar(alpha)
    if _is_host_zero(alpha):
        _decay_(factor, beta)
        return factor
    cols = F.unfold(x.to(factor.dtype), _pair(kernel_size), dilation=_pair(dilation),
                    padding=_pair(padding), stride=_pair(stride))  # (N, C*kh*kw, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return update_factor_(factor, rows, beta, alpha, append_ones=append_ones)


# ---------------------------------------------------------------------------------------
# decompositions (inverse-refresh steps: host checks allowed)
# ---------------------------------------------------------------------------------------
def _buckets(matrices: Sequence[torch.Tensor], indices: Sequence[int]) -> dict:
    """Group matrix indices by (size, dtype, device) so each group stacks into one batch."""
    groups = defaultdict(list)
    for i in indices:
        m = matrices[i]
        groups[(m.shape[-1], m.dtype, m.device)].append(i)
    return groups


def _finite_per_matrix(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool on the host: whether every entry of batch element b is finite."""
    ok = None
    for t in tensors:
        fin = torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
        ok = fin if ok is None else ok & fin
    return ok.cpu()


def _eigh_stack(stack: torch.Tensor, first_index: Sequence[int]) -> tuple:
    """torch.linalg.eigh of a (B, n, n) stack; fp32 failures retried in float64.

    A failure is torch.linalg.eigh raising or returning non-finite values. Retried
    results are cast back to the input dtype. Raises ValueError when an input matrix is
    not finite and RuntimeError when even float64 fails.
    """
    try:
        vals, vecs = torch.linalg.eigh(stack)
        bad = ~_finite_per_matrix(vals, vecs)
    except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
        vals = vecs = None
        bad = torch.ones(stack.shape[0], dtype=torch.bool)
    if not bool(bad.any()):
        return vals, vecs
    retry = stack[bad.to(stack.device)].to(torch.float64)
    finite = _finite_per_matrix(retry)
    if not bool(finite.all()):
        j = int(torch.nonzero(~finite)[0])
        raise ValueError(f"eigh: matrices[{first_index[int(torch.nonzero(bad)[j])]}] is not finite")
    try:
        vals64, vecs64 = torch.linalg.eigh(retry)
    except RuntimeError as exc:
        raise RuntimeError(f"eigh: torch.linalg.eigh failed even in float64: {exc}") from exc
    if not bool(_finite_per_matrix(vals64, vecs64).all()):
        raise RuntimeError("eigh: torch.linalg.eigh returned non-finite values even in float64")
    if vals is None:
        return vals64.to(stack.dtype), vecs64.to(stack.dtype)
    mask = bad.to(stack.device)
    vals, vecs = vals.clone(), vecs.clone()
    vals[mask] = vals64.to(stack.dtype)
    vecs[mask] = vecs64.to(stack.dtype)
    return vals, vecs


def warm_refresh_requested(previous, tol) -> bool:
    """True when eigh was given previous bases and a tolerance (the warm-refresh path)."""
    return previous is not None and len(previous) > 0 and tol is not None


def warm_refresh(matrices, previous, tol, clamp: bool, *, full_solve) -> tuple:
    """eigh's warm path, shared by every backend: `full_solve(matrices, clamp=False)` is the
    backend's own cold solver, used for the factors that cannot be kept or refined.
    Returns (eigenvalues, eigenvectors, paths)."""
    from .warm_eigh import warm_eigh

    prev = [None if q is None else q.to(m.dtype) for m, q in zip(matrices, previous)]
    vals, vecs, paths = warm_eigh(matrices, prev, float(tol),
                                  full_solve=lambda ms: full_solve(ms, clamp=False), clamp=clamp)
    for sink in getattr(_warm_path_sinks, "stack", ()):
        sink.append(paths)
    return vals, vecs, paths


def cold_paths(count: int) -> torch.Tensor:
    """The paths of a cold solve: every matrix "full" (warm_eigh.FULL)."""
    from .warm_eigh import FULL

    return torch.full((count,), FULL, dtype=torch.int64)


_warm_path_sinks = threading.local()


@contextlib.contextmanager
def record_warm_paths():
    """Observe warm refreshes: inside the block, every `warm_refresh` (eigh with previous
    and tol, any backend) appends its per-matrix paths (CPU int64, warm_eigh.KEPT /
    REFINED / FULL in matrix order) to the yielded list. Per thread; blocks may nest."""
    stack = getattr(_warm_path_sinks, "stack", None)
    if stack is None:
        stack = _warm_path_sinks.stack = []
    sink: list = []
    stack.append(sink)
    try:
        yield sink
    finally:
        stack.pop()


def eigh(matrices: Sequence[torch.Tensor], *, previous: Optional[Sequence[Optional[torch.Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True, return_paths: bool = False) -> tuple:
    """Batched eigendecomposition of symmetric matrices of mixed sizes.

    matrices: list of (n_i, n_i) float32/64 tensors (the lower triangle is read).
    Returns (eigenvalues, eigenvectors): lists of (n_i,) ascending and (n_i, n_i) with
    orthonormal columns, M_i = Q_i diag(d_i) Q_i^T, same dtype as M_i; eigenvalues
    clamped at 0 when clamp. Same-size matrices are stacked into one torch.linalg.eigh
    call; fp32 failures (raising or non-finite output) are retried in float64.
    previous: None or one eigenvector matrix (or None) per matrix; with tol, a warm
    refresh (`kfac_fast.warm_eigh`): keep or refine the previous basis when that meets
    tol, else a full solve (which meets any tol).
    """
    if warm_refresh_requested(previous, tol):
        return warm_refresh(matrices, previous, tol, clamp, full_solve=eigh)
    n = len(matrices)
    vals: list = [None] * n
    vecs: list = [None] * n
    for idx in _buckets(matrices, range(n)).values():
        d, q = _eigh_stack(torch.stack([matrices[i] for i in idx]), idx)
        for k, i in enumerate(idx):
            # clones, not views of one stack: the custom op refuses outputs that alias
            # each other (hit for 1x1 factors); row-major like the fake implementation
            vals[i], vecs[i] = d[k].clone(), q[k].clone(memory_format=torch.contiguous_format)
    if clamp:
        vals = [d.clamp(min=0) for d in vals]
    return (vals, vecs, cold_paths(n)) if return_paths else (vals, vecs)


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
    for (size, dtype, device), idx in _buckets(matrices, range(len(matrices))).items():
        shifts = torch.stack([_layer_scalar(damping, i).to(device=device, dtype=dtype) for i in idx])
        eye = torch.eye(size, dtype=dtype, device=device)
        stack = torch.stack([matrices[i] for i in idx]) + shifts[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(stack)
        # a failed factorisation has a zero pivot and would make cholesky_inverse raise
        # for the whole batch: give it the identity, the fallback below replaces it
        chol = torch.where((info != 0)[:, None, None], eye, chol)
        inv = torch.cholesky_inverse(chol)
        bad = ((info != 0).cpu() | ~_finite_per_matrix(inv)).tolist()
        for k, i in enumerate(idx):
            out[i] = _damped_inverse_one(matrices[i], shifts[k]) if bad[k] else inv[k].clone(memory_format=torch.contiguous_format)  # no aliasing
    return out


def pi_damping(a: torch.Tensor, g: torch.Tensor, damping: Scalar) -> tuple:
    """Factored Tikhonov damping with the paper's pi correction.

    gamma = sqrt(damping), pi = sqrt((tr a / dim a) / (tr g / dim g)), pi = 1 when either
    trace is not positive or not finite (or the ratio is not finite).
    Returns (pi*gamma, gamma/pi) as 0-dim tensors with a's dtype and device. No sync.
    """
    damping = _scalar(damping)
    ta = torch.diagonal(a).sum() / a.shape[0]
    tg = torch.diagonal(g).sum().to(device=a.device, dtype=a.dtype) / g.shape[0]
    usable = (ta > 0) & (tg > 0) & torch.isfinite(ta) & torch.isfinite(tg)
    one = torch.ones((), dtype=a.dtype, device=a.device)
    ratio = torch.where(usable, ta, one) / torch.where(usable, tg, one)
    usable = usable & torch.isfinite(ratio) & (ratio > 0)
    pi = torch.where(usable, torch.sqrt(torch.where(usable, ratio, one)), one)
    gamma = torch.sqrt(damping.to(device=a.device, dtype=a.dtype))
    return pi * gamma, gamma / pi


# ---------------------------------------------------------------------------------------
# preconditioning
# ---------------------------------------------------------------------------------------
def _dw_bar(weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """dW_bar = [W.view(d_out, -1) | b] in `dtype`: (d_out, d_in[+1])."""
    w = weight_grad.reshape(weight_grad.shape[0], -1).to(dtype)
    if bias_grad is None:
        return w
    return torch.cat([w, bias_grad.reshape(-1, 1).to(dtype)], dim=1)


def _write_back(weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], p: torch.Tensor,
                nu: torch.Tensor) -> None:
    """weight_grad <- nu * P[:, :d_in] (reshaped to its shape), bias_grad <- nu * P[:, -1].
    P is the caller's own temporary: it is scaled in place."""
    p = p.mul_(nu.to(p.dtype))
    d_in = p.shape[1] - (0 if bias_grad is None else 1)
    weight_grad.copy_(p[:, :d_in].reshape(weight_grad.shape))
    if bias_grad is not None:
        bias_grad.copy_(p[:, d_in])


def _eigen_one(dw: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor, denom: torch.Tensor) -> tuple:
    """(P, <P, dW_bar>) with P = Q_G[(Q_G^T dW_bar Q_A) / denom]Q_A^T.

    <P, dW_bar> = sum((Q_G^T dW_bar Q_A)^2 / denom): no second pass over P needed.
    """
    v = qg.mT @ dw.to(qa.dtype) @ qa
    scaled = v / denom
    return qg @ scaled @ qa.mT, (v * scaled).sum()


def _eigen_denominator(da: torch.Tensor, dg: torch.Tensor, damping, i: int) -> torch.Tensor:
    """d_G d_A^T + damping_i with eigenvalues clamped at 0 (DESIGN.md's eigen method), so a
    slightly negative fp32 eigenvalue can never make the denominator vanish or flip sign."""
    return dg.clamp(min=0)[:, None] * da.clamp(min=0)[None, :] + _layer_scalar(damping, i).to(da.dtype)


def precondition_eigen(grads, qa, da, qg, dg, damping) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (d_G d_A^T + damping_i)]Q_A^T for each layer.

    grads[i]: (d_out, n_a) dW_bar; qa/da: (n_a, n_a)/(n_a,); qg/dg: (d_out, d_out)/(d_out,);
    damping: per-layer scalars. Computed in qa's dtype; P has grads[i]'s dtype.
    """
    out = []
    for i, grad in enumerate(grads):
        p, _ = _eigen_one(grad, qa[i], qg[i], _eigen_denominator(da[i], dg[i], damping, i))
        out.append(p.to(grad.dtype))
    return out


def _inplace(weight_grads, bias_grads, lr, kl_clip, layer_fn) -> torch.Tensor:
    """Shared body of the in-place preconditioners: P and <P, dW_bar> per layer via
    layer_fn(i, dW_bar_i), nu from the KL clip, then .grad <- nu * P. Returns nu."""
    ps, total = [], None
    for i, (w, b) in enumerate(zip(weight_grads, bias_grads)):
        p, term = layer_fn(i, w, b)
        ps.append(p)
        total = term if total is None else total + term
    first = weight_grads[0]
    nu = _kl_nu(total, None if lr is None else _scalar(lr), None if kl_clip is None else _scalar(kl_clip),
                first.device, _nu_dtype(first))
    for w, b, p in zip(weight_grads, bias_grads, ps):
        _write_back(w, b, p, nu)
    return nu


def precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None, kl_clip=None) -> torch.Tensor:
    """In place: .grad <- nu * P (eigen method), bias_grad <- P's last column.

    weight_grads[i]: (d_out, ...) viewed as (d_out, d_in); bias_grads[i]: (d_out,) or
    None (then qa[i] is d_in x d_in). nu = 1 without kl_clip, else
    min(1, sqrt(kl_clip / |sum_i lr^2 sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))|)).
    Returns nu: 0-dim, device of the grads, float32 (float64 for float64 grads).
    """
    def layer(i, w, b):
        return _eigen_one(_dw_bar(w, b, qa[i].dtype), qa[i], qg[i], _eigen_denominator(da[i], dg[i], damping, i))
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def precondition_inverse(grads, a_inv, g_inv) -> list:
    """P_i = G_inv_i dW_bar_i A_inv_i; computed in a_inv's dtype, P has grads[i]'s dtype."""
    return [(g_inv[i] @ grad.to(a_inv[i].dtype) @ a_inv[i]).to(grad.dtype) for i, grad in enumerate(grads)]


def precondition_inverse_(weight_grads, bias_grads, a_inv, g_inv, *, lr=None, kl_clip=None) -> torch.Tensor:
    """In place: .grad <- nu * G_inv dW_bar A_inv; KL clip with <P, dW_bar> = sum(P * dW_bar).
    Returns nu (as precondition_eigen_)."""
    def layer(i, w, b):
        dw = _dw_bar(w, b, a_inv[i].dtype)
        p = g_inv[i] @ dw @ a_inv[i]
        return p, (p * dw).sum()
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def _ekfac_sum(x: torch.Tensor, g: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """sum_n (Q_G^T dW_bar_n Q_A)^2 with dW_bar_n = sum_l d_{n,l} a_bar_{n,l}^T: (d_out, n_a).

    x: (N, d_in) or (N, L, d_in), g: (N, d_out) or (N, L, d_out), cast to qa's dtype;
    the ones-column is appended when qa is (d_in+1)^2.
    """
    dtype = qa.dtype
    bias = qa.shape[0] == x.shape[-1] + 1
    if x.dim() == 2:  # L = 1: Q_G^T d a^T Q_A = (Q_G^T d)(Q_A^T a)^T, so two GEMMs
        a = x.to(dtype)
        a = _with_ones(a) if bias else a
        return ((g.to(dtype) @ qg) ** 2).mT @ ((a @ qa) ** 2)
    n = x.shape[0]
    total = torch.zeros(qg.shape[0], qa.shape[0], dtype=dtype, device=qa.device)
    chunk = max(1, _EKFAC_CHUNK_ELEMENTS // max(1, qg.shape[0] * qa.shape[0]))
    for start in range(0, n, chunk):
        a = x[start:start + chunk].to(dtype)  # (c, L, d_in)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        d = g[start:start + chunk].to(dtype)  # (c, L, d_out)
        dw = d.mT @ a  # (c, d_out, n_a): per-example dW_bar_n
        total += ((qg.mT @ dw @ qa) ** 2).sum(dim=0)
    return total


def ekfac_scales_(scales, xs, gs, qa, qg, beta, alpha) -> list:
    """S_i <- beta_i S_i + alpha_i * sum_n (Q_G^T dW_bar_n Q_A)^2, in place.

    scales[i]: (d_out, n_a) float32/64; beta, alpha: per-layer scalars (the caller folds
    1/N into alpha); alpha == 0 keeps NaN of xs/gs out (a CPU alpha == 0 skips them).
    Returns scales.
    """
    for i, s in enumerate(scales):
        b, a = _layer_scalar(beta, i), _layer_scalar(alpha, i)
        _decay_(s, b)
        if _is_host_zero(a):
            continue
        s.add_(_scaled(a, _ekfac_sum(xs[i], gs[i], qa[i], qg[i]).to(s.dtype)))
    return scales


def precondition_ekfac(grads, qa, qg, scales, damping) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (S_i + damping_i)]Q_A^T; P has grads[i]'s dtype."""
    out = []
    for i, grad in enumerate(grads):
        denom = scales[i].to(qa[i].dtype) + _layer_scalar(damping, i).to(qa[i].dtype)
        p, _ = _eigen_one(grad, qa[i], qg[i], denom)
        out.append(p.to(grad.dtype))
    return out


def precondition_ekfac_(weight_grads, bias_grads, qa, qg, scales, damping, *, lr=None, kl_clip=None) -> torch.Tensor:
    """In place EKFAC preconditioning; KL clip with sum((Q_G^T dW_bar Q_A)^2 / (S + damping)).
    Returns nu (as precondition_eigen_)."""
    def layer(i, w, b):
        denom = scales[i].to(qa[i].dtype) + _layer_scalar(damping, i).to(qa[i].dtype)
        return _eigen_one(_dw_bar(w, b, qa[i].dtype), qa[i], qg[i], denom)
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def kl_clip_scale(grads, precond_grads, lr, kl_clip) -> torch.Tensor:
    """nu = min(1, sqrt(kl_clip / |sum_i lr^2 <P_i, g_i>|)), 1 when the sum is 0.

    Accumulated in float32 (float64 for float64 grads). Returns a 0-dim tensor on the
    grads' device.
    """
    dtype = _nu_dtype(grads[0])
    total = sum((p.to(dtype) * g.to(dtype)).sum() for g, p in zip(grads, precond_grads))
    return _kl_nu(total, _scalar(lr), _scalar(kl_clip), grads[0].device, dtype)


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------
def pack_triangles(factors) -> torch.Tensor:
    """Upper triangles (row-major order of torch.triu_indices(n, n)) of every (n_i, n_i)
    factor concatenated: 1-D, length sum n_i(n_i+1)/2, dtype and device of factors[0]."""
    first = factors[0]
    parts = []
    for f in factors:
        iu = torch.triu_indices(f.shape[0], f.shape[0], device=f.device)
        parts.append(f[iu[0], iu[1]].to(device=first.device, dtype=first.dtype))
    return torch.cat(parts)


def unpack_triangles_(factors, flat) -> list:
    """Inverse of pack_triangles: writes flat's entries into both triangles of each factor."""
    offset = 0
    for f in factors:
        n = f.shape[0]
        count = n * (n + 1) // 2
        iu = torch.triu_indices(n, n, device=f.device)
        values = flat[offset:offset + count].to(device=f.device, dtype=f.dtype)
        f.index_put_((iu[0], iu[1]), values)
        f.index_put_((iu[1], iu[0]), values)
        offset += count
    return factors


# The op names are listed once, in _dispatch.OP_NAMES.
__all__ = list(OP_NAMES)
