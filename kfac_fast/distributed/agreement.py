"""What every rank must agree on, and the small host-side collectives that agree it.

- Settings: `settings_of(precond)` describes the preconditioner's settings as plain
  values (a schedule by its qualified name); `check_same_setup` gathers every rank's
  layers and settings once at construction and raises ValueError on every rank naming
  the first differing layer or setting with each rank's value (never a later hang).
- Per step: `agree_counts` sums small int vectors (which layers fired, which hold
  factors, whether a rank's local work failed) over a CPU (gloo) group, so the sets that
  decide later collectives are the same on every rank without a device sync.
- Failures: `collective_error` turns a timed-out or broken collective into one
  RuntimeError that says what timed out and what to do.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

SETTINGS = ("method", "fisher", "loss_average", "factor_dtype", "factor_update_steps", "inv_update_steps",
            "factor_decay", "damping", "kl_clip", "lr", "accumulation_steps", "update_factors_in_hooks",
            "guard_nonfinite", "eigh_tol", "precision", "max_factor_dim")


def _dist() -> Any:
    import torch.distributed as dist
    return dist


def _plain(value: Any) -> Any:
    """A setting as a value comparable across processes (a schedule by its name)."""
    value = getattr(value, "_uniform", value)  # LayerDamping: its one shared value
    value = getattr(value, "value", value)     # Hyperparameter: the number or callable
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if callable(value):
        return f"<schedule {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(value)


def settings_of(precond: Any) -> dict:
    """The settings of a KFACPreconditioner that every rank must share, as plain values."""
    return {name: _plain(getattr(precond, name, None)) for name in SETTINGS}


def check_same_setup(layers: list, settings: dict, group: Any) -> None:
    """One all_gather_object of (layers, settings); ValueError on every rank on a mismatch."""
    dist = _dist()
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (layers, settings), group=group)
    ref_layers, ref_settings = gathered[0]
    for rank, (other, _) in enumerate(gathered):
        if other == ref_layers:
            continue
        diff = next((i for i, (x, y) in enumerate(zip(ref_layers, other)) if x != y),
                    min(len(ref_layers), len(other)))
        first = ref_layers[diff] if diff < len(ref_layers) else "<none>"
        theirs = other[diff] if diff < len(other) else "<none>"
        raise ValueError(
            f"kfac_fast.distributed: the model differs across ranks: rank {rank} registers "
            f"{len(other)} layers and rank 0 {len(ref_layers)}; first difference at layer "
            f"#{diff}: rank 0 has {first}, rank {rank} has {theirs} "
            "(every rank must build the same model)")
    for name in sorted(set().union(*(s.keys() for _, s in gathered))):
        values = [s.get(name) for _, s in gathered]
        if any(v != values[0] for v in values):
            per_rank = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"kfac_fast.distributed: setting {name!r} differs across ranks ({per_rank}); "
                             "every rank must build its preconditioner with the same settings")


def check_same_layers(signature: list, group: Any) -> None:
    """`check_same_setup` of the layers alone: ValueError on every rank unless every rank
    registered the same (name, kind, a_dim, g_dim, has_bias) list."""
    check_same_setup(signature, {}, group)


def agree_counts(values: list, group: Any) -> list:
    """The element-wise sum of an int list over every rank of a CPU-capable group."""
    dist = _dist()
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, group=group)  # the caller turns a failure into collective_error(what, ...)
    return t.tolist()


def collective_error(what: str, exc: BaseException, timeout: Optional[float] = None) -> RuntimeError:
    """The error a rank raises when one of kfac_fast's collectives fails or times out."""
    limit = f" (timeout {timeout:g} s)" if timeout is not None else ""
    cause = str(exc).removeprefix("kfac_fast.distributed: ")
    return RuntimeError(
        f"kfac_fast.distributed: {what} failed{limit}: {cause}. Another rank did not reach the same "
        "collective (it raised, hung or died) or the group broke after such a failure; kfac_fast's "
        "collectives cannot continue on this group: end the run on every rank and resume from a "
        "checkpoint")
