"""Which `KFACLayer` class serves which module type.

Each kind registers itself with `register_kind(module_type)` when its module is
imported (`kfac_fast.layers` imports them all); a module is a layer when an instance
check against a registered type succeeds, the first registration winning.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

from torch import nn

from .base import KFACLayer

_KINDS: list[tuple[type, type[KFACLayer]]] = []
LayerT = TypeVar("LayerT", bound=type[KFACLayer])


def register_kind(*module_types: type) -> Callable[[LayerT], LayerT]:
    """Class decorator: the class serves modules of these types."""
    def register(cls: LayerT) -> LayerT:
        _KINDS.extend((t, cls) for t in module_types)
        return cls
    return register


def layer_class(module: nn.Module) -> Optional[type[KFACLayer]]:
    """The class serving `module`, or None when K-FAC does not know its kind."""
    for module_type, cls in _KINDS:
        if isinstance(module, module_type):
            return cls
    return None


def is_layer(module: nn.Module) -> bool:
    """Whether K-FAC knows this module kind (supported or not)."""
    return layer_class(module) is not None


def unsupported_reason(module: nn.Module, method: str = "eigen") -> Optional[str]:
    """Why `module` cannot be registered under `method` (None when it can).

    Only modules of a known kind are asked; other kinds are not layers at all.
    """
    cls = layer_class(module)
    return None if cls is None else cls.unsupported_reason(module, method)


def make_layer(name: str, module: nn.Module) -> KFACLayer:
    """The layer object for a registered module."""
    cls = layer_class(module)
    if cls is None:
        known = known_kinds()
        raise TypeError(f"KFACLayer: module {name!r} must be one of {known}, got {type(module).__name__}")
    return cls(name, module)


def known_kinds() -> str:
    """The registered module types, as text for messages ("nn.Linear, nn.Conv2d, ...")."""
    return ", ".join(f"nn.{t.__name__}" for t, _ in _KINDS)
