"""Block-tridiagonal K-FAC (Martens & Grosse 2015, section 4.3) for chains of Linear layers.

Conventions are DESIGN.md's: vec stacks columns, dW_bar = [dW | db] with the bias as
the last column, (A (x) G) vec(X) = vec(G X A).

Indices. A chain is layers 0..m-1 (0-based) of consecutive nn.Linear modules where
layer k+1's input is an elementwise function of layer k's output, so both are rows of
the same examples. Layer k (the paper's layer i = k+1) has input rows a_bar_k (ones
last when it has a bias; the paper's a_bar_{i-1}) and output-gradient rows g_k (the
paper's g_i; DESIGN.md's d, scaled by S). The factors, all running averages with the
same zero-debiased beta_k rule:
    A_k = E[a_bar_k a_bar_k^T]            (a_k x a_k)   the layer's own a_factor
    G_k = E[g_k g_k^T]                    (g_k x g_k)   the layer's own g_factor
    C_k = E[a_bar_k a_bar_{k+1}^T]        (a_k x a_{k+1})  paper: A_bar_{i-1,i}
    D_k = E[g_k g_{k+1}^T]                (g_k x g_{k+1})  paper: G_{i,i+1}
so F_{k,k+1} ~ C_k (x) D_k. Damping goes on the diagonal factors first (factored
Tikhonov, `ops.pi_damping` per layer): A'_k = A_k + pi_k gamma I, G'_k = G_k + gamma/pi_k I.
For the pair (k, k+1):
    Psi^A_k = C_k A'_{k+1}^-1,  Psi^G_k = D_k G'_{k+1}^-1,  Psi_k = Psi^A_k (x) Psi^G_k
    (Psi_k = F_{k,k+1} F'_{k+1,k+1}^-1 exactly, since the Kronecker inverse factors),
    Sigma_k = A'_k (x) G'_k - M^A_k (x) M^G_k,
    M^A_k = Psi^A_k A'_{k+1} Psi^A_k^T = C_k A'_{k+1}^-1 C_k^T, M^G_k = D_k G'_{k+1}^-1 D_k^T;
the last layer of a chain has Sigma_{m-1} = A'_{m-1} (x) G'_{m-1} (block-diagonal).
Sigma_k^-1 without any Kronecker product: with A'^-1/2 the symmetric inverse root,
A'^-1/2 M^A A'^-1/2 = E_A diag(s_A) E_A^T and G'^-1/2 M^G G'^-1/2 = E_G diag(s_G) E_G^T,
K_A = A'^-1/2 E_A, K_G = G'^-1/2 E_G:
    Sigma_k^-1 vec(X) = vec(K_G [(K_G^T X K_A) / (1 - s_G s_A^T)] K_A^T).
1 - s_G s_A^T > 0 because Sigma_k is the Schur complement of a positive definite
matrix (a Khatri-Rao product of the joint PSD statistics plus damping); it is floored
at the dtype's eps against rounding.

The step: F^-1 ~ Xi^T Lambda Xi, Xi block upper-bidiagonal with identity diagonal
blocks and -Psi_k at block (k, k+1), Lambda = diag(Sigma_0^-1, ..., Sigma_{m-1}^-1):
    y_k = dW_k - Psi^G_k dW_{k+1} Psi^A_k^T   (y_{m-1} = dW_{m-1})
    z_k = Sigma_k^-1 y_k
    P_k = z_k - Psi^G_{k-1}^T z_{k-1} Psi^A_{k-1}   (P_0 = z_0).
A pair without state (a layer that did not fire, a refresh not yet made) splits the
chain there: both sides fall back to the block-diagonal blocks, exactly the formulas
above with Psi = 0.

Cost per pair beyond block-diagonal K-FAC: the cross factors C_k, D_k (a_k a_{k+1} +
g_k g_{k+1} numbers, one GEMM each per factor update); at refresh two eigendecompositions
of the damped diagonal factors and two of the whitened ones; per step two extra
Kronecker-vector products (Psi and Psi^T) and one eigenbasis product. `memory_usage()`
reports them under the pair's key "upper|lower".
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from . import ops
from .health import guard_weights
from .preconditioner import KFACPreconditioner, _grad_bar
from .schedules import running_average_weights

# modules that act elementwise, so the next Linear sees rows of the same examples
ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid,
               nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink, nn.Identity)


def find_chains(model: nn.Module, layers: dict) -> list[list[str]]:
    """Chains (>= 2 names) of registered nn.Linear layers inside any nn.Sequential of
    `model`, consecutive up to elementwise activations (`ELEMENTWISE`)."""
    by_module = {id(l.module): name for name, l in layers.items() if l.kind == "linear"}
    chains = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        current: list[str] = []
        for child in seq.children():
            name = by_module.get(id(child))
            if name is not None:
                current.append(name)
            elif not isinstance(child, ELEMENTWISE):
                if len(current) > 1:
                    chains.append(current)
                current = []
        if len(current) > 1:
            chains.append(current)
    return chains


# ------------------------------------------------------------------------ the math
@dataclasses.dataclass
class SigmaInverse:
    """Sigma^-1 of one pair: vec(X) -> vec(K_G [(K_G^T X K_A) * scale] K_A^T)."""

    k_a: torch.Tensor
    k_g: torch.Tensor
    scale: torch.Tensor  # 1 / (1 - s_G s_A^T), (g x a)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.k_g @ ((self.k_g.mT @ x @ self.k_a) * self.scale) @ self.k_a.mT


@dataclasses.dataclass
class PairState:
    """The decomposition one pair (k, k+1) contributes: Psi's factors and Sigma_k^-1."""

    psi_a: torch.Tensor  # (a_k, a_{k+1})
    psi_g: torch.Tensor  # (g_k, g_{k+1})
    sigma_inv: SigmaInverse

    def tensors(self) -> dict:
        s = self.sigma_inv
        return {"psi_a": self.psi_a, "psi_g": self.psi_g, "k_a": s.k_a, "k_g": s.k_g, "scale": s.scale}


