"""State: `state_dict` / `load_state_dict` and the memory accounting.

A state dict holds the step count, the method, per layer the factors with their k and
the decompositions (or EKFAC scales) in use, the health counters and refresh_stats;
each curvature extension adds its own entry under its `state_key`. Key names are
stable: checkpoints written by earlier versions load.
"""
from __future__ import annotations

import torch

from .base import PreconditionerBase


class StateMixin(PreconditionerBase):
    """The state job of KFACPreconditioner."""

    _TENSORS = ("a_factor", "g_factor", "qa", "da", "qg", "dg", "a_inv", "g_inv", "scales")
    _COUNTS = ("a_count", "g_count", "scale_count")

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: step count, and per layer the
        factors, their k, and the decompositions (or EKFAC scales) in use.

        Data-parallel: a collective (call it on every rank, save rank 0's result).
        """
        if self.distributed is None:
            return self._state_dict()
        self.distributed.before_state_dict()
        try:
            return self._state_dict()
        finally:
            self.distributed.after_state_dict()

    def _state_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            entry = {c: getattr(layer, c) for c in self._COUNTS}
            entry.update({t: getattr(layer, t).clone() for t in self._TENSORS
                          if getattr(layer, t) is not None})
            layers[name] = entry
        out = {"steps": self.steps, "method": self.method, "layers": layers,
               "health": self._health.state_dict(), "refresh_stats": dict(self.refresh_stats)}
        for curvature in self._curvatures:
            out[curvature.state_key] = curvature.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; tensors move to each layer's weight device.

        A layer with factors but no stored decomposition is refreshed at its next step.
        Data-parallel: load the same state (rank 0's) on every rank.
        """
        if not isinstance(state, dict) or "layers" not in state or "steps" not in state:
            raise ValueError("state must be a dict from KFACPreconditioner.state_dict()")
        if state.get("method", self.method) != self.method:
            raise ValueError(f"state was saved with method={state['method']!r}, "
                             f"this preconditioner has method={self.method!r}")
        unknown = set(state["layers"]) - set(self.layers)
        missing = set(self.layers) - set(state["layers"])
        resized = sorted(f"{n} ({side} factor {tuple(entry[f'{side}_factor'].shape)}, model needs {dim})"
                         for n, entry in state["layers"].items() if n in self.layers
                         for side, dim in (("a", self.layers[n].a_dim), ("g", self.layers[n].g_dim))
                         if isinstance(entry.get(f"{side}_factor"), torch.Tensor)
                         and entry[f"{side}_factor"].shape[0] != dim)
        if unknown or missing or resized:
            parts = [f"state has layers this model does not register: {sorted(unknown)}" if unknown else "",
                     f"model layers missing from the state: {sorted(missing)}" if missing else "",
                     f"layers whose size differs: {resized}" if resized else ""]
            raise ValueError("state does not match this model's layers: " + "; ".join(p for p in parts if p))
        for name, entry in state["layers"].items():
            layer = self.layers[name]
            device = layer.module.weight.device
            for c in self._COUNTS:
                setattr(layer, c, int(entry.get(c, 0)))
            for t in self._TENSORS:
                v = entry.get(t)
                setattr(layer, t, None if v is None else v.detach().to(device).clone())
        self.steps = int(state["steps"])
        self._factor_step_cache = (-1, False)
        if "health" in state:
            self._health.load_state_dict(state["health"], next(iter(self.layers.values())).module.weight.device)
        self.refresh_stats = {k: int(v) for k, v in state.get("refresh_stats", self.refresh_stats).items()}
        for curvature in self._curvatures:
            curvature.load_state_dict(state.get(curvature.state_key, {}))
        if self.distributed is not None:
            self.distributed.after_load_state_dict()

    def memory_usage(self) -> dict[str, int]:
        """Bytes held per layer name (state tensors plus captures held right now), plus
        the entries of each curvature extension (e.g. "upper|lower" for a tridiagonal pair)."""
        out = {name: sum(layer.memory_usage().values()) for name, layer in self.layers.items()}
        for curvature in self._curvatures:
            out.update(curvature.memory_usage())
        return out

    def total_memory_usage(self) -> int:
        """Bytes held by all layers together (the sum of `memory_usage()`)."""
        return sum(self.memory_usage().values())
