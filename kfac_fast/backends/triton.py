"""The "triton" backend: the launchers of `kfac_fast.kernels`, and what they cannot serve.

A launcher never falls back to another implementation: each row's refusal rule names
the calls its kernel does not handle (float64 factors or eigenbases, mixed gradient
dtypes, weight grads no view flattens, empty layer lists) and the router sends those to
the next backend. Importing this module does not import Triton; the router checks that
Triton imports before it uses a row.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from kfac_fast import _dispatch
from kfac_fast.kernels.guard import offsets_fit

from .cost import MODEL, triton_slower

_KERNELS = "kfac_fast.kernels"

def _missing() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _fp32(call: _dispatch.Call) -> Optional[str]:
    """CUDA tensors with float32 factors/eigenvectors (float64 ones stay on the reference)."""
    why = _dispatch.on_cuda(call)
    if why is None and call.dtype is not None and call.dtype != torch.float32:
        why = f"serves float32 factors/eigenvectors only (got {call.dtype})"
    return why


def _not_fp32(tensors) -> Optional[str]:
    dtypes = {t.dtype for t in tensors} - {torch.float32}
    return f"serves float32 factors/eigenvectors only (got {sorted(map(str, dtypes))[0]})" if dtypes else None


def _factors_fp32(call: _dispatch.Call) -> Optional[str]:
    """_fp32, for every factor of a grouped update."""
    return _fp32(call) or (None if call.args is None else _not_fp32(call.args[0]))


def _one_grad_dtype(grads) -> Optional[str]:
    dtypes = {g.dtype for g in grads if g is not None}
    return None if len(dtypes) == 1 else f"needs one gradient dtype for all layers (got {len(dtypes)})"


def _grouped_eigen(call: _dispatch.Call) -> Optional[str]:
    """_fp32 for every eigenbasis, one gradient dtype, at least one layer."""
    why = _fp32(call)
    if why is not None or call.args is None:
        return why
    grads, qa, da, qg, dg = call.args[:5]
    return _one_grad_dtype(grads) or _not_fp32([*qa, *da, *qg, *dg]) or offsets_fit(grads, qa, qg)


def _grouped_eigen_inplace(call: _dispatch.Call) -> Optional[str]:
    """_grouped_eigen, and weight grads that a view flattens to (d_out, -1)."""
    why = _fp32(call)
    if why is not None or call.args is None:
        return why
    weight_grads, bias_grads, qa, da, qg, dg = call.args[:6]
    for i, w in enumerate(weight_grads):
        try:
            w.view(w.shape[0], -1)
        except RuntimeError:
            return f"weight_grads[{i}] cannot be viewed as (d_out, -1) without a copy"
    return (_one_grad_dtype([*weight_grads, *bias_grads]) or _not_fp32([*qa, *da, *qg, *dg])
            or offsets_fit(weight_grads, qa, qg))


_dispatch.register_backend("triton", preference=1, missing=_missing)
_dispatch.register("update_factor_", "triton", f"{_KERNELS}.factor_update:update_factor_", refuses=_fp32)
_dispatch.register("update_factors_", "triton", f"{_KERNELS}.factor_update_grouped:update_factors_",
                   refuses=_factors_fp32)
_dispatch.register("conv_input_factor_", "triton", f"{_KERNELS}.conv_factor:conv_input_factor_", refuses=_fp32)


def _cheaper(op: str, rule: _dispatch.Refusal) -> _dispatch.Refusal:
    """`rule`, then the cost model (`backends/cost.py`) against the cuda backend when that
    one can run here: Triton serves the call only where it is modelled no slower."""
    def refuses(call: _dispatch.Call) -> Optional[str]:
        why = rule(call)
        if why is None and _dispatch.backend_unavailable("cuda") is None:
            why = triton_slower(op, call.args, call.kwargs)
        return why
    refuses.__doc__ = rule.__doc__
    return refuses


# Ahead of the cuda backend (preference -0.5) but only where the cost model says so: the
# grouped kernels take five launches for all layers, cuda's per-layer GEMMs 6 per layer.
# Modelled, not measured (no GPU yet); bench/bench_triton.py checks it on the next GPU run.
_EIGEN_NOTE = f"per call, triton vs cuda by the {MODEL}"
_dispatch.register("precondition_eigen", "triton", f"{_KERNELS}.precondition:precondition_eigen",
                   refuses=_cheaper("precondition_eigen", _grouped_eigen), preference=-0.5, note=_EIGEN_NOTE)
_dispatch.register("precondition_eigen_", "triton", f"{_KERNELS}.precondition:precondition_eigen_",
                   refuses=_cheaper("precondition_eigen_", _grouped_eigen_inplace), preference=-0.5,
                   note=_EIGEN_NOTE)
