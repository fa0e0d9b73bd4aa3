"""Triton factor updates (kernels/factor_update.py, factor_update_grouped.py, conv_factor.py) against
kfac_fast.backends.reference in float64, under docs/design.md's error rule.

Runs under TRITON_INTERPRET=1 on CPU (its own pytest process: the variable is read when
`@triton.jit` decorates) or on a CUDA device. Tiles of 32 keep each case about a second.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)

from kfac_fast.backends import reference
from kfac_fast.kernels import conv_factor, factor_update, factor_update_grouped
from tests._oracle import assert_error_rule, rel_error

pytestmark = pytest.mark.interpret
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
SMALL = dict(BLOCK=32, BLOCK_K=32)
NAN = float("nan")



def sym_factor(n, gen):
    f = torch.randn(n, n, generator=gen)
    return (f + f.T).to(DEV)


def poison_lower(f):
    """NaN below the diagonal: the kernel must neither read nor keep it."""
    p = f.clone()
    n = p.shape[0]
    p[torch.tril(torch.ones(n, n, dtype=torch.bool, device=p.device), -1)] = NAN
    return p


def oracles(fn, factor, *args, **kw):
    """(float64 reference, float32 reference) on copies of the same rounded inputs."""
    f64, f32 = factor.double().clone(), factor.float().clone()
    fn(f64, *args, **kw)
    fn(f32, *args, **kw)
    return f64, f32


def grouped_oracles(f0s, xs, appends, gen):
    """(betas, alphas, float64 references, float32 references) of update_factors_ on
    copies of f0s, with random float64 per-layer betas and alphas drawn from gen."""
    L = len(f0s)
    betas = torch.rand(L, generator=gen, dtype=torch.float64)
    alphas = torch.rand(L, generator=gen, dtype=torch.float64)
    ref64 = [f.double().clone() for f in f0s]
    ref32 = [f.float().clone() for f in f0s]
    reference.update_factors_(ref64, xs, betas, alphas, append_ones=appends)
    reference.update_factors_(ref32, xs, betas, alphas, append_ones=appends)
    return betas, alphas, ref64, ref32


def x_of(shape, dtype, gen, layout):
    x = torch.randn(*shape, generator=gen).to(dtype)
    if layout == "transposed":  # (R, d) view of a (d, R) tensor
        x = torch.randn(*reversed(shape), generator=gen).to(dtype).T
    elif layout == "sliced":  # every other column and a leading-dim stride
        x = torch.randn(shape[0], 2 * shape[1] + 1, generator=gen).to(dtype)[:, 1::2]
    elif layout == "3d":  # (N, T, d) with non-mergeable strides: no flat view exists
        N, T = 3, max(shape[0] // 3, 1)
        x = torch.randn(T, N, shape[1] + 2, generator=gen).to(dtype).transpose(0, 1)[:, :, :shape[1]]
    return x.to(DEV)


@pytest.mark.parametrize("R,d,append,dtype,layout", [
    (7, 1, False, torch.float32, "contig"),
    (5, 1, True, torch.float32, "contig"),
    (40, 17, True, torch.float16, "contig"),
    (33, 33, False, torch.float32, "transposed"),
    (64, 31, True, torch.float32, "sliced"),
    (30, 64, True, torch.float16, "3d"),
    (300, 255, False, torch.float32, "contig"),
    (130, 256, True, torch.float16, "transposed"),
    (0, 5, True, torch.float32, "contig"),
])
@pytest.mark.parametrize("scalars", ["tensor", "float"])
def test_update_factor(R, d, append, dtype, layout, scalars):
    gen = torch.Generator().manual_seed(R * 1000 + d)
    n = d + append
    f0 = sym_factor(n, gen)
    x = x_of((R, d), dtype, gen, layout)
    # Tensors on the data's device are loaded in-kernel; numbers are passed by value.
    beta, alpha = (torch.tensor(0.9, device=DEV), torch.tensor(0.01, device=DEV)) if scalars == "tensor" \
        else (0.9, 0.01)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, torch.as_tensor(beta).double().cpu(),
                           torch.as_tensor(alpha).double().cpu(), append_ones=append)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config=SMALL)
    assert torch.equal(out, out.T), "both triangles must be written, exactly symmetric"
    assert_error_rule(out, ref64, ref32)


@pytest.mark.parametrize("alpha_kind", ["host", "device"])
def test_alpha_zero_keeps_nan_out(alpha_kind):
    gen = torch.Generator().manual_seed(1)
    f0 = sym_factor(40, gen)
    x = torch.full((9, 39), NAN, device=DEV)
    x[0, 0] = float("inf")
    alpha = 0.0 if alpha_kind == "host" else torch.tensor(0.0, device=DEV)
    out = f0.clone()
    factor_update.update_factor_(out, x, torch.tensor(0.5, device=DEV), alpha, append_ones=True, config=SMALL)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


@pytest.mark.parametrize("beta_kind", ["host", "device"])
def test_beta_zero_overwrites_nan_factor(beta_kind):
    """beta == 0 must not read the old factor (the op contract), in every path."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 39, generator=gen).to(DEV)
    beta = 0.0 if beta_kind == "host" else torch.tensor(0.0, device=DEV)
    ref = reference.update_factor_(torch.zeros(40, 40, dtype=torch.float64), x.double().cpu(), 0.0, 0.5,
                                   append_ones=True)
    out = torch.full((40, 40), NAN, device=DEV)
    factor_update.update_factor_(out, x, beta, 0.5, append_ones=True, config=SMALL)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    grouped = [torch.full((40, 40), NAN, device=DEV)]
    factor_update_grouped.update_factors_(grouped, [x], torch.tensor([0.0], device=DEV),
                                          torch.tensor([0.5], device=DEV), append_ones=[True])
    torch.testing.assert_close(grouped[0].double().cpu(), ref, rtol=1e-5, atol=1e-5)
    skipped = torch.full((40, 40), NAN, device=DEV)  # alpha == 0 too: zeros, x unread
    factor_update.update_factor_(skipped, x, beta, 0.0, append_ones=True, config=SMALL)
    assert (skipped == 0).all()


