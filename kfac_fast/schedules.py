"""Argument checks of the frontend, and hyperparameters that may be schedules.

One style for every check: a check function gives the reason a value is not allowed
(`positive`, `at_least_one`, `decay_range`, ...), and the error names the argument.
`require_bool`, `require_int` and `require_number` check plain arguments;
`Hyperparameter` checks a constant or a schedule.

Every numeric hyperparameter of `KFACPreconditioner` is either a number or a callable
`f(step) -> number`, where `step` counts the `step()` calls made before the current one
(0 on the first call). `Hyperparameter` validates the constant when it is built and
the callable's value each time it is read, so a bad schedule fails with the name of the
argument instead of deep inside an op. Everything here runs on the host with Python
numbers: reading a schedule never touches a device.

A hyperparameter bound to its owner (`bind`, done by KFACPreconditioner) also reads as a
number, as kfac-pytorch's attributes do: `float(pc.lr)` (and `int(pc.inv_update_steps)`,
`f"{pc.lr:.3g}"`) is its value at the owner's current step (`pc.steps`); `pc.lr(step)`
keeps working. An unbound one reads as a number only when it is a constant.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

Number = Union[int, float]
Schedule = Union[Number, Callable[[int], Number]]


class Hyperparameter:
    """A validated constant or schedule.

    Args:
        name: the argument's name, used in error messages.
        value: a number or a callable of the step count.
        check: `check(v) -> None or str`, the reason `v` is not allowed.
        integer: require an int (e.g. update intervals).
        optional: allow None (e.g. `kl_clip=None` turns clipping off).
    """

    def __init__(self, name: str, value, check: Callable[[Number], Optional[str]],
                 *, integer: bool = False, optional: bool = False) -> None:
        self.name = name
        self.check = check
        self.integer = integer
        self.optional = optional
        self.value = value
        self._owner: Any = None
        if not callable(value):
            self._validate(value, where="")

    def bind(self, owner: Any) -> "Hyperparameter":
        """Read the current step from `owner.steps` when used as a number (`float(h)`)."""
        self._owner = owner
        return self

    def _validate(self, v, where: str):
        if v is None:
            if self.optional:
                return None
            raise TypeError(f"{self.name}{where} must be a number, got None")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            # bool is an int subclass: True as a damping is surely a mistake
            raise TypeError(f"{self.name}{where} must be a "
                            f"{'int' if self.integer else 'number'}, got {type(v).__name__}")
        if self.integer and not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise TypeError(f"{self.name}{where} must be an int, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{self.name}{where} must be finite, got {v!r}")
        why = self.check(v)
        if why is not None:
            raise ValueError(f"{self.name}{where} {why}, got {v!r}")
        return v

    def __call__(self, step: int):
        """The value at `step` (validated)."""
        if callable(self.value):
            return self._validate(self.value(step), where=f"({step}) (schedule value)")
        return self._validate(self.value, where="")

    def current(self):
        """The value at the owner's current step (`bind`); a constant needs no owner."""
        if self._owner is not None:
            return self(self._owner.steps)
        if callable(self.value):
            raise TypeError(f"{self.name} is a schedule not bound to a preconditioner: "
                            f"call it with a step, {self.name}(step)")
        return self(0)

    def _number(self, kind: str):
        v = self.current()
        if v is None:
            raise TypeError(f"{self.name} is None (turned off): it has no {kind} value")
        return v

    def __float__(self) -> float:
        return float(self._number("float"))

    def __int__(self) -> int:
        if not self.integer:
            raise TypeError(f"{self.name} is not an integer hyperparameter: use float({self.name})")
        return int(self._number("int"))

    def __format__(self, spec: str) -> str:
        """The current value formatted (f"{pc.lr:.3g}", f"{pc.lr}"); an unbound schedule
        or None: the repr."""
        try:
            value = self.current()
        except TypeError:
            value = None
        return repr(self) if value is None else format(value, spec)

    def __repr__(self) -> str:
        shown = getattr(self.value, "__name__", "schedule") if callable(self.value) else repr(self.value)
        return f"Hyperparameter({self.name}={shown})"


def positive(v: Number) -> Optional[str]:
    return None if v > 0 else "must be > 0"


# the smallest damping the float32 preconditioning ops can hold as a normal number: below
# it a positive Python damping rounds to 0 (or a subnormal) on the device, and a zero
# eigenvalue pair then divides by 0
MIN_DAMPING = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


def damping_range(v: Number) -> Optional[str]:
    if v <= 0:
        return "must be > 0"
    if v < MIN_DAMPING:
        return f"must be >= {MIN_DAMPING:.3g} (smaller values are 0 or subnormal in float32)"
    return None


def non_negative(v: Number) -> Optional[str]:
    return None if v >= 0 else "must be >= 0"


def at_least_one(v: Number) -> Optional[str]:
    return None if v >= 1 else "must be >= 1"


def decay_range(v: Number) -> Optional[str]:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _is_number(v: Any) -> bool:
    # bool is an int subclass: True as a count or a tolerance is surely a mistake
    return not isinstance(v, bool) and isinstance(v, (int, float))


def require_bool(name: str, value: Any) -> bool:
    """`value` itself when it is a bool, else a TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def require_names(name: str, value: Any, one: str, many: str) -> tuple[str, ...]:
    """One string or an iterable of strings as a tuple; a TypeError naming `name` else
    (`one` / `many` say what a string is: "a regex" / "regexes")."""
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be {one} or an iterable of {many}, got {type(value).__name__}") from None
    for entry in names:
        if not isinstance(entry, str):
            raise TypeError(f"{name} entries must be strings, got {entry!r}")
    return names


def require_int(name: str, value: Any, *, optional: bool = False) -> Any:
    """`value` when it is an int >= 1 (or None when optional), else a ValueError."""
    if optional and value is None:
        return None
    if not _is_number(value) or not isinstance(value, int) or at_least_one(value) is not None:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= 1, got {value!r}")
    return value


def require_number(name: str, value: Any, check: Callable[[Number], Optional[str]] = positive, *,
                   optional: bool = False, alternatives: str = "") -> Any:
    """`value` as a float when it is a finite number that `check` allows (or None when
    optional), else a ValueError; `alternatives` names other accepted values."""
    if optional and value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or check(value) is not None:
        bound = (check(-1.0) or check(math.inf) or "").removeprefix("must be ")
        prefix = "None or " if optional else alternatives
        raise ValueError(f"{name} must be {prefix}a finite number {bound}, got {value!r}")
    return float(value)


def running_average_weights(decay: float, k: int) -> tuple[float, float]:
    """(beta_k, 1 - beta_k) of docs/design.md's zero-debiased running average.

    beta_k = decay (1 - decay^(k-1)) / (1 - decay^k), k >= 1 counting updates from 1,
    so beta_1 = 0 and the first update has full weight.
    """
    if k < 1:
        raise ValueError(f"running_average_weights: k must be >= 1, got {k}")
    if decay == 0.0:
        return 0.0, 1.0
    beta = decay * (1.0 - decay ** (k - 1)) / (1.0 - decay ** k)
    return beta, 1.0 - beta
