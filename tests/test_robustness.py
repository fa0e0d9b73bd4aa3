"""Robustness of KFACPreconditioner: non-finite steps, solver failures, the memory guard.

A non-finite step must leave every factor and decomposition as it was, leave `.grad`
unpreconditioned, and be counted; a failing solver walks fp64 -> more damping -> the
previous result, each rung counted; `max_factor_dim` skips big layers with a warning.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner, health, ops


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def batch(seed, poison=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g)
    if poison is not None:
        x[2, 1] = poison
    return x, torch.randint(0, 3, (6,), generator=g)


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def snapshot(precond):
    return {n: {k: v.clone() for k, v in layer.state_tensors().items()} for n, layer in precond.layers.items()}


def assert_state_equal(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys()
        for k in before[name]:
            assert torch.equal(before[name][k], after[name][k]), f"{name}.{k} changed"


# ---------------------------------------------------------------------------------------
# non-finite steps
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("method,in_hooks", [("eigen", False), ("eigen", True), ("inverse", False),
                                             ("ekfac", False)])
def test_nonfinite_step_keeps_state_and_leaves_grad_unpreconditioned(float64_default, method, in_hooks,
                                                                     poison):
    model = mlp()
    # inv_update_steps=1: the bad step is also a refresh step (not for EKFAC: a refresh
    # restarts its scales by design, so they could not stay equal)
    precond = KFACPreconditioner(model, method=method, inv_update_steps=10 if method == "ekfac" else 1,
                                 kl_clip=1e-2,
                                 factor_dtype=torch.float64, update_factors_in_hooks=in_hooks)
    for seed in range(2):
        backward(model, *batch(seed))
        precond.step()
    before = snapshot(precond)

    raw = backward(model, *batch(5, poison))
    assert not all(torch.isfinite(g).all() for g in raw)  # the poison did reach the grads
    precond.step()
    assert_state_equal(before, snapshot(precond))
    for g, p in zip(raw, model.parameters()):
        assert torch.equal(g.isnan(), p.grad.isnan())
        assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(p.grad))  # not preconditioned
    assert precond.health()["nonfinite_steps"] == 1
    assert precond.state_dict()["health"]["nonfinite_steps"].item() == 1

    # the next good step updates and preconditions as usual
    raw = backward(model, *batch(6))
    precond.step()
    assert precond.health()["nonfinite_steps"] == 1
    for name, layer in precond.layers.items():
        assert torch.isfinite(layer.a_factor).all() and torch.isfinite(layer.g_factor).all()
        assert not torch.equal(layer.a_factor, before[name]["a_factor"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not all(torch.equal(g, p.grad) for g, p in zip(raw, model.parameters()))


def test_nonfinite_capture_with_finite_grads_is_dropped(float64_default):
    """A non-finite capture alone (grads finite) still drops the step."""
    model = mlp()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64, kl_clip=None)
    backward(model, *batch(0))
    precond.step()
    before = snapshot(precond)
    raw = backward(model, *batch(1))
    precond.layers["2"].inputs[0] = precond.layers["2"].inputs[0].clone().fill_(float("inf"))
    precond.step()
    assert_state_equal(before, snapshot(precond))
    for g, p in zip(raw, model.parameters()):
        assert torch.equal(g, p.grad)
    assert precond.health()["nonfinite_steps"] == 1


def test_guard_can_be_turned_off(float64_default):
    model = mlp()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64, guard_nonfinite=False)
    backward(model, *batch(0))
    precond.step()
    backward(model, *batch(1, float("nan")))
    precond.step()
    assert precond.health()["nonfinite_steps"] == 0
    with pytest.raises(TypeError, match="guard_nonfinite"):
        KFACPreconditioner(mlp(), guard_nonfinite=1)


def test_all_finite_flags_each_kind_of_bad_value():
    good = [torch.ones(3, dtype=torch.float16), torch.full((2, 2), 6e4, dtype=torch.float16),
            torch.empty(0, 4), torch.arange(3)]
    assert bool(health.all_finite(good))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(4, dtype=torch.bfloat16)
        t[3] = bad
        assert not bool(health.all_finite(good + [t]))
    assert health.all_finite([torch.empty(0), None]) is None


# ---------------------------------------------------------------------------------------
# solver failures (refresh steps)
# ---------------------------------------------------------------------------------------
def trained(method="eigen", steps=2):
    model = mlp()
    precond = KFACPreconditioner(model, method=method, inv_update_steps=1, factor_dtype=torch.float32)
    for seed in range(steps):
        backward(model, *batch(seed))
        precond.step()
    return model, precond


@pytest.mark.parametrize("rung", ["fp64_retries", "damped_retries"])
def test_eigh_failure_walks_the_fallback_chain(monkeypatch, rung):
    model, precond = trained()
    real = ops.eigh
    seen = []

    def fake(matrices, *args, **kwargs):
        m = matrices[0]
        seen.append(m.dtype)
        if rung == "fp64_retries" and m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected")
        if rung == "damped_retries" and len(seen) <= 3:  # batch, plain, fp64 fail; shifted works
            raise torch.linalg.LinAlgError("injected")
        return real(matrices, *args, **kwargs)

    monkeypatch.setattr(health.ops, "eigh", fake)
    backward(model, *batch(7))
    precond.step()
    report = precond.health()
    assert report[rung] >= 1
    for layer in precond.layers.values():
        for t in (layer.qa, layer.da, layer.qg, layer.dg):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
        n = layer.qa.shape[0]
        torch.testing.assert_close(layer.qa.mT @ layer.qa, torch.eye(n), atol=1e-5, rtol=0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_unsolvable_factor_keeps_the_previous_result(monkeypatch, method):
    model, precond = trained(method)
    before = snapshot(precond)
    name = "eigh" if method == "eigen" else "damped_inverse"

    def fake(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected: never converges")

    monkeypatch.setattr(health.ops, name, fake)
    backward(model, *batch(7))
    precond.step()
    after = snapshot(precond)
    kept = ("qa", "da", "qg", "dg") if method == "eigen" else ("a_inv", "g_inv")
    for n in before:
        for k in kept:
            assert torch.equal(before[n][k], after[n][k])
    assert precond.health()["kept_previous"] == 2 * len(precond.layers)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nonfinite_factor_keeps_the_previous_decomposition():
    """A factor poisoned outside the guarded path (e.g. a bad load) is never decomposed."""
    model, precond = trained()
    qa = precond.layers["0"].qa.clone()
    precond.layers["0"].a_factor[0, 0] = float("nan")
    backward(model, *batch(7))
    precond.step()
    assert torch.equal(precond.layers["0"].qa, qa)
    assert precond.health()["kept_previous"] == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_solver_without_previous_result_falls_back_to_identity(monkeypatch):
    monkeypatch.setattr(health.ops, "eigh", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    h = health.Health()
    vals, vecs, _ = h.solve_eigh([torch.eye(3)], [None])
    assert torch.equal(vecs[0], torch.eye(3)) and torch.equal(vals[0], torch.zeros(3))
    assert h.report()["kept_previous"] == 1


@pytest.mark.parametrize("spectrum", [
    [0.0] * 6,                                   # all zero
    [1e30, 1e-30, 0.0, 0.0, 1.0, 1e10],           # huge range, rank-deficient
    [1e-40, 1e-42, 1e-39, 0.0, 0.0, 1e-41],       # denormals in float32
])
def test_hard_spectra_solve_to_finite_results(spectrum):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    m = ((q * torch.tensor(spectrum, dtype=torch.float64)) @ q.mT).float()
    h = health.Health()
    vals, vecs, _ = h.solve_eigh([m], [None])
    assert torch.isfinite(vals[0]).all() and torch.isfinite(vecs[0]).all()
    inv = h.solve_inverse([m], [torch.tensor(1e-3)], [None])
    assert torch.isfinite(inv[0]).all()


# ---------------------------------------------------------------------------------------
# memory guard
# ---------------------------------------------------------------------------------------
def test_max_factor_dim_skips_big_layers_with_one_warning_naming_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 40), nn.Tanh(), nn.Linear(40, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond = KFACPreconditioner(model, max_factor_dim=10)
    assert set(precond.layers) == {"0"}
    messages = [str(w.message) for w in caught if "max_factor_dim" in str(w.message)]
    assert len(messages) == 2 and "'2'" in messages[0] and "'4'" in messages[1]
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    raw = backward(model, x, y)
    precond.step()
    assert torch.equal(raw[2], model[2].weight.grad)  # the skipped layer is untouched
    usage = precond.memory_usage()
    assert usage["0"] > 0 and precond.total_memory_usage() == sum(usage.values())
    with pytest.raises(ValueError, match="max_factor_dim"):
        KFACPreconditioner(model, max_factor_dim=0)
