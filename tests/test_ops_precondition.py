"""precondition_* ops against the dense Kronecker oracle; EKFAC scales; KL clip."""
import pytest
import torch

from kfac_fast import ops
from kfac_fast.backends import reference
from kfac_fast.backends.reference import precondition as reference_precondition
from tests._oracle import assert_error_rule, f64, generator, randn, random_spd


def _dense_kfac(a64, g64, dw_bar64, damping):
    """docs/design.md's oracle: solve((A (x) G) + damping I, vec(dW_bar)), vec stacks columns."""
    k = torch.kron(a64, g64) + damping * torch.eye(a64.shape[0] * g64.shape[0], dtype=torch.float64)
    d_out, n_a = dw_bar64.shape
    return torch.linalg.solve(k, dw_bar64.mT.reshape(-1)).reshape(n_a, d_out).mT


def _layers(gen, shapes, dtype=torch.float32):
    """Per layer (d_out, n_a): SPD factors A (n_a), G (d_out) and their eigendecompositions."""
    a = [random_spd(n_a, dtype=dtype, gen=gen) for _, n_a in shapes]
    g = [random_spd(d_out, dtype=dtype, gen=gen) for d_out, _ in shapes]
    da, qa = ops.eigh(a)
    dg, qg = ops.eigh(g)
    return a, g, qa, da, qg, dg


SHAPES = [(3, 5), (17, 1), (1, 18), (8, 8)]


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_precondition_eigen_matches_dense_kronecker(damping):
    gen = generator(1)
    a, g, qa, da, qg, dg = _layers(gen, SHAPES)
    grads = [randn(d_out, n_a, gen=gen) for d_out, n_a in SHAPES]
    out = ops.precondition_eigen(grads, qa, da, qg, dg, damping)
    baseline = reference.precondition_eigen(grads, qa, da, qg, dg, damping)
    # eigenbasis in float64 from float64 copies of the same factors
    for i, (d_out, n_a) in enumerate(SHAPES):
        expected = _dense_kfac(f64(a[i]), f64(g[i]), f64(grads[i]), damping)
        assert out[i].shape == (d_out, n_a) and out[i].dtype == torch.float32
        bound_ref = reference.precondition_eigen([f64(grads[i])], *[[f64(t[i])] for t in (qa, da, qg, dg)], damping)
        torch.testing.assert_close(bound_ref[0], expected, rtol=1e-3, atol=1e-5)  # fp32 eigenbasis
        assert_error_rule(out[i], bound_ref[0], baseline[i], f"layer {i}")


def test_precondition_eigen_float64_exact_oracle():
    gen = generator(2)
    shapes = [(4, 6), (3, 3)]
    a, g, qa, da, qg, dg = _layers(gen, shapes, dtype=torch.float64)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    out = ops.precondition_eigen(grads, qa, da, qg, dg, [0.01, 0.2])
    for i, lam in enumerate([0.01, 0.2]):
        torch.testing.assert_close(out[i], _dense_kfac(a[i], g[i], grads[i], lam), rtol=1e-9, atol=1e-12)


def _conv_and_linear_grads(gen):
    """weight grads (Linear, Conv2d channels-last, Linear without bias) and bias grads."""
    w = [randn(3, 4, gen=gen),
         randn(5, 2, 3, 3, gen=gen).to(memory_format=torch.channels_last),
         randn(6, 7, gen=gen)]
    b = [randn(3, gen=gen), randn(5, gen=gen), None]
    shapes = [(3, 5), (5, 19), (6, 7)]
    return w, b, shapes