def test_deterministic():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 70, generator=gen).to(DEV)
    f0 = sym_factor(71, gen)
    a, b = f0.clone(), f0.clone()
    for f in (a, b):
        factor_update.update_factor_(f, x, torch.tensor(0.3), torch.tensor(0.7), append_ones=True, config=SMALL)
    assert torch.equal(a, b)


def test_grouped_mixed_sizes():
    """Very different layer sizes, dtypes, layouts and append_ones in one call."""
    gen = torch.Generator().manual_seed(3)
    specs = [(50, 1, True, torch.float32, "contig"), (20, 100, False, torch.float16, "sliced"),
             (33, 2, True, torch.float16, "3d"), (70, 33, True, torch.float32, "transposed"),
             (0, 3, False, torch.float32, "contig"), (41, 17, False, torch.float32, "contig")]
    xs = [x_of((R, d), dt, gen, lay) for R, d, _, dt, lay in specs]
    appends = [a for _, _, a, _, _ in specs]
    f0s = [sym_factor(d + a, gen) for (_, d, a, _, _) in specs]
    betas, alphas, ref64, ref32 = grouped_oracles(f0s, xs, appends, gen)
    for betas_arg, alphas_arg in [(betas.to(DEV, torch.float32), [float(a) for a in alphas]),
                                  ([torch.tensor(float(b), device=DEV) for b in betas], alphas)]:
        outs = [poison_lower(f) for f in f0s]
        factor_update_grouped.update_factors_(outs, xs, betas_arg, alphas_arg, append_ones=appends, config=SMALL)
        for out, r64, r32 in zip(outs, ref64, ref32):
            assert torch.equal(out, out.T)
            assert_error_rule(out, r64, r32)


