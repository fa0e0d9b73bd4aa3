"""The rectangular-tile / split-K candidate of the fused update (kernels/splitk.py, out of
`auto`): against float64 under the error rule for several layouts, dtypes, append_ones on
and off and splits; partial sums added in split order; deterministic; alpha == 0 reads
nothing; beta == 0 overwrites; R smaller than the number of splits; R = 0. Small
rectangular tiles (16x32) keep each case fast under the interpreter."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update, splitk
from tests._oracle import assert_error_rule, rel_error
from tests.triton.test_factor_update import DEV, NAN, oracles, poison_lower, sym_factor, x_of

RECT = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)


def rect(split):
    return dict(RECT, SPLIT_K=split)


@pytest.mark.parametrize("R, d, append, dtype, layout, split", [
    (100, 45, True, torch.float32, "contig", 3),
    (70, 31, True, torch.float16, "transposed", 2),   # column d = 31: last of tile column 0
    (64, 40, False, torch.float16, "3d", 4),          # two-level rows
    (90, 33, True, torch.float32, "sliced", 1),       # rectangular tiles, one kernel
    (2, 20, True, torch.float32, "contig", 4),        # R smaller than the number of splits
    (0, 9, True, torch.float32, "contig", 3),         # R = 0: beta*F, the corner 0
])
def test_splitk_matches_the_reference(R, d, append, dtype, layout, split):
    gen = torch.Generator().manual_seed(R * 10 + d)
    n = d + append
    f0 = sym_factor(n, gen)
    x = x_of((R, d), dtype, gen, layout)
    beta, alpha = torch.tensor(0.9, device=DEV), 0.01
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta.double().cpu(), alpha, append_ones=append)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config=rect(split))
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)
    one = poison_lower(f0)  # SPLIT_K = 1 on the same tiles: equal within the rule
    factor_update.update_factor_(one, x, beta, alpha, append_ones=append, config=rect(1))
    assert_error_rule(one, ref64, ref32)
    assert rel_error(out, one) < 1e-5


def test_partials_are_summed_in_split_order():
    """F[0, 1] = 2^26 - 2^26 + 1 from splits 0, 1, 2 (one row each): 1 in split order,
    0 in any order that adds the 1 before a 2^26 (fp32 cannot hold 2^26 + 1)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(48, 5, generator=gen)
    x[:, :2] = 0.0
    x[0, :2] = torch.tensor([2.0**13, 2.0**13])
    x[16, :2] = torch.tensor([2.0**13, -(2.0**13)])
    x[32, :2] = torch.tensor([1.0, 1.0])
    out = poison_lower(sym_factor(5, gen))
    factor_update.update_factor_(out, x.to(DEV), 0.0, 1.0, config=rect(3))
    assert out[0, 1].item() == 1.0 and out[1, 0].item() == 1.0


def test_splitk_deterministic():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(150, 50, generator=gen).to(DEV)
    f0 = sym_factor(51, gen)
    a, b = f0.clone(), f0.clone()
    for f in (a, b):
        factor_update.update_factor_(f, x, 0.3, torch.tensor(0.7, device=DEV), append_ones=True, config=rect(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("split", [1, 3])
def test_splitk_alpha_zero_reads_nothing(split):
    gen = torch.Generator().manual_seed(9)
    f0 = sym_factor(40, gen)
    x = torch.full((50, 39), NAN, device=DEV)
    out = f0.clone()
    factor_update.update_factor_(out, x, torch.tensor(0.5, device=DEV), 0.0, append_ones=True, config=rect(split))
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_splitk_beta_zero_overwrites_nan():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(60, 39, generator=gen).to(DEV)
    ref = reference.update_factor_(torch.zeros(40, 40, dtype=torch.float64), x.double().cpu(), 0.0, 0.5,
                                   append_ones=True)
    out = torch.full((40, 40), NAN, device=DEV)
    factor_update.update_factor_(out, x, 0.0, 0.5, append_ones=True, config=rect(2))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_upper_rect_tiles_cover_the_upper_triangle_once():
    n, bm, bn = 50, 16, 32
    tiles = splitk.upper_rect_tiles(n, bm, bn)
    hits = torch.zeros(n, n, dtype=torch.int32)
    for ti, tj in tiles:
        hits[ti * bm:(ti + 1) * bm, tj * bn:(tj + 1) * bn] += 1
        r = torch.arange(ti * bm, min((ti + 1) * bm, n))[:, None]
        c = torch.arange(tj * bn, min((tj + 1) * bn, n))[None, :]
        assert bool((r <= c).any()), f"tile {(ti, tj)} holds no upper element"
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool))
    assert (hits[upper] == 1).all()


