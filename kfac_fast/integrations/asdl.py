"""Run ASDL's (`asdfghjkl` on PyPI, module `asdl`) `KfacGradientMaker` on kfac_fast ops.

    import asdl
    from kfac_fast.integrations.asdl import accelerate, deaccelerate, accelerated
    gm = accelerate(asdl.KfacGradientMaker(model, config))  # same object

ASDL's semantics are kept: Kronecker factors A (inputs, no ones column) and B (output
gradients) as ASDL accumulates them; its factored Tikhonov damping
pi = sqrt((tr A / dim A) / (tr B / dim B)), damping_A = max(sqrt(damping) pi, 1e-7),
damping_B = max(sqrt(damping) / pi, 1e-7) (both `damping` when pi is 0 or inf); an
all-zero factor keeps its previous inverse; weight grads <- B^-1 dW A^-1 and bias
grads <- B^-1 db (the bias is not folded into A); `grad_scale` applied first.

Patched internals (instance attributes shadowing the class methods, removed by
`deaccelerate`; tested with asdfghjkl 0.1a5): `update_preconditioner` and
`precondition`. With their default arguments, in one process and with curvature
accumulation (`config.ema_decay` set), all square Kron factors are inverted in one
`ops.damped_inverse` call (per-matrix damping computed on the device, one host sync to
skip all-zero factors) and all K-FAC layers are preconditioned in one
`ops.precondition_inverse_` call, in place on `.grad`. Other module shapes
(unit-wise BatchNorm/LayerNorm, diagonal, full) and other arguments go to ASDL's code.
Factor computation stays ASDL's (its hooks build A and B per layer).

Not supported: `EkfacGradientMaker` of asdfghjkl 0.1a5 never preconditions (its
overrides are named `_precondition`/`_update_preconditioner`, so the base
`precondition` finds no inverse and leaves `.grad` unchanged), so there are no
semantics to keep; `accelerate` refuses it with that reason.
"""
from __future__ import annotations

import torch

from .. import ops
from ._patching import accelerated_context, is_accelerated, restore_attributes, save_attributes, set_record, take_record

__all__ = ["accelerate", "deaccelerate", "accelerated", "is_accelerated", "TESTED_VERSIONS"]

TESTED_VERSIONS = ("0.1a5",)
_EPS = 1e-7  # ASDL's Kron.update_inv floor on each factor's damping
_METHODS = ("update_preconditioner", "precondition")


def _asdl():
    try:
        import asdl
        import asdl.precondition.natural_gradient as ng
        import asdl.symmatrix as sm
    except ImportError as exc:  # pragma: no cover - exercised only without asdl
        raise ImportError("kfac_fast.integrations.asdl needs ASDL (pip install asdfghjkl)") from exc
    return asdl, ng, sm


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


def _assigned(gm):
    """(shape, module) pairs this rank inverts and preconditions, in ASDL's order."""
    _, ng, _ = _asdl()
    for enum_shape, shape in enumerate(ng._module_level_shapes):
        for enum_module, module in enumerate(gm.modules_for(shape)):
            if (gm.world_rank == gm.partitions[enum_shape][enum_module]
                    and gm.is_module_for_inv_and_precondition(module)):
                yield shape, module


def _is_square_kron(matrix, sm) -> bool:
    return (isinstance(matrix, sm.Kron) and matrix.has_A and matrix.has_B
            and matrix.A_is_square and matrix.B_is_square)


def _pi_dampings(krons, damping: float) -> tuple:
    """ASDL's per-factor damping for every Kron at once, on the device (no sync)."""
    mean_a = torch.stack([k.A.diagonal().sum() / k.A.shape[0] for k in krons])
    mean_b = torch.stack([k.B.diagonal().sum() / k.B.shape[0] for k in krons])
    pi = torch.sqrt(mean_a / mean_b)
    ok = (pi != 0) & (pi != float("inf"))
    r = damping ** 0.5
    fallback = torch.full_like(pi, damping)
    return (torch.where(ok, torch.clamp(r * pi, min=_EPS), fallback),
            torch.where(ok, torch.clamp(r / pi, min=_EPS), fallback))


def _invert_krons(krons, damping: float) -> None:
    if not krons:
        return
    damp_a, damp_b = _pi_dampings(krons, damping)
    mats = [k.A for k in krons] + [k.B for k in krons]
    damps = torch.cat([damp_a, damp_b])
    # ASDL leaves an all-zero factor's inverse as it was: one sync on a refresh step.
    nonzero = torch.stack([m.ne(0).any() for m in mats]).tolist()
    keep = [i for i, flag in enumerate(nonzero) if flag]
    if not keep:
        return
    inv = ops.damped_inverse([mats[i] for i in keep], damps[keep])
    for i, m_inv in zip(keep, inv):
        if i < len(krons):
            krons[i].A_inv = m_inv
        else:
            krons[i - len(krons)].B_inv = m_inv


