"""KFACPreconditioner against dense oracles (float64 tiny networks).

The oracles are built independently of the preconditioner: our own hooks record every
layer's input and output gradient, A and G follow docs/design.md's definitions, and the
eigen method is checked against the explicit Kronecker matrix
`K = kron(A, G) + damping I; P = solve(K, vec(dW_bar))`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.schedules import running_average_weights

# float64 oracles: every test here runs with float64 as the default dtype.
pytestmark = pytest.mark.usefixtures("float64_default")


# ---------------------------------------------------------------------------------------
# independent oracle helpers
# ---------------------------------------------------------------------------------------
class Recorder:
    """Records each module's input and output gradient with plain torch hooks."""

    def __init__(self, modules: dict):
        self.inputs = {n: [] for n in modules}
        self.grads = {n: [] for n in modules}
        self.handles = []
        for name, m in modules.items():
            self.handles.append(m.register_forward_hook(self._fwd(name)))

    def _fwd(self, name):
        def hook(module, inputs, output):
            self.inputs[name].append(inputs[0].detach().clone())
            output.register_hook(lambda g: self.grads[name].append(g.detach().clone()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def a_rows(module, x):
    """A rows of docs/design.md (R, d_in[+1]) for one input."""
    if isinstance(module, nn.Conv2d):
        p = F.unfold(x, module.kernel_size, dilation=module.dilation,
                     padding=module.padding, stride=module.stride)
        rows = p.transpose(1, 2).reshape(-1, p.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], 1)
    return rows


def g_rows(module, g):
    if isinstance(module, nn.Conv2d):
        g = g.movedim(1, -1)
    return g.reshape(-1, g.shape[-1])


def oracle_a(module, xs):
    rows = torch.cat([a_rows(module, x) for x in xs])
    return rows.T @ rows / rows.shape[0]


def oracle_g(module, gs, scales):
    """G = (1/N) sum d d^T with d = S * grad_output, N summed over captures."""
    n = sum(g.shape[0] for g in gs)
    total = sum((s * g_rows(module, g)).T @ (s * g_rows(module, g)) for g, s in zip(gs, scales))
    return total / n


def dw_bar(module):
    w = module.weight.grad.reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias.grad[:, None]], 1) if module.bias is not None else w.clone()


def dense_eigen(a, g, dw, damping):
    """docs/design.md's dense oracle: solve(kron(A, G) + damping I, vec(dW_bar))."""
    k = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0])
    return torch.linalg.solve(k, dw.mT.reshape(-1)).reshape(a.shape[0], g.shape[0]).mT


def grad_of(module):
    return dw_bar(module)


def mlp(d_in=5, hidden=4, d_out=3, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(),
                         nn.Linear(hidden, d_out, bias=bias))


def cnn(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, bias=bias), nn.Tanh(),
        nn.Conv2d(3, 4, kernel_size=(2, 3), stride=1, padding=(1, 0), dilation=(1, 2), bias=bias),
        nn.Tanh(), nn.Flatten(), nn.LazyLinear(3, bias=bias))


def layer_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def run_step(model, precond, x, y, loss_fn):
    """One training step with an independent recorder; returns (recorder, raw dW_bar per layer)."""
    mods = layer_modules(model)
    rec = Recorder(mods)
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    raw = {n: dw_bar(m) for n, m in mods.items()}
    precond.step()
    rec.remove()
    return rec, raw


def ce_batch(out, y):
    """Cross-entropy, mean over examples (dim 0), summed over any token dim."""
    per_row = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    return per_row.sum() / out.shape[0]


