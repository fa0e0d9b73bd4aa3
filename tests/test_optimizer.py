"""kfac_fast.KFAC: the quadratic model, its 2x2 solve and the damping rule against dense
float64 oracles, and a short autoencoder run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFAC
from kfac_fast.curves import make_curves
from kfac_fast.fvp import FisherProducts, dot
from kfac_fast.quadratic import adapt_damping, model_change, reduction_ratio, step_coefficients

DT = torch.float64


def tiny(d_in=3, hidden=4, d_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(DT)


LOSSES = {
    # name: (loss of (outputs, targets), dense per-example output Hessian, targets)
    "cross_entropy": (
        lambda z, y: F.cross_entropy(z, y),
        lambda z: torch.diag_embed(z.softmax(-1)) - z.softmax(-1)[:, :, None] * z.softmax(-1)[:, None, :],
        lambda n, k: torch.randint(0, k, (n,))),
    "bce_with_logits": (
        lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum") / z.shape[0],
        lambda z: torch.diag_embed(z.sigmoid() * (1 - z.sigmoid())),
        lambda n, k: torch.rand(n, k, dtype=DT)),
    "gaussian": (
        lambda z, y: 0.5 * (z - y).square().sum() / z.shape[0],
        lambda z: torch.eye(z.shape[1], dtype=DT).expand(z.shape[0], -1, -1),
        lambda n, k: torch.randn(n, k, dtype=DT)),
}


def dense_fisher(model, x, per_example_hessian):
    """F = (1/N) sum_n J_n^T H_n J_n with J built column by column (float64)."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def f(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in params))
    n, k = f(*params).shape
    j = torch.cat([jp.reshape(n, k, -1) for jp in jac], dim=2)  # (N, K, P)
    h = per_example_hessian(f(*params).detach())
    return torch.einsum("nkp,nkl,nlq->pq", j, h, j) / n


def flat(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


def random_like_params(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, dtype=DT, generator=gen) for p in model.parameters()]


# ---------------------------------------------------------------------------------------
# Fisher products and the model
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_model_from_fisher_products_equals_the_dense_fisher(loss_name):
    loss_fn, hess, targets = LOSSES[loss_name]
    model = tiny()
    x, y = torch.randn(6, 3, dtype=DT), targets(6, 3)
    out = model(x)
    loss = loss_fn(out, y)
    params = list(model.parameters())
    fisher = FisherProducts(loss, out, params)
    dense = dense_fisher(model, x, hess)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12  # a GGN of a convex loss is PSD
    v1, v2 = random_like_params(model, 1), random_like_params(model, 2)
    gram = fisher.gram([v1, v2])
    V = torch.stack([flat(v1), flat(v2)], 1)
    torch.testing.assert_close(gram, V.T @ dense @ V, rtol=1e-10, atol=1e-12)
    # M(delta) - M(0) = g^T delta + 1/2 delta^T (F + c I) delta for delta = V x
    g = torch.autograd.grad(loss, params, retain_graph=True)
    for a, b_ in zip(fisher.gradient, g):  # the by-product gradient is the loss's
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-14)
    x_coef = torch.tensor([0.3, -1.7], dtype=DT)
    b = torch.stack([dot(g, v1), dot(g, v2)])
    gram_i = V.T @ V
    c = 0.37
    delta = V @ x_coef
    expected = flat(g) @ delta + 0.5 * delta @ (dense + c * torch.eye(len(delta), dtype=DT)) @ delta
    torch.testing.assert_close(model_change(x_coef, b, gram, gram_i, c), expected, rtol=1e-10, atol=1e-12)


def test_fisher_products_reject_a_bad_vector_and_a_graphless_output():
    model = tiny()
    out = model(torch.randn(2, 3, dtype=DT))
    fisher = FisherProducts(out.square().sum(), out, list(model.parameters()))
    with pytest.raises(ValueError, match="vector must have one tensor per parameter"):
        fisher.jvp([torch.zeros(1)])
    with pytest.raises(ValueError, match="outputs"):
        FisherProducts(out.sum(), out.detach(), list(model.parameters()))


# ---------------------------------------------------------------------------------------
# the 2x2 solve
# ---------------------------------------------------------------------------------------
def test_coefficients_are_the_dense_2x2_minimiser():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(7, 2, dtype=DT, generator=gen)
        r = torch.randn(7, 7, dtype=DT, generator=gen)
        fisher = r @ r.T
        g = torch.randn(7, dtype=DT, generator=gen)
        c = 0.5
        b, gram_f, gram_i = v.T @ g, v.T @ fisher @ v, v.T @ v
        x = step_coefficients(b, gram_f, gram_i, c)
        torch.testing.assert_close(x, -torch.linalg.solve(gram_f + c * gram_i, b), rtol=1e-10, atol=1e-12)
        # and it minimises the model over the plane: the gradient there vanishes
        torch.testing.assert_close((gram_f + c * gram_i) @ x + b, torch.zeros(2, dtype=DT),
                                   atol=1e-10, rtol=0)


