"""kfac_fast.ops: the public functional API (the backend surface other frontends import).

Every public function here validates its arguments (ValueError for values, shapes and
lengths; TypeError for types and dtypes; each message names the argument), normalises
them, and calls the `torch.library` custom op `torch.ops.kfac_fast.<name>`, whose
implementation asks `kfac_fast._dispatch.select` which backend serves the call (torch
reference, Triton or CUDA) and runs it. Exact semantics: docs/ops-api.md; math
conventions: DESIGN.md.

Normalisation (what every implementation receives):
- a single scalar (`beta`, `alpha`, `damping`, `lr`, `kl_clip`) becomes a 0-dim tensor:
  Python numbers become float64 CPU tensors (checked for finiteness or sign here),
  0-dim tensors pass through unchanged (CPU or the data's device; never value-checked,
  that would sync). Passing tensor scalars lets `torch.compile` reuse one graph for
  every value;
- a per-layer scalar (one scalar, a sequence of L scalars, or a 1-D tensor of length L)
  becomes a contiguous 1-D tensor of length L;
- a bias list with None entries becomes, at the custom-op boundary, the list of present
  bias tensors plus a `has_bias` list of bools (torch.compile cannot functionalise a
  mutated `Tensor?[]` holding None); implementations see the public form again;
- `append_ones` becomes one bool per layer; kernel_size/stride/padding/dilation pairs.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import _dispatch
from ._dispatch import OP_NAMES

Tensor = torch.Tensor
Scalar = Union[float, Tensor]

# Names of the warm-refresh paths `eigh(..., return_paths=True)` reports, by code.
EIGH_PATHS = ("kept", "refined", "full")

_FACTOR_DTYPES = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# =======================================================================================
# validation and normalisation helpers
# =======================================================================================
def _tensor(op: str, name: str, value) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _dtype(op: str, name: str, t: Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def _square(op: str, name: str, t: Tensor, *, dtypes=_FACTOR_DTYPES) -> int:
    """Check a (n, n) float tensor and return n."""
    _tensor(op, name, t)
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{op}: {name} must be a square matrix (n, n), got shape {tuple(t.shape)}")
    _dtype(op, name, t, dtypes)
    return t.shape[0]


def _shape(op: str, name: str, t: Tensor, shape: tuple, why: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def _device(op: str, name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other tensors are on {device}")


def _tensor_list(op: str, name: str, value, length: Optional[int] = None, *, optional=False) -> list:
    """A list from a sequence of tensors (None entries only when optional)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(value).__name__}")
    items = list(value)
    if length is not None and len(items) != length:
        raise ValueError(f"{op}: {name} must have {length} entries (one per layer), got {len(items)}")
    for i, t in enumerate(items):
        if t is None and optional:
            continue
        _tensor(op, f"{name}[{i}]", t)
    return items


def _check_scalar_value(op: str, name: str, value: float, kind: str) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if kind == "nonneg" and value < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value}")
    if kind == "positive" and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")


def _scalar(op: str, name: str, value, device: torch.device, kind: str = "finite") -> Tensor:
    """A 0-dim tensor from a Python number (checked: finite, and >= 0 for kind "nonneg",
    > 0 for "positive") or a 0-dim float tensor on CPU or `device` (not value-checked)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{op}: {name} must be a Python number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        if value.device.type != "cpu" and value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device}; scalars must be on cpu or {device}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a Python number or a 0-dim tensor, got {type(value).__name__}")
    value = float(value)
    _check_scalar_value(op, name, value, kind)
    return torch.tensor(value, dtype=torch.float64)


def _per_layer(op: str, name: str, value, n: int, device: torch.device, kind: str = "finite") -> Tensor:
    """A contiguous 1-D tensor of length n from one scalar, n scalars, or a 1-D tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if value.shape[0] != n:
            raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {value.shape[0]}")
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        if value.device.type != "cpu" and value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device}; scalars must be on cpu or {device}")
        return value.contiguous()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {len(value)}")
        items = [_scalar(op, f"{name}[{i}]", v, device, kind) for i, v in enumerate(value)]
        if not any(isinstance(v, torch.Tensor) for v in value):
            return torch.tensor([float(v) for v in value], dtype=torch.float64)
        if not items:
            return torch.empty(0, dtype=torch.float64)
        target = next((t.device for t in items if t.device.type != "cpu"), torch.device("cpu"))
        return torch.stack([t.to(device=target, dtype=torch.float64) for t in items])
    scalar = _scalar(op, name, value, device, kind)
    return scalar.reshape(1).expand(n).contiguous()


def _bools(op: str, name: str, value, n: int) -> list:
    if isinstance(value, bool):
        return [value] * n
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, bool) for v in value):
        raise TypeError(f"{op}: {name} must be a bool or a list of {n} bools, got {value!r}")
    if len(value) != n:
        raise ValueError(f"{op}: {name} must have {n} entries (one per layer), got {len(value)}")
    return list(value)


def _pair(op: str, name: str, value) -> list:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [int(value[0]), int(value[1])]
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def _bias_split(op: str, weight_grads, bias_grads) -> tuple:
    """(present bias tensors, has_bias flags) from a bias list with None entries."""
    bias = _tensor_list(op, "bias_grads", bias_grads, len(weight_grads), optional=True)
    return [b for b in bias if b is not None], [b is not None for b in bias]


