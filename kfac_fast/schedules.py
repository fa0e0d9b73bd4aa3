"""Hyperparameters that may be constants or callables of the step count.

Every numeric hyperparameter of `KFACPreconditioner` is either a number or a callable
`f(step) -> number`, where `step` counts the `step()` calls made before the current one
(0 on the first call). `Hyperparameter` validates the constant when it is built and
the callable's value each time it is read, so a bad schedule fails with the name of the
argument instead of deep inside an op. Everything here runs on the host with Python
numbers: reading a schedule never touches a device.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

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
        if not callable(value):
            self._validate(value, where="")

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


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def at_least_one(v):
    return None if v >= 1 else "must be >= 1"


def decay_range(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def running_average_weights(decay: float, k: int) -> tuple[float, float]:
    """(beta_k, 1 - beta_k) of DESIGN.md's zero-debiased running average.

    beta_k = decay (1 - decay^(k-1)) / (1 - decay^k), k >= 1 counting updates from 1,
    so beta_1 = 0 and the first update has full weight.
    """
    if k < 1:
        raise ValueError(f"running_average_weights: k must be >= 1, got {k}")
    if decay == 0.0:
        return 0.0, 1.0
    beta = decay * (1.0 - decay ** (k - 1)) / (1.0 - decay ** k)
    return beta, 1.0 - beta
