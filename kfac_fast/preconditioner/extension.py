"""The extension point for curvature beyond the per-layer Kronecker blocks.

A `Curvature` object (e.g. the block-tridiagonal pairs of `kfac_fast.tridiag`) is
handed to `KFACPreconditioner.add_curvature`; the preconditioner's jobs then call it at
fixed points, after they have done their own per-layer work:
- factor updates (held captures): `update(layers, context)` with the step's layers;
- refresh: `refresh(layers, damping_of)` with the layers just refreshed;
- precondition: `precondition(grads)` returns P for the layers it takes over (out of
  place, dW_bar layout); the preconditioner forms the rest, the KL clip and the
  write-back;
- state: `state_dict()` / `load_state_dict(entry)` under the key `state_key`, and
  `memory_usage()` entries merged into the preconditioner's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import torch

from ..layers import KFACLayer


@dataclasses.dataclass(frozen=True)
class UpdateContext:
    """What a factor-update step tells a curvature extension."""

    decay: float  # factor_decay at this step
    dtype: torch.dtype  # the factors' dtype
    ok: Optional[torch.Tensor]  # the step's all-finite flag (0-dim device bool), None unguarded
    loss_scale: Callable[[torch.Tensor], Any]  # S of an output-gradient capture


class Curvature(Protocol):
    """Curvature a preconditioner applies on top of its per-layer blocks."""

    state_key: str

    def update(self, layers: list[KFACLayer], context: UpdateContext) -> None: ...

    def refresh(self, layers: list[KFACLayer], damping_of: Callable[[str], float]) -> None: ...

    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, entry: dict) -> None: ...

    def memory_usage(self) -> dict[str, int]: ...