def _dw_bar(w, b):
    m = w.reshape(w.shape[0], -1)
    return m if b is None else torch.cat([m, b[:, None]], 1)


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
@pytest.mark.parametrize("kl", [None, 1e-4, 1e6])
def test_inplace_equals_functional(method, kl):
    gen = generator(3)
    w, b, shapes = _conv_and_linear_grads(gen)
    a, g, qa, da, qg, dg = _layers(gen, shapes)
    dws = [_dw_bar(wi, bi) for wi, bi in zip(w, b)]
    lr = 0.5
    if method == "eigen":
        ps = ops.precondition_eigen(dws, qa, da, qg, dg, 0.05)
        def run(wg, bg):
            return ops.precondition_eigen_(wg, bg, qa, da, qg, dg, 0.05, lr=lr, kl_clip=kl)
    elif method == "inverse":
        a_inv = ops.damped_inverse(a, 0.1)
        g_inv = ops.damped_inverse(g, 0.2)
        ps = ops.precondition_inverse(dws, a_inv, g_inv)
        def run(wg, bg):
            return ops.precondition_inverse_(wg, bg, a_inv, g_inv, lr=lr, kl_clip=kl)
    else:
        scales = [torch.rand(s, generator=gen) + 0.1 for s in shapes]
        ps = ops.precondition_ekfac(dws, qa, qg, scales, 0.05)
        def run(wg, bg):
            return ops.precondition_ekfac_(wg, bg, qa, qg, scales, 0.05, lr=lr, kl_clip=kl)
    wg = [t.clone() for t in w]
    bg = [None if t is None else t.clone() for t in b]
    nu = run(wg, bg)
    total = sum(float((f64(p) * f64(d)).sum()) for p, d in zip(ps, dws))
    expected_nu = 1.0 if kl is None else min(1.0, (kl / abs(lr * lr * total)) ** 0.5)
    assert nu.shape == () and nu.dtype == torch.float32
    assert abs(float(nu) - expected_nu) <= 1e-5 * expected_nu
    if kl == 1e-4:
        assert float(nu) < 1.0  # the clip is active in this case
    for i in range(len(w)):
        assert wg[i].shape == w[i].shape and wg[i].stride() == w[i].stride()
        torch.testing.assert_close(_dw_bar(wg[i], bg[i]), ps[i] * float(nu), rtol=1e-5, atol=1e-6)


