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


# ---------------------------------------------------------------------------------------
# item 9: aliasing and overlapping memory
# ---------------------------------------------------------------------------------------
def test_error_update_factor_aliased_input():
    a = spd(5)
    with pytest.raises(ValueError, match="x shares memory with factor"):
        ops.update_factor_(a, a, 1.0, 1.0)


def test_error_update_factor_input_is_a_view_of_the_factor():
    a = spd(5)
    with pytest.raises(ValueError, match="x shares memory with factor"):
        ops.update_factor_(a, a[1:3], 0.5, 1.0)


def test_error_update_factors_two_factors_share_memory():
    a = spd(4)
    with pytest.raises(ValueError, match=r"factors\[1\] shares memory with factors\[0\]"):
        ops.update_factors_([a, a], [rand(3, 4, seed=1), rand(3, 4, seed=2)], 0.0, 1.0)


def test_error_update_factors_input_aliases_another_layers_factor():
    a, b = spd(4, 1), spd(4, 2)
    with pytest.raises(ValueError, match="shares memory"):
        ops.update_factors_([a, b], [b, rand(3, 4)], 0.0, 1.0)


def test_safe_update_factors_disjoint_views_of_one_buffer():
    """Factors packed in one buffer (disjoint views) are fine."""
    buf = torch.zeros(2 * 16)
    f0, f1 = buf[:16].view(4, 4), buf[16:].view(4, 4)
    x0, x1 = rand(6, 4, seed=1), rand(6, 4, seed=2)
    ops.update_factors_([f0, f1], [x0, x1], 0.0, 1.0)
    torch.testing.assert_close(f0, x0.mT @ x0)
    torch.testing.assert_close(f1, x1.mT @ x1)


def test_error_conv_input_factor_aliased():
    x = rand(1, 2, 1, 2)
    with pytest.raises(ValueError, match="x shares memory with factor"):
        ops.conv_input_factor_(x.view(2, 2), x, 0.0, 1.0, 1, 1, 0, 1)


def test_error_unpack_triangles_into_an_expanded_factor():
    f = rand(1, 3).expand(3, 3)
    with pytest.raises(ValueError, match=r"factors\[0\] has overlapping memory"):
        ops.unpack_triangles_([f], rand(6))


def test_error_unpack_triangles_flat_aliases_factor():
    f = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shares memory"):
        ops.unpack_triangles_([f], f.view(-1)[:6])


def test_error_precondition_eigen_inplace_stride0_grad():
    w = rand(1, 4).expand(3, 4)
    with pytest.raises(ValueError, match=r"weight_grads\[0\] has overlapping memory"):
        ops.precondition_eigen_([w], [None], [torch.eye(4)], [torch.ones(4)], [torch.eye(3)], [torch.ones(3)], 0.1)


def test_error_precondition_eigen_inplace_grad_aliases_basis():
    q = eye_basis(4)
    with pytest.raises(ValueError, match="shares memory"):
        ops.precondition_eigen_([q], [None], [q], [torch.ones(4)], [eye_basis(4, 1)], [torch.ones(4)], 0.1)


def test_error_precondition_inverse_inplace_weight_and_bias_overlap():
    w = rand(3, 5)
    with pytest.raises(ValueError, match="shares memory"):
        ops.precondition_inverse_([w[:, :4]], [w[:, 3]], [torch.eye(5)], [torch.eye(3)])


def test_error_precondition_ekfac_inplace_same_grad_twice():
    w = rand(3, 4)
    q4, q3, s = eye_basis(4), eye_basis(3), torch.ones(3, 4)
    with pytest.raises(ValueError, match="shares memory"):
        ops.precondition_ekfac_([w, w], [None, None], [q4, q4], [q3, q3], [s, s.clone()], 0.1)


def test_error_ekfac_scales_written_scales_alias_input():
    s = torch.ones(3, 4)
    with pytest.raises(ValueError, match="shares memory"):
        ops.ekfac_scales_([s], [s], [rand(3, 3)], [eye_basis(4)], [eye_basis(3)], 0.5, 1.0)


