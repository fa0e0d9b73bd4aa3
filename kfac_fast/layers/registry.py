"""Which `KFACLayer` class serves which module type.

Each kind registers itself with `register_kind(module_type)` when its module is
imported (`kfac_fast.layers` imports them all); a module is a layer when an instance
check against a registered type succeeds, the first registration winning. An opt-in
kind (`KFACLayer.opt_in`, e.g. the norms) serves its modules only when the caller names
it in `extra_kinds`; without that its modules are not layers at all.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, TypeVar, Union

from torch import nn

from ..schedules import require_names
from .base import KFACLayer

_KINDS: list[tuple[type, type[KFACLayer]]] = []
LayerT = TypeVar("LayerT", bound=type[KFACLayer])


def register_kind(*module_types: type) -> Callable[[LayerT], LayerT]:
    """Class decorator: the class serves modules of these types."""
    def register(cls: LayerT) -> LayerT:
        _KINDS.extend((t, cls) for t in module_types)
        return cls
    return register


def layer_class(module: nn.Module, extra_kinds: Iterable[str] = ()) -> Optional[type[KFACLayer]]:
    """The class serving `module`, or None when K-FAC does not know its kind (or it is
    an opt-in kind not named in `extra_kinds`)."""
    names = tuple(extra_kinds)
    for module_type, cls in _KINDS:
        if isinstance(module, module_type) and (not cls.opt_in or cls.kind in names):
            return cls
    return None


def is_layer(module: nn.Module, extra_kinds: Iterable[str] = ()) -> bool:
    """Whether K-FAC knows this module kind (supported or not); opt-in kinds count only
    when named in `extra_kinds`."""
    return layer_class(module, extra_kinds) is not None


def unsupported_reason(module: nn.Module, method: str = "eigen", extra_kinds: Iterable[str] = ()) -> Optional[str]:
    """Why `module` cannot be registered under `method` (None when it can).

    Only modules of a known kind are asked; other kinds are not layers at all.
    """
    cls = layer_class(module, extra_kinds)
    return None if cls is None else cls.unsupported_reason(module, method)


def make_layer(name: str, module: nn.Module, extra_kinds: Iterable[str] = ()) -> KFACLayer:
    """The layer object for a registered module (opt-in kinds when named in `extra_kinds`)."""
    cls = layer_class(module, extra_kinds)
    if cls is None:
        known = known_kinds()
        raise TypeError(f"KFACLayer: module {name!r} must be one of {known}, got {type(module).__name__}")
    return cls(name, module)


def opt_in_kinds() -> tuple[str, ...]:
    """The names `extra_kinds` accepts (the opt-in kinds), in registration order."""
    return tuple(dict.fromkeys(cls.kind for _, cls in _KINDS if cls.opt_in))


def check_extra_kinds(extra_kinds: Union[str, Iterable[str]]) -> tuple[str, ...]:
    """`extra_kinds` as a tuple of opt-in kind names (one name or an iterable of them);
    TypeError / ValueError naming `extra_kinds` otherwise."""
    names = require_names("extra_kinds", extra_kinds, "a kind name", "names")
    known = opt_in_kinds()
    for name in names:
        if name not in known:
            raise ValueError(f"extra_kinds: unknown opt-in kind {name!r} (known: {', '.join(map(repr, known))})")
    return names


def known_kinds() -> str:
    """The registered module types, as text for messages ("nn.Linear, nn.Conv2d, ...")."""
    always = [f"nn.{t.__name__}" for t, cls in _KINDS if not cls.opt_in]
    extra = [f"nn.{t.__name__} with extra_kinds={cls.kind!r}" for t, cls in _KINDS if cls.opt_in]
    return ", ".join(always + extra)
