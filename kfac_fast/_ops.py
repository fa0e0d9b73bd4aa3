"""The op schemas: `torch.ops.kfac_fast.<name>` as `torch.library` custom ops.

Each op's body asks the router (`kfac_fast._dispatch.select`) which implementation
serves the call and runs it; its fake implementation gives `torch.compile` the output
layouts. No math and no validation here: `kfac_fast.ops` validates and normalises the
arguments first (see its docstring for what every implementation receives).

A bias list with None entries crosses the custom-op boundary as the list of present
bias tensors plus a `has_bias` list of bools (torch.compile cannot functionalise a
mutated `Tensor?[]` holding None); implementations see the public form again.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _dispatch

Tensor = torch.Tensor

# Every op of kfac_fast, once: the public wrappers, the schemas and the torch reference
# all follow this list.
OP_NAMES = (
    "update_factor_", "update_factors_", "conv_input_factor_", "eigh", "damped_inverse",
    "pi_damping", "precondition_eigen", "precondition_eigen_", "precondition_inverse",
    "precondition_inverse_", "ekfac_scales_", "precondition_ekfac", "precondition_ekfac_",
    "kl_clip_scale", "pack_triangles", "unpack_triangles_",
)

_LIB = "kfac_fast::"


def _run(op: str, lead: Tensor, size: int, *args, **kwargs):
    """Call the implementation the router picks for `lead`'s device and dtype at `size`."""
    call = _dispatch.Call(lead.device, lead.dtype, size, args, kwargs)
    return _dispatch.select(op, call)[1](*args, **kwargs)


def _max_size(tensors: Sequence[Tensor]) -> int:
    return max((t.shape[0] for t in tensors), default=0)


def _bias_join(bias_grads: list, has_bias: list) -> list:
    """The public bias list (None where a layer has no bias) from the boundary form."""
    present = iter(bias_grads)
    return [next(present) if has else None for has in has_bias]


def _precision(precision: Optional[str]) -> dict:
    """The `precision` keyword for the implementation, only when the caller set it (the
    reference computes in float64/IEEE whatever it says; Triton and CUDA take "tf32")."""
    return {} if precision is None else {"precision": precision}


def nu_dtype(t: Tensor) -> torch.dtype:
    """The dtype of nu, the KL-clip scale the in-place preconditioners return: float32 for
    16-/32-bit grads, float64 for float64 grads (every backend follows this rule)."""
    return torch.promote_types(t.dtype, torch.float32)


def _nu_like(t: Tensor) -> Tensor:
    """Fake nu: 0-dim, `nu_dtype`, on the grads' device."""
    return t.new_empty((), dtype=nu_dtype(t))


def _like_each(tensors: Sequence[Tensor]) -> list:
    return [t.new_empty(t.shape) for t in tensors]


@torch.library.custom_op(_LIB + "update_factor_", mutates_args=("factor",))
def _update_factor(factor: Tensor, x: Tensor, beta: Tensor, alpha: Tensor, append_ones: bool,
                   precision: Optional[str] = None) -> None:
    _run("update_factor_", factor, factor.shape[0], factor, x, beta, alpha, append_ones=append_ones,
         **_precision(precision))


@torch.library.custom_op(_LIB + "update_factors_", mutates_args=("factors",))
def _update_factors(factors: list[Tensor], xs: list[Tensor], betas: Tensor, alphas: Tensor,
                    append_ones: list[bool], precision: Optional[str] = None) -> None:
    _run("update_factors_", factors[0], _max_size(factors), factors, xs, betas, alphas, append_ones=append_ones,
         **_precision(precision))


@torch.library.custom_op(_LIB + "conv_input_factor_", mutates_args=("factor",))
def _conv_input_factor(factor: Tensor, x: Tensor, beta: Tensor, alpha: Tensor, kernel_size: list[int],
                       stride: list[int], padding: list[int], dilation: list[int], append_ones: bool,
                       precision: Optional[str] = None) -> None:
    _run("conv_input_factor_", factor, factor.shape[0], factor, x, beta, alpha, kernel_size, stride, padding,
         dilation, append_ones=append_ones, **_precision(precision))


@torch.library.custom_op(_LIB + "eigh", mutates_args=())
def _eigh(matrices: list[Tensor], previous: list[Optional[Tensor]], tol: Optional[float],
          clamp: bool) -> tuple[list[Tensor], list[Tensor], Tensor]:
    vals, vecs, paths = _run("eigh", matrices[0], _max_size(matrices), matrices,
                             previous=previous if len(previous) else None, tol=tol, clamp=clamp, return_paths=True)
    return list(vals), list(vecs), paths


@_eigh.register_fake
def _(matrices, previous, tol, clamp):
    # paths live on the host whatever the matrices' device: the caller reads them there
    return ([m.new_empty(m.shape[0]) for m in matrices], _like_each(matrices),
            torch.empty(len(matrices), dtype=torch.int64, device="cpu"))


@torch.library.custom_op(_LIB + "damped_inverse", mutates_args=())
def _damped_inverse(matrices: list[Tensor], damping: Tensor) -> list[Tensor]:
    return list(_run("damped_inverse", matrices[0], _max_size(matrices), matrices, damping))


@_damped_inverse.register_fake
def _(matrices, damping):
    return _like_each(matrices)


@torch.library.custom_op(_LIB + "pi_damping", mutates_args=())
def _pi_damping(a: Tensor, g: Tensor, damping: Tensor) -> tuple[Tensor, Tensor]:
    da, dg = _run("pi_damping", a, max(a.shape[0], g.shape[0]), a, g, damping)
    return da, dg