# ---------------------------------------------------------------------------------------
# item 9: errors that name the argument
# ---------------------------------------------------------------------------------------
def test_error_kl_clip_scale_zero_dim_grads():
    with pytest.raises(ValueError, match=r"grads\[0\] must have at least 1"):
        ops.kl_clip_scale([torch.tensor(1.0)], [torch.tensor(2.0)], 0.1, 0.01)


@pytest.mark.parametrize("op", ["eigen", "inverse", "ekfac"])
def test_error_inplace_preconditioner_with_d_out_zero(op):
    w = torch.zeros(0, 4)
    with pytest.raises(ValueError, match=r"weight_grads\[0\] must have d_out >= 1"):
        if op == "eigen":
            ops.precondition_eigen_([w], [None], [torch.eye(4)], [torch.ones(4)], [torch.eye(0)], [torch.ones(0)], 0.1)
        elif op == "inverse":
            ops.precondition_inverse_([w], [None], [torch.eye(4)], [torch.eye(0)])
        else:
            ops.precondition_ekfac_([w], [None], [torch.eye(4)], [torch.eye(0)], [torch.ones(0, 4)], 0.1)


def test_error_conv_input_factor_zero_channels():
    with pytest.raises(ValueError, match="x must have C, H and W >= 1"):
        ops.conv_input_factor_(torch.zeros(1, 1), rand(2, 0, 4, 4), 0.0, 1.0, 3, 1, 1, 1, append_ones=True)


def test_error_conv_input_factor_zero_height():
    with pytest.raises(ValueError, match="x"):
        ops.conv_input_factor_(torch.zeros(18, 18), rand(2, 2, 0, 4), 0.0, 1.0, 3, 1, 1, 1)


def test_error_conv_input_factor_zero_height_padded():
    with pytest.raises(ValueError, match="x must have C, H and W >= 1"):
        ops.conv_input_factor_(torch.zeros(2, 2), rand(2, 2, 0, 4), 0.0, 1.0, 1, 1, 1, 1)


def test_error_damped_inverse_names_the_nan_matrix():
    good, bad = spd(3, 1), spd(4, 2)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"damped_inverse: matrices\[1\] is not finite"):
        ops.damped_inverse([good, bad], 0.1)


@pytest.mark.parametrize("op", ["eigen", "eigen_", "inverse", "inverse_", "ekfac_"])
def test_error_mixed_factor_dtypes_in_one_layer(op):
    w = rand(3, 4)
    q4, q3 = torch.eye(4, dtype=torch.float64), torch.eye(3)
    with pytest.raises(TypeError, match=r"\[0\] is float64 but .*\[0\] is float32"):
        if op == "eigen":
            ops.precondition_eigen([w], [q4], [torch.ones(4)], [q3], [torch.ones(3)], 0.1)
        elif op == "eigen_":
            ops.precondition_eigen_([w], [None], [q4], [torch.ones(4)], [q3], [torch.ones(3)], 0.1)
        elif op == "inverse":
            ops.precondition_inverse([w], [q4], [q3])
        elif op == "inverse_":
            ops.precondition_inverse_([w], [None], [q4], [q3])
        else:
            ops.precondition_ekfac_([w], [None], [q4], [q3], [torch.ones(3, 4)], 0.1)


def test_error_ekfac_scales_mixed_basis_dtypes():
    with pytest.raises(TypeError, match=r"qa\[0\] is float64 but qg\[0\] is float32"):
        ops.ekfac_scales_([torch.ones(3, 4)], [rand(5, 4)], [rand(5, 3)], [torch.eye(4, dtype=torch.float64)],
                          [torch.eye(3)], 0.0, 1.0)


def test_error_update_factor_integer_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.update_factor_(torch.zeros(4, 4), torch.ones(3, 4, dtype=torch.int64), 0.0, 1.0)


def test_error_update_factor_non_finite_python_beta():
    with pytest.raises(ValueError, match="beta must be finite"):
        ops.update_factor_(torch.zeros(4, 4), rand(3, 4), float("nan"), 1.0)


def test_error_negative_damping_named():
    with pytest.raises(ValueError, match="damping"):
        ops.precondition_eigen([rand(3, 4)], [torch.eye(4)], [torch.ones(4)], [torch.eye(3)], [torch.ones(3)], -1.0)


