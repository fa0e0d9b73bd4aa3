"""kfac_fast.ops: the public functional API (the backend surface other frontends import).

Every public function here validates its arguments (`kfac_fast._validate`: ValueError
for values, shapes and lengths; TypeError for types and dtypes; each message names the
argument), normalises them, and calls the `torch.library` custom op
`torch.ops.kfac_fast.<name>` (`kfac_fast._ops`), whose body asks the router
`kfac_fast._dispatch` which backend serves the call (torch reference, Triton or CUDA:
`kfac_fast.backends`, imported here so their rows exist before the first call) and
runs it. Exact semantics: docs/ops-api.md; math conventions: docs/design.md.

Normalisation (what every implementation receives):
- a single scalar (`beta`, `alpha`, `damping`, `lr`, `kl_clip`) becomes a 0-dim tensor:
  Python numbers become float64 CPU tensors (checked for finiteness or sign here),
  0-dim tensors pass through unchanged (CPU or the data's device; never value-checked,
  that would sync). Passing tensor scalars lets `torch.compile` reuse one graph for
  every value;
- a per-layer scalar (one scalar, a sequence of L scalars, or a 1-D tensor of length L)
  becomes a contiguous 1-D tensor of length L;
- a bias list with None entries becomes, at the custom-op boundary, the list of present
  bias tensors plus a `has_bias` list of bools; implementations see the public form again;
- `append_ones` becomes one bool per layer; kernel_size/stride/padding/dilation pairs.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union, overload

import torch

from . import _guards as guard
from . import _validate as check
from . import backends  # noqa: F401  (importing it registers every implementation with the router)
from ._ops import OP_NAMES

Tensor = torch.Tensor
Scalar = Union[float, Tensor]
# one scalar for every layer, one per layer, or a 1-D tensor of length L
PerLayer = Union[float, Sequence[Scalar], Tensor]
IntPair = Union[int, Sequence[int]]
# (eigenvalues, eigenvectors), or with return_paths (eigenvalues, eigenvectors, paths)
EighResult = Union[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor], Tensor]]

# Names of the warm-refresh paths `eigh(..., return_paths=True)` reports, by code.
EIGH_PATHS = ("kept", "refined", "full")

__all__ = [*OP_NAMES, "EIGH_PATHS"]

_kfac = torch.ops.kfac_fast


def update_factor_(factor: Tensor, x: Tensor, beta: Scalar, alpha: Scalar, *, append_ones: bool = False,
                   precision: Optional[str] = None) -> Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar, in place; returns factor.

    factor: (n, n) float32/float64, contiguous. x: (..., d) float32/16/bf16/64, any
    strides, flattened to R rows (R = 0 allowed) and accumulated in factor's dtype;
    x_bar = [x | 1] (n = d+1) when append_ones, else x (n = d). No 1/R: fold it into
    alpha. alpha == 0 never lets NaN/Inf of x into the factor.
    beta, alpha: Python numbers (finite) or 0-dim float tensors (CPU or factor's device).
    precision: None, "ieee" or "fp32" (IEEE fp32 products of fp32 x), or "tf32" (kernels may use
    TF32 tensor cores for fp32 x; the torch reference ignores it). The same on every op
    that takes it.
    """
    args = check.check_update_factor_(factor, x, beta, alpha, append_ones)
    prec = check.precision("update_factor_", precision)
    guard.no_overlap("update_factor_", [("factor", factor)], [("x", x)])
    _kfac.update_factor_(*args, prec)
    return factor


def update_factors_(factors: Sequence[Tensor], xs: Sequence[Tensor], betas: PerLayer, alphas: PerLayer, *,
                    append_ones: Union[bool, Sequence[bool]] = False, precision: Optional[str] = None) -> list[Tensor]:
    """update_factor_ for L layers at once (one call; on GPU a GEMM per layer or one grouped launch); returns factors.

    factors[i]: (n_i, n_i) float32/64 contiguous, all on one device; xs[i]: (..., d_i)
    with n_i = d_i + append_ones[i]. betas, alphas: one scalar, L scalars, or a 1-D
    float tensor of length L. append_ones: a bool or L bools. precision: as update_factor_.
    """
    args = check.check_update_factors_(factors, xs, betas, alphas, append_ones)
    prec = check.precision("update_factors_", precision)
    if args is None:
        return list(factors)
    guard.no_overlap("update_factors_", guard.named("factors", args[0]), guard.named("xs", args[1]))
    _kfac.update_factors_(*args, prec)
    return args[0]


