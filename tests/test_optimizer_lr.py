"""kfac_fast.KFAC's lr: a multiplier on the quadratic model's step, kept in param_groups[0]
so torch's lr schedulers drive it (issue 21 item 9). docs/optimizer.md documents it."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from kfac_fast import KFAC
from tests._bce_problem import bce_closure as closure_of
from tests._bce_problem import random_batches as batches

DT = torch.float64


def net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 6)).to(DT)


def make(model, **kw):
    return KFAC(model, "bce_with_logits", factor_dtype=DT, generator=torch.Generator().manual_seed(0), **kw)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------------
# lr = 1 is the step from before lr existed
# ---------------------------------------------------------------------------------------
# Recorded on main at fbaea42 (before `lr`), 12 steps of `net` on `batches(12)`:
# (final parameters' sum, their 2-norm, last loss, lambda, gamma). float64 throughout.
# Re-recorded when KFAC's MC samples became per-example (issue 20, `fisher.ExampleSeed`),
# the only change to these steps since: with the old whole-batch generator patched back in
# that code reproduced the fbaea42 numbers (to the last bit but one ulp of two sums).
BEFORE_LR = {
    "eigen_nogamma": (dict(method="eigen", gamma_interval=None),
                      (3.7596350469914857, 2.7115153601730024, 4.293901974437977, 69.49368452396294,
                       8.336287814366953)),
    "gamma5": (dict(gamma_interval=5, damping=1.0),
               (1.8043828624431772, 4.130138616141667, 3.8577212589163015, 0.463291230159753,
                0.8796525878489613)),
    "tridiag": (dict(approx="tridiag", damping=3.0),
                (3.1031332484112135, 2.9608388382518873, 4.063881304794184, 1.3898736904792588,
                 2.892845890753078)),
}


def _run(kw, steps=12):
    model = net()
    opt = make(model, **kw)
    loss = None
    for x in batches(steps):
        loss = opt.step(closure_of(model, x)).item()
    p = flat(model)
    return model, opt, (p.sum().item(), p.norm().item(), loss, opt.damping, opt.gamma)


@pytest.mark.parametrize("name", list(BEFORE_LR))
def test_default_lr_repeats_the_steps_recorded_before_lr_existed(name):
    kw, expected = BEFORE_LR[name]
    _, opt, got = _run(kw)
    assert opt.param_groups[0]["lr"] == 1.0
    # every step runs the LM rule (T1 = 5) or the gamma search on these numbers: a step
    # that moved differently would change lambda's path and the loss far beyond this
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("lr", [1.0, 1])
def test_lr_one_is_bit_identical_to_lr_omitted(lr):
    kw = dict(gamma_interval=5, damping=1.0)
    m0, _, _ = _run(kw)
    m1, opt, _ = _run(dict(kw, lr=lr))
    assert torch.equal(flat(m0), flat(m1))
    assert isinstance(opt.param_groups[0]["lr"], float)


# ---------------------------------------------------------------------------------------
# what lr multiplies
# ---------------------------------------------------------------------------------------
def _recording(opt, calls):
    original = opt._solve

    def solve(fisher, grads, directions, prev, c):
        out = original(fisher, grads, directions, prev, c)
        calls.append(([d.clone() for d in directions], None if prev is None else [d.clone() for d in prev],
                      out["x"].clone()))
        return out

    opt._solve = solve


@pytest.mark.parametrize("lr", [0.3, 2.5])
def test_update_is_lr_times_the_model_step_with_the_applied_previous_update(lr):
    """theta_{k+1} - theta_k = lr * (alpha Delta + mu delta0), (alpha, mu) the model's
    minimiser (independent of lr given the directions), delta0 the previous update as applied."""
    model = net()
    opt = make(model, lr=lr, gamma_interval=None)
    calls = []
    _recording(opt, calls)
    applied = []
    for x in batches(3):
        before = flat(model).clone()
        opt.step(closure_of(model, x))
        applied.append(flat(model) - before)
        # the record and `last` carry the model's coefficients, not lr times them
        assert opt.last_metrics.as_dict()["alpha"] == opt.last["alpha"].item() == calls[-1][2][0].item()
    for k, (dirs, prev, coef) in enumerate(calls):
        step = coef[0] * torch.cat([d.reshape(-1) for d in dirs])
        if prev is not None:
            delta0 = torch.cat([d.reshape(-1) for d in prev])
            torch.testing.assert_close(delta0, applied[k - 1], rtol=1e-9, atol=1e-15)
            step = step + coef[1] * delta0
        torch.testing.assert_close(applied[k], lr * step, rtol=1e-9, atol=1e-15)
    assert calls[0][1] is None and calls[1][1] is not None and calls[1][2][1] != 0


def test_rho_is_measured_for_the_step_taken():
    """Linear least squares is its own quadratic model, so rho = 1 at any step length; a
    rho that divided by the model change of the unscaled step would read lr - lr^2/2 over
    1/2, i.e. 0.51 at lr 0.3."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DT)
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 2, dtype=DT)

    def closure():
        out = model(x)
        return 0.5 * (out - y).square().sum() / x.shape[0], out

    opt = KFAC(model, "gaussian", lr=0.3, damping=1.0, l2_reg=0.0, gamma_interval=None, factor_dtype=DT,
               generator=torch.Generator().manual_seed(0))
    opt.step(closure)
    assert opt.last["rho"] == pytest.approx(1.0, abs=1e-9)
    assert opt.damping == pytest.approx(0.95 ** 5)


