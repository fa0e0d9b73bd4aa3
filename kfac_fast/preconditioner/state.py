"""State: `state_dict` / `load_state_dict` and the memory accounting.

A state dict holds the step count, the method, per layer the factors with their k, the
decompositions (or EKFAC scales) in use and what the layer is (`kind`, `has_bias`), the
health counters and refresh_stats; each curvature extension adds its own entry under its
`state_key`. Key names are stable: checkpoints written by earlier versions (without
`kind`/`has_bias`) load.

Loading checks everything before changing anything: unknown or missing layers, a tensor
whose shape is not the layer's, a layer of another kind or bias, a value that is not a
tensor, a non-finite tensor are refused with the layer named; floating tensors are
converted to this preconditioner's `factor_dtype` (a float32 checkpoint loads into a
float64 preconditioner as float64) and moved to the layer's device.

`state_dict(include_factors=False)` (kfac-pytorch's keyword) leaves out the factors, the
decompositions, the EKFAC scales and the curvature extensions' state: a small state of the
step count, the layers' identities (`kind`, `has_bias`), the health counters and
refresh_stats, marked `"include_factors": False`. Loading it checks the layers as usual and
then starts every factor fresh (k = 0, no decomposition): the first factor-update step after
it builds the factors from that batch alone and refreshes them, and until then `.grad` is
left as the plain gradient. Checkpoint files (`kfac_fast.checkpoint`, format v2) hold either.

Data-parallel: `state_dict()` is not a collective: it is this rank's state (under
factor_sync="inverse" its local factors since the last inversion; under "memory" only the
decompositions it owns, the others are recomputed after a load; on FSDP2-sharded layers
under "memory" also only the factors of the layers it owns, so loading it is refused with a
ValueError naming `synced_state_dict()`). `synced_state_dict()` is the collective that gives
every rank the same, global state, from which a resume is exact.
"""
from __future__ import annotations

from typing import Any

import torch

from ..layers import KFACLayer
from .base import PreconditionerBase


def _expected_shapes(layer: KFACLayer) -> dict[str, tuple]:
    a, g = layer.a_dim, layer.g_dim
    return {"a_factor": tuple(layer.a_shape()), "g_factor": (g, g), "qa": (a, a), "da": (a,), "qg": (g, g),
            "dg": (g,), "a_inv": (a, a), "g_inv": (g, g), "scales": (g, a)}


