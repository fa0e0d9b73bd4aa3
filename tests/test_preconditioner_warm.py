"""KFACPreconditioner(eigh_tol=...): warm-started eigenbasis refreshes.

Two twins see identical factors (same model, same batches, no optimizer step), one with
full refreshes and one warm; their preconditioned gradients must agree within the bound
of kfac_fast.warm_eigh's docstring, and refresh_stats must account for every factor.
"""
import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner

TOL = 0.03
DAMPING = 1e-2


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 150), nn.Tanh(), nn.Linear(150, 7))


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _run(steps, eigh_tol, noise=0.05, seed=0):
    """Preconditioned grads (per step) and the preconditioner; factors identical for any tol."""
    model = _model(seed)
    precond = KFACPreconditioner(model, inv_update_steps=1, damping=DAMPING, kl_clip=None,
                                 factor_decay=0.95, factor_dtype=torch.float64, eigh_tol=eigh_tol)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 7, generator=gen, dtype=torch.float64)
    model.double()
    out = []
    for _ in range(steps):
        x = x0 + noise * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        precond.step()
        out.append(_grads(model))
    return out, precond


def test_refresh_stats_add_up_and_warm_paths_are_used():
    steps = 8
    _, precond = _run(steps, TOL)
    stats = precond.refresh_stats
    n_factors = 2 * len(precond.layers)
    assert set(stats) == {"kept", "refined", "full"}
    assert sum(stats.values()) == steps * n_factors
    assert stats["full"] >= n_factors  # the first refresh has no previous basis
    assert stats["kept"] + stats["refined"] > 0  # slowly moving factors are reused


def test_refresh_stats_survive_a_state_dict_round_trip():
    _, precond = _run(4, TOL)
    fresh = KFACPreconditioner(_model().double(), eigh_tol=TOL)
    fresh.load_state_dict(precond.state_dict())
    assert fresh.refresh_stats == precond.refresh_stats and sum(fresh.refresh_stats.values()) > 0


def test_default_is_full_solve():
    _, precond = _run(3, None)
    assert precond.eigh_tol is None
    assert precond.refresh_stats == {"kept": 0, "refined": 0, "full": 3 * 2 * len(precond.layers)}


def test_tol_zero_equals_full_solve():
    full, _ = _run(4, None)
    warm, precond = _run(4, 0.0)
    assert precond.refresh_stats["kept"] + precond.refresh_stats["refined"] == 0
    for gs_f, gs_w in zip(full, warm):
        for a, b in zip(gs_f, gs_w):
            torch.testing.assert_close(a, b)


def test_warm_preconditioned_gradients_within_bound():
    steps = 8
    full, pf = _run(steps, None)
    warm, pw = _run(steps, TOL)
    assert pw.refresh_stats["kept"] + pw.refresh_stats["refined"] > 0
    layers = list(pf.layers.values())
    # warm_eigh's bound with r_A, r_G <= tol (factors of the last step; the bound holds at
    # every step, and the factors barely move, so the last ones give a fair scale)
    for name, lf in pf.layers.items():
        lw = pw.layers[name]
        torch.testing.assert_close(lf.a_factor, lw.a_factor)  # the twins see identical factors
        torch.testing.assert_close(lf.g_factor, lw.g_factor)
    worst = 0.0
    for gs_f, gs_w in zip(full, warm):
        for k, layer in enumerate(layers):
            pa = torch.cat([gs_f[2 * k], gs_f[2 * k + 1][:, None]], 1)
            pb = torch.cat([gs_w[2 * k], gs_w[2 * k + 1][:, None]], 1)
            a_norm = torch.linalg.matrix_norm(layer.a_factor)
            g_norm = torch.linalg.matrix_norm(layer.g_factor)
            bound = (2 * TOL + TOL * TOL) * float(a_norm * g_norm) / DAMPING
            rel = float(torch.linalg.matrix_norm(pa - pb) / torch.linalg.matrix_norm(pa))
            assert rel <= bound, (layer.name, rel, bound)
            worst = max(worst, rel)
    assert worst < 0.1  # and in practice the error is small


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_eigh_tol_validation(bad):
    with pytest.raises(ValueError):
        KFACPreconditioner(_model(), eigh_tol=bad)


def test_eigh_tol_rejected_for_inverse_method():
    with pytest.raises(ValueError, match="eigh_tol"):
        KFACPreconditioner(_model(), method="inverse", eigh_tol=0.03)


def test_ekfac_accepts_warm_refresh():
    model = _model()
    precond = KFACPreconditioner(model, method="ekfac", inv_update_steps=1, eigh_tol=TOL, kl_clip=None)
    x, y = torch.randn(32, 12), torch.randn(32, 7)
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        precond.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(precond.refresh_stats.values()) == 4 * 2 * len(precond.layers)
