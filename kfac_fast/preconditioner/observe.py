"""Observe: the per-step metrics record and the log lines of KFACPreconditioner.

After every `step()`, `precond.last_metrics` is a `kfac_fast.metrics.StepMetrics` of that
step (`StepMetrics.step` is the step count before it, as schedules see it):
- hyperparameters (Python floats): `lr` and `kl_clip` (when the KL clip is on),
  `damping` (when one value serves every layer), `factor_decay`;
- `factor_update` and `refresh` (Python bools): whether this was a factor-update step
  with captured layers (the non-finite guard may still have dropped it on the device;
  see the counters) and whether decompositions / inverses were refreshed; on refresh
  steps `refresh_layers`, `refresh_seconds` (host wall time of the refresh, which syncs)
  and, for "eigen"/"ekfac", `refresh_kept`, `refresh_refined`, `refresh_full` (factors per
  path of this refresh, see `eigh_tol`);
- `nu`: the KL-clip factor (`last_nu`, a 0-dim device tensor) when a layer was preconditioned;
- every counter of `health()` under its own name, cumulative since the start: the device
  counters (`nonfinite_steps` and one per cause) as one 0-dim device tensor each, copied
  on the device in one launch (never read), and the solver counters (`fp64_retries`,
  `damped_retries`, `kept_previous`) as Python ints.

Recording never reads a device tensor: a non-refresh step stays free of host syncs.
`last_metrics.as_dict()` reads everything in one transfer; call it when you log.

Logging (`kfac_fast.metrics.logger`, silent unless configured): DEBUG one line per step
(host values only); INFO on every refresh (layers, seconds, paths) and, on refresh steps
only when INFO is enabled (a refresh step may sync), the steps skipped since the
previous refresh, by cause.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from ..health import CAUSES, SOLVER_COUNTERS
from ..layers import KFACLayer
from ..metrics import StepMetrics, logger
from .base import PreconditionerBase

PATHS = ("kept", "refined", "full")


def _value(h: Callable[[int], Any], step: int) -> Any:
    """`h(step)`, or None where the schedule has no valid value (the step itself raises
    wherever it uses one; a metric never does)."""
    try:
        return h(step)
    except (TypeError, ValueError):
        return None


class ObserveMixin(PreconditionerBase):
    """The metrics record and logging of KFACPreconditioner."""

    last_metrics: Optional[StepMetrics]
    _skips_logged: dict[str, int]

    def _timed_refresh(self, layers: list[KFACLayer]) -> dict[str, Any]:
        """`_refresh(layers)`, timed, with the paths this refresh took; logged at INFO."""
        before = dict(self.refresh_stats)
        start = time.perf_counter()
        self._refresh(layers)
        info: dict[str, Any] = {"layers": len(layers), "seconds": time.perf_counter() - start}
        if self.method != "inverse":
            info.update((k, self.refresh_stats.get(k, 0) - before.get(k, 0)) for k in PATHS)
        if logger.isEnabledFor(logging.INFO):
            paths = "".join(f", {k} {info[k]}" for k in PATHS if k in info)
            logger.info("step %d: refreshed %d layers in %.3f s%s", self.steps, len(layers), info["seconds"], paths)
            self._log_skipped()
        return info

    def _log_skipped(self) -> None:
        """INFO: steps skipped since the last call, by cause (reads the device counters:
        called on refresh steps only, where a host sync is allowed)."""
        now = self._health.report()
        logged = self._skips_logged
        new = {k: now[k] - logged.get(k, 0) for k in ("nonfinite_steps", *CAUSES, *SOLVER_COUNTERS)
               if now.get(k, 0) - logged.get(k, 0) > 0}
        self._skips_logged = now
        if new:
            logger.info("step %d: since the last refresh: %s", self.steps,
                        ", ".join(f"{k} +{v}" for k, v in new.items()))

    def _record_step(self, step: int, factor_update: bool, refresh: Optional[dict[str, Any]]) -> None:
        """Fill `last_metrics` for `step` (no host sync) and log it at DEBUG."""
        m = StepMetrics(step)
        kl_clip = _value(self.kl_clip, step)
        if kl_clip is not None:
            lr = _value(self.lr, step)
            if lr is not None:
                m.record("lr", lr)
            m.record("kl_clip", kl_clip)
        if not self.damping.per_layer:
            damping = _value(self.damping, step)
            if damping is not None:
                m.record("damping", damping)
        decay = _value(self.factor_decay, step)
        if decay is not None:
            m.record("factor_decay", decay)
        m.record("factor_update", bool(factor_update))
        m.record("refresh", refresh is not None)
        for k, v in (refresh or {}).items():
            m.record(f"refresh_{k}", v)
        if self.last_nu is not None:
            m.record("nu", self.last_nu)
        self._record_counters(m)
        self.last_metrics = m
        if logger.isEnabledFor(logging.DEBUG):
            host = {k: v for k, v in m._values.items() if not isinstance(v, torch.Tensor)}
            logger.debug("step %d: %s", step, " ".join(f"{k}={v}" for k, v in host.items()))

    def _record_counters(self, m: StepMetrics) -> None:
        """health()'s counters: the device ones copied in one launch (they grow in place)."""
        health = self._health
        live = {"nonfinite_steps": health.nonfinite_steps, **{k: health.causes.get(k) for k in CAUSES},
                **{k: v for k, v in health.causes.items() if k not in CAUSES}}
        on_device = {k: v for k, v in live.items() if v is not None}
        devices = {v.device for v in on_device.values()}
        snapshot: dict[str, Any] = {}
        if len(devices) == 1:
            stacked = torch.stack(list(on_device.values()))
            snapshot = dict(zip(on_device, stacked.unbind()))
        else:  # counters on several devices (a model moved mid-run): one copy per counter
            snapshot = {k: v.clone() for k, v in on_device.items()}
        for k in live:
            m.record(k, snapshot.get(k, 0))
        for k in SOLVER_COUNTERS:
            m.record(k, health.solver[k])