def test_lr_zero_from_a_scheduler_moves_nothing_and_keeps_lambda():
    model = net()
    opt = make(model, gamma_interval=5)
    sched = lr_scheduler.LambdaLR(opt, lambda k: 0.0)
    before = flat(model).clone()
    opt.step(closure_of(model, batches(1)[0]))  # step 0: would adapt lambda and search gamma
    assert torch.equal(flat(model), before)
    assert opt.damping == 150.0 and opt.gamma == math.sqrt(150.0 + 1e-5)
    rec = opt.last_metrics.as_dict()
    assert rec["lr"] == 0.0 and rec["damping_adapted"] is False and rec["gamma_searched"] is False
    assert math.isnan(rec["rho"])
    sched.step()


# ---------------------------------------------------------------------------------------
# torch's schedulers
# ---------------------------------------------------------------------------------------
def _lrs_with(make_sched, steps=6, **kw):
    model = net()
    opt = make(model, **kw)
    sched = make_sched(opt)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for x in batches(steps):
            expected = opt.param_groups[0]["lr"]
            opt.step(closure_of(model, x))
            seen.append(opt.last_metrics.as_dict()["lr"])
            assert seen[-1] == expected
            sched.step() if not isinstance(sched, lr_scheduler.ReduceLROnPlateau) else sched.step(1.0)
    return model, opt, sched, seen


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.1),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=6, cycle_momentum=False),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.2, max_lr=1.0, step_size_up=2, cycle_momentum=False),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.5, total_iters=4),
}
EXPECTED_LRS = {
    "StepLR": [1.0, 1.0, 0.5, 0.5, 0.25, 0.25],
    "LambdaLR": [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6],
    "CosineAnnealingLR": [0.1 + 0.9 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(6)],
    "ReduceLROnPlateau": [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625],
    "ExponentialLR": [0.8 ** k for k in range(6)],
    "CyclicLR": [0.2, 0.6, 1.0, 0.6, 0.2, 0.6],
    "LinearLR": [0.5, 0.625, 0.75, 0.875, 1.0, 1.0],
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_torch_schedulers_drive_the_step(name):
    _, opt, sched, seen = _lrs_with(SCHEDULERS[name])
    if name in EXPECTED_LRS:
        assert seen == pytest.approx(EXPECTED_LRS[name], rel=1e-12)
    else:  # OneCycleLR: up from max_lr / 25, then annealed
        assert seen[0] == pytest.approx(1.0 / 25) and max(seen) > 0.5 and seen[-1] < seen[2]
    assert opt.param_groups[0]["momentum"] is True


def test_a_scheduled_run_equals_the_same_lrs_set_by_hand():
    """The scheduler only writes param_groups[0]['lr']: the same numbers set by hand give
    the same run bit for bit, and a different schedule a different run."""
    m_sched, _, _, seen = _lrs_with(SCHEDULERS["StepLR"], gamma_interval=5)
    model = net()
    opt = make(model, gamma_interval=5)
    for x, lr in zip(batches(6), seen):
        opt.param_groups[0]["lr"] = lr
        opt.step(closure_of(model, x))
    assert torch.equal(flat(model), flat(m_sched))
    m_plain, _, _ = _run(dict(gamma_interval=5), steps=6)
    assert not torch.allclose(flat(m_plain), flat(m_sched))


@pytest.mark.parametrize("cls", ["OneCycleLR", "CyclicLR"])
def test_schedulers_that_cycle_momentum_are_refused_at_the_step(cls):
    """KFAC's mu is solved, not scheduled: cycle_momentum=True writes a coefficient into
    param_groups[0]['momentum'], which the step refuses rather than misread."""
    model = net()
    opt = make(model)
    if cls == "OneCycleLR":
        lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6)
    else:
        lr_scheduler.CyclicLR(opt, base_lr=0.1, max_lr=1.0)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['momentum'\].*cycle_momentum=False"):
        opt.step(closure_of(model, batches(1)[0]))


