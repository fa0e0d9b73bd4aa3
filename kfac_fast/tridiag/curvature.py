"""The block-tridiagonal pairs as a `Curvature` extension of KFACPreconditioner.

One `ChainPair` per two consecutive layers of a chain holds the cross factors C_k, D_k
(running averages with the layers' own zero-debiased beta_k rule) and, after a refresh,
the pair's Psi and Sigma_k^-1 (`algebra`). `TridiagonalCurvature` is what the
preconditioner's jobs call: it updates the cross factors after the layers' own factor
update, refreshes every ready pair after the layers' inverses, preconditions the runs of
chain layers that have gradients, and keeps its state under the key "tridiag".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import ops
from ..health import guard_weights
from ..layers import KFACLayer
from ..preconditioner import UpdateContext
from ..schedules import running_average_weights
from .algebra import (
    PairState,
    SigmaInverse,
    add_diagonal,
    coupling_terms,
    cross_rows,
    kronecker_difference_inverses,
    precondition_chain,
)


@dataclasses.dataclass
class ChainPair:
    """Cross factors of two consecutive layers of a chain and their decomposition."""

    upper: str
    lower: str
    # C_k and D_k: Tensors, or None before the pair's first update (Any: read only after it)
    a_cross: Any = None
    g_cross: Any = None
    count: int = 0
    state: Optional[PairState] = None

    @property
    def key(self) -> str:
        return f"{self.upper}|{self.lower}"

    def tensors(self) -> dict:
        out = {n: getattr(self, n) for n in ("a_cross", "g_cross") if getattr(self, n) is not None}
        if self.state is not None:
            out.update(self.state.tensors())
        return out


class TridiagonalCurvature:
    """The off-diagonal blocks F_{k,k+1} of every chain (a `Curvature`)."""

    state_key = "tridiag"

    def __init__(self, chains: list[list[str]], layers: dict[str, KFACLayer], factor_dtype: torch.dtype) -> None:
        self.chains = chains
        self.layers = layers
        self.factor_dtype = factor_dtype
        self.pairs = [ChainPair(c[k], c[k + 1]) for c in chains for k in range(len(c) - 1)]
        self._pair_of = {p.upper: p for p in self.pairs}

    # ---- factors -------------------------------------------------------------------
    def update(self, layers: list[KFACLayer], context: UpdateContext) -> None:
        held = {layer.name for layer in layers}
        for pair in self.pairs:
            if pair.upper in held and pair.lower in held:
                self._update_pair(pair, context)

    def _update_pair(self, pair: ChainPair, context: UpdateContext) -> None:
        """C, D <- beta_k (C, D) + (1 - beta_k) (this step's cross statistics)."""
        up, lo = self.layers[pair.upper], self.layers[pair.lower]
        if len(up.inputs) != len(lo.inputs) or len(up.grads) != len(lo.grads):
            raise RuntimeError(f"tridiagonal K-FAC: layers {pair.upper!r} and {pair.lower!r} were "
                               f"captured {len(up.inputs)}/{len(lo.inputs)} times (inputs) and "
                               f"{len(up.grads)}/{len(lo.grads)} times (grads) this step; a chain's "
                               "layers must run once each per forward")
        dtype, device = context.dtype, up.a_factor.device
        if pair.a_cross is None:
            pair.a_cross = torch.zeros(up.a_dim, lo.a_dim, dtype=dtype, device=device)
            pair.g_cross = torch.zeros(up.g_dim, lo.g_dim, dtype=dtype, device=device)
        pair.count += 1
        beta, w = running_average_weights(context.decay, pair.count)
        a_sum = self._cross_sum(pair, up.inputs, lo.inputs, (up.has_bias, lo.has_bias), dtype)
        g_sum = self._cross_sum(pair, up.grads, lo.grads, (False, False), dtype, context.loss_scale)
        rows = sum(up.input_row_count(x) for x in up.inputs)
        n = sum(g.shape[0] for g in up.grads)
        ok = context.ok  # the step's finite flag, set by the diagonal update
        for factor, total, count in ((pair.a_cross, a_sum, rows), (pair.g_cross, g_sum, n)):
            if ok is None:
                factor.mul_(beta).add_(total, alpha=w / max(count, 1))
                continue
            # a bad step leaves the factor as it was, decided on the device
            b, a = guard_weights(ok, [beta], [w / max(count, 1)], device)
            total = torch.where(ok.to(device), total, torch.zeros_like(total))
            factor.mul_(b[0].to(dtype)).add_(total * a[0].to(dtype))

    @staticmethod
    def _cross_sum(pair: ChainPair, upper: list, lower: list, ones: tuple, dtype: torch.dtype,
                   loss_scale: Optional[Callable] = None) -> torch.Tensor:
        """sum over this step's captures of X_upper^T X_lower (rows paired one to one),
        each term times S^2 when `loss_scale` gives S."""
        total: Any = None
        for xu, xl in zip(upper, lower):
            if xu.shape[:-1] != xl.shape[:-1]:
                raise ValueError(f"tridiagonal K-FAC: layers {pair.upper!r} and {pair.lower!r} are "
                                 f"not a chain: row shapes {tuple(xu.shape[:-1])} and "
                                 f"{tuple(xl.shape[:-1])} differ (pass chains= explicitly)")
            term = cross_rows(xu, ones[0], dtype).mT @ cross_rows(xl, ones[1], dtype)
            if loss_scale is not None:
                s = loss_scale(xu)
                term = term * (s * s)
            total = term if total is None else total + term
        return total

    # ---- refresh -------------------------------------------------------------------
    def refresh(self, layers: list[KFACLayer], damping_of: Callable[[str], float]) -> None:
        names = {layer.name for layer in layers}
        ready = [p for p in self.pairs if p.upper in names and p.lower in names and p.count > 0
                 and self.layers[p.lower].a_inv is not None]
        if not ready:
            return
        a_d, g_d, m_a, m_g, psis = [], [], [], [], []
        for pair in ready:
            up, lo = self.layers[pair.upper], self.layers[pair.lower]
            da, dg = ops.pi_damping(up.a_factor, up.g_factor, damping_of(up.name))
            a_d.append(add_diagonal(up.a_factor, da))
            g_d.append(add_diagonal(up.g_factor, dg))
            # a_inv, g_inv are the lower layer's damped inverses
            psi_a, psi_g, ma, mg = coupling_terms(pair.a_cross, pair.g_cross, lo.a_inv, lo.g_inv)
            m_a.append(ma)
            m_g.append(mg)
            psis.append((psi_a, psi_g))
        for pair, (psi_a, psi_g), sigma in zip(ready, psis, kronecker_difference_inverses(a_d, g_d, m_a, m_g)):
            pair.state = PairState(psi_a, psi_g, sigma)

    # ---- precondition --------------------------------------------------------------
    def precondition(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """P of every run of consecutive chain layers with gradients (Xi^T Lambda Xi)."""
        out: dict[str, torch.Tensor] = {}
        for chain in self.chains:
            run: list[str] = []
            for name in chain + [None]:  # None closes the last run
                if name in grads:
                    run.append(name)
                    continue
                if run:
                    out.update(self._precondition_run(run, grads))
                run = []
        return out

    def _precondition_run(self, run: list, grads: dict) -> dict:
        dtype = self.factor_dtype
        pairs = []
        for upper, lower in zip(run[:-1], run[1:]):
            pair = self._pair_of.get(upper)
            pairs.append(pair.state if pair is not None and pair.lower == lower else None)
        diagonal = [(self.layers[n].a_inv, self.layers[n].g_inv) for n in run]
        ps = precondition_chain([grads[n].to(dtype) for n in run], pairs, diagonal)
        return {n: p.to(grads[n].dtype) for n, p in zip(run, ps)}

    # ---- state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {p.key: {"count": p.count, **{n: t.clone() for n, t in p.tensors().items()}} for p in self.pairs}

    def load_state_dict(self, entry: dict) -> None:
        for pair in self.pairs:
            saved = entry.get(pair.key)
            device = self.layers[pair.upper].module.weight.device
            if saved is None:
                pair.a_cross = pair.g_cross = pair.state = None
                pair.count = 0
                continue
            t = {n: v.detach().to(device).clone() for n, v in saved.items() if isinstance(v, torch.Tensor)}
            pair.count = int(saved["count"])
            pair.a_cross, pair.g_cross = t.get("a_cross"), t.get("g_cross")
            pair.state = (PairState(t["psi_a"], t["psi_g"], SigmaInverse(t["k_a"], t["k_g"], t["scale"]))
                          if "psi_a" in t else None)

    def memory_usage(self) -> dict[str, int]:
        """Bytes per pair "upper|lower" (cross factors, Psi, Sigma^-1)."""
        return {p.key: sum(t.numel() * t.element_size() for t in p.tensors().values()) for p in self.pairs}

    def snapshot(self) -> list:
        """The pairs' decompositions in use."""
        return [p.state for p in self.pairs]

    def restore(self, snapshot: list) -> None:
        for pair, state in zip(self.pairs, snapshot):
            pair.state = state
