"""Block-tridiagonal K-FAC (kfac_fast.tridiag) against the paper's definition built densely."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfac_fast
from kfac_fast import KFACPreconditioner, ops
from kfac_fast.schedules import running_average_weights
from kfac_fast.tridiag import TridiagPreconditioner, find_chains, kronecker_difference_inverses, precondition_chain

WIDTHS = (4, 5, 3, 2)


def chain_model(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias), nn.Sigmoid(),
                         nn.Linear(3, 2, bias=bias)).double()


def make(model, cls=TridiagPreconditioner, **kw):
    return cls(model, factor_dtype=torch.float64, kl_clip=None, damping=0.05, inv_update_steps=1,
               factor_decay=0.9, method="inverse", **kw)


def run_step(model, precond, x, y):
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    precond.step()


def vec(x):
    return x.mT.reshape(-1)


def unvec(v, rows, cols):
    return v.reshape(cols, rows).mT


def dense_tridiag_gradient(precond, grads):
    """Xi^T Lambda Xi vec(grad), every block from dense Kronecker products (Martens & Grosse 2015, section 4.3)."""
    names = precond.chains[0]
    layers = [precond.layers[n] for n in names]
    damping = precond.damping(precond.steps)
    diag = []

    def eye(n):
        return torch.eye(n, dtype=torch.float64)

    for layer in layers:
        da, dg = ops.pi_damping(layer.a_factor, layer.g_factor, damping)
        diag.append(torch.kron(layer.a_factor + da * eye(layer.a_dim), layer.g_factor + dg * eye(layer.g_dim)))
    cross = [torch.kron(p.a_cross, p.g_cross) for p in precond.pairs]
    sizes = [d.shape[0] for d in diag]
    offs = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
    n = offs[-1]
    xi, lam = torch.eye(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for k in range(len(layers)):
        sk = slice(offs[k], offs[k + 1])
        if k + 1 < len(layers):
            sl = slice(offs[k + 1], offs[k + 2])
            psi = cross[k] @ torch.linalg.inv(diag[k + 1])
            xi[sk, sl] = -psi
            sigma = diag[k] - psi @ diag[k + 1] @ psi.mT
        else:
            sigma = diag[k]
        lam[sk, sk] = torch.linalg.inv(sigma)
    f_inv = xi.mT @ lam @ xi
    # the oracle's own check: its inverse reproduces the tridiagonal blocks it was built from
    f_hat = torch.linalg.inv(f_inv)
    for k in range(len(layers)):
        sk = slice(offs[k], offs[k + 1])
        torch.testing.assert_close(f_hat[sk, sk], diag[k], rtol=1e-8, atol=1e-10)
        if k + 1 < len(layers):
            torch.testing.assert_close(f_hat[sk, offs[k + 1]:offs[k + 2]], cross[k], rtol=1e-8, atol=1e-10)
    g = torch.cat([vec(grads[n]) for n in names])
    p = f_inv @ g
    return {nm: unvec(p[offs[k]:offs[k + 1]], layer.g_dim, layer.a_dim)
            for k, (nm, layer) in enumerate(zip(names, layers))}


def grad_bar(layer):
    m = layer.module
    return torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) if m.bias is not None else m.weight.grad.clone()


def test_chains_found_and_broken_by_non_elementwise_modules():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3),
                          nn.Tanh(), nn.Linear(3, 2), nn.Linear(2, 2))
    precond = TridiagPreconditioner(model)
    assert find_chains(model, precond.layers) == [["0", "2"], ["4", "6", "7"]]
    assert [p.key for p in precond.pairs] == ["0|2", "4|6", "6|7"]


def test_cross_factors_are_running_averages_of_paired_rows():
    model = chain_model()
    precond = make(model)
    xs = [torch.randn(7, 4, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randn(7, 2, dtype=torch.float64) for _ in range(2)]
    expected_c = expected_d = None
    for step, (x, y) in enumerate(zip(xs, ys)):
        acts, outs = {}, {}
        def record(m, i, o, n, acts=acts, outs=outs):
            acts[n], outs[n] = i[0], o

        hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(m, i, o, n))
                 for n, m in model.named_children() if isinstance(m, nn.Linear)]
        model.zero_grad()
        out = model(x)
        for h in hooks:
            h.remove()
        for o in outs.values():
            o.retain_grad()
        nn.functional.mse_loss(out, y).backward()
        a0 = torch.cat([acts["0"], torch.ones(7, 1, dtype=torch.float64)], 1)
        a2 = torch.cat([acts["2"], torch.ones(7, 1, dtype=torch.float64)], 1)
        c = a0.mT @ a2 / 7
        d = (outs["0"].grad * 7).mT @ (outs["2"].grad * 7) / 7  # S = N for a batch-mean loss
        precond.step()
        beta, w = running_average_weights(0.9, step + 1)
        expected_c = c if expected_c is None else beta * expected_c + w * c
        expected_d = d if expected_d is None else beta * expected_d + w * d
    pair = precond.pairs[0]
    torch.testing.assert_close(pair.a_cross, expected_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pair.g_cross, expected_d, rtol=1e-10, atol=1e-12)
    assert pair.count == 2


@pytest.mark.parametrize("bias", [True, False])
def test_preconditioned_gradient_matches_dense_block_tridiagonal_inverse(bias):
    model = chain_model(bias=bias)
    precond = make(model)
    for _ in range(3):  # running averages over distinct batches: generic factors
        x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        raw = {n: grad_bar(layer) for n, layer in precond.layers.items()}
        precond.step()
    assert [p.key for p in precond.pairs] == ["0|2", "2|4"]
    assert all(p.state is not None for p in precond.pairs)
    expected = dense_tridiag_gradient(precond, raw)
    for n, layer in precond.layers.items():
        torch.testing.assert_close(grad_bar(layer), expected[n], rtol=1e-8, atol=1e-12)
    # the cross terms matter: block-diagonal gives a different direction
    blockdiag = raw["2"]
    l2 = precond.layers["2"]
    assert (grad_bar(l2) - l2.g_inv @ blockdiag @ l2.a_inv).norm() > 1e-3 * grad_bar(l2).norm()


def test_zero_cross_factors_give_the_block_diagonal_method():
    model = chain_model()
    twin = copy.deepcopy(model)
    tri, diag = make(model), make(twin, cls=KFACPreconditioner)
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    run_step(twin, diag, x, y)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    tri.step()
    changed = [p.grad.clone() for p in model.parameters()]
    for pair in tri.pairs:
        pair.a_cross.zero_()
        pair.g_cross.zero_()
    for p, g in zip(model.parameters(), raw):
        p.grad = g.clone()
    tri.repeat_precondition(refresh=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert any((c - p.grad).norm() > 1e-3 * p.grad.norm() for p, c in zip(model.parameters(), changed))


def test_kronecker_difference_inverse_matches_dense():
    torch.manual_seed(1)
    def spd(n):
        m = torch.randn(n, n + 3, dtype=torch.float64)
        return m @ m.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    a, g = spd(4), spd(3)
    ca, cg = torch.randn(4, 5, dtype=torch.float64) * 0.3, torch.randn(3, 2, dtype=torch.float64) * 0.3
    m_a, m_g = ca @ spd(5).inverse() @ ca.mT, cg @ spd(2).inverse() @ cg.mT
    # scale so the difference stays positive definite
    m_a = m_a * 0.5 / torch.linalg.eigvalsh(torch.linalg.solve(a, m_a)).max()
    sigma = kronecker_difference_inverses([a], [g], [m_a], [m_g])[0]
    x = torch.randn(3, 4, dtype=torch.float64)
    dense = torch.linalg.solve(torch.kron(a, g) - torch.kron(m_a, m_g), vec(x))
    torch.testing.assert_close(vec(sigma.apply(x)), dense, rtol=1e-9, atol=1e-12)


def test_bad_arguments_are_named():
    model = chain_model()
    with pytest.raises(ValueError, match="method"):
        TridiagPreconditioner(model, method="eigen")
    with pytest.raises(ValueError, match="chains"):
        TridiagPreconditioner(model, chains=[["0", "1"]])
    with pytest.raises(ValueError, match="approx"):
        kfac_fast.KFAC(model, "gaussian", approx="diagonal")
    with pytest.raises(ValueError, match="method"):
        kfac_fast.KFAC(model, "gaussian", approx="tridiag", method="eigen")
    with pytest.raises(ValueError, match="pairs"):
        precondition_chain([torch.zeros(2, 2)] * 2, [], [(None, None)] * 2)


def test_kfac_optimizer_with_tridiag_trains_and_resumes():
    torch.manual_seed(0)
    model = chain_model()
    opt = kfac_fast.KFAC(model, "gaussian", approx="tridiag", damping=1.0, inv_update_steps=2,
                         damping_interval=2, gamma_interval=3, factor_dtype=torch.float64)
    assert isinstance(opt.preconditioner, TridiagPreconditioner)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.sin(x[:, :2])

    def closure():
        out = model(x)
        return 0.5 * ((out - y) ** 2).sum() / x.shape[0], out

    losses = [opt.step(closure).item() for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0]
    mem = opt.preconditioner.memory_usage()
    assert mem["0|2"] > 0 and opt.preconditioner.tridiag_memory_usage() == mem["0|2"] + mem["2|4"]
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    opt2 = kfac_fast.KFAC(twin, "gaussian", approx="tridiag", damping=1.0, inv_update_steps=2,
                          damping_interval=2, gamma_interval=3, factor_dtype=torch.float64)
    opt2.load_state_dict(state)
    for a, b in zip(opt.preconditioner.pairs, opt2.preconditioner.pairs):
        assert a.count == b.count
        for n, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[n]), n
