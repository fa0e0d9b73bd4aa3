"""The conv input factor's (kh, kw, c) column order (kernels/conv_factor.py, CL: the
candidates CONFIG_CONV_16BIT_CL / CONFIG_CONV_FP32_CL, out of `auto`): the patch columns
gathered so that a channels-last input's consecutive columns are adjacent in memory, the
tile written back in unfold's (c, kh, kw) order by `unfold_order_epilogue`. Any input
layout gives the reference factor under the error rule; beta*F is read from the upper
triangle only (the lower one holds NaN), each pair lands in both triangles (exactly
symmetric), alpha == 0 reads nothing, beta == 0 overwrites a NaN factor, two runs are
bitwise equal."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import conv_factor
from tests._oracle import assert_error_rule
from tests.triton.test_conv_ones_outside import assert_alpha_zero_and_beta_zero, conv_x
from tests.triton.test_factor_update import DEV, oracles, poison_lower, sym_factor

CL16 = dict(BLOCK=16, BLOCK_K=16, CL=True)


@pytest.mark.parametrize("N,C,H,W,k,s,p,dil,append,dtype,channels_last", [
    (2, 3, 6, 5, 3, 1, 1, 1, True, torch.float16, True),         # d = 27, n = 28: 2 tiles
    (2, 5, 7, 6, 3, 2, 1, 1, True, torch.float32, True),         # d = 45: 3 tiles, d in the last
    (1, 4, 6, 6, (3, 2), 1, (1, 0), 2, False, torch.float16, True),  # d = 24, rectangular kernel
    (2, 6, 5, 5, 3, 1, 1, 1, True, torch.float32, False),        # NCHW input, (kh, kw, c) order
    (1, 7, 5, 4, 2, 1, 0, 1, True, torch.float16, False),        # d = 28, NCHW: column d shares tile 1
    (2, 4, 5, 5, 2, 1, 0, 1, True, torch.float32, True),         # d = 16: column d alone in tile 1
])
def test_channels_last_order_matches_the_reference(N, C, H, W, k, s, p, dil, append, dtype, channels_last):
    gen = torch.Generator().manual_seed(N * 1000 + C * 10 + H)
    x = conv_x(N, C, H, W, dtype, channels_last, gen)
    kk = (k, k) if isinstance(k, int) else k
    n = C * kk[0] * kk[1] + append
    f0 = sym_factor(n, gen)
    beta, alpha = torch.tensor(0.6, device=DEV), torch.tensor(0.04, device=DEV)
    ref64, ref32 = oracles(reference.conv_input_factor_, f0, x, beta.double().cpu(), alpha.double().cpu(),
                           k, s, p, dil, append_ones=append)
    runs = []
    for _ in range(2):
        out = poison_lower(f0)
        conv_factor.conv_input_factor_(out, x, beta, alpha, k, s, p, dil, append_ones=append, config=CL16)
        runs.append(out)
    out = runs[0]
    assert torch.equal(out, out.T), "each pair in both triangles"
    assert_error_rule(out, ref64, ref32)
    assert torch.equal(runs[0], runs[1]), "two runs must be bitwise equal"
    # Entry by entry: the permutation puts every value where unfold's order wants it.
    torch.testing.assert_close(out.double().cpu(), ref64, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_channels_last_order_alpha_zero_and_beta_zero(dtype):
    assert_alpha_zero_and_beta_zero(4, True, dtype, CL16, torch.Generator().manual_seed(9))


def test_channels_last_order_is_not_a_shipped_default():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in (False, True):
            assert not conv_factor.pick_config(dtype, tf32).get("CL", False)


@pytest.mark.parametrize("dtype,allow_tf32,config,want", [
    (torch.float16, False, {"CL": True}, conv_factor.CONFIG_CONV_16BIT_CL),
    (torch.float32, True, {"CL": True}, conv_factor.CONFIG_CONV_FP32_CL),
    (torch.float32, True, {"SPLIT_K": 2}, dict(conv_factor.CONFIG_CONV_TF32, SPLIT_K=2)),
    (torch.float16, False, {"CL": True, "SPLIT_K": 2}, dict(conv_factor.CONFIG_CONV_16BIT_CL, SPLIT_K=2)),
])
def test_candidate_configs_start_from_their_own_tiles(monkeypatch, dtype, allow_tf32, config, want):
    """config={"CL": True} runs the (kh, kw, c) order's own tiles (BLOCK_K=16), not the
    shipped BLOCK_K=32 that spilled there; TF32 gets its spill-free conv tiles."""
    seen = {}

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.update(kw)

    monkeypatch.setattr(conv_factor, "_conv_factor_kernel", Record())
    monkeypatch.setattr(conv_factor, "_cl_reduce_kernel", Record())
    x = torch.randn(2, 3, 6, 6).to(dtype).to(DEV)
    conv_factor.conv_input_factor_(sym_factor(28, torch.Generator().manual_seed(3)), x, 0.5, 0.5, 3, 1, 1, 1,
                                   append_ones=True, config=config, allow_tf32=allow_tf32)
    got = {k: seen[k] for k in ("BLOCK", "BLOCK_K", "num_warps", "num_stages")}
    assert got == {k: want[k] for k in got}
    assert seen["SPLIT_K"] == want.get("SPLIT_K", 1) and seen["CL"] == want.get("CL", False)


def test_64_bit_offsets_take_the_smaller_k_step(monkeypatch):
    """With 64-bit offsets the 16-bit gather runs BLOCK_K=16 (32 spilled 428-440 bytes
    under Triton 3.6.0); a BLOCK_K the caller chose is kept."""
    seen = []

    class Record:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((kw["INDEX64"], kw["BLOCK_K"]))

    monkeypatch.setattr(conv_factor, "_conv_factor_kernel", Record())
    monkeypatch.setattr(conv_factor, "needs_index64", lambda *tensors: True)  # as if x spanned 2^31
    x = torch.randn(2, 3, 6, 6).to(torch.float16).to(DEV)
    f = sym_factor(28, torch.Generator().manual_seed(3))
    conv_factor.conv_input_factor_(f, x, 0.5, 0.5, 3, 1, 1, 1, append_ones=True)
    conv_factor.conv_input_factor_(f, x, 0.5, 0.5, 3, 1, 1, 1, append_ones=True, config={"BLOCK_K": 32})
    assert seen == [(True, conv_factor.INDEX64_16BIT["BLOCK_K"]), (True, 32)]
