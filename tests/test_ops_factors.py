"""update_factor_, update_factors_, conv_input_factor_ against float64 oracles."""
import pytest
import torch

from kfac_fast import ops
from kfac_fast.backends import reference
from tests._oracle import assert_error_rule, f64, generator, randn, random_spd


def _gram_oracle(factor64, x64, beta, alpha, append_ones):
    """beta*F + alpha * sum_r x_bar_r x_bar_r^T, one outer product per row (float64)."""
    rows = x64.reshape(-1, x64.shape[-1])
    if append_ones:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    total = torch.zeros_like(factor64)
    for r in rows:
        total += torch.outer(r, r)
    return beta * factor64 + alpha * total


@pytest.mark.parametrize("rows", [1, 3, 257])
@pytest.mark.parametrize("dim", [1, 2, 17, 255])
@pytest.mark.parametrize("append_ones", [False, True])
def test_update_factor_matches_outer_products(rows, dim, append_ones):
    gen = generator(rows * 1000 + dim * 2 + append_ones)
    n = dim + append_ones
    factor = random_spd(n, dtype=torch.float32, gen=gen)
    x = randn(rows, dim, gen=gen)
    beta, alpha = 0.7, 1.3 / rows
    expected = _gram_oracle(f64(factor), f64(x), beta, alpha, append_ones)
    baseline = reference.update_factor_(factor.clone(), x, beta, alpha, append_ones=append_ones)
    out = factor.clone()
    assert ops.update_factor_(out, x, beta, alpha, append_ones=append_ones) is out
    assert_error_rule(out, expected, baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_update_factor_half_inputs_accumulate_in_factor_dtype(dtype):
    gen = generator(3)
    x = randn(257, 17, dtype=dtype, gen=gen) * 4  # large enough that a half accumulator would lose bits
    factor = random_spd(18, dtype=torch.float32, gen=gen)
    expected = _gram_oracle(f64(factor), f64(x), 0.5, 0.25, True)
    baseline = reference.update_factor_(factor.clone(), x.float(), 0.5, 0.25, append_ones=True)
    out = ops.update_factor_(factor.clone(), x, 0.5, 0.25, append_ones=True)
    assert out.dtype == torch.float32
    assert_error_rule(out, expected, baseline)


@pytest.mark.parametrize("make", [
    lambda g: randn(17, 40, gen=g)[:, ::2][:, :17],             # strided columns
    lambda g: randn(17, 5, gen=g).mT,                            # transposed (5, 17)
    lambda g: randn(3, 7, 30, gen=g)[:, :, 5:22],                # 3-D, non-contiguous rows
])
def test_update_factor_noncontiguous_and_batched_x(make):
    gen = generator(11)
    x = make(gen)
    assert not x.is_contiguous()
    d = x.shape[-1]
    factor = random_spd(d, dtype=torch.float32, gen=gen)
    expected = _gram_oracle(f64(factor), f64(x), 0.9, 0.1, False)
    baseline = reference.update_factor_(factor.clone(), x.contiguous(), 0.9, 0.1)
    assert_error_rule(ops.update_factor_(factor.clone(), x, 0.9, 0.1), expected, baseline)


@pytest.mark.parametrize("alpha", [0.0, 0, torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)])
def test_alpha_zero_does_not_leak_nan(alpha):
    gen = generator(5)
    factor = random_spd(9, dtype=torch.float32, gen=gen)
    x = randn(6, 8, gen=gen)
    x[2, 3] = float("nan")
    x[4, 1] = float("inf")
    out = ops.update_factor_(factor.clone(), x, 0.5, alpha, append_ones=True)
    torch.testing.assert_close(out, factor * 0.5, rtol=0, atol=0)
    outs = ops.update_factors_([factor.clone()], [x], 0.5, alpha, append_ones=True)
    torch.testing.assert_close(outs[0], factor * 0.5, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_alpha_zero_device_tensor_does_not_leak_nan():
    factor = random_spd(9, dtype=torch.float32, gen=generator(5)).cuda()
    x = torch.randn(6, 8, device="cuda")
    x[2, 3] = float("nan")
    alpha = torch.zeros((), device="cuda")
    out = ops.update_factor_(factor.clone(), x, 0.5, alpha, append_ones=True)
    torch.testing.assert_close(out, factor * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, torch.tensor(0.0)])
def test_beta_zero_overwrites_without_reading_the_factor(beta):
    gen = generator(9)
    x = randn(7, 5, gen=gen)
    poisoned = torch.full((6, 6), float("nan"))
    out = ops.update_factor_(poisoned, x, beta, 0.25, append_ones=True)
    expected = reference.update_factor_(torch.zeros(6, 6, dtype=torch.float64), f64(x), 0.0, 0.25,
                                        append_ones=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected.float())


