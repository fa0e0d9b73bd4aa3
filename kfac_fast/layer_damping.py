"""Damping that may differ per layer: the `damping=` argument of `KFACPreconditioner`.

Three forms, all read on the host (Python numbers, never a device tensor):
- a number or a callable of the step count: one lambda for every layer (the default);
- a dict {module name or regex: number or schedule}: a key equal to a layer's name wins,
  else the first key (in dict order) that `re.fullmatch`es the name; the key "default"
  serves every layer no other key matches (without it, every layer must match a key);
- a callable `f(name, step) -> number` (two required positional parameters).

The precondition ops already take one damping per layer, so a per-layer damping costs
nothing on the device: the frontend hands them a list.

Read as a number (`float(pc.damping)`, as kfac-pytorch users do) it is the shared value at
the preconditioner's current step; a per-layer damping has no single value and raises a
TypeError that says to use `for_layers(names, step)`.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Iterable, Optional, Union

from .schedules import Hyperparameter, damping_range

DEFAULT_KEY = "default"


def _takes_name_and_step(fn: Callable) -> bool:
    """Whether `fn` wants (name, step) rather than (step): two required positionals."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: a plain schedule
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) >= 2


class LayerDamping:
    """The damping of every layer at a step.

    Calling it with a step gives the one value every layer shares (the "default" key
    for a dict); `per_layer` says whether layers may differ, and `for_layers` gives the
    values of named layers (a float when they cannot differ, else a list).
    """

    def __init__(self, damping: Union[float, Callable, dict]) -> None:
        self._uniform: Optional[Hyperparameter] = None
        self._by_name: Optional[Callable[[str, int], float]] = None
        self._rules: list = []  # (key, compiled regex, Hyperparameter)
        self._resolved: dict[str, Hyperparameter] = {}
        if isinstance(damping, dict):
            for key, value in damping.items():
                if not isinstance(key, str):
                    raise TypeError(f"damping: dict keys must be module names or regexes, got {key!r}")
                if key == DEFAULT_KEY:
                    self._uniform = Hyperparameter("damping['default']", value, damping_range)
                    continue
                try:
                    pattern = re.compile(key)
                except re.error as exc:
                    raise ValueError(f"damping: bad regex key {key!r}: {exc}") from None
                self._rules.append((key, pattern, Hyperparameter(f"damping[{key!r}]", value, damping_range)))
        elif callable(damping) and _takes_name_and_step(damping):
            self._by_name = damping
        else:
            self._uniform = Hyperparameter("damping", damping, damping_range)
        self.per_layer = bool(self._rules) or self._by_name is not None
        self._owner: Any = None

    def bind(self, owner: Any) -> "LayerDamping":
        """Read the current step from `owner.steps` when used as a number (`float(d)`)."""
        self._owner = owner
        if self._uniform is not None:
            self._uniform.bind(owner)
        return self

    def __float__(self) -> float:
        if self.per_layer:
            raise TypeError("damping is per layer (a dict of layers or a callable of (name, step)): it has "
                            "no single value; use damping.for_layers(names, step)")
        assert self._uniform is not None
        return float(self._uniform)

    def __format__(self, spec: str) -> str:
        return repr(self) if self.per_layer else format(self._uniform, spec)

    def __repr__(self) -> str:
        if self.per_layer:
            return f"LayerDamping(per layer: {[k for k, _, _ in self._rules] or 'f(name, step)'})"
        return f"LayerDamping({self._uniform!r})"

    def resolve(self, names: Iterable[str]) -> None:
        """Bind each registered layer name to its rule (construction time: a dict that
        leaves a layer without a value fails here, naming it)."""
        if not self.per_layer:
            return
        for name in names:
            if self._by_name is not None:
                self._resolved[name] = Hyperparameter(
                    f"damping({name!r}, step)", lambda step, n=name, fn=self._by_name: fn(n, step), damping_range)
                continue
            exact = [h for key, _, h in self._rules if key == name]
            matched = exact or [h for _, p, h in self._rules if p.fullmatch(name)]
            if matched:
                self._resolved[name] = matched[0]
            elif self._uniform is not None:
                self._resolved[name] = self._uniform
            else:
                raise ValueError(f"damping: layer {name!r} matches no key of the damping dict "
                                 f"{[k for k, _, _ in self._rules]} and there is no 'default'")

    def __call__(self, step: int) -> float:
        """The value shared by every layer (the dict's "default")."""
        if self._uniform is None:
            raise TypeError("damping is per layer (a callable of (name, step) or a dict without "
                            "'default'): there is no single value; use for_layers")
        return self._uniform(step)

    def for_layers(self, names: list[str], step: int) -> Union[float, list]:
        """The damping of each named layer at `step`: a float when uniform, else a list."""
        if not self.per_layer:
            return self(step)
        return [self._resolved[n](step) for n in names]