# ---------------------------------------------------------------------------------------
# eigen method vs the dense Kronecker oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6,), (3, 4)], ids=["N,d", "N,T,d"])
def test_linear_eigen_matches_dense_kronecker(bias, shape):
    model = mlp(bias=bias)
    damping = 0.05
    precond = KFACPreconditioner(model, damping=damping, kl_clip=None, factor_dtype=torch.float64)
    x = torch.randn(*shape, 5)
    y = torch.randint(0, 3, shape)
    rec, raw = run_step(model, precond, x, y, ce_batch)
    for name, m in layer_modules(model).items():
        a = oracle_a(m, rec.inputs[name])
        g = oracle_g(m, rec.grads[name], [shape[0]])
        state = precond.layers[name]
        torch.testing.assert_close(state.a_factor, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.g_factor, g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dw_bar(m), dense_eigen(a, g, raw[name], damping), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_eigen_matches_dense_kronecker(bias):
    model = cnn(bias=bias)
    x = torch.randn(3, 2, 9, 12)
    model(x)  # materialise the LazyLinear before registration
    damping = 0.02
    precond = KFACPreconditioner(model, damping=damping, kl_clip=None, factor_dtype=torch.float64)
    y = torch.randint(0, 3, (3,))
    rec, raw = run_step(model, precond, x, y, ce_batch)
    mods = layer_modules(model)
    assert set(precond.layers) == set(mods)
    for name, m in mods.items():
        a = oracle_a(m, rec.inputs[name])
        g = oracle_g(m, rec.grads[name], [3])
        torch.testing.assert_close(precond.layers[name].a_factor, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(precond.layers[name].g_factor, g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dw_bar(m), dense_eigen(a, g, raw[name], damping), rtol=1e-9, atol=1e-12)


def test_kl_clip_scales_every_layer_by_the_dense_nu():
    model = mlp()
    damping, lr, clip = 0.05, 0.3, 1e-6
    precond = KFACPreconditioner(model, damping=damping, lr=lr, kl_clip=clip, factor_dtype=torch.float64)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    rec, raw = run_step(model, precond, x, y, ce_batch)
    ps, total = {}, 0.0
    for name, m in layer_modules(model).items():
        p = dense_eigen(oracle_a(m, rec.inputs[name]), oracle_g(m, rec.grads[name], [6]), raw[name], damping)
        ps[name] = p
        total += float((p * raw[name]).sum())
    nu = min(1.0, math.sqrt(clip / abs(lr * lr * total)))
    assert nu < 1  # the clip is active in this test
    for name, m in layer_modules(model).items():
        torch.testing.assert_close(dw_bar(m), nu * ps[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(precond.last_nu.double(), torch.tensor(nu), rtol=1e-9, atol=0)


def test_single_example_kfac_is_the_exact_empirical_fisher_block():
    model = mlp()
    precond = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
    x, y = torch.randn(1, 5), torch.randint(0, 3, (1,))
    rec, raw = run_step(model, precond, x, y, ce_batch)
    for name in layer_modules(model):
        state = precond.layers[name]
        v = raw[name].mT.reshape(-1)  # vec stacks columns
        torch.testing.assert_close(torch.kron(state.a_factor, state.g_factor), torch.outer(v, v),
                                   rtol=1e-10, atol=1e-13)


def test_running_average_follows_zero_debiased_rule():
    model = mlp()
    decay = 0.8
    precond = KFACPreconditioner(model, factor_decay=decay, kl_clip=None, factor_dtype=torch.float64)
    expected = {}
    for k in (1, 2, 3):
        x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
        rec, _ = run_step(model, precond, x, y, ce_batch)
        beta, w = running_average_weights(decay, k)
        assert (k == 1 and beta == 0) or k > 1
        for name, m in layer_modules(model).items():
            a_new = oracle_a(m, rec.inputs[name])
            g_new = oracle_g(m, rec.grads[name], [4])
            a_old, g_old = expected.get(name, (torch.zeros_like(a_new), torch.zeros_like(g_new)))
            expected[name] = (beta * a_old + w * a_new, beta * g_old + w * g_new)
    for name, (a, g) in expected.items():
        assert precond.layers[name].a_count == 3 and precond.layers[name].g_count == 3
        torch.testing.assert_close(precond.layers[name].a_factor, a, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(precond.layers[name].g_factor, g, rtol=1e-11, atol=1e-14)


# ---------------------------------------------------------------------------------------
# inverse method: the factored Tikhonov formula with pi
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_inverse_method_matches_factored_formula(bias):
    model = mlp(bias=bias)
    damping = 0.03
    precond = KFACPreconditioner(model, method="inverse", damping=damping, kl_clip=None,
                                 factor_dtype=torch.float64)
    x, y = torch.randn(2, 3, 5), torch.randint(0, 3, (2, 3))
    rec, raw = run_step(model, precond, x, y, ce_batch)
    gamma = math.sqrt(damping)
    for name, m in layer_modules(model).items():
        a = oracle_a(m, rec.inputs[name])
        g = oracle_g(m, rec.grads[name], [2])
        pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
        p = torch.linalg.solve(g + gamma / pi * torch.eye(g.shape[0]), raw[name]) \
            @ torch.linalg.inv(a + pi * gamma * torch.eye(a.shape[0]))
        torch.testing.assert_close(dw_bar(m), p, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------
# loss_average: S makes G the same whatever the loss averages over
# ---------------------------------------------------------------------------------------
def _g_factors(loss_average, loss_fn, x, y):
    model = mlp(seed=3)
    precond = KFACPreconditioner(model, loss_average=loss_average, kl_clip=None, factor_dtype=torch.float64)
    rec, _ = run_step(model, precond, x, y, loss_fn)
    return model, rec, {n: layer.g_factor.clone() for n, layer in precond.layers.items()}


@pytest.mark.parametrize("loss_average,loss_fn,scale", [
    ("batch", ce_batch, lambda n, t: n),
    ("tokens", lambda o, y: F.cross_entropy(o.reshape(-1, 3), y.reshape(-1)), lambda n, t: n * t),
    ("sum", lambda o, y: F.cross_entropy(o.reshape(-1, 3), y.reshape(-1), reduction="sum"), lambda n, t: 1),
    (7.0, lambda o, y: F.cross_entropy(o.reshape(-1, 3), y.reshape(-1), reduction="sum") / 7.0,
     lambda n, t: 7.0),
], ids=["batch", "tokens", "sum", "number"])
def test_loss_average_gives_per_token_gradient_statistics(loss_average, loss_fn, scale):
    n, t = 4, 3
    torch.manual_seed(11)
    x, y = torch.randn(n, t, 5), torch.randint(0, 3, (n, t))
    model, rec, gs = _g_factors(loss_average, loss_fn, x, y)
    for name, m in layer_modules(model).items():
        torch.testing.assert_close(gs[name], oracle_g(m, rec.grads[name], [scale(n, t)]), rtol=1e-12, atol=1e-14)
    # and all four conventions agree: G is a property of the model and data, not the loss scaling
    _, _, reference = _g_factors("sum", lambda o, y: F.cross_entropy(o.reshape(-1, 3), y.reshape(-1),
                                                                    reduction="sum"), x, y)
    for name in gs:
        torch.testing.assert_close(gs[name], reference[name], rtol=1e-10, atol=1e-14)


def test_factors_do_not_change_with_batch_size():
    """A batch and the same batch repeated twice give the same A and G ("batch" mean)."""
    x, y = torch.randn(3, 5), torch.randint(0, 3, (3,))
    out = []
    for xx, yy in ((x, y), (x.repeat(2, 1), y.repeat(2))):
        model = mlp(seed=5)
        precond = KFACPreconditioner(model, kl_clip=None, factor_dtype=torch.float64)
        run_step(model, precond, xx, yy, ce_batch)
        out.append({n: (layer.a_factor.clone(), layer.g_factor.clone()) for n, layer in precond.layers.items()})
    for name in out[0]:
        torch.testing.assert_close(out[0][name][0], out[1][name][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out[0][name][1], out[1][name][1], rtol=1e-12, atol=1e-14)
