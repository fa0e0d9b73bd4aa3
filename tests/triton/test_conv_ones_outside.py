"""The conv input factor (kernels/conv_factor.py) with the ones column out of the K loop:
column sums of the patch matrix and the row count added after it, in the tile column
holding column d. Against the float64 reference under the error rule: column d alone in
its tile or sharing one, several tiles, NCHW and channels-last, append_ones on and off,
alpha == 0 reads nothing, beta == 0 overwrites a NaN factor, no patch rows, two runs
bitwise equal."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import conv_factor
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, NAN, SMALL, oracles, poison_lower, sym_factor

TILE16 = dict(BLOCK=16, BLOCK_K=16)


def conv_x(N, C, H, W, dtype, channels_last, gen):
    x = torch.randn(N, C, H, W, generator=gen).to(dtype).to(DEV)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("N,C,H,W,k,s,p,dil,append,dtype,channels_last,config", [
    (2, 16, 5, 4, 1, 1, 0, 1, True, torch.float16, False, TILE16),      # d = 16: column d alone in tile 1
    (2, 3, 6, 5, 3, 1, 1, 1, True, torch.float16, True, TILE16),        # d = 27: column d shares tile 1
    (3, 5, 7, 6, (3, 1), 2, (1, 0), 1, True, torch.float32, False, TILE16),  # d = 15: last column of tile 0
    (1, 7, 6, 6, 3, 1, 2, 2, True, torch.float32, True, SMALL),         # d = 63, n = 64: 2 tiles of 32
    (2, 4, 5, 5, 2, 1, 0, 1, False, torch.float16, False, TILE16),      # d = 16, no ones column
    (2, 9, 4, 4, 3, 1, 1, 1, True, torch.float32, False, TILE16),       # d = 81, n = 82: 6 tiles
    (3, 6, 1, 5, 3, 1, 1, 1, True, torch.float16, False, TILE16),       # H = 1: two of three kernel rows in padding
])
def test_conv_ones_outside_matches_the_reference(N, C, H, W, k, s, p, dil, append, dtype, channels_last, config):
    gen = torch.Generator().manual_seed(N * 100 + C)
    x = conv_x(N, C, H, W, dtype, channels_last, gen)
    kk = (k, k) if isinstance(k, int) else k
    n = C * kk[0] * kk[1] + append
    f0 = sym_factor(n, gen)
    beta, alpha = torch.tensor(0.7, device=DEV), torch.tensor(0.03, device=DEV)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta.double().cpu(), alpha.double().cpu(),
                           k, s, p, dil, append_ones=append)
    out = poison_lower(f0)
    conv_factor.conv_input_factor_(out, x, beta, alpha, k, s, p, dil, append_ones=append, config=config)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)
    again = poison_lower(f0)
    conv_factor.conv_input_factor_(again, x, beta, alpha, k, s, p, dil, append_ones=append, config=config)
    assert torch.equal(out, again), "two runs must be bitwise equal"
    if append:  # the corner is beta*F + alpha*(number of patch rows)
        rows = torch.nn.functional.unfold(x.float().cpu(), k, dil, p, s).shape
        want = 0.7 * f0[-1, -1].double().cpu() + 0.03 * rows[0] * rows[2]
        assert abs(float(out[-1, -1]) - float(want)) <= 1e-6 * abs(float(want))


def assert_alpha_zero_and_beta_zero(C, channels_last, dtype, config, gen):
    """alpha == 0 with NaN x leaves beta*F (no row read); beta == 0 overwrites a NaN factor
    with alpha*P_bar^T P_bar (reference in float64). A 3x3 conv, padding 1, on (2, C, 5, 5)."""
    n = C * 9 + 1
    f0 = sym_factor(n, gen)
    nan_x = torch.full((2, C, 5, 5), NAN, device=DEV).to(dtype)
    if channels_last:
        nan_x = nan_x.to(memory_format=torch.channels_last)
    out = f0.clone()
    conv_factor.conv_input_factor_(out, nan_x, 0.5, 0.0, 3, 1, 1, 1, append_ones=True, config=config)
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)
    x = conv_x(2, C, 5, 5, dtype, channels_last, gen)
    ref = reference.conv_input_factor_(torch.zeros(n, n, dtype=torch.float64), x.double().cpu(), 0.0, 0.5,
                                       3, 1, 1, 1, append_ones=True)
    out = torch.full((n, n), NAN, device=DEV)
    conv_factor.conv_input_factor_(out, x, 0.0, 0.5, 3, 1, 1, 1, append_ones=True, config=config)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conv_ones_outside_alpha_zero_and_beta_zero(dtype):
    assert_alpha_zero_and_beta_zero(3, False, dtype, TILE16, torch.Generator().manual_seed(7))


def test_conv_no_patch_rows():
    """N = 0: no rows; the ones column's corner gets 0 rows, the rest beta*F."""
    gen = torch.Generator().manual_seed(8)
    f0 = sym_factor(19, gen)
    out = poison_lower(f0)
    conv_factor.conv_input_factor_(out, torch.zeros(0, 2, 4, 4, device=DEV), 0.5, 2.0, 3, 1, 1, 1,
                                   append_ones=True, config=TILE16)
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_conv_configs_ship_their_stage_counts():
    """The conv kernel's own configs (kernels/conv_factor.py) are the ones launched."""
    assert conv_factor.pick_config(torch.bfloat16, False) == conv_factor.CONFIG_CONV_16BIT
    assert conv_factor.pick_config(torch.float32, False) == conv_factor.CONFIG_CONV_FP32