def test_inverse_method_matches_dense_factored_tikhonov():
    gen = generator(4)
    shapes = [(3, 5), (6, 2)]
    a = [random_spd(n_a, gen=gen) for _, n_a in shapes]
    g = [random_spd(d_out, gen=gen) for d_out, _ in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    lam = 0.04
    damp = [ops.pi_damping(ai, gi, lam) for ai, gi in zip(a, g)]
    a_inv = ops.damped_inverse(a, torch.stack([d[0] for d in damp]))
    g_inv = ops.damped_inverse(g, torch.stack([d[1] for d in damp]))
    out = ops.precondition_inverse(grads, a_inv, g_inv)
    for i in range(len(shapes)):
        ea = torch.eye(a[i].shape[0], dtype=torch.float64)
        eg = torch.eye(g[i].shape[0], dtype=torch.float64)
        k = torch.kron(a[i] + damp[i][0] * ea, g[i] + damp[i][1] * eg)
        n_a, d_out = a[i].shape[0], g[i].shape[0]
        expected = torch.linalg.solve(k, grads[i].mT.reshape(-1)).reshape(n_a, d_out).mT
        torch.testing.assert_close(out[i], expected, rtol=1e-9, atol=1e-12)


def _ekfac_oracle(s64, x64, g64, qa64, qg64, beta, alpha):
    """beta*S + alpha * sum_n (Q_G^T dW_bar_n Q_A)^2, one example at a time."""
    if x64.dim() == 2:
        x64, g64 = x64[:, None], g64[:, None]
    bias = qa64.shape[0] == x64.shape[-1] + 1
    total = torch.zeros_like(s64)
    for n in range(x64.shape[0]):
        dw = torch.zeros_like(s64)
        for pos in range(x64.shape[1]):
            a = x64[n, pos]
            a = torch.cat([a, torch.ones(1, dtype=a.dtype)]) if bias else a
            dw += torch.outer(g64[n, pos], a)
        total += (qg64.mT @ dw @ qa64) ** 2
    return beta * s64 + alpha * total


@pytest.mark.parametrize("seq", [None, 1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_ekfac_scales_match_per_example_definition(seq, bias):
    gen = generator(5 + (seq or 0) + bias)
    n, d_in, d_out = 7, 4, 3
    lead = (n,) if seq is None else (n, seq)
    xs = [randn(*lead, d_in, gen=gen)]
    gs = [randn(*lead, d_out, gen=gen)]
    _, _, qa, _, qg, _ = _layers(gen, [(d_out, d_in + bias)])
    scales = [torch.rand(d_out, d_in + bias, generator=gen)]
    expected = _ekfac_oracle(f64(scales[0]), f64(xs[0]), f64(gs[0]), f64(qa[0]), f64(qg[0]), 0.8, 1 / n)
    baseline = reference.ekfac_scales_([scales[0].clone()], xs, gs, qa, qg, 0.8, 1 / n)
    out = ops.ekfac_scales_([scales[0].clone()], xs, gs, qa, qg, 0.8, 1 / n)
    assert_error_rule(out[0], expected, baseline[0])


def test_ekfac_scales_chunked_per_example(monkeypatch):
    monkeypatch.setattr(reference_precondition, "EKFAC_CHUNK_ELEMENTS", 20)  # several chunks
    gen = generator(6)
    xs = [torch.randn(9, 3, 2, generator=gen, dtype=torch.float64)]
    gs = [torch.randn(9, 3, 4, generator=gen, dtype=torch.float64)]
    _, _, qa, _, qg, _ = _layers(gen, [(4, 3)], dtype=torch.float64)
    s = [torch.rand(4, 3, generator=gen, dtype=torch.float64)]
    expected = _ekfac_oracle(s[0], xs[0], gs[0], qa[0], qg[0], 0.5, 0.2)
    torch.testing.assert_close(ops.ekfac_scales_([s[0].clone()], xs, gs, qa, qg, 0.5, 0.2)[0], expected)


def test_ekfac_alpha_zero_does_not_leak_nan():
    gen = generator(7)
    xs, gs = [randn(5, 3, gen=gen)], [randn(5, 2, gen=gen)]
    xs[0][1, 1] = float("nan")
    _, _, qa, _, qg, _ = _layers(gen, [(2, 3)])
    s = torch.rand(2, 3, generator=gen)
    out = ops.ekfac_scales_([s.clone()], xs, gs, qa, qg, 0.5, torch.tensor(0.0))
    torch.testing.assert_close(out[0], s * 0.5, rtol=0, atol=0)


def test_ekfac_with_kfac_scales_equals_eigen():
    gen = generator(8)
    a, g, qa, da, qg, dg = _layers(gen, SHAPES)
    grads = [randn(s, gen=gen) for s in SHAPES]
    scales = [torch.outer(dg[i], da[i]) for i in range(len(SHAPES))]
    ek = ops.precondition_ekfac(grads, qa, qg, scales, 0.1)
    ei = ops.precondition_eigen(grads, qa, da, qg, dg, 0.1)
    for x, y in zip(ek, ei):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_kl_clip_scale_formula_and_zero_sum():
    gen = generator(9)
    grads = [randn(3, 4, gen=gen), randn(5, gen=gen)]
    pre = [randn(3, 4, gen=gen), randn(5, gen=gen)]
    total = sum(float((f64(p) * f64(q)).sum()) for p, q in zip(grads, pre))
    nu = ops.kl_clip_scale(grads, pre, 0.1, 1e-5)
    expected = min(1.0, (1e-5 / abs(0.01 * total)) ** 0.5)
    assert abs(float(nu) - expected) <= 1e-6 * expected
    assert float(ops.kl_clip_scale(grads, pre, 0.1, 1e9)) == 1.0
    zero_pre = [torch.zeros_like(p) for p in pre]
    assert float(ops.kl_clip_scale(grads, zero_pre, torch.tensor(0.1), torch.tensor(1e-5))) == 1.0