# ---------------------------------------------------------------------------------------
# item 9: documented safe results
# ---------------------------------------------------------------------------------------
def test_safe_zero_damping_on_zero_eigenvalues_is_not_nan():
    """damping 0 and a zero eigenvalue pair (a dead input feature): that direction gets 0
    (the pseudo-inverse), not 0/0."""
    qa, qg = torch.eye(4), eye_basis(3, 1)
    da = torch.tensor([0.0, 1.0, 2.0, 3.0])
    dg = torch.tensor([0.0, 0.5, 1.5])
    grad = rand(3, 4, seed=2)
    grad[:, 0] = 0.0  # the dead feature's column carries no gradient
    grad = qg @ (qg.mT @ grad)  # (still 0 in column 0: qa is the identity)
    p = ops.precondition_eigen([grad], [qa], [da], [qg], [dg], 0.0)[0]
    assert torch.isfinite(p).all()
    w = grad.clone()
    nu = ops.precondition_eigen_([w], [None], [qa], [da], [qg], [dg], 0.0, lr=0.1, kl_clip=1e-3)
    assert torch.isfinite(w).all() and torch.isfinite(nu) and nu > 0
    torch.testing.assert_close(w, nu * p)


def test_safe_one_nan_layer_does_not_disable_the_kl_clip_for_the_others():
    """nu is computed from the layers whose <P, dW_bar> is finite (docs/ops-api.md): the
    finite layer is clipped exactly as if it were alone."""
    q4, q3 = eye_basis(4), eye_basis(3)
    w_good, w_nan = rand(3, 4, seed=1) * 100, rand(3, 4, seed=2)
    w_nan[0, 0] = float("nan")
    alone = w_good.clone()
    nu_alone = ops.precondition_eigen_([alone], [None], [q4], [torch.ones(4)], [q3], [torch.ones(3)], 1e-3,
                                       lr=1.0, kl_clip=1e-3)
    assert nu_alone < 1  # the clip is active
    both = [w_good.clone(), w_nan]
    nu = ops.precondition_eigen_(both, [None, None], [q4, q4], [torch.ones(4)] * 2, [q3, q3],
                                 [torch.ones(3)] * 2, 1e-3, lr=1.0, kl_clip=1e-3)
    torch.testing.assert_close(nu, nu_alone)
    torch.testing.assert_close(both[0], alone)


def test_safe_kl_clip_scale_skips_a_non_finite_layer():
    g1, p1 = rand(3, 4, seed=1), rand(3, 4, seed=2).abs() * 10
    g2 = rand(5, seed=3)
    g2[1] = float("inf")
    alone = ops.kl_clip_scale([g1.abs()], [p1], 1.0, 1e-3)
    both = ops.kl_clip_scale([g1.abs(), g2], [p1, g2], 1.0, 1e-3)
    assert alone < 1
    torch.testing.assert_close(both, alone)


def test_safe_damped_inverse_of_zero_matrix_with_zero_damping_is_finite():
    """A singular matrix with damping 0: the fallback's small shift keeps it finite."""
    inv = ops.damped_inverse([torch.zeros(3, 3)], 0.0)[0]
    assert torch.isfinite(inv).all()
    torch.testing.assert_close(inv, inv[0, 0] * torch.eye(3))


def test_safe_eigh_of_a_huge_but_finite_matrix_is_finite():
    m = spd(6) * 1e30
    vals, vecs = ops.eigh([m])
    assert torch.isfinite(vals[0]).all() and torch.isfinite(vecs[0]).all()


def test_safe_update_factor_alpha_zero_keeps_nan_input_out():
    f = spd(4)
    before = f.clone()
    x = rand(3, 4)
    x[0, 0] = float("nan")
    ops.update_factor_(f, x, 1.0, 0.0)
    assert torch.equal(f, before)


def test_safe_update_factor_beta_zero_ignores_garbage_in_factor():
    f = torch.full((4, 4), float("nan"))
    x = rand(3, 4)
    ops.update_factor_(f, x, 0.0, 1.0)
    torch.testing.assert_close(f, x.mT @ x)