def _bias_join(bias_grads: list, has_bias: list) -> list:
    """Inverse of _bias_split: the public list with None entries."""
    present = iter(bias_grads)
    return [next(present) if has else None for has in has_bias]


def _select(op: str, t: Tensor, size: int):
    """The implementation that serves op for t's device and dtype at this size."""
    return _dispatch.select(op, t.device, t.dtype, size)[1]


def _max_size(tensors) -> int:
    return max((t.shape[0] for t in tensors), default=0)


def _nu_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# =======================================================================================
# custom ops: torch.ops.kfac_fast.<name> (implementation = dispatch; fake = layouts)
# =======================================================================================
_lib = "kfac_fast::"


@torch.library.custom_op(_lib + "update_factor_", mutates_args=("factor",))
def _update_factor_op(factor: Tensor, x: Tensor, beta: Tensor, alpha: Tensor, append_ones: bool) -> None:
    _select("update_factor_", factor, factor.shape[0])(factor, x, beta, alpha, append_ones=append_ones)


@torch.library.custom_op(_lib + "update_factors_", mutates_args=("factors",))
def _update_factors_op(factors: list[Tensor], xs: list[Tensor], betas: Tensor, alphas: Tensor,
                       append_ones: list[bool]) -> None:
    _select("update_factors_", factors[0], _max_size(factors))(factors, xs, betas, alphas, append_ones=append_ones)


@torch.library.custom_op(_lib + "conv_input_factor_", mutates_args=("factor",))
def _conv_input_factor_op(factor: Tensor, x: Tensor, beta: Tensor, alpha: Tensor, kernel_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int], append_ones: bool) -> None:
    _select("conv_input_factor_", factor, factor.shape[0])(
        factor, x, beta, alpha, kernel_size, stride, padding, dilation, append_ones=append_ones)


