"""The fused update with the ones column out of the K loop (ONES_OUTSIDE, the shipped main
loop of the 16-bit and TF32 configs): same results as the in-loop ones column under the
error rule, for every layout, append_ones on and off, the ones column in a tile of its
own or sharing one, and alpha == 0; the ROW_ALIGN hint changes no result."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, SMALL, oracles, poison_lower, sym_factor, x_of

OUTSIDE = dict(SMALL, ONES_OUTSIDE=True)


@pytest.mark.parametrize("R, d, append, dtype, layout", [
    (37, 31, True, torch.float16, "contig"),     # column d = 31 last in tile 0
    (37, 32, True, torch.float16, "contig"),     # column d = 32 alone in tile 1
    (50, 45, True, torch.float32, "transposed"),
    (64, 70, True, torch.float16, "3d"),         # two-level rows (bf16: the interpreter cannot)
    (33, 40, False, torch.float16, "sliced"),
    (1, 3, True, torch.float32, "contig"),
    (0, 5, True, torch.float32, "contig"),
])
def test_ones_outside_matches_the_reference(R, d, append, dtype, layout):
    gen = torch.Generator().manual_seed(R * 100 + d)
    n = d + append
    f0 = sym_factor(n, gen)
    x = x_of((R, d), dtype, gen, layout)
    beta, alpha = torch.tensor(0.9, device=DEV), torch.tensor(0.01, device=DEV)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta.double().cpu(), alpha.double().cpu(),
                           append_ones=append)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config=OUTSIDE)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)
    # The corner is beta*F + alpha*R exactly as the shipped kernel computes it.
    in_loop = poison_lower(f0)
    factor_update.update_factor_(in_loop, x, beta, alpha, append_ones=append, config=dict(SMALL, ONES_OUTSIDE=False))
    if append:
        torch.testing.assert_close(out[-1, -1], in_loop[-1, -1], rtol=0, atol=0)


def test_ones_outside_alpha_zero_reads_nothing():
    gen = torch.Generator().manual_seed(2)
    f0 = sym_factor(34, gen)
    x = torch.full((9, 33), float("nan"), device=DEV)
    out = f0.clone()
    factor_update.update_factor_(out, x, torch.tensor(0.5, device=DEV), 0.0, append_ones=True, config=OUTSIDE)
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_shipped_configs():
    """ONES_OUTSIDE is the shipped main loop of the 16-bit and TF32 fused configs (same
    tile sizes as before); IEEE fp32 keeps the in-loop ones column; candidates (tile
    shapes, split-K) stay out of pick_config."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in (False, True):
            cfg = factor_update.pick_config(dtype, tf32)
            assert cfg.get("ONES_OUTSIDE", False) == (dtype != torch.float32 or tf32)
            assert cfg["BLOCK"] == (64 if dtype == torch.float32 and not tf32 else 128)
            assert "BLOCK_M" not in cfg and "SPLIT_K" not in cfg


@pytest.mark.parametrize("dtype, d", [(torch.float16, 40), (torch.float32, 36)])
def test_row_align_hint_changes_nothing(dtype, d):
    """ROW_ALIGN is only a hint: the host grants it for aligned rows (d and the row
    stride multiples of 16 bytes) and the results are bitwise those without it."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(45, d + 8, generator=gen).to(dtype)[:, :d].to(DEV)
    v, R, dd, L_inner, s_outer, s_inner, s_col, two = factor_update.rows_view(x)
    assert factor_update.row_align(v, dd, s_outer, s_inner, s_col, two) == 16 // x.element_size()
    assert factor_update.row_align(v[:, 1:], dd - 1, s_outer, s_inner, s_col, two) == 1
    f0 = sym_factor(d + 1, gen)
    outs = []
    for hint in (True, False):
        out = poison_lower(f0)
        saved = factor_update.row_align
        if not hint:
            factor_update.row_align = lambda *a: 1
        try:
            factor_update.update_factor_(out, x, 0.9, 0.01, append_ones=True, config=OUTSIDE)
        finally:
            factor_update.row_align = saved
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
