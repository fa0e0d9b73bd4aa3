"""The fused update with the ones column out of the K loop (CONFIG_16BIT_ONES_OUTSIDE, a
candidate kept out of `auto` until a GPU has run it): same results as the shipped kernel
under the error rule, for every layout, append_ones on and off, the ones column in a
tile of its own or sharing one, and alpha == 0."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update, factor_update_grouped
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
    shipped = poison_lower(f0)
    factor_update.update_factor_(shipped, x, beta, alpha, append_ones=append, config=SMALL)
    if append:
        torch.testing.assert_close(out[-1, -1], shipped[-1, -1], rtol=0, atol=0)


def test_ones_outside_alpha_zero_reads_nothing():
    gen = torch.Generator().manual_seed(2)
    f0 = sym_factor(34, gen)
    x = torch.full((9, 33), float("nan"), device=DEV)
    out = f0.clone()
    factor_update.update_factor_(out, x, torch.tensor(0.5, device=DEV), 0.0, append_ones=True, config=OUTSIDE)
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_candidate_is_not_a_shipped_default():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in (False, True):
            assert not factor_update.pick_config(dtype, tf32).get("ONES_OUTSIDE", False)
            assert not factor_update_grouped.pick_config(dtype, tf32).get("ONES_OUTSIDE", False)
