"""The math of block-tridiagonal K-FAC (Martens & Grosse 2015, section 4.3), as pure functions.

Conventions are docs/design.md's: vec stacks columns, dW_bar = [dW | db] with the bias as
the last column, (A (x) G) vec(X) = vec(G X A).

Indices. A chain is layers 0..m-1 (0-based) of consecutive nn.Linear modules where
layer k+1's input is an elementwise function of layer k's output, so both are rows of
the same examples. Layer k (the paper's layer i = k+1) has input rows a_bar_k (ones
last when it has a bias; the paper's a_bar_{i-1}) and output-gradient rows g_k (the
paper's g_i; docs/design.md's d, scaled by S). The factors, all running averages with the
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
from typing import Optional, Sequence

import torch

from .. import ops


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


def symmetrize(m: torch.Tensor) -> torch.Tensor:
    """(M + M^T) / 2."""
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
        roots.append(symmetrize((q * d.clamp_min(tiny).rsqrt()) @ q.mT))
    whitened = [symmetrize(r @ m @ r) for r, m in zip(roots, list(m_a) + list(m_g))]
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


def coupling_terms(a_cross: torch.Tensor, g_cross: torch.Tensor, a_inv: torch.Tensor,
                   g_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Psi^A, Psi^G, M^A, M^G) of a pair from its cross factors C, D and the lower
    layer's damped inverses A'^-1, G'^-1 (module docstring)."""
    psi_a = a_cross @ a_inv
    psi_g = g_cross @ g_inv
    return psi_a, psi_g, symmetrize(psi_a @ a_cross.mT), symmetrize(psi_g @ g_cross.mT)


def cross_rows(x: torch.Tensor, ones: bool, dtype: torch.dtype) -> torch.Tensor:
    """Captured rows (..., d) as an (R, d) matrix in `dtype`, ones-column last when `ones`."""
    r = x.reshape(-1, x.shape[-1]).to(dtype)
    if ones:
        r = torch.cat([r, torch.ones(r.shape[0], 1, dtype=dtype, device=r.device)], dim=1)
    return r


def add_diagonal(m: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """M + value I (a new tensor)."""
    return m + value.to(m.dtype) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
