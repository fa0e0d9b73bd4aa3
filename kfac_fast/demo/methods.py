"""The demo's optimisers under test: each one's learning-rate grid and how to build it."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..optimizer import KFAC


@dataclasses.dataclass
class Method:
    """An optimiser under test: its lr grid and how to build it for a model."""

    name: str
    lrs: tuple
    make: Callable  # (model, lr) -> (torch optimizer, preconditioner with .step() or None)
    note: str
    knob: str = "lr"  # what the grid varies (the "lr" column holds it)


def inv_schedule(step: int) -> int:
    """Eigendecompositions every step for the first 20 steps, then every 10.

    The curvature changes fastest right after the random initialisation (the error
    falls from ~850 to ~130 nats in a few dozen steps); a basis kept for 10 steps
    there is stale enough to blow the run up unless the damping is made large.
    """
    return 1 if step < 20 else 10


KFAC_SETTINGS: dict[str, Any] = dict(factor_update_steps=1, inv_update_steps=inv_schedule, damping=1.0,
                     factor_decay=0.95, kl_clip=0.1, fisher="mc")
MOMENTUM = 0.9


def _settings_note(settings: dict) -> str:
    return ", ".join(f"{k}={'1 for 20 steps, then 10' if callable(v) else v}" for k, v in settings.items())


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM), None


def _adam(model, lr):
    return torch.optim.Adam(model.parameters(), lr=lr), None


def _soap(model, lr):
    import heavyball

    # Eager: torch.compile's warm-up would eat most of a few-minute budget on CPU.
    heavyball.utils.compile_mode = None
    soap = getattr(heavyball, "ForeachSOAP", None) or heavyball.SOAP  # renamed in heavyball 2.x
    return soap(model.parameters(), lr=lr, weight_decay=0.0, precondition_frequency=10), None


# The K-FAC row's learning rate. Its grid is over the damping instead: with kl_clip=0.1
# binding, the update lr * nu * P has nu = sqrt(kl_clip / (lr^2 v^T F v)), so lr * nu does
# not depend on lr: the former lr grid (0.3, 1.0) printed the same error, 127.85, at both
# points (issue 21). 0.3 is the lr that grid chose; 1.0 the damping it ran with.
KFAC_LR = 0.3


def _kfac(model, damping):
    from .. import KFACPreconditioner

    opt = torch.optim.SGD(model.parameters(), lr=KFAC_LR, momentum=MOMENTUM)
    return opt, KFACPreconditioner(model, lr=KFAC_LR, **dict(KFAC_SETTINGS, damping=damping))


# The paper's optimizer (kfac_fast.KFAC): MC Fisher, the quadratic-model step with
# momentum, Levenberg-Marquardt lambda. Its grid is over the initial lambda (the "lr"
# column); inverses every T2 = 20 steps as in the paper; factors every second step (the
# paper cuts the same cost by taking statistics on 1/8 of the batch).
# method="eigen" (the exactly damped (A (x) G + gamma^2 I)^-1) instead of the paper's
# factored Tikhonov: at 400 steps it ended at 55.7-60.4 nats over six runs (MC seeds
# 1-3, lambda0 0.01/0.1/1), factored Tikhonov at 68.2-77.5 (three MC seeds), SOAP at
# 77.4. Its steps cost ~25% more on CPU (two more matmuls per layer). No gamma search
# (T3 = 20; 300 steps, MC seed 1): with eigen it ended higher, 66.5 against 62.0; with
# factored Tikhonov a little lower, 76.5 against ~80.5, but in 39 s instead of ~31 s.
# Measured 2026-11-28 with throwaway scripts around `train`.
KFAC_OPT_SETTINGS: dict[str, Any] = dict(method="eigen", gamma_interval=None, inv_update_steps=20,
                         factor_update_steps=2)
# the block-tridiagonal inverse exists for factored Tikhonov damping only
KFAC_TRI_SETTINGS: dict[str, Any] = dict(KFAC_OPT_SETTINGS, method="inverse")


def _kfac_opt(model, damping):
    return KFAC(model, "bce_with_logits", damping=damping, **KFAC_OPT_SETTINGS), None


def _kfac_tri(model, damping):
    # the paper's block-tridiagonal inverse (kfac_fast.tridiag): not in the default
    # --methods, its refreshes and steps cost about twice the block-diagonal ones
    return KFAC(model, "bce_with_logits", damping=damping, approx="tridiag", **KFAC_TRI_SETTINGS), None


# lr grids: centred on where an 80-step grid of three points per method found the best
# (2026-11-28; every baseline's best then sat on its grid's upper edge, so the baseline
# grids moved up). The expensive methods get two points and the grid runs steps/8 steps,
# which keeps the whole demo near 5 minutes on 2 cores.
METHODS = {
    "sgd": Method("SGD+momentum", (1e-2, 3e-2, 1e-1), _sgd, f"torch.optim.SGD, momentum {MOMENTUM}"),
    "adam": Method("Adam", (1e-3, 3e-3, 1e-2), _adam, "torch.optim.Adam, betas (0.9, 0.999)"),
    "soap": Method("SOAP", (1e-2, 3e-2), _soap,
                   "heavyball SOAP, betas (0.9, 0.95), preconditioner every 10 steps, eager"),
    "kfac": Method("K-FAC", (1.0, 0.3), _kfac,
                   f"KFACPreconditioner on SGD momentum {MOMENTUM}, lr {KFAC_LR}, grid over the damping "
                   "(kl_clip binds, so lr * nu does not depend on lr); "
                   + _settings_note({k: v for k, v in KFAC_SETTINGS.items() if k != "damping"}), knob="damping"),
    "kfac-opt": Method("KFAC (paper)", (0.1, 0.01), _kfac_opt,
                       "the paper's optimizer, grid over the initial damping lambda; "
                       + ", ".join(f"{k}={v}" for k, v in KFAC_OPT_SETTINGS.items()), knob="lambda0"),
    "kfac-tri": Method("KFAC (tridiag)", (150.0, 10.0, 1.0), _kfac_tri,
                       "the paper's optimizer with the block-tridiagonal inverse (approx='tridiag'); "
                       + ", ".join(f"{k}={v}" for k, v in KFAC_TRI_SETTINGS.items()), knob="lambda0"),
}
