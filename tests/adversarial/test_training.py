"""Adversarial cases of training with KFACPreconditioner, issue 18.

`test_error_<case>`: a clear error naming the argument or cause; `test_safe_<case>`: the
documented safe result (finite factors, decompositions and `.grad`, the step counted in
`health()` with its cause, or a warning naming the layer).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.schedules import running_average_weights

pytestmark = pytest.mark.adversarial


def mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def all_state_finite(precond):
    return all(torch.isfinite(t).all() for layer in precond.layers.values()
               for t in layer.state_tensors().values())


# ---------------------------------------------------------------------------------------
# item 10: the debiased running average, against written-out weights
# ---------------------------------------------------------------------------------------
def test_safe_running_average_weights_written_out():
    # beta_k = decay (1 - decay^(k-1)) / (1 - decay^k), by hand for decay = 0.95
    assert running_average_weights(0.95, 1) == (0.0, 1.0)
    beta2, w2 = running_average_weights(0.95, 2)
    assert beta2 == pytest.approx(0.0475 / 0.0975, rel=1e-12)  # 0.48718, not 0.513
    assert w2 == pytest.approx(0.05 / 0.0975, rel=1e-12)
    beta3, _ = running_average_weights(0.95, 3)
    assert beta3 == pytest.approx(0.95 * (1 - 0.9025) / (1 - 0.857375), rel=1e-12)
    # large k: the newest batch keeps weight ~ (1 - decay), never decays to 0
    _, w100 = running_average_weights(0.95, 100)
    assert w100 == pytest.approx(0.05 / (1 - 0.95 ** 100), rel=1e-12)


def test_safe_factor_after_k_updates_is_the_hand_built_weighted_sum(float64_default):
    """A after k updates = sum_j decay^(k-j) (1-decay) X_j / (1 - decay^k), X_j = mean a_bar a_bar^T."""
    decay, k = 0.9, 5
    model = nn.Linear(5, 3)
    precond = KFACPreconditioner(model, factor_decay=decay, inv_update_steps=100, kl_clip=None,
                                 factor_dtype=torch.float64)
    xs = []
    for j in range(k):
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(10 + j))
        xs.append(x)
        model.zero_grad()
        model(x).pow(2).sum().backward()
        precond.step()
    expected = torch.zeros(6, 6)
    for j, x in enumerate(xs, start=1):
        a = torch.cat([x, torch.ones(7, 1)], dim=1)
        expected += decay ** (k - j) * (1 - decay) * (a.mT @ a / 7)
    expected /= 1 - decay ** k
    torch.testing.assert_close(precond.layers[""].a_factor, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# items 1 and 7: never a non-finite factor, decomposition or .grad; every drop counted
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_hooks", [False, True])
@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_safe_huge_finite_batch_does_not_freeze_a_layer(method, in_hooks):
    """inputs x 1e20 are finite, but x^T x overflows fp32: the step is dropped (not the
    layer frozen for the rest of the run) and counted as capture_overflow."""
    model = mlp()
    precond = KFACPreconditioner(model, method=method, inv_update_steps=1, update_factors_in_hooks=in_hooks)
    for seed in range(2):
        backward(model, *batch(seed))
        precond.step()
    before = {n: layer.a_factor.clone() for n, layer in precond.layers.items()}
    x, y = batch(7)
    raw = backward(model, x * 1e20, y)
    assert all(torch.isfinite(g).all() for g in raw)
    precond.step()
    assert all_state_finite(precond)
    for n, layer in precond.layers.items():
        assert torch.equal(layer.a_factor, before[n])
    report = precond.health()
    assert report["capture_overflow"] == 1 and report["nonfinite_steps"] == 1
    assert report["nonfinite_capture"] == 0
    for g, p in zip(raw, model.parameters()):
        assert torch.equal(g, p.grad)  # left unpreconditioned
    # the next good step updates every factor again (nothing frozen)
    backward(model, *batch(8))
    precond.step()
    assert all(not torch.equal(layer.a_factor, before[n]) for n, layer in precond.layers.items())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert precond.health()["capture_overflow"] == 1


def test_safe_huge_finite_conv_batch_is_dropped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    precond = KFACPreconditioner(model, inv_update_steps=1)
    x = torch.randn(4, 2, 5, 5)
    y = torch.randint(0, 2, (4,))
    backward(model, x, y)
    precond.step()
    backward(model, x * 1e19, y)
    precond.step()
    assert all_state_finite(precond)
    assert precond.health()["capture_overflow"] == 1


def test_safe_large_but_normal_batch_is_not_dropped():
    """The overflow bound must not fire on big but representable statistics."""
    model = mlp()
    precond = KFACPreconditioner(model, inv_update_steps=1)
    x, y = batch(1, n=64)
    backward(model, x * 1e6, y)
    precond.step()
    report = precond.health()
    assert report["capture_overflow"] == 0 and report["nonfinite_steps"] == 0


@pytest.mark.parametrize("damping", [1e-300, 1e-45, 1e-39])
def test_error_damping_that_is_zero_in_float32(damping):
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(mlp(), damping=damping)


def test_error_damping_schedule_that_underflows_names_the_step():
    m = mlp()
    precond = KFACPreconditioner(m, damping=lambda step: 1e-3 if step == 0 else 1e-300)
    backward(m, *batch(0))
    precond.step()
    backward(m, *batch(1))
    with pytest.raises(ValueError, match=r"damping\(1\)"):
        precond.step()


def test_error_per_layer_damping_that_is_zero_in_float32():
    with pytest.raises(ValueError, match="damping"):
        KFACPreconditioner(mlp(), damping={"0": 1e-3, "default": 1e-300})


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_safe_nan_eigenvectors_in_a_loaded_state_never_reach_grad(method):
    model = mlp()
    precond = KFACPreconditioner(model, method=method, inv_update_steps=100)
    backward(model, *batch(0))
    precond.step()
    state = precond.state_dict()
    model2 = mlp()
    precond2 = KFACPreconditioner(model2, method=method, inv_update_steps=100)
    precond2.load_state_dict(state)
    precond2.layers["0"].qa[0, 0] = float("nan")  # a corrupted decomposition
    raw = backward(model2, *batch(1))
    precond2.step()
    for g, p in zip(raw, model2.parameters()):
        assert torch.isfinite(p.grad).all()
        assert torch.equal(g, p.grad)  # the plain gradient, not NaN
    report = precond2.health()
    assert report["nonfinite_output"] == 1 and report["nonfinite_steps"] == 1
    assert report["nonfinite_grad"] == 0


def test_safe_output_guard_keeps_plain_gradient_for_inverse_with_inf_inverse():
    model = mlp()
    precond = KFACPreconditioner(model, method="inverse", inv_update_steps=100)
    backward(model, *batch(0))
    precond.step()
    precond.layers["2"].a_inv[0, 0] = float("inf")
    raw = backward(model, *batch(1))
    precond.step()
    for g, p in zip(raw, model.parameters()):
        assert torch.equal(g, p.grad)
    assert precond.health()["nonfinite_output"] == 1


def test_safe_nan_batch_counts_its_cause():
    model = mlp()
    precond = KFACPreconditioner(model)
    backward(model, *batch(0))
    precond.step()
    x, y = batch(1)
    x[0, 0] = float("nan")
    backward(model, x, y)
    precond.step()
    report = precond.health()
    assert report["nonfinite_capture"] == 1 and report["nonfinite_grad"] == 1
    assert report["nonfinite_steps"] == 1 and report["capture_overflow"] == 0
    assert all_state_finite(precond)


def test_safe_health_counts_survive_state_dict_round_trip():
    model = mlp()
    precond = KFACPreconditioner(model)
    x, y = batch(1)
    backward(model, x * 1e20, y)
    precond.step()
    precond2 = KFACPreconditioner(mlp())
    precond2.load_state_dict(precond.state_dict())
    assert precond2.health()["capture_overflow"] == 1


# ---------------------------------------------------------------------------------------
# item 6: update_factors_in_hooks=True and a NaN loss with finite inputs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eigen", "ekfac"])
@pytest.mark.parametrize("in_hooks", [False, True])
def test_safe_nan_loss_with_finite_inputs_leaves_every_factor(method, in_hooks):
    model = mlp()
    precond = KFACPreconditioner(model, method=method, inv_update_steps=10, update_factors_in_hooks=in_hooks)
    for seed in range(2):
        backward(model, *batch(seed))
        precond.step()
    before = {n: {k: v.clone() for k, v in layer.state_tensors().items()} for n, layer in precond.layers.items()}
    x, y = batch(3)
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) * float("nan")).backward()  # inputs finite, loss NaN
    precond.step()
    for n, layer in precond.layers.items():
        for k, v in layer.state_tensors().items():
            assert torch.equal(v, before[n][k]), f"{n}.{k} changed"
    assert precond.health()["nonfinite_steps"] == 1


# ---------------------------------------------------------------------------------------
# item 5: no silent no-ops
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_hooks", [False, True])
def test_safe_forward_without_backward_is_not_added_to_a(in_hooks, float64_default):
    """A train-mode, grad-enabled forward that never reaches a backward (an accuracy check)
    adds nothing: A equals that of a run without it."""
    def run(extra_forward):
        model = mlp()
        precond = KFACPreconditioner(model, update_factors_in_hooks=in_hooks, factor_dtype=torch.float64)
        for seed in range(3):
            if extra_forward:
                model(batch(100 + seed, n=9)[0]).argmax(dim=1)  # accuracy check, no backward
            backward(model, *batch(seed))
            precond.step()
        return {n: layer.a_factor.clone() for n, layer in precond.layers.items()}
    clean, polluted = run(False), run(True)
    for n in clean:
        assert torch.equal(clean[n], polluted[n]), n


def test_safe_forward_without_backward_between_micro_batches(float64_default):
    """Accumulation micro-batches with an unused forward between them: its input is dropped."""
    def run(extra):
        model = mlp()
        precond = KFACPreconditioner(model, accumulation_steps=2, factor_dtype=torch.float64)
        model.zero_grad()
        for seed in range(2):
            x, y = batch(seed)
            (F.cross_entropy(model(x), y) / 2).backward()
            if extra and seed == 0:
                model(batch(50)[0])
        precond.step()
        return {n: layer.a_factor.clone() for n, layer in precond.layers.items()}
    clean, polluted = run(False), run(True)
    for n in clean:
        assert torch.equal(clean[n], polluted[n]), n


def test_safe_deepcopy_after_registration_does_not_feed_the_original():
    import copy
    model = mlp()
    precond = KFACPreconditioner(model)
    backward(model, *batch(0))
    precond.step()
    before = {n: layer.a_factor.clone() for n, layer in precond.layers.items()}
    clone = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="copy"):
        backward(clone, *batch(1))
    precond.step()  # nothing from the copy
    for n, layer in precond.layers.items():
        assert torch.equal(layer.a_factor, before[n])
        assert layer.a_count == 1


def test_safe_keyword_input_is_captured():
    model = nn.Linear(5, 3)
    precond = KFACPreconditioner(model)
    x, _ = batch(0)
    model.zero_grad()
    model(input=x).pow(2).sum().backward()
    raw = model.weight.grad.clone()
    precond.step()
    layer = precond.layers[""]
    assert layer.a_count == 1 and torch.isfinite(layer.a_factor).all()
    assert not torch.equal(raw, model.weight.grad)  # preconditioned


def test_safe_training_under_eval_warns_naming_the_layer():
    model = mlp()
    precond = KFACPreconditioner(model)
    model.eval()
    backward(model, *batch(0))
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond.step()
    named = sorted(str(w.message).split("'")[1] for w in caught if "eval mode" in str(w.message))
    assert named == ["0", "2"]  # each layer named, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backward(model, *batch(1))
        precond.step()
    assert not [w for w in caught if "K-FAC" in str(w.message)]  # once per layer


def test_safe_eval_pass_then_train_step_does_not_warn():
    import warnings
    model = mlp()
    precond = KFACPreconditioner(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
        model(batch(9)[0])  # validation with grad enabled
        model.train()
        backward(model, *batch(0))
        precond.step()
    assert not [w for w in caught if "K-FAC" in str(w.message)]


def test_safe_frozen_bias_with_trainable_weight_warns_naming_the_layer():
    model = mlp()
    model[2].bias.requires_grad_(False)
    precond = KFACPreconditioner(model)
    backward_frozen = model.zero_grad
    backward_frozen(set_to_none=True)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    raw = model[2].weight.grad.clone()
    with pytest.warns(UserWarning, match=r"layer '2'.*bias"):
        precond.step()
    assert torch.equal(model[2].weight.grad, raw)  # left as it was, and said so
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_safe_late_backward_after_step_does_not_pair_with_next_step(float64_default):
    """A forward whose backward runs only after step() belongs to no step."""
    def run(late):
        model = mlp()
        precond = KFACPreconditioner(model, factor_dtype=torch.float64)
        pending = None
        for seed in range(3):
            if late and seed == 1:
                x, y = batch(77)
                pending = F.cross_entropy(model(x), y)  # forward of step 1 ...
            backward(model, *batch(seed))
            precond.step()
            if pending is not None and seed == 1:
                pending.backward()  # ... backward after its step
                model.zero_grad(set_to_none=True)
                pending = None
        return {n: layer.a_factor.clone() for n, layer in precond.layers.items()}
    clean, late = run(False), run(True)
    for n in clean:
        assert torch.equal(clean[n], late[n]), n


# ---------------------------------------------------------------------------------------
# more of the same kind: arguments, schedules and mid-run abuse
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("damping", 0.0), ("damping", -1e-3), ("damping", float("nan")), ("damping", float("inf")),
    ("factor_decay", 1.0), ("factor_decay", -0.1), ("kl_clip", 0.0), ("lr", -0.1),
    ("inv_update_steps", 0), ("factor_update_steps", 0), ("accumulation_steps", 0),
    ("loss_average", -2.0), ("loss_average", "mean"), ("method", "kfac"), ("fisher", "true"),
])
def test_error_bad_constructor_argument_is_named(name, value):
    with pytest.raises((ValueError, TypeError), match=name):
        KFACPreconditioner(mlp(), **{name: value})


@pytest.mark.parametrize("name, kind", [("damping", TypeError), ("inv_update_steps", TypeError),
                                        ("update_factors_in_hooks", TypeError), ("guard_nonfinite", TypeError)])
def test_error_bool_or_string_where_a_number_or_bool_is_expected(name, kind):
    value = "yes" if name in ("update_factors_in_hooks", "guard_nonfinite") else True
    with pytest.raises(kind, match=name):
        KFACPreconditioner(mlp(), **{name: value})


def test_error_schedule_returning_nan_names_the_argument_and_step():
    model = mlp()
    precond = KFACPreconditioner(model, kl_clip=lambda step: float("nan") if step == 1 else 1e-3)
    backward(model, *batch(0))
    precond.step()
    backward(model, *batch(1))
    with pytest.raises(ValueError, match=r"kl_clip\(1\)"):
        precond.step()


def test_error_model_that_is_not_a_module():
    with pytest.raises(TypeError, match="model"):
        KFACPreconditioner([nn.Linear(2, 2)])


def test_error_mc_fisher_without_sample_fisher_call():
    model = mlp()
    precond = KFACPreconditioner(model, fisher="mc")
    backward(model, *batch(0))
    with pytest.raises(RuntimeError, match="sample_fisher"):
        precond.step()


def test_error_sample_fisher_on_empirical_preconditioner():
    model = mlp()
    precond = KFACPreconditioner(model)
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        precond.sample_fisher(model(batch(0)[0]), "cross_entropy")


@pytest.mark.parametrize("poison_micro_batch", [0, 1])
def test_safe_nan_micro_batch_drops_the_whole_accumulated_step(poison_micro_batch):
    model = mlp()
    precond = KFACPreconditioner(model, accumulation_steps=2, inv_update_steps=1)
    backward(model, *batch(0))
    precond.step()
    before = {n: {k: v.clone() for k, v in layer.state_tensors().items()} for n, layer in precond.layers.items()}
    model.zero_grad()
    for mb in range(2):
        x, y = batch(10 + mb)
        if mb == poison_micro_batch:
            x[0, 0] = float("nan")
        (F.cross_entropy(model(x), y) / 2).backward()
    precond.step()
    for n, layer in precond.layers.items():
        for k, v in layer.state_tensors().items():
            assert torch.equal(v, before[n][k]), f"{n}.{k}"
    assert precond.health()["nonfinite_capture"] == 1


def test_safe_step_without_any_forward_is_a_no_op():
    model = mlp()
    precond = KFACPreconditioner(model)
    precond.step()  # nothing captured, no grads
    backward(model, *batch(0))
    precond.step()
    assert all_state_finite(precond)


def test_safe_step_called_twice_after_one_backward():
    model = mlp()
    precond = KFACPreconditioner(model)
    raw = backward(model, *batch(0))
    precond.step()
    once = [p.grad.clone() for p in model.parameters()]
    precond.step()  # no new capture: .grad is not preconditioned a second time
    for a, p in zip(once, model.parameters()):
        assert torch.equal(a, p.grad)
    assert not all(torch.equal(r, o) for r, o in zip(raw, once))


def test_safe_grad_scaler_overflow_leaves_factors_and_counts():
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    precond = KFACPreconditioner(model, grad_scaler=scaler, inv_update_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(2):
        opt.zero_grad()
        x, y = batch(seed)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        precond.step()
        scaler.step(opt)
        scaler.update()
    before = {n: layer.g_factor.clone() for n, layer in precond.layers.items()}
    opt.zero_grad()
    x, y = batch(5)
    scaler.scale(F.cross_entropy(model(x), y) * 1e38).backward()  # overflows in the backward
    scaler.unscale_(opt)
    precond.step()
    assert all_state_finite(precond)
    for n, layer in precond.layers.items():
        assert torch.equal(layer.g_factor, before[n])


def test_safe_inf_target_loss_keeps_everything_finite():
    model = mlp()
    precond = KFACPreconditioner(model, inv_update_steps=1)
    backward(model, *batch(0))
    precond.step()
    model.zero_grad()
    x, _ = batch(1)
    F.mse_loss(model(x), torch.full((6, 3), float("inf"))).backward()
    precond.step()
    assert all_state_finite(precond)
    assert precond.health()["nonfinite_steps"] == 1


def test_safe_huge_batch_in_float64_factors_is_kept_when_representable(float64_default):
    """float64 captures into float64 factors: 1e20 inputs are far from float64's max and
    are used (the bound follows the accumulation dtype)."""
    model = mlp().double()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64)
    x, y = batch(0)
    backward(model, x * 1e20, y)
    precond.step()
    assert precond.health()["capture_overflow"] == 0
    assert precond.layers["0"].a_count == 1 and torch.isfinite(precond.layers["0"].a_factor).all()
    assert precond.layers["0"].a_factor.abs().max() > 1e39


def test_safe_remove_hooks_then_step_leaves_grads():
    model = mlp()
    precond = KFACPreconditioner(model)
    precond.remove_hooks()
    raw = backward(model, *batch(0))
    precond.step()
    for g, p in zip(raw, model.parameters()):
        assert torch.equal(g, p.grad)
