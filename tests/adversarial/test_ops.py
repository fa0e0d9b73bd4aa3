"""Adversarial cases of the op API (`kfac_fast.ops`), issue 18.

Every test is named for its outcome: `test_error_<case>` expects a clear ValueError /
TypeError naming the argument; `test_safe_<case>` expects the documented safe result
(finite values, the clamp, an orthonormal basis). The planted-bug checks of issue 18
item 10 are here too, written against independent values.
"""
from __future__ import annotations

import pytest
import torch

from kfac_fast import ops

pytestmark = pytest.mark.adversarial


def spd(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return (m @ m.mT / (n + 3)).to(dtype)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def eye_basis(n, seed=0):
    q, _ = torch.linalg.qr(rand(n, n, seed=seed, dtype=torch.float64))
    return q.float()


# ---------------------------------------------------------------------------------------
# item 10: independent values
# ---------------------------------------------------------------------------------------
def test_safe_negative_eigenvalues_are_clamped_in_a_direct_call():
    """docs/ops-api.md: unclamped eigenvalues are safe. With da, dg containing negatives the
    result equals the one with eigenvalues clamped at 0, written out by hand here."""
    qa, qg = eye_basis(4, 1), eye_basis(3, 2)
    da = torch.tensor([-1.0, -1e-3, 0.5, 2.0])
    dg = torch.tensor([-2.0, 0.25, 1.5])
    grad, damping = rand(3, 4, seed=3), 1e-3
    p = ops.precondition_eigen([grad], [qa], [da], [qg], [dg], damping)[0]
    v = qg.double().mT @ grad.double() @ qa.double()
    denom = dg.double().clamp(min=0)[:, None] * da.double().clamp(min=0)[None, :] + damping
    expected = qg.double() @ (v / denom) @ qa.double().mT
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-5)
    # the in-place form clamps too (and with -damping eigenvalue products it would divide by 0)
    w = grad.clone()
    da_hit = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    dg_hit = torch.tensor([1e-3, 1.0, 1.0])  # dg*da = -1e-3 = -damping unclamped
    ops.precondition_eigen_([w], [None], [qa], [da_hit], [qg], [dg_hit], damping)
    assert torch.isfinite(w).all()


def test_safe_warm_refresh_does_not_keep_a_non_orthonormal_basis():
    """previous = 1.05 Q, where Q is the exact basis: r is tiny but ||Q^T Q - I|| = 0.41,
    so the warm refresh must solve again: the result is orthonormal and exact."""
    m = spd(8, 4, torch.float64)
    d, q = torch.linalg.eigh(m)
    vals, vecs, paths = ops.eigh([m], previous=[1.05 * q], tol=0.5, return_paths=True)
    qn = vecs[0]
    n = m.shape[0]
    assert torch.linalg.norm(qn.mT @ qn - torch.eye(n, dtype=m.dtype)) < 1e-10
    residual = torch.linalg.norm(m @ qn - qn * vals[0]) / torch.linalg.norm(m)
    assert residual < 1e-10
    torch.testing.assert_close(vals[0], d.clamp(min=0), rtol=1e-10, atol=1e-12)
    assert ops.EIGH_PATHS[int(paths[0])] == "full"


def test_safe_warm_refresh_float32_non_orthonormal_basis():
    m = spd(17, 5)
    _, q = torch.linalg.eigh(m.double())
    vals, vecs = ops.eigh([m], previous=[(1.05 * q).float()], tol=0.03)
    qn = vecs[0].double()
    assert torch.linalg.norm(qn.mT @ qn - torch.eye(17, dtype=torch.float64)) < 1e-4
    assert torch.linalg.norm(m.double() @ qn - qn * vals[0].double()) / torch.linalg.norm(m.double()) < 1e-5