def test_coefficients_without_previous_update_are_the_line_search():
    b = torch.tensor([-2.0, 0.0], dtype=DT)
    gram_f = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=DT)
    gram_i = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=DT)
    x = step_coefficients(b, gram_f, gram_i, 0.5)  # delta0 = 0: a singular 2x2 system
    torch.testing.assert_close(x, torch.tensor([2.0 / 4.0, 0.0], dtype=DT))
    x1 = step_coefficients(b[:1], gram_f[:1, :1], gram_i[:1, :1], 0.5)
    torch.testing.assert_close(x1, torch.tensor([0.5], dtype=DT))


def _recording_solve(opt, calls):
    original = opt._solve

    def solve(fisher, grads, directions, prev, c):
        out = original(fisher, grads, directions, prev, c)
        calls.append(([g.clone() for g in grads], [d.clone() for d in directions],
                      None if prev is None else [d.clone() for d in prev], c, out["x"].clone()))
        return out

    opt._solve = solve


def test_optimizer_coefficients_equal_the_dense_solve_on_the_batch():
    """alpha (step 1, 1x1) and alpha, mu (step 2, 2x2) against the dense Fisher of the batch."""
    loss_fn, hess, targets = LOSSES["cross_entropy"]
    model = tiny(seed=3)
    opt = KFAC(model, "cross_entropy", damping=0.5, l2_reg=1e-3, gamma_interval=None,
               factor_dtype=DT, generator=torch.Generator().manual_seed(0))
    calls = []
    _recording_solve(opt, calls)
    torch.manual_seed(4)
    batches = [(torch.randn(8, 3, dtype=DT), targets(8, 3)) for _ in range(2)]
    fishers = []
    for x, y in batches:
        fishers.append(dense_fisher(model, x, hess))

        def closure(x=x, y=y):
            out = model(x)
            return loss_fn(out, y), out

        opt.step(closure)
    for (grads, dirs, prev, c, x), dense in zip(calls, fishers):
        vs = [flat(dirs)] + ([] if prev is None else [flat(prev)])
        V = torch.stack(vs, 1)
        m = V.T @ (dense + c * torch.eye(V.shape[0], dtype=DT)) @ V
        expected = -torch.linalg.solve(m, V.T @ flat(grads))
        torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-12)
    assert calls[0][2] is None and calls[1][2] is not None  # 1x1 first, then 2x2
    assert calls[0][3] == pytest.approx(0.5 + 1e-3)  # c = lambda + eta


# ---------------------------------------------------------------------------------------
# Levenberg-Marquardt
# ---------------------------------------------------------------------------------------
def test_damping_rule_moves_lambda_the_right_way():
    w = 0.95 ** 5
    assert adapt_damping(10.0, 0.9, w) == pytest.approx(10.0 * w)
    assert adapt_damping(10.0, 0.1, w) == pytest.approx(10.0 / w)
    assert adapt_damping(10.0, 0.5, w) == 10.0
    assert adapt_damping(10.0, -math.inf, w) == pytest.approx(10.0 / w)
    assert reduction_ratio(float("nan"), 1.0, -1.0) == -math.inf
    with pytest.raises(ValueError, match="omega1"):
        adapt_damping(1.0, 0.5, 1.5)


def _one_step(model, closure, loss, **kw):
    opt = KFAC(model, loss, l2_reg=0.0, gamma_interval=None, factor_dtype=DT,
               generator=torch.Generator().manual_seed(0), **kw)
    opt.step(closure)
    return opt


def test_exact_quadratic_problem_gives_rho_one_and_less_damping():
    """Linear least squares: h is its own quadratic model, so rho = 1 > 3/4."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DT)
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 2, dtype=DT)

    def closure():
        out = model(x)
        return 0.5 * (out - y).square().sum() / x.shape[0], out

    opt = _one_step(model, closure, "gaussian", damping=1.0)
    assert opt.last["rho"] == pytest.approx(1.0, abs=1e-9)
    assert opt.damping == pytest.approx(1.0 * 0.95 ** 5)


def test_badly_modelled_problem_gives_small_rho_and_more_damping():
    """A pseudo-Huber loss far from its minimum: nearly linear there, so its tiny local
    curvature makes the quadratic model promise a far larger decrease than a step of
    that length delivers (the loss even grows past the minimum)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DT)
    x = torch.randn(32, 4, dtype=DT)

    def closure():
        out = model(x)
        return torch.sqrt(1 + (out - 10.0).square()).sum() / x.shape[0], out

    opt = _one_step(model, closure, "gaussian", damping=1e-4)
    assert opt.last["rho"] < 0.25
    assert opt.damping == pytest.approx(1e-4 / 0.95 ** 5)