class StateMixin(PreconditionerBase):
    """The state job of KFACPreconditioner."""

    _COUNTS = ("a_count", "g_count", "scale_count")

    def state_dict(self, include_factors: bool = True) -> dict:
        """Everything needed to continue bit-identically: step count, and per layer the
        factors, their k, and the decompositions (or EKFAC scales) in use.

        include_factors=False: without factors, decompositions and scales (small; see the
        module docstring: loading it restarts the factors).

        Never a collective: safe to call on one rank only (`if rank == 0: ...`).
        Data-parallel it holds this rank's view (see the module docstring, and the
        "distributed" entry it adds); `synced_state_dict()` is the exact, global one.
        """
        if not isinstance(include_factors, bool):
            raise TypeError(f"state_dict: include_factors must be a bool, got {include_factors!r}")
        out = self._state_dict(include_factors)
        if self.distributed is not None:
            out["distributed"] = self.distributed.describe_state(synced=False)
        return out

    def synced_state_dict(self) -> dict:
        """A collective (call it on every rank): the global state, the same on every rank
        (factors averaged, every decomposition present), from which a resume on any
        number of ranks continues exactly. Single-process: `state_dict()`."""
        if self.distributed is None:
            return self._state_dict()
        self.distributed.before_state_dict()
        try:
            out = self._state_dict()
        finally:
            self.distributed.after_state_dict()
        out["distributed"] = self.distributed.describe_state(synced=True)
        return out

    def _state_dict(self, include_factors: bool = True) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            entry: dict[str, Any] = {}
            if include_factors:
                entry.update({c: getattr(layer, c) for c in self._COUNTS})
                entry.update({t: getattr(layer, t).clone() for t in KFACLayer.STATE_TENSORS
                              if getattr(layer, t) is not None})
            entry.update(kind=layer.kind, has_bias=bool(layer.has_bias))
            layers[name] = entry
        out = {"steps": self.steps, "method": self.method, "layers": layers,
               "health": self._health.state_dict(), "refresh_stats": dict(self.refresh_stats)}
        if not include_factors:
            out["include_factors"] = False
            return out
        for curvature in self._curvatures:
            out[curvature.state_key] = curvature.state_dict()
        return out

    def _check_state(self, state: Any) -> None:
        """Raise ValueError / TypeError naming the layer for a state this model cannot load."""
        if not isinstance(state, dict) or not isinstance(state.get("layers"), dict) or "steps" not in state:
            raise ValueError("state must be a dict from KFACPreconditioner.state_dict()")
        if state.get("method", self.method) != self.method:
            raise ValueError(f"state was saved with method={state['method']!r}, "
                             f"this preconditioner has method={self.method!r}")
        if isinstance(state["steps"], bool) or not isinstance(state["steps"], int) or state["steps"] < 0:
            raise TypeError(f"state['steps'] must be an int >= 0, got {state['steps']!r}")
        unknown = set(state["layers"]) - set(self.layers)
        missing = set(self.layers) - set(state["layers"])
        # the whole stored shape against the layer's (a norm's (k, k, d) blocks, an embedding's diagonal)
        resized = sorted(f"{n} ({side} factor {tuple(entry[f'{side}_factor'].shape)}, model needs {want})"
                         for n, entry in state["layers"].items() if n in self.layers and isinstance(entry, dict)
                         for side, want in (("a", tuple(self.layers[n].a_shape())),
                                            ("g", (self.layers[n].g_dim, self.layers[n].g_dim)))
                         if isinstance(entry.get(f"{side}_factor"), torch.Tensor)
                         and entry[f"{side}_factor"].dim() > 0 and tuple(entry[f"{side}_factor"].shape) != want)
        if unknown or missing or resized:
            parts = [f"state has layers this model does not register: {sorted(unknown)}" if unknown else "",
                     f"model layers missing from the state: {sorted(missing)}" if missing else "",
                     f"layers whose size differs: {resized}" if resized else ""]
            raise ValueError("state does not match this model's layers: " + "; ".join(p for p in parts if p))
        for name, entry in state["layers"].items():
            self._check_entry(name, entry, self.layers[name])

    def _check_entry(self, name: str, entry: Any, layer: KFACLayer) -> None:
        if not isinstance(entry, dict):
            raise TypeError(f"state of layer {name!r} must be a dict, got {type(entry).__name__}")
        if "kind" in entry and entry["kind"] != layer.kind:
            raise ValueError(f"layer {name!r}: the state is of a {entry['kind']!r} layer, "
                             f"this model's is {layer.kind!r}")
        if "has_bias" in entry and bool(entry["has_bias"]) != bool(layer.has_bias):
            raise ValueError(f"layer {name!r}: the state was saved with bias={bool(entry['has_bias'])}, "
                             f"this model's layer has bias={bool(layer.has_bias)} (its A would be read "
                             "with the wrong ones-column)")
        for c in self._COUNTS:
            v = entry.get(c, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"layer {name!r}: {c} must be an int >= 0, got {v!r}")
        shapes = _expected_shapes(layer)
        for t in KFACLayer.STATE_TENSORS:
            v = entry.get(t)
            if v is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"layer {name!r}: {t} must be a tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise TypeError(f"layer {name!r}: {t} must be a floating tensor, got {v.dtype}")
            if tuple(v.shape) != shapes[t]:
                raise ValueError(f"layer {name!r}: {t} has shape {tuple(v.shape)}, this model's layer "
                                 f"needs {shapes[t]}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"layer {name!r}: {t} is not finite (a damaged or diverged state)")

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; tensors move to each layer's weight device and
        convert to `factor_dtype`. Everything is checked first (see the module
        docstring): a refused state leaves this preconditioner unchanged.

        A state from `state_dict(include_factors=False)` starts every factor fresh.
        Not a collective. Data-parallel: load the same state (rank 0's) on every rank.
        """
        self._check_state(state)
        for name, entry in state["layers"].items():
            layer = self.layers[name]
            device = layer.module.weight.device
            for c in self._COUNTS:
                setattr(layer, c, int(entry.get(c, 0)))
            for t in KFACLayer.STATE_TENSORS:
                v = entry.get(t)
                setattr(layer, t, None if v is None
                        else v.detach().to(device=device, dtype=self.factor_dtype).clone())
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