def test_grouped_alpha_zero_layer():
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(10, 5, generator=gen).to(DEV), torch.full((10, 40), NAN, device=DEV)]
    fs = [sym_factor(6, gen), sym_factor(41, gen)]
    want = [0.5 * fs[0].double() + 2.0 * reference.with_ones(xs[0].double()).T @ reference.with_ones(xs[0].double()),
            0.25 * fs[1].double()]
    factor_update_grouped.update_factors_(fs, xs, torch.tensor([0.5, 0.25], device=DEV),
                                  torch.tensor([2.0, 0.0], device=DEV), append_ones=True, config=SMALL)
    assert rel_error(fs[0], want[0]) < 1e-6 and torch.isfinite(fs[1]).all() and rel_error(fs[1], want[1]) < 1e-7


@pytest.mark.parametrize("N,C,H,W,k,s,p,dil,append,dtype,channels_last", [
    (2, 3, 9, 8, 3, 2, 1, 2, True, torch.float32, False),
    (2, 5, 7, 7, 1, 1, 0, 1, False, torch.float16, True),
    (3, 4, 10, 11, (3, 2), (1, 2), (1, 0), 1, True, torch.float32, False),
    (2, 3, 6, 6, 3, 1, 1, 1, False, torch.float16, True),
    (1, 29, 5, 4, 3, 1, 1, 2, True, torch.float32, False),  # n = 262: 9 tiles, straddling
])
def test_conv_input_factor(N, C, H, W, k, s, p, dil, append, dtype, channels_last):
    gen = torch.Generator().manual_seed(N * C * H)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype).to(DEV)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kk = (k, k) if isinstance(k, int) else k
    n = C * kk[0] * kk[1] + append
    f0 = sym_factor(n, gen)
    beta, alpha = torch.tensor(0.8, device=DEV), torch.tensor(0.05, dtype=torch.float64)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta.double().cpu(), alpha, k, s, p, dil,
                           append_ones=append)
    out = poison_lower(f0)
    conv_factor.conv_input_factor_(out, x, beta, alpha, k, s, p, dil, append_ones=append, config=SMALL)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)


def test_conv_alpha_zero_keeps_nan_out():
    gen = torch.Generator().manual_seed(5)
    x = torch.full((2, 3, 5, 5), NAN, device=DEV)
    f0 = sym_factor(28, gen)
    out = f0.clone()
    conv_factor.conv_input_factor_(out, x, 1.0, torch.tensor(0.0, device=DEV), 3, 1, 1, 1, append_ones=True,
                                   config=SMALL)
    assert torch.equal(out, f0)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="bf16 tl.dot and the shipped tile sizes are checked on a GPU only")
@pytest.mark.parametrize("d,append", [(255, True), (1024, False)])
def test_gpu_bf16_shipped_configs(d, append):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(4096, d, generator=gen).to(torch.bfloat16).to(DEV)
    f0 = sym_factor(d + append, gen)
    beta, alpha = torch.tensor(0.9, device=DEV), torch.tensor(1 / 4096, device=DEV)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta, alpha, append_ones=append)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, beta, alpha, append_ones=append)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)
    fs = [poison_lower(f0), poison_lower(f0)]
    factor_update_grouped.update_factors_(fs, [x, x], beta, alpha, append_ones=append)
    for f in fs:
        assert_error_rule(f, ref64, ref32)
    xc = torch.randn(8, 16, 20, 20, generator=gen).to(torch.bfloat16).to(DEV)
    fc = sym_factor(16 * 9 + 1, gen)
    c64, c32 = oracles(reference.conv_input_factor_, fc, xc, beta, alpha, 3, 1, 1, 1, append_ones=True)
    conv_factor.conv_input_factor_(fc, xc, beta, alpha, 3, 1, 1, 1, append_ones=True)
    assert_error_rule(fc, c64, c32)
