"""The patch scaffolding every integration shares: shadow methods with instance
attributes, remember what was there, put it back.

An integration `accelerate`s an object of another library by setting instance
attributes that shadow its class's methods (the class itself is never touched) and
stores a record under `STATE` on the object; `deaccelerate` restores the saved
attributes and clears the record.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

STATE = "_kfac_fast"  # the attribute holding an integration's record on the patched object
MISSING = object()  # "no instance attribute of that name before patching"


def is_accelerated(obj: Any) -> bool:
    """Whether `obj` is currently patched by a kfac_fast integration."""
    return getattr(obj, STATE, None) is not None


def set_record(obj: Any, record: Any) -> None:
    """Mark obj as patched; `record` is what its integration needs to undo the patches."""
    setattr(obj, STATE, record)


def take_record(obj: Any) -> Any:
    """The record `set_record` left on obj (None when not patched); obj counts as
    unpatched from here on, its integration restores what the record names."""
    record = getattr(obj, STATE, None)
    if record is not None:
        setattr(obj, STATE, None)
    return record


def save_attributes(obj: Any, names: Iterable[str]) -> dict:
    """The instance attributes `names` of obj as they are now (MISSING where absent)."""
    return {name: obj.__dict__.get(name, MISSING) for name in names}


def restore_attributes(obj: Any, saved: dict) -> None:
    """Undo patches: reset each saved attribute, or delete it where there was none."""
    for name, value in saved.items():
        if value is MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, value)


def accelerated_context(accelerate: Callable, deaccelerate: Callable, doc: str) -> Callable:
    """A context manager `accelerated(obj, **kwargs)`: accelerate for the block, then restore."""

    @contextlib.contextmanager
    def accelerated(obj: Any, **kwargs: Any) -> Iterator[Any]:
        accelerate(obj, **kwargs)
        try:
            yield obj
        finally:
            deaccelerate(obj)

    accelerated.__doc__ = doc
    return accelerated