def _sym(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.mT)


def kronecker_difference_inverses(a: Sequence[torch.Tensor], g: Sequence[torch.Tensor],
                                  m_a: Sequence[torch.Tensor], m_g: Sequence[torch.Tensor]) -> list:
    """(A (x) G - M_A (x) M_G)^-1 for lists of SPD A, G and PSD M_A, M_G, as `SigmaInverse`s,
    from batched eigendecompositions of A, G and the whitened A^-1/2 M_A A^-1/2,
    G^-1/2 M_G G^-1/2 (the paper's way; no Kronecker product is formed)."""
    n = len(a)
    if not (len(g) == len(m_a) == len(m_g) == n):
        raise ValueError(f"kronecker_difference_inverses: a, g, m_a, m_g must have equal lengths, "
                         f"got {len(a)}, {len(g)}, {len(m_a)}, {len(m_g)}")
    if n == 0:
        return []
    vals, vecs = ops.eigh(list(a) + list(g))
    roots = []
    for d, q in zip(vals, vecs):
        tiny = torch.finfo(d.dtype).tiny
        roots.append(_sym((q * d.clamp_min(tiny).rsqrt()) @ q.mT))
    whitened = [_sym(r @ m @ r) for r, m in zip(roots, list(m_a) + list(m_g))]
    s, e = ops.eigh(whitened)
    out = []
    for i in range(n):
        s_a, s_g = s[i], s[n + i]
        eps = torch.finfo(s_a.dtype).eps
        denom = (1.0 - torch.outer(s_g, s_a)).clamp_min(eps)
        out.append(SigmaInverse(roots[i] @ e[i], roots[n + i] @ e[n + i], denom.reciprocal()))
    return out