@torch.library.custom_op(_lib + "eigh", mutates_args=())
def _eigh_op(matrices: list[Tensor], previous: list[Optional[Tensor]], tol: Optional[float],
             clamp: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
    vals, vecs, paths = _select("eigh", matrices[0], _max_size(matrices))(
        matrices, previous=previous if len(previous) else None, tol=tol, clamp=clamp, return_paths=True)
    return list(vals), list(vecs), paths


@_eigh_op.register_fake
def _(matrices, previous, tol, clamp):
    return ([m.new_empty(m.shape[0]) for m in matrices], [m.new_empty(m.shape) for m in matrices],
            torch.empty(len(matrices), dtype=torch.int64, device="cpu"))


@torch.library.custom_op(_lib + "damped_inverse", mutates_args=())
def _damped_inverse_op(matrices: list[Tensor], damping: Tensor) -> list[Tensor]:
    return list(_select("damped_inverse", matrices[0], _max_size(matrices))(matrices, damping))


@_damped_inverse_op.register_fake
def _(matrices, damping):
    return [m.new_empty(m.shape) for m in matrices]


@torch.library.custom_op(_lib + "pi_damping", mutates_args=())
def _pi_damping_op(a: Tensor, g: Tensor, damping: Tensor) -> tuple[Tensor, Tensor]:
    da, dg = _select("pi_damping", a, max(a.shape[0], g.shape[0]))(a, g, damping)
    return da, dg


@_pi_damping_op.register_fake
def _(a, g, damping):
    return a.new_empty(()), a.new_empty(())


@torch.library.custom_op(_lib + "precondition_eigen", mutates_args=())
def _precondition_eigen_op(grads: list[Tensor], qa: list[Tensor], da: list[Tensor], qg: list[Tensor],
                           dg: list[Tensor], damping: Tensor) -> list[Tensor]:
    return list(_select("precondition_eigen", qa[0], _max_size(qa + qg))(grads, qa, da, qg, dg, damping))


@_precondition_eigen_op.register_fake
def _(grads, qa, da, qg, dg, damping):
    return [g.new_empty(g.shape) for g in grads]


@torch.library.custom_op(_lib + "precondition_eigen_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_eigen__op(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                            qa: list[Tensor], da: list[Tensor], qg: list[Tensor], dg: list[Tensor],
                            damping: Tensor, lr: Optional[Tensor], kl_clip: Optional[Tensor]) -> Tensor:
    return _select("precondition_eigen_", qa[0], _max_size(qa + qg))(
        weight_grads, _bias_join(bias_grads, has_bias), qa, da, qg, dg, damping, lr=lr, kl_clip=kl_clip)


@_precondition_eigen__op.register_fake
def _(weight_grads, bias_grads, has_bias, qa, da, qg, dg, damping, lr, kl_clip):
    return weight_grads[0].new_empty((), dtype=_nu_dtype(weight_grads[0]))


@torch.library.custom_op(_lib + "precondition_inverse", mutates_args=())
def _precondition_inverse_op(grads: list[Tensor], a_inv: list[Tensor], g_inv: list[Tensor]) -> list[Tensor]:
    return list(_select("precondition_inverse", a_inv[0], _max_size(a_inv + g_inv))(grads, a_inv, g_inv))


@_precondition_inverse_op.register_fake
def _(grads, a_inv, g_inv):
    return [g.new_empty(g.shape) for g in grads]


@torch.library.custom_op(_lib + "precondition_inverse_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_inverse__op(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                              a_inv: list[Tensor], g_inv: list[Tensor], lr: Optional[Tensor],
                              kl_clip: Optional[Tensor]) -> Tensor:
    return _select("precondition_inverse_", a_inv[0], _max_size(a_inv + g_inv))(
        weight_grads, _bias_join(bias_grads, has_bias), a_inv, g_inv, lr=lr, kl_clip=kl_clip)


@_precondition_inverse__op.register_fake
def _(weight_grads, bias_grads, has_bias, a_inv, g_inv, lr, kl_clip):
    return weight_grads[0].new_empty((), dtype=_nu_dtype(weight_grads[0]))


@torch.library.custom_op(_lib + "ekfac_scales_", mutates_args=("scales",))
def _ekfac_scales_op(scales: list[Tensor], xs: list[Tensor], gs: list[Tensor], qa: list[Tensor],
                     qg: list[Tensor], beta: Tensor, alpha: Tensor) -> None:
    _select("ekfac_scales_", scales[0], _max_size(qa + qg))(scales, xs, gs, qa, qg, beta, alpha)


@torch.library.custom_op(_lib + "precondition_ekfac", mutates_args=())
def _precondition_ekfac_op(grads: list[Tensor], qa: list[Tensor], qg: list[Tensor], scales: list[Tensor],
                           damping: Tensor) -> list[Tensor]:
    return list(_select("precondition_ekfac", qa[0], _max_size(qa + qg))(grads, qa, qg, scales, damping))


@_precondition_ekfac_op.register_fake
def _(grads, qa, qg, scales, damping):
    return [g.new_empty(g.shape) for g in grads]


@torch.library.custom_op(_lib + "precondition_ekfac_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_ekfac__op(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                            qa: list[Tensor], qg: list[Tensor], scales: list[Tensor], damping: Tensor,
                            lr: Optional[Tensor], kl_clip: Optional[Tensor]) -> Tensor:
    return _select("precondition_ekfac_", qa[0], _max_size(qa + qg))(
        weight_grads, _bias_join(bias_grads, has_bias), qa, qg, scales, damping, lr=lr, kl_clip=kl_clip)


@_precondition_ekfac__op.register_fake
def _(weight_grads, bias_grads, has_bias, qa, qg, scales, damping, lr, kl_clip):
    return weight_grads[0].new_empty((), dtype=_nu_dtype(weight_grads[0]))


@torch.library.custom_op(_lib + "kl_clip_scale", mutates_args=())
def _kl_clip_scale_op(grads: list[Tensor], precond_grads: list[Tensor], lr: Tensor, kl_clip: Tensor) -> Tensor:
    return _select("kl_clip_scale", grads[0], _max_size(grads))(grads, precond_grads, lr, kl_clip)


@_kl_clip_scale_op.register_fake
def _(grads, precond_grads, lr, kl_clip):
    return grads[0].new_empty((), dtype=_nu_dtype(grads[0]))


@torch.library.custom_op(_lib + "pack_triangles", mutates_args=())
def _pack_triangles_op(factors: list[Tensor]) -> Tensor:
    return _select("pack_triangles", factors[0], _max_size(factors))(factors)


@_pack_triangles_op.register_fake
def _(factors):
    return factors[0].new_empty(sum(f.shape[0] * (f.shape[0] + 1) // 2 for f in factors))


@torch.library.custom_op(_lib + "unpack_triangles_", mutates_args=("factors",))
def _unpack_triangles_op(factors: list[Tensor], flat: Tensor) -> None:
    _select("unpack_triangles_", factors[0], _max_size(factors))(factors, flat)


# =======================================================================================
# public API
# =======================================================================================
def update_factor_(factor: Tensor, x: Tensor, beta: Scalar, alpha: Scalar, *, append_ones: bool = False) -> Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar, in place; returns factor.

    factor: (n, n) float32/float64, contiguous. x: (..., d) float32/16/bf16/64, any
    strides, flattened to R rows (R = 0 allowed) and accumulated in factor's dtype;
    x_bar = [x | 1] (n = d+1) when append_ones, else x (n = d). No 1/R: fold it into
    alpha. alpha == 0 never lets NaN/Inf of x into the factor.
    beta, alpha: Python numbers (finite) or 0-dim float tensors (CPU or factor's device).
    """
    op = "update_factor_"
    n = _square(op, "factor", factor)
    if not factor.is_contiguous():
        raise ValueError(f"{op}: factor must be contiguous")
    _tensor(op, "x", x)
    _dtype(op, "x", x, _INPUT_DTYPES)
    _device(op, "x", x, factor.device)
    if not isinstance(append_ones, bool):
        raise TypeError(f"{op}: append_ones must be a bool, got {type(append_ones).__name__}")
    if x.dim() < 1 or x.shape[-1] + int(append_ones) != n:
        got = x.shape[-1] if x.dim() else "a 0-dim tensor"
        raise ValueError(f"{op}: x must have last dim {n - int(append_ones)} "
                         f"(factor is {n}x{n} with append_ones={append_ones}), got {got}")
    beta_t = _scalar(op, "beta", beta, factor.device)
    alpha_t = _scalar(op, "alpha", alpha, factor.device)
    torch.ops.kfac_fast.update_factor_(factor, x, beta_t, alpha_t, append_ones)
    return factor


def update_factors_(factors: Sequence[Tensor], xs: Sequence[Tensor], betas, alphas, *,
                    append_ones: Union[bool, Sequence[bool]] = False) -> list:
    """update_factor_ for L layers at once (one grouped launch on GPU); returns factors.

    factors[i]: (n_i, n_i) float32/64 contiguous, all on one device; xs[i]: (..., d_i)
    with n_i = d_i + append_ones[i]. betas, alphas: one scalar, L scalars, or a 1-D
    float tensor of length L. append_ones: a bool or L bools.
    """
    op = "update_factors_"
    factors = _tensor_list(op, "factors", factors)
    n = len(factors)
    xs = _tensor_list(op, "xs", xs, n)
    ones = _bools(op, "append_ones", append_ones, n)
    if n == 0:
        return factors
    device = factors[0].device
    for i, (f, x) in enumerate(zip(factors, xs)):
        size = _square(op, f"factors[{i}]", f)
        if not f.is_contiguous():
            raise ValueError(f"{op}: factors[{i}] must be contiguous")
        _device(op, f"factors[{i}]", f, device)
        _dtype(op, f"xs[{i}]", x, _INPUT_DTYPES)
        _device(op, f"xs[{i}]", x, device)
        if x.dim() < 1 or x.shape[-1] + int(ones[i]) != size:
            raise ValueError(f"{op}: xs[{i}] must have last dim {size - int(ones[i])} (factors[{i}] is "
                             f"{size}x{size} with append_ones={ones[i]}), got shape {tuple(x.shape)}")
    betas_t = _per_layer(op, "betas", betas, n, device)
    alphas_t = _per_layer(op, "alphas", alphas, n, device)
    torch.ops.kfac_fast.update_factors_(factors, xs, betas_t, alphas_t, ones)
    return factors


def conv_input_factor_(factor: Tensor, x: Tensor, beta: Scalar, alpha: Scalar, kernel_size, stride, padding,
                       dilation, *, append_ones: bool = False) -> Tensor:
    """Conv2d A update from its NCHW input: factor <- beta*factor + alpha * P_bar^T P_bar.

    x: (N, C, H, W) float32/16/bf16/64 (NCHW or channels-last memory). P: the N*L rows
    of `F.unfold(x, kernel_size, dilation, padding, stride)` (channel-major, then kernel
    rows, then kernel cols); P_bar = [P | 1] when append_ones. factor: (n, n) with
    n = C*kh*kw + append_ones. kernel_size, stride, padding, dilation: int or pair.
    """
    op = "conv_input_factor_"
    n = _square(op, "factor", factor)
    if not factor.is_contiguous():
        raise ValueError(f"{op}: factor must be contiguous")
    _tensor(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    _dtype(op, "x", x, _INPUT_DTYPES)
    _device(op, "x", x, factor.device)
    if not isinstance(append_ones, bool):
        raise TypeError(f"{op}: append_ones must be a bool, got {type(append_ones).__name__}")
    k = _pair(op, "kernel_size", kernel_size)
    s = _pair(op, "stride", stride)
    p = _pair(op, "padding", padding)
    d = _pair(op, "dilation", dilation)
    for name, v, low in (("kernel_size", k, 1), ("stride", s, 1), ("padding", p, 0), ("dilation", d, 1)):
        if min(v) < low:
            raise ValueError(f"{op}: {name} must be >= {low}, got {tuple(v)}")
    for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
        if size + 2 * p[axis] < d[axis] * (k[axis] - 1) + 1:
            raise ValueError(f"{op}: kernel_size {tuple(k)} (dilation {tuple(d)}) does not fit the padded "
                             f"input of x with shape {tuple(x.shape)} and padding {tuple(p)}")
    expected = x.shape[1] * k[0] * k[1] + int(append_ones)
    if expected != n:
        raise ValueError(f"{op}: factor must be {expected}x{expected} (C*kh*kw = {x.shape[1]}*{k[0]}*{k[1]}"
                         f" with append_ones={append_ones}), got {n}x{n}")
    beta_t = _scalar(op, "beta", beta, factor.device)
    alpha_t = _scalar(op, "alpha", alpha, factor.device)
    torch.ops.kfac_fast.conv_input_factor_(factor, x, beta_t, alpha_t, k, s, p, d, append_ones)
    return factor


def eigh(matrices: Sequence[Tensor], *, previous: Optional[Sequence[Optional[Tensor]]] = None,
         tol: Optional[float] = None, clamp: bool = True, return_paths: bool = False) -> tuple:
    """Batched eigendecomposition of symmetric matrices of mixed sizes.

    matrices: list of symmetric (n_i, n_i) float32/64 tensors on one device. Returns
    (eigenvalues, eigenvectors): lists of (n_i,) ascending and (n_i, n_i) orthonormal
    columns with M_i = Q_i diag(d_i) Q_i^T, dtype of M_i; eigenvalues clamped at 0 when
    clamp. fp32 failures are retried in float64; never NaN for a finite input.
    previous: None or, per matrix, its last eigenvectors (or None); with tol (>= 0, the
    off-diagonal ratio ||offdiag(Q^T M Q)||_F / ||M||_F) a warm refresh
    (`kfac_fast.warm_eigh`): each previous basis is kept, refined by Jacobi/rotation
    steps, or replaced by a full solve; the result always meets r <= tol with
    ||Q^T Q - I||_F <= warm_eigh.default_ortho_tol(n, dtype).
    return_paths (keyword-only): return (eigenvalues, eigenvectors, paths) instead, paths
    a CPU int64 tensor with one entry per matrix indexing EIGH_PATHS ("kept", "refined",
    "full"); a cold solve (no previous or no tol) is all "full".
    """
    op = "eigh"
    matrices = _tensor_list(op, "matrices", matrices)
    n = len(matrices)
    prev = [] if previous is None else _tensor_list(op, "previous", previous, n, optional=True)
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"{op}: tol must be a float or None, got {type(tol).__name__}")
        _check_scalar_value(op, "tol", float(tol), "nonneg")
        tol = float(tol)
    if not isinstance(clamp, bool):
        raise TypeError(f"{op}: clamp must be a bool, got {type(clamp).__name__}")
    if not isinstance(return_paths, bool):
        raise TypeError(f"{op}: return_paths must be a bool, got {type(return_paths).__name__}")
    if n == 0:
        return ([], [], torch.zeros(0, dtype=torch.int64)) if return_paths else ([], [])
    device = matrices[0].device
    for i, m in enumerate(matrices):
        size = _square(op, f"matrices[{i}]", m)
        _device(op, f"matrices[{i}]", m, device)
        if prev and prev[i] is not None:
            _dtype(op, f"previous[{i}]", prev[i], _FACTOR_DTYPES)
            _shape(op, f"previous[{i}]", prev[i], (size, size), f"matrices[{i}] is {size}x{size}")
            _device(op, f"previous[{i}]", prev[i], device)
    vals, vecs, paths = torch.ops.kfac_fast.eigh(matrices, prev, tol, clamp)
    return (list(vals), list(vecs), paths) if return_paths else (list(vals), list(vecs))


def damped_inverse(matrices: Sequence[Tensor], damping) -> list:
    """(M_i + damping_i I)^-1 for symmetric PSD (n_i, n_i) float32/64 matrices on one device.

    damping: one scalar >= 0, L scalars, or a 1-D tensor of length L. Batched Cholesky
    by size bucket with a fallback (symmetrise, more damping, eigh): never NaN for a
    finite PSD input with damping > 0. Returns a list of new (n_i, n_i) tensors.
    """
    op = "damped_inverse"
    matrices = _tensor_list(op, "matrices", matrices)
    if not matrices:
        return []
    device = matrices[0].device
    for i, m in enumerate(matrices):
        _square(op, f"matrices[{i}]", m)
        _device(op, f"matrices[{i}]", m, device)
    damping_t = _per_layer(op, "damping", damping, len(matrices), device, "nonneg")
    return list(torch.ops.kfac_fast.damped_inverse(matrices, damping_t))


def pi_damping(a: Tensor, g: Tensor, damping: Scalar) -> tuple:
    """(pi*gamma, gamma/pi): the damping for A and for G under factored Tikhonov damping.

    a, g: square float32/64 factors on one device. gamma = sqrt(damping) (damping >= 0),
    pi = sqrt((tr a / dim a) / (tr g / dim g)), 1 when either trace is not positive or
    not finite. Returns two 0-dim tensors with a's dtype and device (no host sync).
    """
    op = "pi_damping"
    _square(op, "a", a)
    _square(op, "g", g)
    _device(op, "g", g, a.device)
    damping_t = _scalar(op, "damping", damping, a.device, "nonneg")
    da, dg = torch.ops.kfac_fast.pi_damping(a, g, damping_t)
    return da, dg


def _check_eigen_layers(op: str, n: int, qa, da, qg, dg, device) -> tuple:
    """Validate per-layer eigenbases; returns the lists and [(d_out, n_a)] per layer."""
    qa = _tensor_list(op, "qa", qa, n)
    qg = _tensor_list(op, "qg", qg, n)
    da = None if da is None else _tensor_list(op, "da", da, n)
    dg = None if dg is None else _tensor_list(op, "dg", dg, n)
    dims = []
    for i in range(n):
        n_a = _square(op, f"qa[{i}]", qa[i])
        d_out = _square(op, f"qg[{i}]", qg[i])
        _device(op, f"qa[{i}]", qa[i], device)
        _device(op, f"qg[{i}]", qg[i], device)
        for name, vec, size in (("da", da, n_a), ("dg", dg, d_out)):
            if vec is not None:
                _dtype(op, f"{name}[{i}]", vec[i], _FACTOR_DTYPES)
                _shape(op, f"{name}[{i}]", vec[i], (size,))
                _device(op, f"{name}[{i}]", vec[i], device)
        dims.append((d_out, n_a))
    return qa, da, qg, dg, dims


def _check_grads(op: str, grads, dims, device, name: str = "grads") -> None:
    for i, (g, shape) in enumerate(zip(grads, dims)):
        _dtype(op, f"{name}[{i}]", g, _INPUT_DTYPES)
        _shape(op, f"{name}[{i}]", g, shape, "(d_out, n_a) of the layer's factors")
        _device(op, f"{name}[{i}]", g, device)


def _check_inplace_grads(op: str, weight_grads, bias_grads, dims, device) -> tuple:
    """Validate weight/bias grads against per-layer (d_out, n_a); returns split bias lists."""
    weight_grads = _tensor_list(op, "weight_grads", weight_grads, len(dims))
    present, has_bias = _bias_split(op, weight_grads, bias_grads)
    bias = list(bias_grads)
    for i, (w, (d_out, n_a)) in enumerate(zip(weight_grads, dims)):
        _dtype(op, f"weight_grads[{i}]", w, _INPUT_DTYPES)
        _device(op, f"weight_grads[{i}]", w, device)
        if w.dim() < 2 or w.shape[0] != d_out:
            raise ValueError(f"{op}: weight_grads[{i}] must have shape (d_out={d_out}, ...), got {tuple(w.shape)}")
        d_in = w[0].numel()
        if d_in + int(has_bias[i]) != n_a:
            raise ValueError(f"{op}: weight_grads[{i}] has d_in={d_in} and bias_grads[{i}] is "
                             f"{'set' if has_bias[i] else 'None'}, so the A-side matrices must be "
                             f"{d_in + int(has_bias[i])}x{d_in + int(has_bias[i])}; they are {n_a}x{n_a}")
        if bias[i] is not None:
            _dtype(op, f"bias_grads[{i}]", bias[i], _INPUT_DTYPES)
            _shape(op, f"bias_grads[{i}]", bias[i], (d_out,))
            _device(op, f"bias_grads[{i}]", bias[i], device)
    return weight_grads, present, has_bias


def _kl_args(op: str, lr, kl_clip, device) -> tuple:
    if kl_clip is None:
        lr_t = None if lr is None else _scalar(op, "lr", lr, device, "positive")
        return lr_t, None
    if lr is None:
        raise ValueError(f"{op}: lr is required when kl_clip is given")
    return _scalar(op, "lr", lr, device, "positive"), _scalar(op, "kl_clip", kl_clip, device, "positive")


def _nonempty(op: str, name: str, items: list) -> None:
    if not items:
        raise ValueError(f"{op}: {name} must not be empty (nu needs a device)")


def precondition_eigen(grads: Sequence[Tensor], qa, da, qg, dg, damping) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (d_G d_A^T + damping_i)]Q_A^T for each layer.

    grads[i]: (d_out, n_a) dW_bar; qa[i] (n_a, n_a), da[i] (n_a,), qg[i] (d_out, d_out),
    dg[i] (d_out,) float32/64; damping >= 0 per-layer rule. Returns new (d_out, n_a)
    tensors with grads[i]'s dtype (computed in the factors' dtype).
    """
    op = "precondition_eigen"
    grads = _tensor_list(op, "grads", grads)
    if not grads:
        return []
    device = grads[0].device
    qa, da, qg, dg, dims = _check_eigen_layers(op, len(grads), qa, da, qg, dg, device)
    _check_grads(op, grads, dims, device)
    damping_t = _per_layer(op, "damping", damping, len(grads), device, "nonneg")
    return list(torch.ops.kfac_fast.precondition_eigen(grads, qa, da, qg, dg, damping_t))


def precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None, kl_clip=None) -> Tensor:
    """In place: weight_grads[i] <- nu * P_i[:, :d_in], bias_grads[i] <- nu * P_i[:, -1].

    weight_grads[i]: (d_out, ...) (Linear (d_out, d_in), Conv2d (d_out, C, kh, kw));
    bias_grads[i]: (d_out,) or None (then qa[i] is d_in x d_in). P as in
    precondition_eigen. nu = 1 without kl_clip; with kl_clip (lr required)
    nu = min(1, sqrt(kl_clip / |sum_i lr^2 sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))|)).
    Returns nu: 0-dim on the grads' device, float32 (float64 for float64 grads).
    """
    op = "precondition_eigen_"
    weight_grads = _tensor_list(op, "weight_grads", weight_grads)
    _nonempty(op, "weight_grads", weight_grads)
    device = weight_grads[0].device
    n = len(weight_grads)
    qa, da, qg, dg, dims = _check_eigen_layers(op, n, qa, da, qg, dg, device)
    weight_grads, present, has_bias = _check_inplace_grads(op, weight_grads, bias_grads, dims, device)
    damping_t = _per_layer(op, "damping", damping, n, device, "nonneg")
    lr_t, kl_t = _kl_args(op, lr, kl_clip, device)
    return torch.ops.kfac_fast.precondition_eigen_(weight_grads, present, has_bias, qa, da, qg, dg, damping_t,
                                                   lr_t, kl_t)


def _check_inverse_layers(op: str, n: int, a_inv, g_inv, device) -> tuple:
    a_inv = _tensor_list(op, "a_inv", a_inv, n)
    g_inv = _tensor_list(op, "g_inv", g_inv, n)
    dims = []
    for i in range(n):
        n_a = _square(op, f"a_inv[{i}]", a_inv[i])
        d_out = _square(op, f"g_inv[{i}]", g_inv[i])
        _device(op, f"a_inv[{i}]", a_inv[i], device)
        _device(op, f"g_inv[{i}]", g_inv[i], device)
        dims.append((d_out, n_a))
    return a_inv, g_inv, dims


def precondition_inverse(grads: Sequence[Tensor], a_inv, g_inv) -> list:
    """P_i = G_inv_i dW_bar_i A_inv_i; grads[i] (d_out, n_a), a_inv[i] (n_a, n_a),
    g_inv[i] (d_out, d_out) float32/64. Returns new tensors with grads[i]'s dtype."""
    op = "precondition_inverse"
    grads = _tensor_list(op, "grads", grads)
    if not grads:
        return []
    device = grads[0].device
    a_inv, g_inv, dims = _check_inverse_layers(op, len(grads), a_inv, g_inv, device)
    _check_grads(op, grads, dims, device)
    return list(torch.ops.kfac_fast.precondition_inverse(grads, a_inv, g_inv))


def precondition_inverse_(weight_grads, bias_grads, a_inv, g_inv, *, lr=None, kl_clip=None) -> Tensor:
    """In place: .grad <- nu * G_inv dW_bar A_inv (bias = last column), KL clip with
    <P, dW_bar> = sum(P * dW_bar). Grads and nu as in precondition_eigen_."""
    op = "precondition_inverse_"
    weight_grads = _tensor_list(op, "weight_grads", weight_grads)
    _nonempty(op, "weight_grads", weight_grads)
    device = weight_grads[0].device
    a_inv, g_inv, dims = _check_inverse_layers(op, len(weight_grads), a_inv, g_inv, device)
    weight_grads, present, has_bias = _check_inplace_grads(op, weight_grads, bias_grads, dims, device)
    lr_t, kl_t = _kl_args(op, lr, kl_clip, device)
    return torch.ops.kfac_fast.precondition_inverse_(weight_grads, present, has_bias, a_inv, g_inv, lr_t, kl_t)


def ekfac_scales_(scales, xs, gs, qa, qg, beta, alpha) -> list:
    """S_i <- beta_i S_i + alpha_i * sum_n (Q_G^T dW_bar_n Q_A)^2, in place; returns scales.

    scales[i]: (d_out, n_a) float32/64; xs[i]: (N, d_in) or (N, L, d_in) inputs,
    gs[i]: (N, d_out) or (N, L, d_out) scaled output gradients (same leading dims);
    dW_bar_n = sum_l d_{n,l} a_bar_{n,l}^T with the ones-column appended exactly when
    qa[i] is (d_in+1)^2. beta, alpha: per-layer rule (fold 1/N into alpha).
    """
    op = "ekfac_scales_"
    scales = _tensor_list(op, "scales", scales)
    n = len(scales)
    xs = _tensor_list(op, "xs", xs, n)
    gs = _tensor_list(op, "gs", gs, n)
    if n == 0:
        return scales
    device = scales[0].device
    qa, _, qg, _, dims = _check_eigen_layers(op, n, qa, None, qg, None, device)
    for i in range(n):
        d_out, n_a = dims[i]
        x, g = xs[i], gs[i]
        _dtype(op, f"scales[{i}]", scales[i], _FACTOR_DTYPES)
        _shape(op, f"scales[{i}]", scales[i], (d_out, n_a), "(d_out, n_a) of qg[i], qa[i]")
        _device(op, f"scales[{i}]", scales[i], device)
        for name, t in (("xs", x), ("gs", g)):
            _dtype(op, f"{name}[{i}]", t, _INPUT_DTYPES)
            _device(op, f"{name}[{i}]", t, device)
            if t.dim() not in (2, 3):
                raise ValueError(f"{op}: {name}[{i}] must be (N, d) or (N, L, d), got shape {tuple(t.shape)}")
        if x.dim() != g.dim() or x.shape[:-1] != g.shape[:-1]:
            raise ValueError(f"{op}: gs[{i}] must have the leading dims of xs[{i}] {tuple(x.shape[:-1])}, "
                             f"got {tuple(g.shape[:-1])}")
        if g.shape[-1] != d_out:
            raise ValueError(f"{op}: gs[{i}] must have last dim {d_out} (qg[{i}] is {d_out}x{d_out}), "
                             f"got {g.shape[-1]}")
        if n_a not in (x.shape[-1], x.shape[-1] + 1):
            raise ValueError(f"{op}: qa[{i}] is {n_a}x{n_a}, so xs[{i}] must have last dim {n_a} or {n_a - 1}, "
                             f"got {x.shape[-1]}")
    beta_t = _per_layer(op, "beta", beta, n, device)
    alpha_t = _per_layer(op, "alpha", alpha, n, device)
    torch.ops.kfac_fast.ekfac_scales_(scales, xs, gs, qa, qg, beta_t, alpha_t)
    return scales


def _check_scales(op: str, scales, dims, device) -> list:
    scales = _tensor_list(op, "scales", scales, len(dims))
    for i, (s, shape) in enumerate(zip(scales, dims)):
        _dtype(op, f"scales[{i}]", s, _FACTOR_DTYPES)
        _shape(op, f"scales[{i}]", s, shape, "(d_out, n_a) of qg[i], qa[i]")
        _device(op, f"scales[{i}]", s, device)
    return scales


def precondition_ekfac(grads: Sequence[Tensor], qa, qg, scales, damping) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (S_i + damping_i)]Q_A^T; shapes as precondition_eigen,
    scales[i] (d_out, n_a). Returns new tensors with grads[i]'s dtype."""
    op = "precondition_ekfac"
    grads = _tensor_list(op, "grads", grads)
    if not grads:
        return []
    device = grads[0].device
    qa, _, qg, _, dims = _check_eigen_layers(op, len(grads), qa, None, qg, None, device)
    _check_grads(op, grads, dims, device)
    scales = _check_scales(op, scales, dims, device)
    damping_t = _per_layer(op, "damping", damping, len(grads), device, "nonneg")
    return list(torch.ops.kfac_fast.precondition_ekfac(grads, qa, qg, scales, damping_t))


def precondition_ekfac_(weight_grads, bias_grads, qa, qg, scales, damping, *, lr=None, kl_clip=None) -> Tensor:
    """In place EKFAC: .grad <- nu * P, KL clip with sum((Q_G^T dW_bar Q_A)^2 / (S + damping)).
    Grads and nu as in precondition_eigen_."""
    op = "precondition_ekfac_"
    weight_grads = _tensor_list(op, "weight_grads", weight_grads)
    _nonempty(op, "weight_grads", weight_grads)
    device = weight_grads[0].device
    n = len(weight_grads)
    qa, _, qg, _, dims = _check_eigen_layers(op, n, qa, None, qg, None, device)
    weight_grads, present, has_bias = _check_inplace_grads(op, weight_grads, bias_grads, dims, device)
    scales = _check_scales(op, scales, dims, device)
    damping_t = _per_layer(op, "damping", damping, n, device, "nonneg")
    lr_t, kl_t = _kl_args(op, lr, kl_clip, device)
    return torch.ops.kfac_fast.precondition_ekfac_(weight_grads, present, has_bias, qa, qg, scales, damping_t,
                                                   lr_t, kl_t)


def kl_clip_scale(grads: Sequence[Tensor], precond_grads: Sequence[Tensor], lr: Scalar, kl_clip: Scalar) -> Tensor:
    """nu = min(1, sqrt(kl_clip / |sum_i lr^2 <P_i, g_i>|)) (1 when the sum is 0).

    grads[i], precond_grads[i]: tensors of equal shape on one device; lr, kl_clip > 0.
    Returns a 0-dim tensor on the grads' device, float32 (float64 for float64 grads).
    """
    op = "kl_clip_scale"
    grads = _tensor_list(op, "grads", grads)
    _nonempty(op, "grads", grads)
    precond = _tensor_list(op, "precond_grads", precond_grads, len(grads))
    device = grads[0].device
    for i, (g, p) in enumerate(zip(grads, precond)):
        _dtype(op, f"grads[{i}]", g, _INPUT_DTYPES)
        _dtype(op, f"precond_grads[{i}]", p, _INPUT_DTYPES)
        _device(op, f"grads[{i}]", g, device)
        _device(op, f"precond_grads[{i}]", p, device)
        _shape(op, f"precond_grads[{i}]", p, tuple(g.shape), f"the shape of grads[{i}]")
    lr_t = _scalar(op, "lr", lr, device, "positive")
    kl_t = _scalar(op, "kl_clip", kl_clip, device, "positive")
    return torch.ops.kfac_fast.kl_clip_scale(grads, precond, lr_t, kl_t)


def _check_factors(op: str, factors) -> list:
    factors = _tensor_list(op, "factors", factors)
    if not factors:
        raise ValueError(f"{op}: factors must not be empty")
    for i, f in enumerate(factors):
        _square(op, f"factors[{i}]", f, dtypes=_INPUT_DTYPES)
        _device(op, f"factors[{i}]", f, factors[0].device)
    return factors


def pack_triangles(factors: Sequence[Tensor]) -> Tensor:
    """Upper triangles (row-major order of torch.triu_indices(n, n)) of every (n_i, n_i)
    factor in one 1-D tensor of length sum n_i(n_i+1)/2, dtype/device of factors[0]."""
    factors = _check_factors("pack_triangles", factors)
    return torch.ops.kfac_fast.pack_triangles(factors)


def unpack_triangles_(factors: Sequence[Tensor], flat: Tensor) -> list:
    """Write pack_triangles' layout back into both triangles of each factor; returns factors.

    flat: 1-D with exactly sum n_i(n_i+1)/2 entries, on the factors' device.
    """
    op = "unpack_triangles_"
    factors = _check_factors(op, factors)
    _tensor(op, "flat", flat)
    _dtype(op, "flat", flat, _INPUT_DTYPES)
    _device(op, "flat", flat, factors[0].device)
    total = sum(f.shape[0] * (f.shape[0] + 1) // 2 for f in factors)
    if flat.dim() != 1 or flat.shape[0] != total:
        raise ValueError(f"{op}: flat must be 1-D with {total} entries (sum n(n+1)/2 of the factors), "
                         f"got shape {tuple(flat.shape)}")
    torch.ops.kfac_fast.unpack_triangles_(factors, flat)
    return factors


# The op names are listed once, in _dispatch.OP_NAMES.
__all__ = [*OP_NAMES, "EIGH_PATHS"]
