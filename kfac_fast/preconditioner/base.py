"""What the jobs of `KFACPreconditioner` share: its settings and state, declared once.

The class is composed of one mixin per job (capture, factor updates, refresh,
precondition, state); each inherits `PreconditionerBase`, which declares the
attributes the constructor sets and the few methods one job calls on another, so each
job reads as a unit and a type checker sees the whole contract.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..health import Health
from ..layer_damping import LayerDamping
from ..layers import KFACLayer
from ..schedules import Hyperparameter
from .extension import Curvature

Damping = Union[float, list]


class PreconditionerBase:
    """Settings and state of a KFACPreconditioner (set by its constructor)."""

    # settings
    method: str
    fisher: str
    loss_average: Union[str, float]
    factor_dtype: torch.dtype
    grad_scaler: Any
    accumulation_steps: int
    update_factors_in_hooks: bool
    guard_nonfinite: bool
    eigh_tol: Optional[float]
    precision: str
    max_factor_dim: Optional[int]
    factor_update_steps: Hyperparameter
    inv_update_steps: Hyperparameter
    factor_decay: Hyperparameter
    kl_clip: Hyperparameter
    lr: Hyperparameter
    damping: LayerDamping
    # state
    layers: dict[str, KFACLayer]
    steps: int
    last_nu: Optional[torch.Tensor]
    refresh_stats: dict[str, int]
    distributed: Any  # a kfac_fast.distributed.DataParallelKFAC, or None single-process
    _health: Health
    _row_mask: Optional[torch.Tensor]
    _captures_ok: Optional[torch.Tensor]
    _step_causes: dict[str, torch.Tensor]
    _factor_step_cache: tuple[int, bool]
    _warned: set
    _curvatures: list[Curvature]

    def _layer_damping(self, layers: list[KFACLayer]) -> Damping:
        """This step's damping of `layers`: a float, or one per layer (per-layer damping)."""
        return self.damping.for_layers([layer.name for layer in layers], self.steps)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    if TYPE_CHECKING:  # the calls between jobs (implemented by the mixins)
        def _hook_update_a(self, layer: KFACLayer, x: torch.Tensor, rows: Optional[torch.Tensor] = None,
                           grad_rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]: ...

        def _hook_update_g(self, layer: KFACLayer, rows: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                           ok: Optional[torch.Tensor] = None) -> None: ...

        def _check_captures(self, tensors: list) -> Optional[torch.Tensor]: ...

        def _refresh(self, layers: list[KFACLayer]) -> None: ...

        def _warn_silent_skips(self) -> None: ...

        def _has_inverse_state(self, layer: KFACLayer, method: str) -> bool: ...
