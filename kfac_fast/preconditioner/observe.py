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

    _metrics: Optional[StepMetrics]
    _pending_metrics: Optional[tuple]
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

    @property
    def last_metrics(self) -> Optional[StepMetrics]:
        """The `StepMetrics` of the last step (None before the first), built on first access
        from what `step()` kept: a step only stores references and one counter copy."""
        pending = self._pending_metrics
        if pending is not None:
            step, host, nu, counter_names, counters, solver = pending
            m = StepMetrics(step)
            for k, v in host.items():
                m.record(k, v)
            if nu is not None:
                m.record("nu", nu)
            values = [*counters[0].unbind(), *counters[1]] if isinstance(counters, tuple) else counters
            for k, v in zip(counter_names, values):
                m.record(k, v)
            for k, v in solver.items():
                m.record(k, v)
            self._metrics, self._pending_metrics = m, None
        return self._metrics

    def _record_step(self, step: int, factor_update: bool, refresh: Optional[dict[str, Any]]) -> None:
        """Keep what `last_metrics` shows for `step` (no host sync; the record itself is
        built when read) and log it at DEBUG."""
        host: dict[str, Any] = {}
        kl_clip = _value(self.kl_clip, step)
        if kl_clip is not None:
            lr = _value(self.lr, step)
            if lr is not None:
                host["lr"] = lr
            host["kl_clip"] = kl_clip
        if not self.damping.per_layer:
            damping = _value(self.damping, step)
            if damping is not None:
                host["damping"] = damping
        decay = _value(self.factor_decay, step)
        if decay is not None:
            host["factor_decay"] = decay
        host["factor_update"] = bool(factor_update)
        host["refresh"] = refresh is not None
        for k, v in (refresh or {}).items():
            host[f"refresh_{k}"] = v
        names, counters = self._counter_snapshot()
        solver = {k: self._health.solver[k] for k in SOLVER_COUNTERS}
        self._pending_metrics = (step, host, self.last_nu, names, counters, solver)
        if logger.isEnabledFor(logging.DEBUG):
            shown = {**host, **solver}
            logger.debug("step %d: %s", step, " ".join(f"{k}={v}" for k, v in shown.items()))

    def _counter_snapshot(self) -> tuple[list[str], Any]:
        """health()'s device counters by name, copied (they grow in place): those created
        so far as one stacked tensor when they share a device (one launch), else a list of
        copies; the names of counters not created yet follow, with 0."""
        health = self._health
        live = {"nonfinite_steps": health.nonfinite_steps, **{k: health.causes.get(k) for k in CAUSES},
                **{k: v for k, v in health.causes.items() if k not in CAUSES}}
        present = {k: v for k, v in live.items() if v is not None}
        names = [*present, *(k for k in live if k not in present)]
        zeros = [0] * (len(live) - len(present))
        if present and len({v.device for v in present.values()}) == 1:
            return names, (torch.stack(list(present.values())), zeros)
        return names, [*(v.clone() for v in present.values()), *zeros]