def precondition_chain(grads: Sequence[torch.Tensor], pairs: Sequence[Optional[PairState]],
                       diagonal: Sequence[tuple]) -> list:
    """Xi^T Lambda Xi applied to one chain's dW_bar matrices (module docstring).

    grads: dW_bar of layers 0..m-1; pairs[k]: the state of pair (k, k+1) or None
    (length m-1); diagonal[k]: (A'_k^-1, G'_k^-1), used where layer k has no pair below.
    """
    m = len(grads)
    if len(pairs) != max(m - 1, 0) or len(diagonal) != m:
        raise ValueError(f"precondition_chain: need {max(m - 1, 0)} pairs and {m} diagonal "
                         f"blocks for {m} grads, got {len(pairs)} and {len(diagonal)}")
    zs = []
    for k in range(m):
        pair = pairs[k] if k < m - 1 else None
        if pair is None:
            a_inv, g_inv = diagonal[k]
            zs.append(g_inv @ grads[k] @ a_inv)
        else:
            y = grads[k] - pair.psi_g @ grads[k + 1] @ pair.psi_a.mT
            zs.append(pair.sigma_inv.apply(y))
    out = [zs[0]]
    for k in range(1, m):
        pair = pairs[k - 1]
        out.append(zs[k] if pair is None else zs[k] - pair.psi_g.mT @ zs[k - 1] @ pair.psi_a)
    return out


# ------------------------------------------------------------------------ the frontend
@dataclasses.dataclass
class ChainPair:
    """Cross factors of two consecutive layers of a chain and their decomposition."""

    upper: str
    lower: str
    a_cross: Optional[torch.Tensor] = None  # C_k
    g_cross: Optional[torch.Tensor] = None  # D_k
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