@_pi_damping.register_fake
def _(a, g, damping):
    return a.new_empty(()), a.new_empty(())


@torch.library.custom_op(_LIB + "precondition_eigen", mutates_args=())
def _precondition_eigen(grads: list[Tensor], qa: list[Tensor], da: list[Tensor], qg: list[Tensor],
                        dg: list[Tensor], damping: Tensor, precision: Optional[str] = None) -> list[Tensor]:
    return list(_run("precondition_eigen", qa[0], _max_size(qa + qg), grads, qa, da, qg, dg, damping,
                     **_precision(precision)))


@_precondition_eigen.register_fake
def _(grads, qa, da, qg, dg, damping, precision=None):
    return _like_each(grads)


@torch.library.custom_op(_LIB + "precondition_eigen_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_eigen_inplace(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                                qa: list[Tensor], da: list[Tensor], qg: list[Tensor], dg: list[Tensor],
                                damping: Tensor, lr: Optional[Tensor], kl_clip: Optional[Tensor],
                                precision: Optional[str] = None) -> Tensor:
    return _run("precondition_eigen_", qa[0], _max_size(qa + qg), weight_grads, _bias_join(bias_grads, has_bias),
                qa, da, qg, dg, damping, lr=lr, kl_clip=kl_clip, **_precision(precision))


@_precondition_eigen_inplace.register_fake
def _(weight_grads, bias_grads, has_bias, qa, da, qg, dg, damping, lr, kl_clip, precision=None):
    return _nu_like(weight_grads[0])


@torch.library.custom_op(_LIB + "precondition_inverse", mutates_args=())
def _precondition_inverse(grads: list[Tensor], a_inv: list[Tensor], g_inv: list[Tensor]) -> list[Tensor]:
    return list(_run("precondition_inverse", a_inv[0], _max_size(a_inv + g_inv), grads, a_inv, g_inv))


@_precondition_inverse.register_fake
def _(grads, a_inv, g_inv):
    return _like_each(grads)


@torch.library.custom_op(_LIB + "precondition_inverse_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_inverse_inplace(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                                  a_inv: list[Tensor], g_inv: list[Tensor], lr: Optional[Tensor],
                                  kl_clip: Optional[Tensor]) -> Tensor:
    return _run("precondition_inverse_", a_inv[0], _max_size(a_inv + g_inv), weight_grads,
                _bias_join(bias_grads, has_bias), a_inv, g_inv, lr=lr, kl_clip=kl_clip)


@_precondition_inverse_inplace.register_fake
def _(weight_grads, bias_grads, has_bias, a_inv, g_inv, lr, kl_clip):
    return _nu_like(weight_grads[0])


@torch.library.custom_op(_LIB + "ekfac_scales_", mutates_args=("scales",))
def _ekfac_scales(scales: list[Tensor], xs: list[Tensor], gs: list[Tensor], qa: list[Tensor],
                  qg: list[Tensor], beta: Tensor, alpha: Tensor) -> None:
    _run("ekfac_scales_", scales[0], _max_size(qa + qg), scales, xs, gs, qa, qg, beta, alpha)


@torch.library.custom_op(_LIB + "precondition_ekfac", mutates_args=())
def _precondition_ekfac(grads: list[Tensor], qa: list[Tensor], qg: list[Tensor], scales: list[Tensor],
                        damping: Tensor) -> list[Tensor]:
    return list(_run("precondition_ekfac", qa[0], _max_size(qa + qg), grads, qa, qg, scales, damping))


@_precondition_ekfac.register_fake
def _(grads, qa, qg, scales, damping):
    return _like_each(grads)


@torch.library.custom_op(_LIB + "precondition_ekfac_", mutates_args=("weight_grads", "bias_grads"))
def _precondition_ekfac_inplace(weight_grads: list[Tensor], bias_grads: list[Tensor], has_bias: list[bool],
                                qa: list[Tensor], qg: list[Tensor], scales: list[Tensor], damping: Tensor,
                                lr: Optional[Tensor], kl_clip: Optional[Tensor]) -> Tensor:
    return _run("precondition_ekfac_", qa[0], _max_size(qa + qg), weight_grads, _bias_join(bias_grads, has_bias),
                qa, qg, scales, damping, lr=lr, kl_clip=kl_clip)


@_precondition_ekfac_inplace.register_fake
def _(weight_grads, bias_grads, has_bias, qa, qg, scales, damping, lr, kl_clip):
    return _nu_like(weight_grads[0])


@torch.library.custom_op(_LIB + "kl_clip_scale", mutates_args=())
def _kl_clip_scale(grads: list[Tensor], precond_grads: list[Tensor], lr: Tensor, kl_clip: Tensor) -> Tensor:
    return _run("kl_clip_scale", grads[0], _max_size(grads), grads, precond_grads, lr, kl_clip)


@_kl_clip_scale.register_fake
def _(grads, precond_grads, lr, kl_clip):
    return _nu_like(grads[0])


@torch.library.custom_op(_LIB + "pack_triangles", mutates_args=())
def _pack_triangles(factors: list[Tensor]) -> Tensor:
    return _run("pack_triangles", factors[0], _max_size(factors), factors)


@_pack_triangles.register_fake
def _(factors):
    return factors[0].new_empty(sum(f.shape[0] * (f.shape[0] + 1) // 2 for f in factors))


@torch.library.custom_op(_LIB + "unpack_triangles_", mutates_args=("factors",))
def _unpack_triangles(factors: list[Tensor], flat: Tensor) -> None:
    _run("unpack_triangles_", factors[0], _max_size(factors), factors, flat)
