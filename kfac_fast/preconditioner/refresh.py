"""Refresh: the eigendecompositions (or damped inverses) the preconditioning uses.

Run on inverse-update steps and for layers without a decomposition yet (host syncs are
allowed here). Solves go through `Health`'s fallback chain; a warm refresh (`eigh_tol`)
reports per factor whether it kept, refined or fully solved the previous basis, counted
in `refresh_stats`. Data-parallel, the owner ranks refresh and share the results.
Curvature extensions refresh after the layers, with the same per-layer damping. A layer
that owns its block (a norm) has nothing to refresh: it is applied from its current block.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..layers import KFACLayer
from .base import PreconditionerBase


class RefreshMixin(PreconditionerBase):
    """The refresh job of KFACPreconditioner."""

    def _refresh(self, layers: list[KFACLayer]) -> None:
        if self.distributed is not None:
            # factors averaged across ranks, decompositions shared out (kfac_fast.distributed)
            solved, paths = self.distributed.refresh(layers, self.damping(self.steps))
            if self.method != "inverse" and solved:
                self._count_refresh(paths, solved)
            return
        if any(layer.owns_block for layer in layers):
            layers = [layer for layer in layers if not layer.owns_block]
        if not layers:
            return
        if self.method == "inverse":
            self._refresh_inverses(layers)
        else:
            self._refresh_eigen(layers)
        for curvature in self._curvatures:
            curvature.refresh(layers, self._damping_of)

    def _refresh_inverses(self, layers: list[KFACLayer]) -> None:
        damping = self._layer_damping(layers)
        per = damping if isinstance(damping, list) else [damping] * len(layers)
        pis = [ops.pi_damping(layer.a_factor, layer.g_factor, d) for layer, d in zip(layers, per)]
        # failures fall back to fp64, more damping, then the inverse in use (counted)
        invs = self._health.solve_inverse([layer.a_factor for layer in layers] + [layer.g_factor for layer in layers],
                                          [p[0] for p in pis] + [p[1] for p in pis],
                                          [layer.a_inv for layer in layers] + [layer.g_inv for layer in layers])
        for i, layer in enumerate(layers):
            layer.a_inv, layer.g_inv = invs[i], invs[len(layers) + i]

    def _refresh_eigen(self, layers: list[KFACLayer]) -> None:
        # a diagonal A (embeddings) is its own eigendecomposition (Q_A = I, never stored)
        dense = [layer for layer in layers if not layer.diagonal_a]
        # failures fall back to fp64, more damping, then the decomposition in use (counted)
        factors = [layer.a_factor for layer in dense] + [layer.g_factor for layer in layers]
        vals, vecs, paths = self._health.solve_eigh(
            factors,
            [None if layer.qa is None else (layer.da, layer.qa) for layer in dense]
            + [None if layer.qg is None else (layer.dg, layer.qg) for layer in layers], tol=self.eigh_tol)
        self._count_refresh(paths, len(factors))
        for i, layer in enumerate(dense):
            layer.da, layer.qa = vals[i], vecs[i]
        for j, layer in enumerate(layers, start=len(dense)):
            layer.dg, layer.qg = vals[j], vecs[j]
            if layer.diagonal_a:
                layer.da = layer.diagonal_eigenvalues()
            if self.method == "ekfac":
                # a new basis restarts the scales; until their first update they are
                # K-FAC's own (S = d_G d_A^T), so the step stays well defined
                layer.scales = torch.outer(layer.dg, layer.da).contiguous()
                layer.scale_count = 0

    def _damping_of(self, name: str) -> float:
        """One layer's damping this step (the value its own refresh used)."""
        value = self.damping.for_layers([name], self.steps)
        return value[0] if isinstance(value, list) else value

    def _count_refresh(self, paths: Optional[torch.Tensor], count: int) -> None:
        """Add one refresh's per-factor paths to refresh_stats (None: all fully solved)."""
        if paths is None or len(paths) != count:
            self.refresh_stats["full"] += count
            return
        names = ops.EIGH_PATHS
        for name, n in zip(names, torch.bincount(paths, minlength=len(names)).tolist()):
            self.refresh_stats[name] += n

    def _has_inverse_state(self, layer: KFACLayer, method: str) -> bool:
        if self.distributed is not None:
            # rank-identical (under "memory" only the owner holds the decomposition)
            return self.distributed.is_ready(layer)
        if layer.owns_block:  # applied from its current block: ready once it has one
            return layer.a_count > 0
        if method == "inverse":
            return layer.a_inv is not None
        if method == "ekfac":
            return layer.qa is not None and layer.scales is not None
        return layer.dg is not None  # a diagonal A never holds a qa