def conv_input_factor_(factor: Tensor, x: Tensor, beta: Scalar, alpha: Scalar, kernel_size: IntPair,
                       stride: IntPair, padding: IntPair, dilation: IntPair, *, append_ones: bool = False,
                       precision: Optional[str] = None) -> Tensor:
    """Conv2d A update from its NCHW input: factor <- beta*factor + alpha * P_bar^T P_bar.

    x: (N, C, H, W) float32/16/bf16/64 (NCHW or channels-last memory). P: the N*L rows
    of `F.unfold(x, kernel_size, dilation, padding, stride)` (channel-major, then kernel
    rows, then kernel cols); P_bar = [P | 1] when append_ones. factor: (n, n) with
    n = C*kh*kw + append_ones. kernel_size, stride, padding, dilation: int or pair.
    precision: as update_factor_.
    """
    op = "conv_input_factor_"
    args = check.check_conv_input_factor_(factor, x, beta, alpha, kernel_size, stride, padding, dilation, append_ones)
    prec = check.precision(op, precision)
    guard.nonzero_sizes(op, "x", x, (1, 2, 3), "C, H and W")
    guard.no_overlap(op, [("factor", factor)], [("x", x)])
    _kfac.conv_input_factor_(*args, prec)
    return factor


@overload
def eigh(matrices: Sequence[Tensor], *, previous: Optional[Sequence[Optional[Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True,
         return_paths: Literal[False] = False) -> tuple[list[Tensor], list[Tensor]]: ...


@overload
def eigh(matrices: Sequence[Tensor], *, previous: Optional[Sequence[Optional[Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True,
         return_paths: Literal[True]) -> tuple[list[Tensor], list[Tensor], Tensor]: ...


@overload
def eigh(matrices: Sequence[Tensor], *, previous: Optional[Sequence[Optional[Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True, return_paths: bool = False) -> EighResult: ...


def eigh(matrices: Sequence[Tensor], *, previous: Optional[Sequence[Optional[Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True, return_paths: bool = False) -> EighResult:
    """Batched eigendecomposition of symmetric matrices of mixed sizes.

    matrices: list of symmetric (n_i, n_i) float32/64 tensors on one device. Returns
    (eigenvalues, eigenvectors): lists of (n_i,) ascending and (n_i, n_i) orthonormal
    columns with M_i = Q_i diag(d_i) Q_i^T, dtype of M_i; eigenvalues clamped at 0 when
    clamp. fp32 failures are retried in float64; never NaN for a finite input.
    previous: None or, per matrix, its last eigenvectors (or None); with tol (>= 0, the
    off-diagonal ratio ||offdiag(Q^T M Q)||_F / ||M||_F) a warm refresh
    (`kfac_fast.backends.warm_eigh`): each previous basis is kept, refined by
    Jacobi/rotation steps, or replaced by a full solve; the result always meets r <= tol
    with ||Q^T Q - I||_F <= warm_eigh.default_ortho_tol(n, dtype).
    return_paths (keyword-only): return (eigenvalues, eigenvectors, paths) instead, paths
    a CPU int64 tensor with one entry per matrix indexing EIGH_PATHS ("kept", "refined",
    "full"); a cold solve (no previous or no tol) is all "full".
    """
    matrices, prev, tol, clamp = check.check_eigh(matrices, previous, tol, clamp, return_paths)
    if not matrices:
        return ([], [], torch.zeros(0, dtype=torch.int64)) if return_paths else ([], [])
    vals, vecs, paths = _kfac.eigh(matrices, prev, tol, clamp)
    return (list(vals), list(vecs), paths) if return_paths else (list(vals), list(vecs))


def damped_inverse(matrices: Sequence[Tensor], damping: PerLayer) -> list[Tensor]:
    """(M_i + damping_i I)^-1 for symmetric PSD (n_i, n_i) float32/64 matrices on one device.

    damping: one scalar >= 0, L scalars, or a 1-D tensor of length L. Batched Cholesky
    by size bucket with a fallback (symmetrise, more damping, eigh): never NaN for a
    finite PSD input with damping > 0. Returns a list of new (n_i, n_i) tensors.
    """
    op = "damped_inverse"
    matrices = check.matrices_on_one_device(op, "matrices", matrices)
    if not matrices:
        return []
    damping_t = check.per_layer(op, "damping", damping, len(matrices), matrices[0].device, "nonneg")
    return list(_kfac.damped_inverse(matrices, damping_t))


def pi_damping(a: Tensor, g: Tensor, damping: Scalar) -> tuple[Tensor, Tensor]:
    """(pi*gamma, gamma/pi): the damping for A and for G under factored Tikhonov damping.

    a, g: square float32/64 factors on one device. gamma = sqrt(damping) (damping >= 0),
    pi = sqrt((tr a / dim a) / (tr g / dim g)), 1 when either trace is not positive or
    not finite. Returns two 0-dim tensors with a's dtype and device (no host sync).
    """
    op = "pi_damping"
    check.square(op, "a", a)
    check.square(op, "g", g)
    check.device(op, "g", g, a.device)
    da, dg = _kfac.pi_damping(a, g, check.scalar(op, "damping", damping, a.device, "nonneg"))
    return da, dg


def precondition_eigen(grads: Sequence[Tensor], qa: Sequence[Tensor], da: Sequence[Tensor],
                       qg: Sequence[Tensor], dg: Sequence[Tensor], damping: PerLayer, *,
                       precision: Optional[str] = None) -> list[Tensor]:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (d_G d_A^T + damping_i)]Q_A^T for each layer.

    grads[i]: (d_out, n_a) dW_bar; qa[i] (n_a, n_a), da[i] (n_a,), qg[i] (d_out, d_out),
    dg[i] (d_out,) float32/64; damping >= 0 per-layer rule. Returns new (d_out, n_a)
    tensors with grads[i]'s dtype (computed in the factors' dtype). precision: as
    update_factor_ (TF32 for the GEMMs of the Triton and CUDA paths).
    """
    op = "precondition_eigen"
    prec = check.precision(op, precision)
    grads = check.tensor_list(op, "grads", grads)
    if not grads:
        return []
    where = grads[0].device
    qa, da, qg, dg, dims = check.layer_bases(op, len(grads), qa, da, qg, dg, where)
    guard.same_dtype(op, "qa", qa, "qg", qg)
    check.grads(op, grads, dims, where)
    damping_t = check.per_layer(op, "damping", damping, len(grads), where, "nonneg")
    return list(_kfac.precondition_eigen(grads, qa, da, qg, dg, damping_t, prec))


def precondition_eigen_(weight_grads: Sequence[Tensor], bias_grads: Sequence[Optional[Tensor]],
                        qa: Sequence[Tensor], da: Sequence[Tensor], qg: Sequence[Tensor], dg: Sequence[Tensor],
                        damping: PerLayer, *, lr: Optional[Scalar] = None,
                        kl_clip: Optional[Scalar] = None, precision: Optional[str] = None) -> Tensor:
    """In place: weight_grads[i] <- nu * P_i[:, :d_in], bias_grads[i] <- nu * P_i[:, -1].

    weight_grads[i]: (d_out, ...) (Linear (d_out, d_in), Conv2d (d_out, C, kh, kw));
    bias_grads[i]: (d_out,) or None (then qa[i] is d_in x d_in). P as in
    precondition_eigen. nu = 1 without kl_clip; with kl_clip (lr required)
    nu = min(1, sqrt(kl_clip / |sum_i lr^2 sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))|)).
    Returns nu: 0-dim on the grads' device, float32 (float64 for float64 grads).
    precision: as precondition_eigen.
    """
    op = "precondition_eigen_"
    prec = check.precision(op, precision)
    weights = check.tensor_list(op, "weight_grads", weight_grads)
    check.nonempty(op, "weight_grads", weights)
    where, n = weights[0].device, len(weights)
    qa, da, qg, dg, dims = check.layer_bases(op, n, qa, da, qg, dg, where)
    guard.same_dtype(op, "qa", qa, "qg", qg)
    guard.nonempty_layers(op, dims)
    weights, present, has_bias = check.inplace_grads(op, weights, bias_grads, dims, where)
    guard.inplace_grads(op, weights, bias_grads, [qa, da, qg, dg])
    damping_t = check.per_layer(op, "damping", damping, n, where, "nonneg")
    lr_t, kl_t = check.kl_args(op, lr, kl_clip, where)
    return _kfac.precondition_eigen_(weights, present, has_bias, qa, da, qg, dg, damping_t, lr_t, kl_t, prec)


def precondition_inverse(grads: Sequence[Tensor], a_inv: Sequence[Tensor], g_inv: Sequence[Tensor]) -> list[Tensor]:
    """P_i = G_inv_i dW_bar_i A_inv_i; grads[i] (d_out, n_a), a_inv[i] (n_a, n_a),
    g_inv[i] (d_out, d_out) float32/64. Returns new tensors with grads[i]'s dtype."""
    op = "precondition_inverse"
    grads = check.tensor_list(op, "grads", grads)
    if not grads:
        return []
    where = grads[0].device
    a_inv, g_inv, dims = check.layer_inverses(op, len(grads), a_inv, g_inv, where)
    guard.same_dtype(op, "a_inv", a_inv, "g_inv", g_inv)
    check.grads(op, grads, dims, where)
    return list(_kfac.precondition_inverse(grads, a_inv, g_inv))


def precondition_inverse_(weight_grads: Sequence[Tensor], bias_grads: Sequence[Optional[Tensor]],
                          a_inv: Sequence[Tensor], g_inv: Sequence[Tensor], *, lr: Optional[Scalar] = None,
                          kl_clip: Optional[Scalar] = None) -> Tensor:
    """In place: .grad <- nu * G_inv dW_bar A_inv (bias = last column), KL clip with
    <P, dW_bar> = sum(P * dW_bar). Grads and nu as in precondition_eigen_."""
    op = "precondition_inverse_"
    weights = check.tensor_list(op, "weight_grads", weight_grads)
    check.nonempty(op, "weight_grads", weights)
    where = weights[0].device
    a_inv, g_inv, dims = check.layer_inverses(op, len(weights), a_inv, g_inv, where)
    guard.same_dtype(op, "a_inv", a_inv, "g_inv", g_inv)
    guard.nonempty_layers(op, dims)
    weights, present, has_bias = check.inplace_grads(op, weights, bias_grads, dims, where)
    guard.inplace_grads(op, weights, bias_grads, [a_inv, g_inv])
    lr_t, kl_t = check.kl_args(op, lr, kl_clip, where)
    return _kfac.precondition_inverse_(weights, present, has_bias, a_inv, g_inv, lr_t, kl_t)


def ekfac_scales_(scales: Sequence[Tensor], xs: Sequence[Tensor], gs: Sequence[Tensor], qa: Sequence[Tensor],
                  qg: Sequence[Tensor], beta: PerLayer, alpha: PerLayer) -> list[Tensor]:
    """S_i <- beta_i S_i + alpha_i * sum_n (Q_G^T dW_bar_n Q_A)^2, in place; returns scales.

    scales[i]: (d_out, n_a) float32/64; xs[i]: (N, d_in) or (N, L, d_in) inputs,
    gs[i]: (N, d_out) or (N, L, d_out) scaled output gradients (same leading dims);
    dW_bar_n = sum_l d_{n,l} a_bar_{n,l}^T with the ones-column appended exactly when
    qa[i] is (d_in+1)^2. beta, alpha: per-layer rule (fold 1/N into alpha).
    """
    args = check.check_ekfac_scales_(scales, xs, gs, qa, qg, beta, alpha)
    if args is None:
        return list(scales)
    guard.same_dtype("ekfac_scales_", "qa", args[3], "qg", args[4])
    guard.no_overlap("ekfac_scales_", guard.named("scales", args[0]),
                     guard.named("xs", args[1]) + guard.named("gs", args[2]) + guard.named("qa", args[3])
                     + guard.named("qg", args[4]))
    _kfac.ekfac_scales_(*args)
    return args[0]


def precondition_ekfac(grads: Sequence[Tensor], qa: Sequence[Tensor], qg: Sequence[Tensor],
                       scales: Sequence[Tensor], damping: PerLayer) -> list[Tensor]:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (S_i + damping_i)]Q_A^T; shapes as precondition_eigen,
    scales[i] (d_out, n_a). Returns new tensors with grads[i]'s dtype."""
    op = "precondition_ekfac"
    grads = check.tensor_list(op, "grads", grads)
    if not grads:
        return []
    where = grads[0].device
    qa, _, qg, _, dims = check.layer_bases(op, len(grads), qa, None, qg, None, where)
    guard.same_dtype(op, "qa", qa, "qg", qg)
    check.grads(op, grads, dims, where)
    scales = check.layer_scales(op, scales, dims, where)
    damping_t = check.per_layer(op, "damping", damping, len(grads), where, "nonneg")
    return list(_kfac.precondition_ekfac(grads, qa, qg, scales, damping_t))


def precondition_ekfac_(weight_grads: Sequence[Tensor], bias_grads: Sequence[Optional[Tensor]],
                        qa: Sequence[Tensor], qg: Sequence[Tensor], scales: Sequence[Tensor], damping: PerLayer, *,
                        lr: Optional[Scalar] = None, kl_clip: Optional[Scalar] = None) -> Tensor:
    """In place EKFAC: .grad <- nu * P, KL clip with sum((Q_G^T dW_bar Q_A)^2 / (S + damping)).
    Grads and nu as in precondition_eigen_."""
    op = "precondition_ekfac_"
    weights = check.tensor_list(op, "weight_grads", weight_grads)
    check.nonempty(op, "weight_grads", weights)
    where, n = weights[0].device, len(weights)
    qa, _, qg, _, dims = check.layer_bases(op, n, qa, None, qg, None, where)
    guard.same_dtype(op, "qa", qa, "qg", qg)
    guard.nonempty_layers(op, dims)
    weights, present, has_bias = check.inplace_grads(op, weights, bias_grads, dims, where)
    scales = check.layer_scales(op, scales, dims, where)
    guard.inplace_grads(op, weights, bias_grads, [qa, qg, scales])
    damping_t = check.per_layer(op, "damping", damping, n, where, "nonneg")
    lr_t, kl_t = check.kl_args(op, lr, kl_clip, where)
    return _kfac.precondition_ekfac_(weights, present, has_bias, qa, qg, scales, damping_t, lr_t, kl_t)


def kl_clip_scale(grads: Sequence[Tensor], precond_grads: Sequence[Tensor], lr: Scalar, kl_clip: Scalar) -> Tensor:
    """nu = min(1, sqrt(kl_clip / |sum_i lr^2 <P_i, g_i>|)) (1 when the sum is 0).

    grads[i], precond_grads[i]: tensors of equal shape on one device; lr, kl_clip > 0.
    Returns a 0-dim tensor on the grads' device, float32 (float64 for float64 grads).
    """
    args = check.check_kl_clip_scale(grads, precond_grads, lr, kl_clip)
    for i, g in enumerate(args[0]):
        guard.min_dim("kl_clip_scale", f"grads[{i}]", g)
    return _kfac.kl_clip_scale(*args)


def pack_triangles(factors: Sequence[Tensor]) -> Tensor:
    """Upper triangles (row-major order of torch.triu_indices(n, n)) of every (n_i, n_i)
    factor in one 1-D tensor of length sum n_i(n_i+1)/2, dtype/device of factors[0]."""
    factors = check.matrices_on_one_device("pack_triangles", "factors", factors, dtypes=check.INPUT_DTYPES,
                                           required=True)
    return _kfac.pack_triangles(factors)


def unpack_triangles_(factors: Sequence[Tensor], flat: Tensor) -> list[Tensor]:
    """Write pack_triangles' layout back into both triangles of each factor; returns factors.

    flat: 1-D with exactly sum n_i(n_i+1)/2 entries, on the factors' device.
    """
    checked, flat = check.check_unpack_triangles_(factors, flat)
    guard.no_overlap("unpack_triangles_", guard.named("factors", checked), [("flat", flat)])
    _kfac.unpack_triangles_(checked, flat)
    return checked