# ---------------------------------------------------------------------------------------
# the optimiser end to end
# ---------------------------------------------------------------------------------------
def autoencoder(seed=0):
    torch.manual_seed(seed)
    sizes = (196, 32, 16, 3, 16, 32, 196)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i not in (2, len(sizes) - 2):  # linear code and logits
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_small_autoencoder_halves_its_training_error_in_200_steps(method):
    torch.manual_seed(0)
    # CURVES-like images at 14x14: small widths keep 200 steps to a few seconds
    data = F.avg_pool2d(make_curves(512, seed=1).reshape(-1, 1, 28, 28), 2).reshape(-1, 196)
    model = autoencoder()
    opt = KFAC(model, "bce_with_logits", method=method, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)

    def error():
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(model(data), data, reduction="sum").item() / len(data)

    start = error()
    for _ in range(200):
        xb = data[torch.randint(0, len(data), (64,), generator=gen)]

        def closure(xb=xb):
            out = model(xb)
            return F.binary_cross_entropy_with_logits(out, xb, reduction="sum") / xb.shape[0], out

        loss = opt.step(closure)
        assert torch.isfinite(loss)
    end = error()
    assert math.isfinite(end) and all(torch.isfinite(p).all() for p in model.parameters())
    assert end < 0.5 * start, (start, end)


def test_state_dict_round_trip_continues_identically():
    data = torch.rand(16, 3, dtype=DT)

    def run(opt, model, steps):
        for _ in range(steps):
            def closure():
                out = model(data)
                return F.binary_cross_entropy_with_logits(out, data, reduction="sum") / 16, out
            opt.step(closure)

    kw = dict(factor_dtype=DT, damping_interval=2, gamma_interval=3, inv_update_steps=2)
    a = tiny(seed=5)
    opt_a = KFAC(a, "bce_with_logits", generator=torch.Generator().manual_seed(0), **kw)
    run(opt_a, a, 3)
    b = tiny(seed=6)
    b.load_state_dict(a.state_dict())
    opt_b = KFAC(b, "bce_with_logits", generator=torch.Generator().manual_seed(1), **kw)
    opt_b.load_state_dict(opt_a.state_dict())  # with the MC seed: b's own generator no longer matters
    assert opt_b.damping == opt_a.damping and opt_b.gamma == opt_a.gamma
    run(opt_a, a, 3)
    run(opt_b, b, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_arguments_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="damping"):
        KFAC(model, "cross_entropy", damping=0.0)
    with pytest.raises(ValueError, match="loss"):
        KFAC(model, "hinge")
    with pytest.raises(ValueError, match="method"):
        KFAC(model, method="ekfac")
    with pytest.raises(ValueError, match="damping_interval"):
        KFAC(model, damping_interval=0)
    opt = KFAC(model)
    with pytest.raises(TypeError, match=r"\(loss, outputs\)"):
        opt.step(lambda: model(torch.randn(2, 3, dtype=DT)).sum())


def test_iterate_average_is_swapped_in_and_out():
    model = tiny(seed=7)
    opt = KFAC(model, "bce_with_logits", average_decay=0.5, factor_dtype=DT,
               generator=torch.Generator().manual_seed(0))
    data = torch.rand(8, 3, dtype=DT)
    seen = []
    for _ in range(3):
        def closure():
            out = model(data)
            return F.binary_cross_entropy_with_logits(out, data, reduction="sum") / 8, out
        opt.step(closure)
        seen.append([p.detach().clone() for p in model.parameters()])
    # EMA with decay 0.5 started at the first iterate: 0.25 t1 + 0.25 t2 + 0.5 t3
    expected = [0.25 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*seen)]
    with opt.swap_averaged():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
    for p, last in zip(model.parameters(), seen[-1]):
        torch.testing.assert_close(p.detach(), last, rtol=0, atol=0)


def test_exponential_batch_size_grows_from_m1_to_n():
    from kfac_fast.optimizer import exponential_batch_size
    sizes = [exponential_batch_size(k, 1000, 20000, 500) for k in (0, 250, 500, 900)]
    assert sizes[0] == 1000 and sizes[2] == sizes[3] == 20000
    assert sizes[1] == round(1000 * 20 ** 0.5)
    with pytest.raises(ValueError, match="initial"):
        exponential_batch_size(0, 0, 10)