def test_scheduler_and_optimizer_state_round_trip():
    """Save after 3 scheduled steps, load into fresh objects, run 3 more: the same as an
    uninterrupted run, lr sequence included."""
    def fresh():
        model = net()
        gen = torch.Generator().manual_seed(0)
        opt = KFAC(model, "bce_with_logits", factor_dtype=DT, generator=gen, gamma_interval=5)
        return model, opt, lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), gen

    data = batches(6)
    model, opt, sched, gen = fresh()
    lrs = []
    for k, x in enumerate(data):
        if k == 3:
            # deep copies, as torch.save makes: state_dict() holds the live factor tensors
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), gen.get_state()))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(closure_of(model, x))
        sched.step()
    assert saved[1]["param_groups"][0]["lr"] == 0.5

    model2, opt2, sched2, gen2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    gen2.set_state(saved[3])
    lrs2 = []
    for x in data[3:]:
        lrs2.append(opt2.param_groups[0]["lr"])
        opt2.step(closure_of(model2, x))
        sched2.step()
    assert lrs2 == lrs[3:] == [0.5, 0.25, 0.25]
    assert torch.equal(flat(model2), flat(model))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.125


def test_state_from_before_lr_loads_at_lr_one_and_bad_lr_in_a_state_is_refused():
    model = net()
    opt = make(model)
    opt.step(closure_of(model, batches(1)[0]))
    state = opt.state_dict()
    old = dict(state, param_groups=[{k: v for k, v in g.items() if k != "lr"} for g in state["param_groups"]])
    opt2 = make(net())
    opt2.param_groups[0]["lr"] = 0.5
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["lr"] == 1.0
    bad = dict(state, param_groups=[dict(g, lr=-1.0) for g in state["param_groups"]])
    with pytest.raises(ValueError, match="lr"):
        make(net()).load_state_dict(bad)


# ---------------------------------------------------------------------------------------
# bad values
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error", [
    (0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (True, TypeError), ("0.1", TypeError), (None, TypeError), (torch.tensor(0.1), TypeError),
])
def test_bad_lr_is_refused_naming_lr(bad, error):
    with pytest.raises(error, match="lr"):
        KFAC(net(), "bce_with_logits", lr=bad)


@pytest.mark.parametrize("bad, error", [(-0.5, ValueError), (float("nan"), ValueError), ("1", TypeError),
                                        (False, TypeError)])
def test_bad_lr_written_between_steps_is_refused_naming_it(bad, error):
    model = net()
    opt = make(model)
    opt.step(closure_of(model, batches(1)[0]))
    opt.param_groups[0]["lr"] = bad
    before = flat(model).clone()
    factors = [layer.a_factor.clone() for layer in opt.preconditioner.layers.values()]
    calls = []

    def closure():
        calls.append(1)
        return closure_of(model, batches(1)[0])()

    with pytest.raises(error, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(closure)
    # refused before the closure ran: no parameter, factor or step count moved
    assert calls == [] and torch.equal(flat(model), before) and opt.param_groups[0]["step"] == 1
    assert all(torch.equal(layer.a_factor, f) for layer, f in zip(opt.preconditioner.layers.values(), factors))
