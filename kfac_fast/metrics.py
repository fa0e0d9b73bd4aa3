"""The `kfac_fast` logger and the per-step metrics record of the frontends.

Logging: every module logs through `logger` ("kfac_fast"), which has only a NullHandler:
nothing is printed unless the application configures logging, e.g.
`logging.getLogger("kfac_fast").setLevel(logging.INFO)` plus a handler (or
`logging.basicConfig(level=logging.INFO)`). INFO is for events that happen at most once per
refresh (refresh paths, damping changes, skipped steps); DEBUG for per-step detail.

Metrics: a frontend fills one `StepMetrics` per step, cheaply. Python numbers are stored as
they are and device tensors stay on the device, so recording never syncs with the GPU.
`as_dict()` reads everything in one transfer, which is a host sync: call it when you log,
not on every step. `write_to(writer)` passes each value to `writer.add_scalar(tag, value,
step)`, which TensorBoard's `SummaryWriter` (and most tracking clients) accept.
"""
from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Any, Union

import torch

logger = logging.getLogger("kfac_fast")
logger.addHandler(logging.NullHandler())

Value = Union[int, float, bool, str, torch.Tensor]


class StepMetrics:
    """What one step of a frontend measured, by name (snake_case), for logging.

    `record` keeps the value as given: a Python number or string, or a 0-dim tensor on any
    device, which is not read. Reading happens in `as_dict()`.
    """

    def __init__(self, step: int) -> None:
        self.step = int(step)
        self._values: dict[str, Value] = {}

    def record(self, name: str, value: Value) -> None:
        if not name.isidentifier():
            raise ValueError(f"StepMetrics.record: name must be snake_case, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"StepMetrics.record: {name} must be a single value, got shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        elif not isinstance(value, (Real, str)):
            raise TypeError(f"StepMetrics.record: {name} must be a number, string or 0-dim tensor, "
                            f"got {type(value).__name__}")
        self._values[name] = value

    def names(self) -> list[str]:
        return list(self._values)

    def as_dict(self) -> dict[str, Any]:
        """Every value as a Python number (or string): one device-to-host transfer per
        device holding recorded tensors; integer and bool tensors give ints. `step` is
        included."""
        out: dict[str, Any] = {"step": self.step}
        by_device: dict[torch.device, list[str]] = {}
        for name, value in self._values.items():
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, []).append(name)
            else:
                out[name] = value
        for names in by_device.values():
            stacked = torch.stack([self._values[n].to(torch.float64) for n in names])  # type: ignore[union-attr]
            for name, number in zip(names, stacked.tolist()):
                value = self._values[name]
                # integer and bool tensors (counters, flags) come back as Python ints
                floating = value.is_floating_point()  # type: ignore[union-attr]
                out[name] = number if floating else int(number)
        return {name: out[name] for name in ["step", *self._values]}

    def write_to(self, writer: Any, prefix: str = "kfac/") -> None:
        """`writer.add_scalar(prefix + name, value, step)` for every finite number (strings
        and NaN/Inf are skipped: TensorBoard plots neither)."""
        for name, value in self.as_dict().items():
            if name != "step" and isinstance(value, Real) and math.isfinite(float(value)):
                writer.add_scalar(prefix + name, float(value), self.step)

    def __repr__(self) -> str:
        return f"StepMetrics(step={self.step}, names={self.names()})"
