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
