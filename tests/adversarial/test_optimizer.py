"""Adversarial cases of `kfac_fast.KFAC` (the paper's optimizer), issue 18.

`test_error_<case>`: a clear error naming the argument; `test_safe_<case>`: the documented
safe result (a non-finite update is never applied, and is counted in
`opt.preconditioner.health()["kfac_nonfinite_update"]`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC

pytestmark = pytest.mark.adversarial


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def closure_for(model, x):
    def closure():
        out = model(x)
        return F.binary_cross_entropy_with_logits(out, torch.sigmoid(x), reduction="sum") / x.shape[0], out
    return closure


def data(seed=0):
    return torch.rand(8, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["inverse", "eigen"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_safe_nonfinite_batch_on_a_step_without_adaptation(method, poison):
    model = tiny()
    opt = KFAC(model, "bce_with_logits", method=method, damping_interval=5, gamma_interval=None,
               generator=torch.Generator().manual_seed(0))
    opt.step(closure_for(model, data(0)))  # step 0 adapts; step 1 does not
    before = [p.detach().clone() for p in model.parameters()]
    bad = data(1)
    bad[2, 1] = poison
    opt.step(closure_for(model, bad))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # the update was not applied
    assert opt.preconditioner.health()["kfac_nonfinite_update"] == 1
    # training goes on and stays finite
    for seed in range(2, 6):
        loss = opt.step(closure_for(model, data(seed)))
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_safe_huge_batch_leaves_factors_finite():
    model = tiny()
    opt = KFAC(model, "bce_with_logits", damping_interval=5, gamma_interval=None,
               generator=torch.Generator().manual_seed(0))
    opt.step(closure_for(model, data(0)))
    opt.step(closure_for(model, data(1) * 1e30))
    for layer in opt.preconditioner.layers.values():
        assert all(torch.isfinite(t).all() for t in layer.state_tensors().values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = opt.preconditioner.health()
    assert report["capture_overflow"] + report["nonfinite_capture"] >= 1
    for seed in range(2, 5):
        opt.step(closure_for(model, data(seed)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_error_damping_zero_and_negative():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping"):
            KFAC(tiny(), damping=bad)


@pytest.mark.parametrize("kwargs, name", [
    ({"damping_interval": 0}, "damping_interval"), ({"l2_reg": -1.0}, "l2_reg"),
    ({"method": "ekfac"}, "method"), ({"momentum": "yes"}, "momentum"),
])
def test_error_bad_argument_is_named(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        KFAC(tiny(), "bce_with_logits", **kwargs)


def test_error_unknown_loss():
    with pytest.raises(ValueError, match="hinge"):
        KFAC(tiny(), "hinge")


def test_error_step_without_closure():
    opt = KFAC(tiny(), "bce_with_logits")
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)


def test_error_closure_returning_only_the_loss():
    model = tiny()
    opt = KFAC(model, "bce_with_logits")
    x = data(0)
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: F.binary_cross_entropy_with_logits(model(x), x))


def test_error_closure_with_a_vector_loss():
    model = tiny()
    opt = KFAC(model, "bce_with_logits")
    x = data(0)

    def closure():
        out = model(x)
        return F.binary_cross_entropy_with_logits(out, x, reduction="none"), out
    with pytest.raises(TypeError, match="0-dim"):
        opt.step(closure)


def test_error_closure_outputs_not_depending_on_parameters():
    model = tiny()
    opt = KFAC(model, "bce_with_logits")
    x = data(0)

    def closure():
        out = model(x).detach().requires_grad_()
        return F.binary_cross_entropy_with_logits(out, x), out
    with pytest.raises((RuntimeError, ValueError)):
        opt.step(closure)


def test_error_load_state_dict_without_preconditioner():
    opt = KFAC(tiny(), "bce_with_logits")
    state = opt.state_dict()
    del state["preconditioner"]
    with pytest.raises(ValueError, match="preconditioner"):
        opt.load_state_dict(state)


def test_safe_nan_batch_on_an_adapting_step_is_undone():
    model = tiny()
    opt = KFAC(model, "bce_with_logits", damping_interval=1, gamma_interval=None,
               generator=torch.Generator().manual_seed(0))
    opt.step(closure_for(model, data(0)))
    before = [p.detach().clone() for p in model.parameters()]
    damping = opt.damping
    bad = data(1)
    bad[0, 0] = float("nan")
    opt.step(closure_for(model, bad))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert opt.damping >= damping  # a failed step never lowers the damping


def test_safe_nan_batch_with_momentum_and_gamma_search():
    model = tiny()
    opt = KFAC(model, "bce_with_logits", damping_interval=5, gamma_interval=2, momentum=True,
               generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        opt.step(closure_for(model, data(seed)))
    bad = data(9)
    bad[:, 1] = float("inf")
    opt.step(closure_for(model, bad))
    for seed in range(3, 7):
        assert torch.isfinite(opt.step(closure_for(model, data(seed))))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))
