"""The router: which registered implementation serves an op call.

This module is only the mechanism. It knows no op and no backend by name: the backend
modules under `kfac_fast.backends` declare themselves (`register_backend`) and add their
rows (`register`) when `kfac_fast.ops` imports that package, and `kfac_fast._ops` asks
`select` on every call.

An implementation has exactly the signature of its torch reference and receives
arguments already validated by `kfac_fast.ops`, with scalars as 0-dim tensors (a CPU
scalar may be read on the host without a device sync).

`KFAC_FAST_BACKEND=auto|<backend>` picks the backend. `auto` takes the first
implementation in each op's preference order that serves the call and falls back
silently; naming a backend that cannot serve a call raises a RuntimeError that says why.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class Call:
    """What a refusal rule sees: the device, the dtype of the op's leading tensor, the
    largest matrix size, and the implementation's arguments (None when `describe` asks
    about a device in general)."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    size: Optional[int] = None
    args: Optional[tuple] = None
    kwargs: dict = field(default_factory=dict)


# A rule: None when the implementation can serve the call, else the reason it cannot.
Refusal = Callable[[Call], Optional[str]]


@dataclass
class _Backend:
    name: str
    preference: float
    missing: Callable[[], Optional[str]]  # why it cannot run on this machine at all
    _why: Any = field(default=False, repr=False)  # cached missing(); False: not asked yet

    def unavailable(self) -> Optional[str]:
        if self._why is False:
            self._why = self.missing()
        return self._why


@dataclass
class _Impl:
    backend: str
    target: str  # "module:function", imported on first use
    refuses: Refusal
    preference: float
    note: str = ""  # how the rule chooses (e.g. a cost model), shown by describe()
    _fn: Optional[Callable] = field(default=None, repr=False)

    def load(self) -> Callable:
        if self._fn is None:
            module, name = self.target.split(":")
            self._fn = getattr(importlib.import_module(module), name)
        return self._fn


_BACKENDS: dict[str, _Backend] = {}
_REGISTRY: dict[str, list[_Impl]] = {}


def serves_all(call: Call) -> Optional[str]:
    """The rule of an implementation that serves every call."""
    return None


def on_cuda(call: Call) -> Optional[str]:
    """The default rule: CUDA tensors only."""
    return None if call.device.type == "cuda" else f"runs on CUDA tensors only (got {call.device.type})"


def register_backend(name: str, *, preference: float, missing: Callable[[], Optional[str]]) -> None:
    """Declare a backend: `auto` tries lower `preference` first; `missing()` says why the
    backend cannot be used on this machine (None when it can), asked once."""
    _BACKENDS[name] = _Backend(name, preference, missing)


def register(op: str, backend: str, target: str, refuses: Refusal = on_cuda,
             preference: Optional[float] = None, note: str = "") -> None:
    """Add an implementation of `op` ("module:function"); `preference` overrides the
    backend's own for this op; `note` says how its rule chooses per call (describe()
    shows it, since describe() has no call to apply the rule to)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not declared (register_backend first)")
    rank = _BACKENDS[backend].preference if preference is None else preference
    impls = _REGISTRY.setdefault(op, [])
    impls.append(_Impl(backend, target, refuses, rank, note))
    impls.sort(key=lambda i: i.preference)


def backend_names() -> tuple[str, ...]:
    """The declared backends, in declaration order."""
    return tuple(_BACKENDS)


def backend_unavailable(name: str) -> Optional[str]:
    """Why backend `name` cannot run on this machine (None when it can); for rules that
    compare against another backend."""
    backend = _BACKENDS.get(name)
    return f"backend {name!r} is not declared" if backend is None else backend.unavailable()


def requested_backend() -> str:
    """The value of KFAC_FAST_BACKEND ("auto" when unset); ValueError when unknown."""
    names = backend_names()
    value = os.environ.get("KFAC_FAST_BACKEND", "auto").strip().lower() or "auto"
    if value != "auto" and value not in names:
        raise ValueError(f"KFAC_FAST_BACKEND must be auto, {', '.join(names)}; got {value!r}")
    return value


def _explain(impl: _Impl, call: Call) -> Optional[str]:
    return _BACKENDS[impl.backend].unavailable() or impl.refuses(call)


def select(op: str, call: Call) -> tuple[str, Callable]:
    """(backend name, implementation) that serves `op` for this call."""
    wanted = requested_backend()
    impls = _REGISTRY[op]
    if wanted == "auto":
        for impl in impls:
            if _explain(impl, call) is None:
                return impl.backend, impl.load()
        raise RuntimeError(f"kfac_fast: no implementation of {op} serves device {call.device}")
    for impl in impls:
        if impl.backend == wanted:
            why = _explain(impl, call)
            if why is not None:
                raise RuntimeError(f"KFAC_FAST_BACKEND={wanted}: {op} cannot use {wanted}: {why}")
            return impl.backend, impl.load()
    raise RuntimeError(f"KFAC_FAST_BACKEND={wanted}: {op} has no {wanted} implementation")


def describe(device: torch.device) -> dict[str, dict[str, str]]:
    """For each op: the backend chosen for `device` (auto rules) and why each is or is not used."""
    call = Call(torch.device(device))
    info = {}
    for op, impls in _REGISTRY.items():
        reasons = {}
        chosen = None
        for impl in impls:
            why = _explain(impl, call)
            note = f" ({impl.note})" if impl.note else ""
            if why is None and chosen is None:
                chosen = impl.backend
                reasons[impl.backend] = f"used: first available in preference order{note}"
            elif why is None:
                reasons[impl.backend] = f"available, but {chosen} is preferred{note}"
            else:
                reasons[impl.backend] = f"not used: {why}{note}"
        info[op] = {"backend": chosen or "none", **reasons}
    return info