def test_zero_rows_only_scales():
    factor = random_spd(4, dtype=torch.float32, gen=generator(6))
    out = ops.update_factor_(factor.clone(), torch.empty(0, 3), 0.3, 2.0, append_ones=True)
    torch.testing.assert_close(out, factor * 0.3)


def test_tensor_scalars_equal_python_scalars():
    gen = generator(8)
    factor = random_spd(17, dtype=torch.float32, gen=gen)
    x = randn(33, 17, gen=gen)
    a = ops.update_factor_(factor.clone(), x, 0.25, 0.5)
    b = ops.update_factor_(factor.clone(), x, torch.tensor(0.25), torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(a, b)


def test_grouped_equals_per_layer():
    gen = generator(9)
    dims = [1, 2, 17, 255, 17]
    ones = [True, False, True, True, False]
    rows = [3, 257, 1, 40, 17]
    factors = [random_spd(d + o, dtype=torch.float32, gen=gen) for d, o in zip(dims, ones)]
    xs = [randn(r, d, gen=gen) for r, d in zip(rows, dims)]
    betas = torch.rand(len(dims), generator=gen)
    alphas = [0.1, 0.2, 0.3, 0.0, 1.5]
    grouped = ops.update_factors_([f.clone() for f in factors], xs, betas, alphas, append_ones=ones)
    for i, f in enumerate(factors):
        single = ops.update_factor_(f.clone(), xs[i], betas[i], alphas[i], append_ones=ones[i])
        torch.testing.assert_close(grouped[i], single, rtol=1e-6, atol=1e-6)
        expected = _gram_oracle(f64(f), f64(xs[i]), float(betas[i]), alphas[i], ones[i])
        assert_error_rule(grouped[i], expected, single, f"layer {i}")


def _patches_oracle(x64, k, s, p, d):
    """im2col by explicit loops: rows (N*L, C*kh*kw), channel-major then kernel rows, cols."""
    n, c, h, w = x64.shape
    xp = torch.nn.functional.pad(x64, (p[1], p[1], p[0], p[0]))
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = [xp[b, ch, i * s[0] + ki * d[0], j * s[1] + kj * d[1]]
                         for ch in range(c) for ki in range(k[0]) for kj in range(k[1])]
                rows.append(torch.stack(patch))
    return torch.stack(rows)


@pytest.mark.parametrize("shape,k,s,p,d", [
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((1, 2, 9, 8), (2, 3), (2, 1), (0, 2), (2, 1)),
    ((3, 1, 5, 5), (1, 1), (2, 2), (0, 0), (1, 1)),
])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_input_factor_matches_explicit_patches(shape, k, s, p, d, append_ones, channels_last):
    gen = generator(sum(shape) + append_ones)
    x = randn(*shape, gen=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    n = shape[1] * k[0] * k[1] + append_ones
    factor = random_spd(n, dtype=torch.float32, gen=gen)
    rows = _patches_oracle(f64(x), k, s, p, d)
    expected = _gram_oracle(f64(factor), rows, 0.6, 0.05, append_ones)
    baseline = reference.update_factor_(factor.clone(), rows.float(), 0.6, 0.05, append_ones=append_ones)
    out = ops.conv_input_factor_(factor.clone(), x, 0.6, 0.05, k, s, p, d, append_ones=append_ones)
    assert_error_rule(out, expected, baseline)


def test_conv_input_factor_int_args_and_half_input():
    gen = generator(12)
    x = randn(2, 4, 6, 6, dtype=torch.float16, gen=gen)
    factor = random_spd(4 * 9 + 1, dtype=torch.float32, gen=gen)
    rows = _patches_oracle(f64(x), (3, 3), (1, 1), (1, 1), (1, 1))
    expected = _gram_oracle(f64(factor), rows, 0.0, 1.0, True)
    baseline = reference.update_factor_(factor.clone(), rows.float(), 0.0, 1.0, append_ones=True)
    out = ops.conv_input_factor_(factor.clone(), x, 0.0, 1.0, 3, 1, 1, 1, append_ones=True)
    assert_error_rule(out, expected, baseline)


def test_conv_alpha_zero_does_not_leak_nan():
    x = randn(1, 2, 4, 4, gen=generator(13))
    x[0, 1, 2, 2] = float("nan")
    factor = random_spd(2 * 4, dtype=torch.float32, gen=generator(14))
    out = ops.conv_input_factor_(factor.clone(), x, 0.5, 0.0, 2, 1, 0, 1)
    torch.testing.assert_close(out, factor * 0.5, rtol=0, atol=0)
