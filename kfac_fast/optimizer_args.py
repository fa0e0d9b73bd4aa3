"""KFAC's argument checks: each names the argument and the rule it broke."""
from __future__ import annotations

import math
from typing import Any, Optional


def positive_int(name: str, v: Any, optional: bool = False) -> int:
    """v, an int >= 1 (`optional` only says in the error that None is allowed too)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {v!r}")
    return v


def positive_float(name: str, v: Any, *, allow_zero: bool = False) -> float:
    """v as a float: finite and > 0 (>= 0 with allow_zero)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


def learning_rate(v: Any, *, name: str = "lr", allow_zero: bool = False) -> float:
    """KFAC's lr as a float: a Python number (not a bool, string or tensor), finite and > 0
    (>= 0 with allow_zero: a scheduler may anneal it to 0 between steps)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


def step_lr(group: dict) -> float:
    """The lr of a step from KFAC's param group, after a scheduler may have written to it;
    its `momentum` must still be the bool KFAC was built with."""
    if not isinstance(group["momentum"], bool):
        raise TypeError(
            f"param_groups[0]['momentum'] must be a bool (use delta0 in the 2x2 solve or not), got "
            f"{group['momentum']!r}: KFAC's momentum coefficient mu is solved each step, not scheduled; "
            "OneCycleLR and CyclicLR write a coefficient there unless built with cycle_momentum=False")
    return learning_rate(group["lr"], name="param_groups[0]['lr']", allow_zero=True)


def unit_interval(name: str, v: Any) -> float:
    """v as a float strictly between 0 and 1 (a decay or an adaptation factor)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    return float(v)


def check_distributed(process_group: Optional[Any], distributed: Any, approx: str) -> None:
    """The data-parallel arguments KFAC cannot hand to its preconditioner as they are:
    the type of `distributed`, a `process_group` with distributed=False, and approx="tridiag"
    (single-process only) where a group of more than one rank would run it."""
    from .distributed import DistributedOptions, resolve_group
    if not (distributed is None or isinstance(distributed, (bool, DistributedOptions))):
        raise TypeError(f"distributed must be None, a bool or a DistributedOptions, got {distributed!r}")
    if distributed is False:
        if process_group is not None:
            raise ValueError("process_group was given but distributed=False")
        return
    if approx == "tridiag" and (distributed not in (None, False) or resolve_group(process_group) is not None):
        raise NotImplementedError(
            "approx='tridiag' is single-process only: its chain inverses are not shared across ranks; use "
            "approx='blockdiag' data-parallel, or pass distributed=False for an independent KFAC per rank")


def exponential_batch_size(step: int, initial: int = 1000, total: int = 60000,
                           ramp_steps: int = 500) -> int:
    """The paper's growing mini-batch: m_k = m1 (N / m1)^min(k / ramp_steps, 1)."""
    if initial < 1 or total < initial or ramp_steps < 1 or step < 0:
        raise ValueError(f"exponential_batch_size: need step >= 0, 1 <= initial <= total and "
                         f"ramp_steps >= 1, got step={step}, initial={initial}, total={total}, "
                         f"ramp_steps={ramp_steps}")
    return int(round(initial * (total / initial) ** min(step / ramp_steps, 1.0)))