def test_pick_split():
    cfg = splitk.CONFIG_128x256
    assert cfg["BLOCK_K"] == 32
    assert splitk.pick_split(4096, 8192, cfg) == 4    # 272 tiles: 9 waves x 64 K-steps
    assert splitk.pick_split(4097, 8192, cfg) == 3    # 305 tiles: 7 waves x 86 K-steps
    assert splitk.pick_split(4096, 32 * 8, cfg) == 1  # 8 K-steps: no split keeps MIN_KSTEPS
    assert splitk.pick_split(4096, 32 * 16, cfg) == 2  # 16 K-steps: 5 waves x 8 < 3 x 16
    assert splitk.pick_split(256, 131072, cfg) == splitk.MAX_SPLIT  # 3 tiles, 4096 K-steps


def test_split_alone_runs_the_candidate_config(monkeypatch):
    """config={"SPLIT_K": s} takes CONFIG_128x256's tiles, K step and stages, not the
    shipped 16-bit config's (BLOCK_K=64 x 3 stages spilled at odd d under Triton 3.8)."""
    seen = {}
    monkeypatch.setattr(splitk, "launch_rect", lambda *a: seen.update(a[11]))
    x = torch.randn(40, 30).to(torch.float16).to(DEV)
    factor_update.update_factor_(sym_factor(31, torch.Generator().manual_seed(1)), x, 0.5, 0.5, append_ones=True,
                                 config={"SPLIT_K": 2})
    assert seen == dict(splitk.CONFIG_128x256, SPLIT_K=2)


@pytest.mark.parametrize("config", [{"BLOCK_N": 64}, {"BLOCK_M": 64}, {"SPLIT_K": 3}])
def test_any_candidate_key_reaches_the_candidate(monkeypatch, config):
    """A config naming only BLOCK_N (or BLOCK_M, or SPLIT_K > 1) runs the rectangular
    candidate with that value; before, BLOCK_N alone was silently ignored."""
    seen = {}
    monkeypatch.setattr(splitk, "launch_rect", lambda *a: seen.update(a[11]))
    x = torch.randn(40, 30).to(torch.float16).to(DEV)
    factor_update.update_factor_(sym_factor(31, torch.Generator().manual_seed(1)), x, 0.5, 0.5, append_ones=True,
                                 config=config)
    assert seen == dict(splitk.CONFIG_128x256, **config)


def test_ieee_float32_candidate_takes_the_fma_tiles(monkeypatch):
    """Float32 rows get their own candidate tiles: IEEE the 64x64 FMA tiles, TF32 128x128
    (128x256 spilled 580/476 bytes for IEEE, 144-276 at odd d for TF32)."""
    seen = []
    monkeypatch.setattr(splitk, "launch_rect", lambda *a: seen.append(dict(a[11])))
    x = torch.randn(40, 30).to(DEV)
    for precision in ("ieee", "tf32"):
        factor_update.update_factor_(sym_factor(31, torch.Generator().manual_seed(1)), x, 0.5, 0.5,
                                     append_ones=True, config={"SPLIT_K": 2}, precision=precision)
    assert seen == [dict(splitk.CONFIG_FP32_RECT, SPLIT_K=2), dict(splitk.CONFIG_TF32_RECT, SPLIT_K=2)]


def test_unknown_schedule_is_refused():
    x = torch.randn(40, 30).to(DEV)
    with pytest.raises(ValueError, match="SCHEDULE"):
        factor_update.update_factor_(sym_factor(31, torch.Generator().manual_seed(1)), x, 0.5, 0.5,
                                     config={"SCHEDULE": "stream-k"})


@pytest.mark.parametrize("split", [1, 2])
def test_candidate_tile_shape(split):
    """The candidate's own 128x256 tiles and BLOCK_K=32 (column halves and quarters of
    the epilogue at full width), n = 301 straddling tiles in both directions."""
    gen = torch.Generator().manual_seed(11)
    x = x_of((100, 300), torch.float16, gen, "contig")
    f0 = sym_factor(301, gen)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, 0.9, 0.01, append_ones=True)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, 0.9, 0.01, append_ones=True, config={"SPLIT_K": split})
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="bf16 tl.dot and the candidate's compiled tiles are checked on a GPU only")
@pytest.mark.parametrize("d, append, rows", [(255, True, 4096), (1024, False, 8192), (4096, True, 8192)])
def test_gpu_candidate_bf16(d, append, rows):
    """On a GPU: the 128x256 candidate with the split pick_split chooses, and SPLIT_K=1,
    against float64; the split result bitwise equal over two runs."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=gen).to(torch.bfloat16).to(DEV)
    f0 = sym_factor(d + append, gen)
    beta, alpha = torch.tensor(0.9, device=DEV), torch.tensor(1 / rows, device=DEV)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta, alpha, append_ones=append)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    split = splitk.pick_split(d + append, rows, splitk.CONFIG_128x256, sms=sms)
    outs = []
    for s in (split, split, 1):
        out = poison_lower(f0)
        factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config={"SPLIT_K": s})
        assert torch.equal(out, out.T)
        assert_error_rule(out, ref64, ref32)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
