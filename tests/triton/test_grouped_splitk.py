"""Split-K for the grouped factor update (kernels/grouped_splitk.py, a candidate reached
with config={"SPLIT_K": s}): long layers' tiles summed over row splits into a workspace
and reduced in split order, short layers updated in place, in one call. Against the
float64 reference under the error rule; bitwise deterministic; alpha == 0 reads nothing;
beta == 0 overwrites a NaN factor."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update_grouped as fg
from kfac_fast.kernels import grouped_splitk
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, NAN, grouped_oracles, poison_lower, sym_factor
from tests.triton.test_grouped_aligned import aligned_of, make_x

SPLIT = dict(BLOCK=16, BLOCK_K=16, SPLIT_K=3, SPLIT_MIN_ROWS=40)

LAYERS = [(100, 32, True, torch.float16, "contig"), (90, 24, False, torch.float16, "offset"),
          (20, 16, True, torch.float16, "padded"), (75, 17, True, torch.float16, "3d"),
          (0, 8, True, torch.float16, "contig"), (97, 12, True, torch.float32, "contig"),
          (41, 20, False, torch.float32, "transposed"), (33, 7, True, torch.float32, "contig"),
          (0, 5, True, torch.float32, "offset")]


def test_work_lists_cover_every_row_once_in_order():
    sizes, rows = [33, 17, 5], [100, 30, 0]
    splits = [grouped_splitk.layer_splits(r, SPLIT) for r in rows]
    assert splits == [3, 1, 1]
    items, reduce_items, slots = grouped_splitk.work_lists(sizes, rows, 16, 16, splits)
    assert slots == 3 * 6 and len(reduce_items) == 6  # layer 0: 3 tiles a side, 6 upper tiles
    for layer, ti, tj, slot0, s in reduce_items:
        parts = sorted((it for it in items if it[:3] == (layer, ti, tj)), key=lambda it: it[5])
        assert [it[5] for it in parts] == list(range(slot0, slot0 + s))
        assert parts[0][3] == 0 and parts[-1][4] == rows[layer]
        assert all(p[4] == q[3] for p, q in zip(parts, parts[1:])), "contiguous row ranges"
        assert all((p[3] % 16 == 0) for p in parts)
    assert sum(1 for it in items if it[5] < 0) == 3 + 1  # the unsplit layers' tiles


@pytest.mark.parametrize("append", [True, False])
def test_grouped_splitk_matches_the_reference(append, monkeypatch):
    reduced = []
    real = grouped_splitk._grouped_reduce_kernel

    class Spy:  # the reduction must run: the split path is taken
        def __getitem__(self, grid):
            reduced.append(grid[0])
            return real[grid]

    monkeypatch.setattr(grouped_splitk, "_grouped_reduce_kernel", Spy())
    gen = torch.Generator().manual_seed(11)
    xs = [make_x(R, d, dt, lay, gen) for R, d, _, dt, lay in LAYERS]
    appends = [a and append for _, _, a, _, _ in LAYERS]
    assert {aligned_of(x) for x in xs} == {True, False}
    assert {grouped_splitk.layer_splits(x.numel() // max(x.shape[-1], 1), SPLIT) for x in xs} == {1, 3}
    f0s = [sym_factor(x.shape[-1] + a, gen) for x, a in zip(xs, appends)]
    betas, alphas, ref64, ref32 = grouped_oracles(f0s, xs, appends, gen)
    runs = []
    for _ in range(2):
        outs = [poison_lower(f) for f in f0s]
        fg.update_factors_(outs, xs, betas.to(DEV, torch.float32), alphas.to(DEV, torch.float32),
                           append_ones=appends, config=SPLIT)
        runs.append(outs)
    for i, (out, r64, r32) in enumerate(zip(runs[0], ref64, ref32)):
        assert torch.equal(out, out.T), i
        assert_error_rule(out, r64, r32, what=f"layer {i} {LAYERS[i]}")
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "two runs must be bitwise equal"
    assert len(reduced) == 8 and all(r > 0 for r in reduced)  # 4 (dtype, aligned) groups split, twice


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grouped_splitk_alpha_zero_and_beta_zero(dtype):
    gen = torch.Generator().manual_seed(12)
    xs = [make_x(64, 16, dtype, "contig", gen), make_x(64, 16, dtype, "offset", gen)]
    assert all(grouped_splitk.layer_splits(64, SPLIT) == 3 for _ in xs)
    nan_xs = [x.clone().fill_(NAN) if aligned_of(x) else make_x(64, 16, dtype, "offset", gen).fill_(NAN)
              for x in xs]
    f0s = [sym_factor(17, gen) for _ in xs]
    outs = [f.clone() for f in f0s]
    fg.update_factors_(outs, nan_xs, 0.5, 0.0, append_ones=True, config=SPLIT)
    for out, f in zip(outs, f0s):
        torch.testing.assert_close(out, 0.5 * f, rtol=0, atol=0)
    outs = [torch.full((17, 17), NAN, device=DEV) for _ in xs]
    fg.update_factors_(outs, xs, 0.0, 0.5, append_ones=True, config=SPLIT)
    for out, x in zip(outs, xs):
        xb = reference.with_ones(x.double().cpu())
        torch.testing.assert_close(out.double().cpu(), 0.5 * xb.T @ xb, rtol=1e-5, atol=1e-5)
        assert out[-1, -1] == 0.5 * 64  # the row count summed over the splits, exactly


def test_splitk_is_not_a_shipped_default():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for tf32 in (False, True):
            assert fg.pick_config(dtype, tf32).get("SPLIT_K", 1) == 1
