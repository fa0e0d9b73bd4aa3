"""Which implementation serves an op for a device, dtype and size.

Every op of `kfac_fast.ops` has a torch implementation (`kfac_fast.reference`, always
available) and may have faster ones: "triton" (`kfac_fast.kernels`) and "cuda"
(`kfac_fast._C`). An implementation has exactly the signature of its reference function
and receives arguments already validated by `kfac_fast.ops`, with scalars as 0-dim
tensors (a CPU scalar may be read on the host without a device sync).

`KFAC_FAST_BACKEND=auto|torch|triton|cuda` picks the backend. `auto` takes the first
available backend in each op's preference order and falls back silently; naming a
backend that cannot serve a call raises a RuntimeError that says why.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")


@dataclass
class _Impl:
    backend: str
    target: str  # "module:function", imported on first use
    # (device, dtype, size) -> None when it can serve the call, else the reason it cannot
    refuses: Callable[[torch.device, Optional[torch.dtype], Optional[int]], Optional[str]]
    _fn: Optional[Callable] = field(default=None, repr=False)

    def load(self) -> Callable:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn


_REGISTRY: dict[str, list[_Impl]] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it cannot be used on this machine


def _backend_missing(backend: str) -> Optional[str]:
    """Why a backend cannot be used at all on this machine (None when it can)."""
    if backend in _UNAVAILABLE:
        return _UNAVAILABLE[backend]
    why = None
    if backend == "triton":
        try:
            importlib.import_module("triton")
        except Exception as exc:  # ImportError, or a broken install
            why = f"triton is not importable ({type(exc).__name__}: {exc})"
    elif backend == "cuda":
        try:
            from kfac_fast import _C  # noqa: F401

            if not _C.build_info()["cuda"]:
                why = "kfac_fast._C was built without CUDA (no nvcc at build time, or KFAC_FAST_CUDA=0)"
        except Exception as exc:
            why = f"kfac_fast._C is not importable ({type(exc).__name__}: {exc})"
    _UNAVAILABLE[backend] = why
    return why


def _on_cuda(device, dtype, size):
    return None if device.type == "cuda" else f"runs on CUDA tensors only (got {device.type})"


def _serves_all(device, dtype, size):
    return None


# `auto` tries backends in this order unless a registration says otherwise.
_DEFAULT_PREFERENCE = {"cuda": 0, "triton": 1, "torch": 2}


def register(op: str, backend: str, target: str, refuses=_on_cuda, preference=None) -> None:
    """Add an implementation of `op`; `auto` tries lower `preference` first."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = _Impl(backend, target, refuses)
    impl.preference = _DEFAULT_PREFERENCE[backend] if preference is None else preference
    impls = _REGISTRY.setdefault(op, [])
    impls.append(impl)
    impls.sort(key=lambda i: i.preference)


def requested_backend() -> str:
    value = os.environ.get("KFAC_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"KFAC_FAST_BACKEND must be auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


def _explain(impl: _Impl, device, dtype, size) -> Optional[str]:
    return _backend_missing(impl.backend) or impl.refuses(device, dtype, size)


def select(op: str, device: torch.device, dtype=None, size=None) -> tuple[str, Callable]:
    """(backend name, implementation) that serves `op` for this call."""
    impls = _REGISTRY[op]
    wanted = requested_backend()
    if wanted == "auto":
        for impl in impls:
            if _explain(impl, device, dtype, size) is None:
                return impl.backend, impl.load()
        raise RuntimeError(f"kfac_fast: no implementation of {op} serves device {device}")
    for impl in impls:
        if impl.backend == wanted:
            why = _explain(impl, device, dtype, size)
            if why is not None:
                raise RuntimeError(f"KFAC_FAST_BACKEND={wanted}: {op} cannot use {wanted}: {why}")
            return impl.backend, impl.load()
    raise RuntimeError(f"KFAC_FAST_BACKEND={wanted}: {op} has no {wanted} implementation")


def describe(device: torch.device) -> dict[str, dict[str, str]]:
    """For each op: the backend chosen for `device` (auto rules) and why each is or is not used."""
    info = {}
    for op, impls in _REGISTRY.items():
        reasons = {}
        chosen = None
        for impl in impls:
            why = _explain(impl, device, None, None)
            if why is None and chosen is None:
                chosen = impl.backend
                reasons[impl.backend] = "used: first available in preference order"
            elif why is None:
                reasons[impl.backend] = f"available, but {chosen} is preferred"
            else:
                reasons[impl.backend] = f"not used: {why}"
        info[op] = {"backend": chosen or "none", **reasons}
    return info


# ---------------------------------------------------------------------------------------
# The implementations. Each row: op name, backend, "module:function", and optionally the
# rule that refuses a call (default: CUDA tensors only). Keep one section per backend.
# ---------------------------------------------------------------------------------------
OP_NAMES = (
    "update_factor_", "update_factors_", "conv_input_factor_", "eigh", "damped_inverse",
    "pi_damping", "precondition_eigen", "precondition_eigen_", "precondition_inverse",
    "precondition_inverse_", "ekfac_scales_", "precondition_ekfac", "precondition_ekfac_",
    "kl_clip_scale", "pack_triangles", "unpack_triangles_",
)

# --- torch: the reference, every op, every device ---
for _op in OP_NAMES:
    register(_op, "torch", f"kfac_fast.reference:{_op}", refuses=_serves_all)

# --- triton (kfac_fast.kernels) ---
def _triton_fp32(device, dtype, size):
    """CUDA tensors with float32 factors/eigenvectors (float64 ones stay on the reference)."""
    why = _on_cuda(device, dtype, size)
    if why is None and dtype is not None and dtype != torch.float32:
        why = f"serves float32 factors/eigenvectors only (got {dtype})"
    return why


register("update_factor_", "triton", "kfac_fast.kernels.factor_update:update_factor_", refuses=_triton_fp32)
register("update_factors_", "triton", "kfac_fast.kernels.factor_update:update_factors_", refuses=_triton_fp32)
register("conv_input_factor_", "triton", "kfac_fast.kernels.conv_factor:conv_input_factor_", refuses=_triton_fp32)
# Preferred over the cuda backend's per-layer torch GEMMs + scale kernel: five launches
# for all layers instead of four GEMMs per layer. Untuned: chosen by launch count, not by
# a measurement (no GPU yet); bench/bench_triton.py decides on the next GPU run.
_GROUPED_FIRST = 0.5
register("precondition_eigen", "triton", "kfac_fast.kernels.precondition:precondition_eigen",
         refuses=_triton_fp32, preference=_GROUPED_FIRST)
register("precondition_eigen_", "triton", "kfac_fast.kernels.precondition:precondition_eigen_",
         refuses=_triton_fp32, preference=_GROUPED_FIRST)

# --- cuda (kfac_fast._C through kfac_fast._cuda) ---
def _eigh_cuda_refuses(device, dtype, size):
    """CUDA tensors only. It never refuses a size: it buckets by size itself (small and
    large n to torch.linalg.eigh, mid sizes to the Jacobi kernel), so the reason states
    that cut-off; describe() shows it for non-CUDA devices."""
    from kfac_fast._cuda import EIGH_CUTOFF_REASON

    if device.type != "cuda":
        return f"runs on CUDA tensors only (got {device.type}); on CUDA, {EIGH_CUTOFF_REASON}"
    return None


register("eigh", "cuda", "kfac_fast._cuda:eigh", refuses=_eigh_cuda_refuses)
register("precondition_eigen", "cuda", "kfac_fast._cuda:precondition_eigen")
register("precondition_eigen_", "cuda", "kfac_fast._cuda:precondition_eigen_")