def _make_update_preconditioner(gm, original):
    _, _, sm = _asdl()

    def update_preconditioner(damping=None, module_name=None, kron=None, zero_curvature=False,
                              partition_aware=False):
        default = (module_name is None and kron in (None, ["A", "B"]) and not zero_curvature
                   and not partition_aware)
        if not gm.do_accumulate or not default or not _single_process():
            return original(damping=damping, module_name=module_name, kron=kron,
                            zero_curvature=zero_curvature, partition_aware=partition_aware)
        if damping is None:
            damping = gm.config.damping
        krons = []
        for shape, module in _assigned(gm):
            matrix = gm._get_module_symmatrix(module, shape)
            if matrix is None:
                continue
            if _is_square_kron(matrix, sm):
                krons.append(matrix)
            else:
                matrix.update_inv(damping)
        _invert_krons(krons, damping)
        fisher = gm._get_full_fisher()
        if fisher is not None:
            fisher.update_inv(damping)

    return update_preconditioner


def _kron_grads(module):
    """(weight grad, bias grad or None) as ASDL's _precondition_module picks them, or
    None when the module needs ASDL's own path (weight without grad)."""
    if not module.weight.requires_grad or module.weight.grad is None:
        return None
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        if bias.grad is None:
            return None
        return module.weight.grad, bias.grad
    return module.weight.grad, None


def _make_precondition(gm, original):
    _, ng, sm = _asdl()

    def precondition(vectors=None, grad_scale=None, use_inv=True):
        if vectors is not None or not use_inv or not _single_process():
            return original(vectors=vectors, grad_scale=grad_scale, use_inv=use_inv)
        if grad_scale is None:
            grad_scale = gm.grad_scale
        weights, a_inv, b_inv, biases, bias_b_inv = [], [], [], [], []
        for shape, module in _assigned(gm):
            matrix = gm._get_module_symmatrix(module, shape)
            grads = _kron_grads(module)
            if not isinstance(matrix, sm.Kron) or grads is None:
                gm._precondition_module(module, shape, grad_scale=grad_scale, use_inv=use_inv)
                continue
            if not matrix.has_inv:
                continue  # ASDL skips a module whose inverse is not there yet
            weight, bias = grads
            weights.append(weight)
            a_inv.append(matrix.A_inv)
            b_inv.append(matrix.B_inv)
            if bias is not None:
                biases.append(bias)
                bias_b_inv.append(matrix.B_inv)
        if weights:
            if grad_scale != 1:
                torch._foreach_mul_(weights + biases, grad_scale)
            # A bias is a one-column layer whose A-side inverse is 1: B^-1 db.
            one = [torch.ones(1, 1, dtype=m.dtype, device=m.device) for m in bias_b_inv]
            ops.precondition_inverse_(weights + [b.view(-1, 1) for b in biases], [None] * (len(weights) + len(biases)),
                                      a_inv + one, b_inv + bias_b_inv)
        _precondition_full(gm, ng, grad_scale, use_inv)

    return precondition


def _precondition_full(gm, ng, grad_scale, use_inv) -> None:
    """ASDL's SHAPE_FULL branch of precondition (whole-model Fisher), unchanged."""
    params = list(gm.parameters_for(ng.SHAPE_FULL))
    if not params:
        return
    fisher = gm._get_full_fisher()
    if fisher is None:
        raise ValueError(f"Fisher of shape {ng.SHAPE_FULL} has not been calculated.")
    vectors = ng.ParamVector(params, [p.grad for p in params])
    if grad_scale != 1:
        vectors.mul_(grad_scale)
    fisher.mvp(vectors=vectors, use_inv=use_inv, inplace=True)


def accelerate(gm):
    """Route an ASDL KfacGradientMaker's inversions and preconditioning through kfac_fast;
    returns the same object. Accelerating twice is a no-op."""
    if is_accelerated(gm):
        return gm
    asdl, ng, _ = _asdl()
    if isinstance(gm, ng.EkfacGradientMaker):
        raise ValueError("accelerate: asdfghjkl's EkfacGradientMaker never preconditions (its overrides are "
                         "named _precondition/_update_preconditioner), so there is nothing to keep exact")
    if not isinstance(gm, ng.NaturalGradientMaker):
        raise TypeError(f"accelerate: expected an asdl.KfacGradientMaker, got {type(gm).__name__}")
    for attr in ("partitions", "world_rank", "modules_for", "_get_module_symmatrix", "do_accumulate"):
        if not hasattr(gm, attr):
            raise TypeError(f"accelerate: this ASDL version has no {attr!r} on its gradient maker "
                            f"(tested with {', '.join(TESTED_VERSIONS)})")
    saved = save_attributes(gm, _METHODS)
    gm.update_preconditioner = _make_update_preconditioner(gm, gm.update_preconditioner)
    gm.precondition = _make_precondition(gm, gm.precondition)
    set_record(gm, saved)
    return gm


def deaccelerate(gm):
    """Undo `accelerate` (the state lives in ASDL's own Kron objects: nothing to convert)."""
    saved = take_record(gm)
    if saved is not None:
        restore_attributes(gm, saved)
    return gm


accelerated = accelerated_context(
    accelerate, deaccelerate, "`with accelerated(gm): ...` accelerates for the block, then restores.")
