"""KFAC's per-step record (`KFAC.last_metrics`) and its log lines (docs/optimizer.md).

One `kfac_fast.metrics.StepMetrics` per step, with the same names every step:

    loss              the closure's loss h(theta) at the step's start (0-dim device tensor)
    lr                the multiplier the step used (param_groups[0]["lr"])
    damping, gamma    lambda of the quadratic model and gamma of the factors this step used
                      (gamma: the search's winner on a search step)
    alpha, mu         the model's minimiser over span{Delta, delta0} (device tensors; mu 0
                      without delta0; both 0 when the update was not finite); the applied
                      update is lr * (alpha Delta + mu delta0)
    rho, loss_after   the reduction ratio and h(theta + delta) on adaptation steps, else NaN
                      (loss_after also on gamma-search steps)
    damping_adapted   the Levenberg-Marquardt rule ran on this step's rho (bool)
    gamma_searched    the gamma search ran this step (bool)
    damping_next, gamma_next   what the next step uses
    skipped           1 when this step's update was not applied (non-finite, zeroed on the
                      device; or h(theta + delta) not finite, undone), else 0 (device bool)
    nonfinite_updates the running count of non-finite updates, the counter behind
                      `opt.preconditioner.health()["kfac_nonfinite_update"]` (a device copy)

Recording reads nothing from the device. Logging through `kfac_fast.metrics.logger`: INFO
when lambda or gamma change and when updates were skipped, DEBUG one line per step. The
INFO lines come from the damping adaptation and gamma search, which read the host anyway;
non-finite updates of other steps are counted on the device and reported at the next
adaptation step (every T1 steps) when INFO is enabled. The DEBUG line reads the whole record
(`as_dict()`, one host sync per step): enable DEBUG only when that cost is acceptable.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Union

import torch

from .metrics import StepMetrics, logger

if TYPE_CHECKING:
    from .optimizer import KFAC

CAUSE = "kfac_nonfinite_update"


def record_step(opt: KFAC, step: int, loss: torch.Tensor, solved: dict, *, adapted: bool, searched: bool,
                damping: float, gamma: float, gamma_before: float) -> StepMetrics:
    """The record of step `step` (the optimizer's state after it), then its log lines."""
    group = opt.param_groups[0]
    last = opt.last
    m = StepMetrics(step)
    m.record("loss", loss.detach())
    m.record("lr", group["lr"])
    m.record("damping", damping)
    m.record("gamma", gamma)
    m.record("alpha", last["alpha"])
    m.record("mu", last["mu"])
    m.record("rho", last["rho"] if adapted else math.nan)
    m.record("loss_after", last["loss_after"] if adapted else solved.get("loss_after", math.nan))
    m.record("damping_adapted", adapted)
    m.record("gamma_searched", searched)
    m.record("damping_next", group["damping"])
    m.record("gamma_next", group["gamma"])
    undone = bool(adapted and last.get("undone"))
    ok = solved.get("finite")
    skipped: Union[bool, torch.Tensor] = undone if ok is None else (~ok) | undone
    m.record("skipped", skipped)
    counter = opt.preconditioner._health.causes.get(CAUSE)
    m.record("nonfinite_updates", 0 if counter is None else counter.clone())
    _log(opt, m, counter, adapted=adapted, undone=undone, damping=damping, gamma_before=gamma_before)
    return m


def _log(opt: KFAC, m: StepMetrics, counter: Union[torch.Tensor, None], *, adapted: bool, undone: bool,
         damping: float, gamma_before: float) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    group = opt.param_groups[0]
    step = m.step
    lam, gam = group["damping"], group["gamma"]
    if undone:
        logger.info("KFAC step %d: h(theta + delta) = %s is not finite: update undone", step, opt.last["loss_after"])
    if adapted and lam != damping:
        logger.info("KFAC step %d: rho %.4g, lambda %.6g -> %.6g", step, opt.last["rho"], damping, lam)
    elif adapted:
        logger.debug("KFAC step %d: rho %.4g, lambda kept at %.6g", step, opt.last["rho"], lam)
    if gam != gamma_before:
        logger.info("KFAC step %d: gamma %.6g -> %.6g", step, gamma_before, gam)
    if adapted and counter is not None:
        # an adaptation step reads the host anyway; other steps only count on the device
        seen, since = getattr(opt, "_nonfinite_seen", (0, 0))
        total = int(counter)
        if total > seen:
            logger.info("KFAC steps %d-%d: %d non-finite update(s) not applied (health()['%s'] = %d)",
                        since, step, total - seen, CAUSE, total)
        opt._nonfinite_seen = (total, step + 1)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("KFAC step %d: %s", step, m.as_dict())
