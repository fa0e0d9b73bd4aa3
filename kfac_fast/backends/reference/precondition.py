"""Reference preconditioning: eigen, inverse and EKFAC methods, the KL clip."""
from __future__ import annotations

from typing import Optional

import torch

from kfac_fast._ops import nu_dtype

from .._common import decay_, eigen_denominator, finite_term, is_host_zero, kl_nu, layer_scalar, scaled
from .factors import with_ones

# Per-example EKFAC sums (L > 1) are formed in chunks of at most this many elements of
# the (chunk, d_out, n_a) tensor, to bound memory.
EKFAC_CHUNK_ELEMENTS = 1 << 24


def _dw_bar(weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """dW_bar = [W.view(d_out, -1) | b] in `dtype`: (d_out, d_in[+1])."""
    w = weight_grad.reshape(weight_grad.shape[0], -1).to(dtype)
    if bias_grad is None:
        return w
    return torch.cat([w, bias_grad.reshape(-1, 1).to(dtype)], dim=1)


def _write_back(weight_grad: torch.Tensor, bias_grad: Optional[torch.Tensor], p: torch.Tensor,
                nu: torch.Tensor) -> None:
    """weight_grad <- nu * P[:, :d_in] (reshaped to its shape), bias_grad <- nu * P[:, -1].
    P is the caller's own temporary: it is scaled in place."""
    p = p.mul_(nu.to(p.dtype))
    d_in = p.shape[1] - (0 if bias_grad is None else 1)
    weight_grad.copy_(p[:, :d_in].reshape(weight_grad.shape))
    if bias_grad is not None:
        bias_grad.copy_(p[:, d_in])


def _eigen_one(dw: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor, denom: torch.Tensor) -> tuple:
    """(P, <P, dW_bar>) with P = Q_G[(Q_G^T dW_bar Q_A) / denom]Q_A^T.

    <P, dW_bar> = sum((Q_G^T dW_bar Q_A)^2 / denom): no second pass over P needed. A zero
    denominator (damping 0 on a zero eigenvalue pair) gives 0, the pseudo-inverse's
    answer, not 0/0 = NaN; a NaN denominator stays NaN.
    """
    v = qg.mT @ dw.to(qa.dtype) @ qa
    scaled_v = torch.where(denom == 0, torch.zeros((), dtype=v.dtype, device=v.device), v / denom)
    return qg @ scaled_v @ qa.mT, (v * scaled_v).sum()


def precondition_eigen(grads, qa, da, qg, dg, damping, *, precision=None) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (d_G d_A^T + damping_i)]Q_A^T for each layer.

    grads[i]: (d_out, n_a) dW_bar; qa/da: (n_a, n_a)/(n_a,); qg/dg: (d_out, d_out)/(d_out,);
    damping: per-layer scalars. Computed in qa's dtype; P has grads[i]'s dtype.
    `precision` (the ops' keyword for the kernels' TF32) is ignored: IEEE math here.
    """
    out = []
    for i, grad in enumerate(grads):
        p, _ = _eigen_one(grad, qa[i], qg[i], eigen_denominator(da[i], dg[i], damping, i))
        out.append(p.to(grad.dtype))
    return out


def _inplace(weight_grads, bias_grads, lr, kl_clip, layer_fn) -> torch.Tensor:
    """Shared body of the in-place preconditioners: P and <P, dW_bar> per layer via
    layer_fn(i, dW_bar_i), nu from the KL clip, then .grad <- nu * P. Returns nu."""
    ps, total = [], None
    for i, (w, b) in enumerate(zip(weight_grads, bias_grads)):
        p, term = layer_fn(i, w, b)
        ps.append(p)
        term = finite_term(term)
        total = term if total is None else total + term
    first = weight_grads[0]
    nu = kl_nu(total, lr, kl_clip, first.device, nu_dtype(first))
    for w, b, p in zip(weight_grads, bias_grads, ps):
        _write_back(w, b, p, nu)
    return nu


def precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None, kl_clip=None,
                        precision=None) -> torch.Tensor:
    """In place: .grad <- nu * P (eigen method), bias_grad <- P's last column.

    weight_grads[i]: (d_out, ...) viewed as (d_out, d_in); bias_grads[i]: (d_out,) or
    None (then qa[i] is d_in x d_in). nu = 1 without kl_clip, else
    min(1, sqrt(kl_clip / |sum_i lr^2 sum((Q_G^T dW_bar Q_A)^2 / (d_G d_A^T + damping))|)).
    Returns nu: 0-dim, device of the grads, float32 (float64 for float64 grads).
    """
    def layer(i, w, b):
        return _eigen_one(_dw_bar(w, b, qa[i].dtype), qa[i], qg[i], eigen_denominator(da[i], dg[i], damping, i))
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def precondition_inverse(grads, a_inv, g_inv) -> list:
    """P_i = G_inv_i dW_bar_i A_inv_i; computed in a_inv's dtype, P has grads[i]'s dtype."""
    return [(g_inv[i] @ grad.to(a_inv[i].dtype) @ a_inv[i]).to(grad.dtype) for i, grad in enumerate(grads)]


def precondition_inverse_(weight_grads, bias_grads, a_inv, g_inv, *, lr=None, kl_clip=None) -> torch.Tensor:
    """In place: .grad <- nu * G_inv dW_bar A_inv; KL clip with <P, dW_bar> = sum(P * dW_bar).
    Returns nu (as precondition_eigen_)."""
    def layer(i, w, b):
        dw = _dw_bar(w, b, a_inv[i].dtype)
        p = g_inv[i] @ dw @ a_inv[i]
        return p, (p * dw).sum()
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def _ekfac_sum(x: torch.Tensor, g: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """sum_n (Q_G^T dW_bar_n Q_A)^2 with dW_bar_n = sum_l d_{n,l} a_bar_{n,l}^T: (d_out, n_a).

    x: (N, d_in) or (N, L, d_in), g: (N, d_out) or (N, L, d_out), cast to qa's dtype;
    the ones-column is appended when qa is (d_in+1)^2.
    """
    dtype = qa.dtype
    bias = qa.shape[0] == x.shape[-1] + 1
    if x.dim() == 2:  # L = 1: Q_G^T d a^T Q_A = (Q_G^T d)(Q_A^T a)^T, so two GEMMs
        a = x.to(dtype)
        a = with_ones(a) if bias else a
        return ((g.to(dtype) @ qg) ** 2).mT @ ((a @ qa) ** 2)
    n = x.shape[0]
    total = torch.zeros(qg.shape[0], qa.shape[0], dtype=dtype, device=qa.device)
    chunk = max(1, EKFAC_CHUNK_ELEMENTS // max(1, qg.shape[0] * qa.shape[0]))
    for start in range(0, n, chunk):
        a = x[start:start + chunk].to(dtype)  # (c, L, d_in)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        d = g[start:start + chunk].to(dtype)  # (c, L, d_out)
        dw = d.mT @ a  # (c, d_out, n_a): per-example dW_bar_n
        total += ((qg.mT @ dw @ qa) ** 2).sum(dim=0)
    return total


def ekfac_scales_(scales, xs, gs, qa, qg, beta, alpha) -> list:
    """S_i <- beta_i S_i + alpha_i * sum_n (Q_G^T dW_bar_n Q_A)^2, in place.

    scales[i]: (d_out, n_a) float32/64; beta, alpha: per-layer scalars (the caller folds
    1/N into alpha); alpha == 0 keeps NaN of xs/gs out (a CPU alpha == 0 skips them).
    Returns scales.
    """
    for i, s in enumerate(scales):
        b, a = layer_scalar(beta, i), layer_scalar(alpha, i)
        decay_(s, b)
        if is_host_zero(a):
            continue
        s.add_(scaled(a, _ekfac_sum(xs[i], gs[i], qa[i], qg[i]).to(s.dtype)))
    return scales


def _ekfac_denominator(scales, damping, i: int, dtype: torch.dtype) -> torch.Tensor:
    """S_i + damping_i in the eigenvectors' dtype."""
    return scales[i].to(dtype) + layer_scalar(damping, i).to(dtype)


