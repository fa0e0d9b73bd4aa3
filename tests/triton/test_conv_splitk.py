"""Split-K for the conv input factor (kernels/conv_factor.py, the candidate
CONFIG_CONV_16BIT_SPLIT, out of `auto`, reached with config={"SPLIT_K": s}): every upper
tile summed over s contiguous chunks of patch rows into workspace partials (the ones
column's sums and row count included), reduced in split order by
kernels/splitk.py's _splitk_reduce_kernel with the symmetric epilogue. Against the float64
reference under the error rule; bitwise deterministic; alpha == 0 reads nothing; beta == 0
overwrites a NaN factor; more splits than rows; with the (kh, kw, c) order too."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import conv_factor, splitk
from tests._oracle import assert_error_rule
from tests.triton.test_conv_ones_outside import assert_alpha_zero_and_beta_zero, conv_x
from tests.triton.test_factor_update import DEV, NAN, oracles, poison_lower, sym_factor


def split(s):
    return dict(BLOCK=16, BLOCK_K=16, SPLIT_K=s)


@pytest.mark.parametrize("N,C,H,W,k,s,p,dil,append,dtype,channels_last,splits", [
    (2, 3, 6, 5, 3, 1, 1, 1, True, torch.float16, False, 3),     # 60 patch rows: chunks of 32, 28, 0
    (3, 5, 5, 6, 3, 1, 1, 1, True, torch.float32, True, 4),      # d = 45: 3 tiles a side
    (2, 4, 5, 5, 2, 1, 0, 1, False, torch.float16, True, 2),     # d = 16, no ones column
    (1, 2, 3, 3, 3, 1, 1, 1, True, torch.float32, False, 8),     # 9 rows, 8 splits: most chunks empty
    (2, 16, 4, 4, 1, 1, 0, 1, True, torch.float16, False, 5),    # d = 16: column d alone in tile 1
])
def test_conv_splitk_matches_the_reference(N, C, H, W, k, s, p, dil, append, dtype, channels_last, splits,
                                          monkeypatch):
    reduced = []
    real = splitk._splitk_reduce_kernel

    class Spy:  # the split path runs: partials reduced
        def __getitem__(self, grid):
            reduced.append(grid[0])
            return real[grid]

    monkeypatch.setattr(splitk, "_splitk_reduce_kernel", Spy())
    gen = torch.Generator().manual_seed(N * 100 + C + splits)
    x = conv_x(N, C, H, W, dtype, channels_last, gen)
    kk = (k, k) if isinstance(k, int) else k
    n = C * kk[0] * kk[1] + append
    f0 = sym_factor(n, gen)
    beta, alpha = torch.tensor(0.8, device=DEV), torch.tensor(0.02, device=DEV)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta.double().cpu(), alpha.double().cpu(),
                           k, s, p, dil, append_ones=append)
    runs = []
    for _ in range(2):
        out = poison_lower(f0)
        conv_factor.conv_input_factor_(out, x, beta, alpha, k, s, p, dil, append_ones=append, config=split(splits))
        runs.append(out)
    out = runs[0]
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)
    assert torch.equal(runs[0], runs[1]), "two runs must be bitwise equal"
    nt = -(-n // 16)
    assert reduced == [nt * (nt + 1) // 2] * 2
    if append:  # the row counts of the chunks sum to the number of patch rows exactly (fp32 integers)
        rows = torch.nn.functional.unfold(x.float().cpu(), k, dil, p, s).shape
        want = 0.8 * f0[-1, -1].double().cpu() + 0.02 * rows[0] * rows[2]
        assert abs(float(out[-1, -1]) - float(want)) <= 1e-6 * abs(float(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conv_splitk_alpha_zero_and_beta_zero(dtype):
    assert_alpha_zero_and_beta_zero(4, False, dtype, split(3), torch.Generator().manual_seed(13))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_conv_splitk_with_the_channels_last_order(dtype):
    """Both candidates at once: (kh, kw, c)-ordered partials reduced by _cl_reduce_kernel."""
    gen = torch.Generator().manual_seed(14)
    x = conv_x(2, 5, 6, 5, dtype, True, gen)  # d = 45: 3 tiles a side, 60 patch rows
    f0 = sym_factor(46, gen)
    beta, alpha = torch.tensor(0.7, device=DEV), torch.tensor(0.03, device=DEV)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta.double().cpu(), alpha.double().cpu(),
                           3, 1, 1, 1, append_ones=True)
    runs = []
    for _ in range(2):
        out = poison_lower(f0)
        conv_factor.conv_input_factor_(out, x, beta, alpha, 3, 1, 1, 1, append_ones=True,
                                       config=dict(split(3), CL=True))
        runs.append(out)
    assert torch.equal(runs[0], runs[0].T)
    assert_error_rule(runs[0], ref64, ref32)
    torch.testing.assert_close(runs[0].double().cpu(), ref64, rtol=2e-3, atol=2e-3)  # entry by entry
    assert torch.equal(runs[0], runs[1])
    nan_x = torch.full_like(x, NAN)
    out = f0.clone()
    conv_factor.conv_input_factor_(out, nan_x, 0.5, 0.0, 3, 1, 1, 1, append_ones=True, config=dict(split(3), CL=True))
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_conv_splitk_is_not_a_shipped_default():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in (False, True):
            assert conv_factor.pick_config(dtype, tf32).get("SPLIT_K", 1) == 1
