"""EKFAC scales and the MC Fisher against dense float64 oracles."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_preconditioner import dw_bar, layer_modules, mlp

from kfac_fast import KFACPreconditioner
from kfac_fast.fisher import sampled_output_grad

# float64 oracles: every test here runs with float64 as the default dtype.
pytestmark = pytest.mark.usefixtures("float64_default")


def per_example_grads(model, x, y):
    """{layer: [dW_bar_n]} from one backward per example of its own CE loss."""
    out = {n: [] for n in layer_modules(model)}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, m in layer_modules(model).items():
            out[n].append(dw_bar(m))
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_ekfac_scales_are_the_dense_empirical_fisher_diagonal_in_the_kronecker_basis(bias):
    model = mlp(bias=bias, seed=2)
    twin = copy.deepcopy(model)
    damping = 0.01
    precond = KFACPreconditioner(model, method="ekfac", damping=damping, kl_clip=None,
                                 factor_dtype=torch.float64)
    x, y = torch.randn(5, 5), torch.randint(0, 3, (5,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {n: dw_bar(m) for n, m in layer_modules(model).items()}
    precond.step()
    examples = per_example_grads(twin, x, y)
    for name, m in layer_modules(model).items():
        state = precond.layers[name]
        vecs = torch.stack([d.mT.reshape(-1) for d in examples[name]])  # vec stacks columns
        fisher = vecs.T @ vecs / len(examples[name])  # dense empirical Fisher block
        q = torch.kron(state.qa, state.qg)  # eigenbasis of A (x) G
        diag = torch.diagonal(q.T @ fisher @ q)
        expected = diag.reshape(state.a_dim, state.g_dim).mT
        torch.testing.assert_close(state.scales, expected, rtol=1e-9, atol=1e-13)
        # and the step is the dense solve with the rescaled curvature Q diag(S + damping) Q^T
        curvature = q @ torch.diag(expected.mT.reshape(-1) + damping) @ q.T
        p = torch.linalg.solve(curvature, raw[name].mT.reshape(-1)).reshape(state.a_dim, state.g_dim).mT
        torch.testing.assert_close(dw_bar(m), p, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------------
# MC Fisher
# ---------------------------------------------------------------------------------------
def exact_output_fisher_g(model, x, loss, variance=1.0):
    """Exact G of docs/design.md for the true Fisher: (1/N) sum_n J_n^T H_n J_n, J_n the
    Jacobian of the model output w.r.t. the layer output, H_n the output Fisher."""
    lin1, lin2 = model[0], model[2]
    h = lin1(x)
    z = lin2(torch.tanh(h)).detach()
    if loss == "cross_entropy":
        p = torch.softmax(z, -1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    elif loss == "bce_with_logits":
        p = torch.sigmoid(z)
        hess = torch.diag_embed(p * (1 - p))
    else:
        hess = torch.eye(z.shape[-1]).expand(z.shape[0], -1, -1) / variance
    g_out = hess.mean(0)
    jac = lin2.weight.detach()[None] * (1 - torch.tanh(h.detach()) ** 2)[:, None, :]  # (N, d_out, hidden)
    g_hidden = (jac.mT @ hess @ jac).mean(0)
    return {"0": g_hidden, "2": g_out}


@pytest.mark.parametrize("loss", ["cross_entropy", "bce_with_logits", "gaussian"])
def test_mc_fisher_g_converges_to_the_exact_output_fisher(loss):
    model = mlp(seed=4)
    x = torch.randn(4, 5)
    y = torch.randint(0, 3, (4,))
    precond = KFACPreconditioner(model, fisher="mc", factor_decay=0.0, inv_update_steps=10**6,
                                 kl_clip=None, factor_dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    samples = {n: [] for n in precond.layers}
    # `steps` independent estimates, each the mean of `per_step` samples (factor_decay=0:
    # each step's G is that step's estimate)
    steps, per_step = 25, 16
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = model(x)
        precond.sample_fisher(out, loss, num_samples=per_step, generator=gen)
        F.cross_entropy(out, y).backward()  # the user's loss: must not enter G
        precond.step()
        for n, layer in precond.layers.items():
            samples[n].append(layer.g_factor.clone())
    exact = exact_output_fisher_g(model, x, loss)
    for n in precond.layers:
        stack = torch.stack(samples[n])
        mean, sd = stack.mean(0), stack.std(0)
        # 5 standard errors of the mean over steps * per_step samples, entrywise
        tol = 5 * sd / math.sqrt(steps) + 1e-12
        assert ((mean - exact[n]).abs() <= tol).all(), (n, (mean - exact[n]).abs().max(), tol.max())
        assert (exact[n].abs() > 3 * tol).any()  # the test can see a wrong answer


def test_mc_fisher_averages_num_samples_in_one_step():
    model = mlp(seed=4)
    x = torch.randn(3, 5)
    precond = KFACPreconditioner(model, fisher="mc", kl_clip=None, factor_dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    out = model(x)
    precond.sample_fisher(out, "cross_entropy", num_samples=3, generator=gen)
    out.sum().backward()
    precond.step()
    # the same three samples drawn by hand
    gen = torch.Generator().manual_seed(1)
    grads = [sampled_output_grad(out, "cross_entropy", generator=gen) for _ in range(3)]
    g = sum(d.T @ d for d in grads) / (3 * 3)
    torch.testing.assert_close(precond.layers["2"].g_factor, g, rtol=1e-12, atol=1e-14)


def test_mc_fisher_does_not_touch_grad():
    model = mlp()
    precond = KFACPreconditioner(model, fisher="mc", kl_clip=None, factor_dtype=torch.float64)
    out = model(torch.randn(3, 5))
    precond.sample_fisher(out, "cross_entropy")
    assert all(p.grad is None for p in model.parameters())


def test_mc_fisher_without_sample_call_fails_clearly():
    model = mlp()
    precond = KFACPreconditioner(model, fisher="mc", factor_dtype=torch.float64)
    model(torch.randn(3, 5)).sum().backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        precond.step()


def test_sample_fisher_needs_mc_mode():
    model = mlp()
    precond = KFACPreconditioner(model, factor_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        precond.sample_fisher(model(torch.randn(2, 5)), "cross_entropy")


def test_sampled_output_grad_rejects_unknown_loss():
    with pytest.raises(ValueError, match="loss"):
        sampled_output_grad(torch.randn(2, 3), "hinge")
