"""Warm-started eigenbasis refresh (kfac_fast.backends.warm_eigh): the guarantee on every path.

Sequences mimic training: a zero-debiased running average (decay 0.95) of sample
covariances Z^T Z / m whose generating matrix drifts slowly, refreshed every 10 updates.
"""
import functools
import math

import pytest
import torch

from kfac_fast.backends.warm_eigh import FULL, KEPT, REFINED, default_ortho_tol, warm_eigh

DECAY = 0.95


def full_eigh(matrices):
    out = [torch.linalg.eigh(m) for m in matrices]
    return [d for d, _ in out], [q for _, q in out]


class CountingSolve:
    def __init__(self):
        self.calls = []

    def __call__(self, matrices):
        self.calls.append([m.shape[0] for m in matrices])
        return full_eigh(matrices)


@functools.lru_cache(maxsize=None)
def training_factors(n, refreshes, seed, rows=None, drift=0.002):
    """Factors at each refresh (every 10 updates), float64 (cached: do not modify)."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or (2 * n if n > 3 else 64)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    gen = torch.arange(1, n + 1, dtype=torch.float64).pow(-0.5)[:, None] * basis
    push = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    factor = torch.zeros(n, n, dtype=torch.float64)
    out = []
    for k in range(1, 10 * refreshes + 1):
        z = torch.randn(rows, n, generator=g, dtype=torch.float64) @ (gen + drift * k * push)
        beta = DECAY * (1 - DECAY ** (k - 1)) / (1 - DECAY ** k)
        factor = beta * factor + (1 - beta) * z.T @ z / rows
        if k % 10 == 0:
            out.append(factor.clone())
    return out


def ratio64(a, q):
    """Off-diagonal ratio of the returned basis, recomputed in float64."""
    a, q = a.double(), q.double()
    b = q.T @ a @ q
    return ((b - torch.diag(b.diagonal())).norm() / a.norm()).item()


def check_guarantee(a, d, q, tol, path, clamp=True):
    n = a.shape[0]
    eps = torch.finfo(a.dtype).eps
    assert d.shape == (n,) and q.shape == (n, n) and d.dtype == a.dtype == q.dtype
    assert bool((d[1:] >= d[:-1]).all()), "eigenvalues must be ascending"
    if clamp:
        assert bool((d >= 0).all())
    defect = (q.double().T @ q.double() - torch.eye(n, dtype=torch.float64)).norm().item()
    # r is measured in the factor's dtype; recomputing it in float64 moves it by rounding
    slack = 50 * math.sqrt(n) * eps
    if path == FULL:
        assert ratio64(a, q) <= 1e3 * n * eps
        assert defect <= 1e3 * n * eps
    else:
        assert ratio64(a, q) <= tol + slack
        assert defect <= default_ortho_tol(n, a.dtype) + slack
    b_diag = (q.double().T @ a.double() @ q.double()).diagonal()
    want = b_diag.clamp_min(0) if clamp else b_diag
    assert torch.allclose(d.double(), want, atol=slack * a.double().norm().item(), rtol=0)


# tol below the sequences' off-diagonal ratios between refreshes (n = 3: 0.01-0.03,
# n = 64: 0.06-0.09, n = 300: ~0.06) so that each refines: Jacobi for n = 3 and 64, the
# rotation step for n = 300. KEPT is covered by the tests further down.
@pytest.mark.parametrize("n, tol, warm_path", [(3, 0.015, REFINED), (64, 0.03, REFINED),
                                               (300, 0.03, REFINED)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guarantee_at_every_refresh(n, tol, warm_path, dtype):
    factors = [f.to(dtype) for f in training_factors(n, refreshes=5, seed=n)]
    q = None
    paths = []
    for a in factors:
        d, qs, p = warm_eigh([a], [q], tol, full_solve=full_eigh)
        check_guarantee(a, d[0], qs[0], tol, p.item())
        paths.append(p.item())
        q = qs[0]
    assert paths[0] == FULL  # no previous basis
    assert warm_path in paths[1:], paths


def eigen_precondition(grad, qa, da, qg, dg, damping):
    return qg @ ((qg.T @ grad @ qa) / (dg[:, None] * da[None, :] + damping)) @ qa.T


@pytest.mark.parametrize("n_in, n_out, tol", [(64, 3, 0.03), (300, 64, 0.06)])
def test_preconditioned_gradient_within_tol_bound(n_in, n_out, tol):
    """||P_warm - P_exact|| / ||P_exact|| <= (r_A |A| |G|_2 + r_G |G| (|A|_2 + r_A |A|)) / lam.

    The bound of kfac_fast.warm_eigh's docstring, with the ratios r measured on the
    returned bases (each <= tol by the guarantee) and |.| the Frobenius norm.
    """
    damping = 1e-2
    g = torch.Generator().manual_seed(7)
    a_seq = training_factors(n_in, refreshes=4, seed=1)
    g_seq = training_factors(n_out, refreshes=4, seed=2)
    qa = qg = None
    warm = 0
    for a, gf in zip(a_seq, g_seq):
        (da, dg), (qa, qg), paths = warm_eigh([a, gf], [qa, qg], tol, full_solve=full_eigh)
        warm += int((paths != FULL).sum())
        grad = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
        ea, va = torch.linalg.eigh(a)
        eg, vg = torch.linalg.eigh(gf)
        exact = eigen_precondition(grad, va, ea.clamp_min(0), vg, eg.clamp_min(0), damping)
        approx = eigen_precondition(grad, qa, da, qg, dg, damping)
        err = ((approx - exact).norm() / exact.norm()).item()
        r_a, r_g = ratio64(a, qa), ratio64(gf, qg)
        assert r_a <= tol and r_g <= tol
        a_f, g_f = a.norm().item(), gf.norm().item()
        a_2, g_2 = torch.linalg.matrix_norm(a, 2).item(), torch.linalg.matrix_norm(gf, 2).item()
        bound = (r_a * a_f * g_2 + r_g * g_f * (a_2 + r_a * a_f)) / damping
        assert err <= bound * (1 + 1e-6) + 1e-12, (err, bound)
    assert warm > 0  # the bound was tested on warm bases, not only on full solves


def test_factor_that_jumps_falls_back_to_full_solve():
    a_prev, a = training_factors(64, refreshes=2, seed=3)
    q_prev = torch.linalg.eigh(a_prev)[1]
    unrelated = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(4)))[0]
    solve = CountingSolve()
    d, q, paths = warm_eigh([a, a], [q_prev, unrelated], 0.03, full_solve=solve)
    assert paths.tolist() == [REFINED, FULL]
    assert solve.calls == [[64]]  # one batched call, only the factor that jumped
    for i in range(2):
        check_guarantee(a, d[i], q[i], 0.03, paths[i].item())


def test_order_and_signs_of_previous_do_not_matter():
    factors = training_factors(64, refreshes=3, seed=5)
    q0 = torch.linalg.eigh(factors[0])[1]
    signs = torch.where(torch.arange(64) % 3 == 0, -1.0, 1.0).double()
    shuffled = (q0 * signs).flip(-1)  # descending order, some columns negated
    for prev in (q0, shuffled):
        q = prev
        paths = []
        for a in factors[1:]:
            d, qs, p = warm_eigh([a], [q], 0.03, full_solve=full_eigh)
            check_guarantee(a, d[0], qs[0], 0.03, p.item())
            paths.append(p.item())
            q = qs[0]
        assert paths == [REFINED, REFINED]


def test_unchanged_factor_keeps_the_basis():
    a = training_factors(300, refreshes=1, seed=6)[0]
    d_prev, q_prev = torch.linalg.eigh(a)
    d, q, paths = warm_eigh([a], [q_prev], 1e-8, full_solve=CountingSolve())
    assert paths.tolist() == [KEPT]
    assert torch.equal(q[0], q_prev)  # eigh's order is already ascending: no permutation
    assert torch.allclose(d[0], d_prev.clamp_min(0), atol=1e-12 * a.norm().item(), rtol=0)


def test_rotation_step_refines_well_separated_spectrum():
    """Above jacobi_max_n: a nearly diagonal B with distinct eigenvalues is REFINED."""
    n = 200
    g = torch.Generator().manual_seed(8)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    noise = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e-4
    core = torch.diag(torch.linspace(1, 3, n, dtype=torch.float64)) + noise + noise.T
    a = basis @ core @ basis.T
    d, q, paths = warm_eigh([a], [basis], 1e-9, full_solve=CountingSolve(), jacobi_max_n=128)
    assert paths.tolist() == [REFINED]
    check_guarantee(a, d[0], q[0], 1e-9, REFINED)


def test_rotation_step_that_stalls_goes_to_full():
    """Clustered eigenvalues with strong coupling: the rotation step cannot converge."""
    n = 200
    g = torch.Generator().manual_seed(9)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    noise = torch.randn(n, n, generator=g, dtype=torch.float64) * 2e-3
    a = basis @ (torch.eye(n, dtype=torch.float64) + noise + noise.T) @ basis.T
    solve = CountingSolve()
    d, q, paths = warm_eigh([a], [basis], 1e-6, full_solve=solve, jacobi_max_n=128)
    assert paths.tolist() == [FULL] and solve.calls == [[n]]
    check_guarantee(a, d[0], q[0], 1e-6, FULL)


@pytest.mark.parametrize("n", [5, 17])
def test_jacobi_refines_odd_sizes(n):
    g = torch.Generator().manual_seed(n)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float32))[0]
    noise = torch.randn(n, n, generator=g, dtype=torch.float32) * 1e-2
    a = basis @ (torch.diag(torch.rand(n, generator=g)) + noise + noise.T) @ basis.T
    d, q, paths = warm_eigh([a], [basis], 1e-5, full_solve=CountingSolve())
    assert paths.tolist() == [REFINED]
    check_guarantee(a, d[0], q[0], 1e-5, REFINED)


def test_mixed_sizes_batch_and_missing_previous():
    f64 = training_factors(64, refreshes=2, seed=10)
    f3 = training_factors(3, refreshes=2, seed=11)
    prev = [torch.linalg.eigh(f64[0])[1], None, torch.linalg.eigh(f3[0])[1],
            torch.linalg.eigh(f64[0])[1]]
    mats = [f64[1], f3[1], f3[1], f64[1]]
    solve = CountingSolve()
    d, q, paths = warm_eigh(mats, prev, 0.03, full_solve=solve)
    assert paths[1] == FULL and solve.calls == [[3]]
    assert torch.equal(q[0], q[3]) and torch.equal(d[0], d[3])  # same input, same answer
    for a, di, qi, p in zip(mats, d, q, paths.tolist()):
        check_guarantee(a, di, qi, 0.03, p)


def test_clamp_off_keeps_negative_eigenvalues():
    a = torch.diag(torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    d, _, paths = warm_eigh([a], [torch.eye(3, dtype=torch.float64)], 1e-12,
                            full_solve=full_eigh, clamp=False)
    assert paths.tolist() == [KEPT] and d[0].tolist() == [-1.0, 0.5, 2.0]


def test_nonfinite_factor_goes_to_full_solve():
    a = torch.eye(4)
    a[1, 2] = float("nan")
    solve = CountingSolve()
    _, _, paths = warm_eigh([a], [torch.eye(4)], 1e-3, full_solve=solve)
    assert paths.tolist() == [FULL] and solve.calls == [[4]]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(previous=[]), ValueError, "previous must have one entry per matrix"),
    (dict(previous=[torch.eye(3)]), ValueError, r"previous\[0\] must have the shape"),
    (dict(previous=[torch.eye(4, dtype=torch.float64)]), TypeError, r"previous\[0\] must match"),
    (dict(tol=-1.0), ValueError, "tol must be a finite number >= 0"),
    (dict(tol=float("nan")), ValueError, "tol must be a finite number >= 0"),
    (dict(max_steps=-1), ValueError, "max_steps"),
    (dict(matrices=[torch.eye(4, dtype=torch.float16)]), TypeError, r"matrices\[0\] must be float32"),
    (dict(matrices=[torch.ones(4, 3)]), ValueError, r"matrices\[0\] must be a square"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(matrices=[torch.eye(4)], previous=[torch.eye(4)], tol=1e-3)
    args.update(kwargs)
    matrices, previous, tol = args.pop("matrices"), args.pop("previous"), args.pop("tol")
    with pytest.raises(error, match=match):
        warm_eigh(matrices, previous, tol, full_solve=full_eigh, **args)