class TridiagPreconditioner(KFACPreconditioner):
    """KFACPreconditioner with the paper's block-tridiagonal inverse on Linear chains.

    Layers in a chain (see `find_chains`, or pass `chains` as lists of registered layer
    names in forward order) are preconditioned with Xi^T Lambda Xi; every other layer
    block-diagonally with factored Tikhonov damping (method "inverse", the only method).
    Held captures only (update_factors_in_hooks=False), single process, no GradScaler.
    """

    def __init__(self, model: nn.Module, *, chains: Optional[Iterable[Sequence[str]]] = None,
                 **kwargs) -> None:
        method = kwargs.setdefault("method", "inverse")
        if method != "inverse":
            raise ValueError(f"TridiagPreconditioner: method must be 'inverse' (factored Tikhonov "
                             f"damping of the diagonal factors), got {method!r}")
        if kwargs.get("update_factors_in_hooks"):
            raise ValueError("TridiagPreconditioner: update_factors_in_hooks=True is not supported "
                             "(the cross factors need both layers' captures at step())")
        if kwargs.get("grad_scaler") is not None:
            raise ValueError("TridiagPreconditioner: grad_scaler is not supported")
        kwargs.setdefault("distributed", False)
        if kwargs["distributed"] not in (False, None):
            raise ValueError("TridiagPreconditioner: distributed must be False")
        kwargs["distributed"] = False
        super().__init__(model, **kwargs)
        if chains is None:
            chains = find_chains(model, self.layers)
        else:
            chains = [list(c) for c in chains]
            for c in chains:
                bad = [n for n in c if n not in self.layers or self.layers[n].kind != "linear"]
                if bad or len(c) < 2 or len(set(c)) != len(c):
                    raise ValueError(f"chains: each chain needs >= 2 distinct registered nn.Linear "
                                     f"layer names; {c!r} has bad entries {bad!r}")
        seen = [n for c in chains for n in c]
        if len(seen) != len(set(seen)):
            raise ValueError(f"chains: a layer may belong to one chain only, got {chains!r}")
        self.chains: list[list[str]] = chains
        self.pairs = [ChainPair(c[k], c[k + 1]) for c in chains for k in range(len(c) - 1)]
        self._pair_of = {p.upper: p for p in self.pairs}

    # ---- factors -------------------------------------------------------------------
    def _update_factors(self, layers: list) -> None:
        super()._update_factors(layers)
        held = {l.name for l in layers}
        for pair in self.pairs:
            if pair.upper in held and pair.lower in held:
                self._update_pair(pair)

    def _update_pair(self, pair: ChainPair) -> None:
        """C, D <- beta_k (C, D) + (1 - beta_k) (this step's cross statistics)."""
        up, lo = self.layers[pair.upper], self.layers[pair.lower]
        if len(up.inputs) != len(lo.inputs) or len(up.grads) != len(lo.grads):
            raise RuntimeError(f"tridiagonal K-FAC: layers {pair.upper!r} and {pair.lower!r} were "
                               f"captured {len(up.inputs)}/{len(lo.inputs)} times (inputs) and "
                               f"{len(up.grads)}/{len(lo.grads)} times (grads) this step; a chain's "
                               "layers must run once each per forward")
        dtype, device = self.factor_dtype, up.a_factor.device
        if pair.a_cross is None:
            pair.a_cross = torch.zeros(up.a_dim, lo.a_dim, dtype=dtype, device=device)
            pair.g_cross = torch.zeros(up.g_dim, lo.g_dim, dtype=dtype, device=device)
        pair.count += 1
        beta, w = running_average_weights(self.factor_decay(self.steps), pair.count)
        a_sum = self._cross_sum(pair, up.inputs, lo.inputs, (up.has_bias, lo.has_bias))
        g_sum = self._cross_sum(pair, up.grads, lo.grads, (False, False), loss_scaled=True)
        rows = sum(up.input_row_count(x) for x in up.inputs)
        n = sum(g.shape[0] for g in up.grads)
        ok = self._captures_ok  # the step's finite flag, set by the diagonal update
        for factor, total, count in ((pair.a_cross, a_sum, rows), (pair.g_cross, g_sum, n)):
            if ok is None:
                factor.mul_(beta).add_(total, alpha=w / max(count, 1))
                continue
            # a bad step leaves the factor as it was, decided on the device
            b, a = guard_weights(ok, [beta], [w / max(count, 1)], device)
            total = torch.where(ok.to(device), total, torch.zeros_like(total))
            factor.mul_(b[0].to(dtype)).add_(total * a[0].to(dtype))

    def _cross_sum(self, pair: ChainPair, upper: list, lower: list, ones: tuple,
                   loss_scaled: bool = False) -> torch.Tensor:
        """sum over this step's captures of X_upper^T X_lower (rows paired one to one)."""
        total = None
        for xu, xl in zip(upper, lower):
            if xu.shape[:-1] != xl.shape[:-1]:
                raise ValueError(f"tridiagonal K-FAC: layers {pair.upper!r} and {pair.lower!r} are "
                                 f"not a chain: row shapes {tuple(xu.shape[:-1])} and "
                                 f"{tuple(xl.shape[:-1])} differ (pass chains= explicitly)")
            ru = _rows(xu, ones[0], self.factor_dtype)
            rl = _rows(xl, ones[1], self.factor_dtype)
            term = ru.mT @ rl
            if loss_scaled:
                s = self._loss_scale(xu)
                term = term * (s * s)
            total = term if total is None else total + term
        return total

    # ---- refresh -------------------------------------------------------------------
    def _refresh(self, layers: list) -> None:
        super()._refresh(layers)
        names = {l.name for l in layers}
        ready = [p for p in self.pairs if p.upper in names and p.lower in names and p.count > 0
                 and self.layers[p.lower].a_inv is not None]
        if not ready:
            return
        a_d, g_d, m_a, m_g, psis = [], [], [], [], []
        for pair in ready:
            up, lo = self.layers[pair.upper], self.layers[pair.lower]
            da, dg = ops.pi_damping(up.a_factor, up.g_factor, self._damping_of(up.name))
            a_d.append(_add_diag(up.a_factor, da))
            g_d.append(_add_diag(up.g_factor, dg))
            psi_a = pair.a_cross @ lo.a_inv  # a_inv, g_inv are the damped inverses
            psi_g = pair.g_cross @ lo.g_inv
            m_a.append(_sym(psi_a @ pair.a_cross.mT))
            m_g.append(_sym(psi_g @ pair.g_cross.mT))
            psis.append((psi_a, psi_g))
        for pair, (psi_a, psi_g), sigma in zip(ready, psis, kronecker_difference_inverses(a_d, g_d, m_a, m_g)):
            pair.state = PairState(psi_a, psi_g, sigma)

    def _damping_of(self, name: str) -> float:
        """The layer's damping this step (the same value its diagonal inverses used)."""
        for_layers = getattr(self.damping, "for_layers", None)
        if for_layers is None:
            return self.damping(self.steps)
        value = for_layers([name], self.steps)
        return value[0] if isinstance(value, list) else value

    def set_row_mask(self, mask) -> None:
        if mask is not None:
            raise ValueError("TridiagPreconditioner: set_row_mask is not supported (the cross "
                             "factors pair every row of consecutive layers)")
        super().set_row_mask(mask)

    def inverse_snapshot(self) -> list:
        """The pairs' decompositions in use (for a caller that refreshes and may go back)."""
        return [p.state for p in self.pairs]

    def restore_inverses(self, snapshot: list) -> None:
        for pair, state in zip(self.pairs, snapshot):
            pair.state = state

    # ---- the step ------------------------------------------------------------------
    def _precondition(self, layers: list) -> None:
        chosen = [l for l in layers if l.module.weight.grad is not None
                  and (not l.has_bias or l.module.bias.grad is not None)]
        if not chosen:
            self.last_nu = None
            return
        names = {l.name for l in chosen}
        grads = {l.name: _grad_bar(l) for l in chosen}
        precond = {}
        for chain in self.chains:
            run: list[str] = []
            for name in chain + [None]:  # None closes the last run
                if name in names:
                    run.append(name)
                    continue
                if run:
                    precond.update(self._precondition_run(run, grads))
                run = []
        rest = [n for n in grads if n not in precond]
        if rest:
            ps = ops.precondition_inverse([grads[n] for n in rest], [self.layers[n].a_inv for n in rest],
                                          [self.layers[n].g_inv for n in rest])
            precond.update(zip(rest, ps))
        order = list(grads)
        kl_clip = self.kl_clip(self.steps)
        device = chosen[0].module.weight.grad.device
        if kl_clip is None:
            nu = torch.ones((), dtype=torch.float32, device=device)
        else:
            nu = ops.kl_clip_scale([grads[n] for n in order], [precond[n] for n in order],
                                   self.lr(self.steps), kl_clip)
        for name in order:
            layer, p = self.layers[name], precond[name]
            w = layer.module.weight.grad
            w.copy_((p[:, :layer.in_dim] * nu).reshape(w.shape))
            if layer.has_bias:
                layer.module.bias.grad.copy_(p[:, -1] * nu)
        self.last_nu = nu

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
    def _state_dict(self) -> dict:
        out = super()._state_dict()
        out["tridiag"] = {p.key: {"count": p.count, **{n: t.clone() for n, t in p.tensors().items()}}
                          for p in self.pairs}
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("tridiag", {})
        for pair in self.pairs:
            entry = saved.get(pair.key)
            device = self.layers[pair.upper].module.weight.device
            if entry is None:
                pair.a_cross = pair.g_cross = pair.state = None
                pair.count = 0
                continue
            t = {n: v.detach().to(device).clone() for n, v in entry.items() if isinstance(v, torch.Tensor)}
            pair.count = int(entry["count"])
            pair.a_cross, pair.g_cross = t.get("a_cross"), t.get("g_cross")
            pair.state = (PairState(t["psi_a"], t["psi_g"], SigmaInverse(t["k_a"], t["k_g"], t["scale"]))
                          if "psi_a" in t else None)

    def memory_usage(self) -> dict[str, int]:
        """Bytes per layer name, plus per pair "upper|lower" (cross factors, Psi, Sigma^-1)."""
        out = super().memory_usage()
        for pair in self.pairs:
            out[pair.key] = sum(t.numel() * t.element_size() for t in pair.tensors().values())
        return out

    def tridiag_memory_usage(self) -> int:
        """Bytes the tridiagonal approximation adds over the block-diagonal one."""
        return sum(sum(t.numel() * t.element_size() for t in p.tensors().values()) for p in self.pairs)


def _rows(x: torch.Tensor, ones: bool, dtype: torch.dtype) -> torch.Tensor:
    r = x.reshape(-1, x.shape[-1]).to(dtype)
    if ones:
        r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=dtype, device=r.device)], dim=1)
    return r


def _add_diag(m: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return m + value.to(m.dtype) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