def precondition_ekfac(grads, qa, qg, scales, damping) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (S_i + damping_i)]Q_A^T; P has grads[i]'s dtype."""
    out = []
    for i, grad in enumerate(grads):
        p, _ = _eigen_one(grad, qa[i], qg[i], _ekfac_denominator(scales, damping, i, qa[i].dtype))
        out.append(p.to(grad.dtype))
    return out


def precondition_ekfac_(weight_grads, bias_grads, qa, qg, scales, damping, *, lr=None, kl_clip=None) -> torch.Tensor:
    """In place EKFAC preconditioning; KL clip with sum((Q_G^T dW_bar Q_A)^2 / (S + damping)).
    Returns nu (as precondition_eigen_)."""
    def layer(i, w, b):
        denom = _ekfac_denominator(scales, damping, i, qa[i].dtype)
        return _eigen_one(_dw_bar(w, b, qa[i].dtype), qa[i], qg[i], denom)
    return _inplace(weight_grads, bias_grads, lr, kl_clip, layer)


def kl_clip_scale(grads, precond_grads, lr, kl_clip) -> torch.Tensor:
    """nu = min(1, sqrt(kl_clip / |sum_i lr^2 <P_i, g_i>|)), 1 when the sum is 0.

    Accumulated in float32 (float64 for float64 grads). Returns a 0-dim tensor on the
    grads' device.
    """
    dtype = nu_dtype(grads[0])
    total = sum(finite_term((p.to(dtype) * g.to(dtype)).sum()) for g, p in zip(grads, precond_grads))
    return kl_nu(total, lr, kl_clip, grads[0].device, dtype)
