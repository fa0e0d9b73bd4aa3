"""The tail-split schedule of the fused update's rectangular-tile candidate
(kernels/splitk.py, SCHEDULE = "tail", out of `auto`): whole waves of tiles unsplit with
the epilogue in place, the tail tiles split into row chunks reduced in chunk order.
Against float64 under the error rule (fp32, fp16; layouts; append_ones on and off) with
a small SM count so that full waves AND a split tail exist; tiles < SMs; R = 0 with more
chunks than rows (empty chunks); alpha == 0 reads nothing; beta == 0 overwrites NaN;
bitwise deterministic; the partials added in chunk order; the host schedule directly."""
from __future__ import annotations

import pytest
import torch
import triton

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update, splitk, splitk_tail
from kfac_fast.kernels.table_cache import TableCache
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, NAN, oracles, poison_lower, sym_factor, x_of

RECT = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, SCHEDULE="tail")


def tail(sms, min_k=None):
    return dict(RECT, SMS=sms, **({} if min_k is None else {"MIN_KSTEPS": min_k}))


def shape_of(n, R, cfg):
    """(tiles, unsplit, s_tail) of the plan the launch will run."""
    tiles, unsplit, s, _ = splitk_tail.tail_plan(n, R, cfg, cfg["SMS"])
    return len(tiles), unsplit, s


@pytest.mark.parametrize("R, d, append, dtype, layout, sms, min_k, expect", [
    (100, 49, True, torch.float32, "contig", 4, 1, (6, 4, 2)),        # a full wave + a split tail
    (130, 45, True, torch.float16, "transposed", 4, 2, (5, 4, 3)),    # 9 K-steps: 3 chunks of 3, not 4
    (300, 33, True, torch.float32, "sliced", 4, None, (5, 4, 2)),     # MIN_KSTEPS = 8 allows 2 chunks only
    (90, 40, False, torch.float16, "3d", 16, 1, (5, 0, 3)),           # tiles < SMs: all split; two-level rows
    (2, 20, True, torch.float32, "contig", 8, 1, (2, 2, 1)),          # one K-step: never split
    (0, 9, True, torch.float32, "contig", 2, 0, (1, 0, 2)),           # R = 0 < chunks: empty chunks, beta*F
    (0, 9, True, torch.float16, "contig", 2, None, (1, 1, 1)),        # R = 0, unsplit
    (64, 31, True, torch.float16, "contig", 2, 1, (2, 2, 1)),         # tiles a multiple of SMs: nothing split
])
def test_tail_matches_the_reference(R, d, append, dtype, layout, sms, min_k, expect):
    gen = torch.Generator().manual_seed(R * 10 + d)
    n = d + append
    cfg = tail(sms, min_k)
    assert shape_of(n, R, cfg) == expect
    f0 = sym_factor(n, gen)
    x = x_of((R, d), dtype, gen, layout)
    beta, alpha = torch.tensor(0.9, device=DEV), 0.01
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta.double().cpu(), alpha, append_ones=append)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config=cfg)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)


def test_tail_partials_are_summed_in_chunk_order():
    """One tile, three chunks of one K-step: F[0, 1] = 2^26 - 2^26 + 1 from chunks 0, 1, 2:
    1 in chunk order, 0 in any order that adds the 1 before a 2^26 (fp32 cannot hold
    2^26 + 1)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(48, 5, generator=gen)
    x[:, :2] = 0.0
    x[0, :2] = torch.tensor([2.0**13, 2.0**13])
    x[16, :2] = torch.tensor([2.0**13, -(2.0**13)])
    x[32, :2] = torch.tensor([1.0, 1.0])
    assert shape_of(5, 48, tail(3, 1)) == (1, 0, 3)
    out = poison_lower(sym_factor(5, gen))
    factor_update.update_factor_(out, x.to(DEV), 0.0, 1.0, config=tail(3, 1))
    assert out[0, 1].item() == 1.0 and out[1, 0].item() == 1.0


def test_tail_deterministic():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(150, 50, generator=gen).to(DEV)
    f0 = sym_factor(51, gen)
    assert shape_of(51, 150, tail(4, 1)) == (6, 4, 2)
    a, b = f0.clone(), f0.clone()
    for f in (a, b):
        factor_update.update_factor_(f, x, 0.3, torch.tensor(0.7, device=DEV), append_ones=True,
                                     config=tail(4, 1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sms", [4, 64])  # full wave + split tail; all split
def test_tail_alpha_zero_reads_nothing(sms):
    gen = torch.Generator().manual_seed(9)
    f0 = sym_factor(40, gen)
    x = torch.full((50, 39), NAN, device=DEV)
    assert shape_of(40, 50, tail(sms, 1))[2] > 1
    out = f0.clone()
    factor_update.update_factor_(out, x, torch.tensor(0.5, device=DEV), 0.0, append_ones=True, config=tail(sms, 1))
    torch.testing.assert_close(out, 0.5 * f0, rtol=0, atol=0)


def test_tail_beta_zero_overwrites_nan():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(60, 39, generator=gen).to(DEV)
    assert shape_of(40, 60, tail(4, 1)) == (5, 4, 4)
    ref = reference.update_factor_(torch.zeros(40, 40, dtype=torch.float64), x.double().cpu(), 0.0, 0.5,
                                   append_ones=True)
    out = torch.full((40, 40), NAN, device=DEV)
    factor_update.update_factor_(out, x, 0.0, 0.5, append_ones=True, config=tail(4, 1))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, R, cfg, sms", [
    (50, 100, tail(4, 1), 4), (46, 130, tail(4, 2), 4), (40, 90, tail(16, 1), 16), (21, 2, tail(8, 1), 8),
    (10, 0, tail(2, 0), 2), (46, 130, tail(8, 1), 8), (64, 64, tail(3, 1), 3),
    (200, 1000, tail(13), 13), (200, 1000, tail(50, 1), 50),
    (4096, 8192, splitk_tail.CONFIG_TAIL, 132), (4097, 8192, splitk_tail.CONFIG_TAIL, 132),
    (256, 131072, splitk_tail.CONFIG_TAIL, 132), (4096, 32 * 8, splitk_tail.CONFIG_TAIL, 132),
])
def test_tail_schedule_covers_every_tile_row_once(n, R, cfg, sms):
    """Every (upper tile, row) in exactly one program; only the tail split (into
    BLOCK_K-aligned contiguous chunks, tail x s <= sms, s maximal under the cap and
    MIN_KSTEPS); the whole waves first and unsplit; programs never longer than the ones
    before them; tail tile t's chunks in consecutive slots in chunk order."""
    bk = cfg["BLOCK_K"]
    items = splitk_tail.tail_split_schedule(n, R, cfg, sms)
    tiles = splitk.upper_rect_tiles(n, cfg["BLOCK_M"], cfg["BLOCK_N"])
    _, unsplit, s, _ = splitk_tail.tail_plan(n, R, cfg, sms)
    full, ntail = len(tiles) // sms * sms, len(tiles) % sms
    if s > 1:
        assert unsplit == full and ntail * s <= sms and ntail > 0
        ksteps, min_k = triton.cdiv(R, bk), cfg.get("MIN_KSTEPS", splitk.MIN_KSTEPS)
        q = max(triton.cdiv(ksteps, s), 1)  # K-steps per chunk
        assert q == splitk_tail.tail_plan(n, R, cfg, sms)[3] // bk and (q >= min_k or R == 0)
        assert s == splitk_tail.MAX_TAIL_SPLIT or ntail * (s + 1) > sms or triton.cdiv(ksteps, s + 1) < min_k or \
            triton.cdiv(ksteps, triton.cdiv(ksteps, s + 1)) == s  # s + 1 chunks: no fewer K-steps each
        assert R == 0 or all(hi > lo for _, _, lo, hi, _ in items)  # no empty chunk
    else:
        assert unsplit == len(tiles)
    assert [it[:2] for it in items[:unsplit]] == tiles[:unsplit]
    assert all(it[2:] == (0, R, -1) for it in items[:unsplit])
    rows = {t: [] for t in tiles}
    slots = {}
    for ti, tj, lo, hi, slot in items:
        rows[(ti, tj)].append((lo, hi))
        if slot >= 0:
            assert (ti, tj) in tiles[unsplit:] and lo % bk == 0 and slot not in slots
            slots[slot] = ((ti, tj), lo)
    for t, spans in rows.items():
        assert len(spans) == (1 if t in tiles[:unsplit] else s)
        covered = sorted(r for lo, hi in spans for r in range(lo, hi))
        assert covered == list(range(R)), f"tile {t}"
    assert sorted(slots) == list(range(len(slots)))
    for t in range(len(tiles) - unsplit):
        chain = [slots[t * s + k] for k in range(s)] if s > 1 else []
        assert all(c[0] == tiles[unsplit + t] for c in chain) and [c[1] for c in chain] == sorted(c[1] for c in chain)
    steps = [triton.cdiv(hi - lo, bk) for _, _, lo, hi, _ in items]
    assert steps == sorted(steps, reverse=True)


def test_tail_plan_on_an_h200():
    """The schedule bench/kernel_report.py --model scores (N = 8192, 132 SMs)."""
    cfg = splitk_tail.CONFIG_TAIL
    t, u, s, c = splitk_tail.tail_plan(4096, 8192, cfg, 132)
    assert (len(t), u, s, c) == (272, 264, 16, 512)   # 8 tail tiles x 16 chunks of 16 K-steps
    t, u, s, c = splitk_tail.tail_plan(4097, 8192, cfg, 132)
    assert (len(t), u, s, c) == (305, 264, 3, 2752)   # 41 tail tiles x 3 chunks of 86 K-steps
    t, u, s, c = splitk_tail.tail_plan(256, 131072, cfg, 132)
    assert (len(t), u, s) == (2, 0, splitk_tail.MAX_TAIL_SPLIT)  # tall-skinny: every tile split
    assert splitk_tail.tail_plan(4096, 32 * 8, cfg, 132)[2] == 1  # 8 K-steps: MIN_KSTEPS keeps it whole


def test_schedule_alone_runs_the_candidate_config(monkeypatch):
    """config={"SCHEDULE": "tail"} takes CONFIG_128x256's tiles, not the shipped config's."""
    seen = {}
    monkeypatch.setattr(splitk_tail, "launch_tail", lambda *a: seen.update(a[11]))
    x = torch.randn(40, 30).to(torch.float16).to(DEV)
    factor_update.update_factor_(sym_factor(31, torch.Generator().manual_seed(1)), x, 0.5, 0.5, append_ones=True,
                                 config={"SCHEDULE": "tail"})
    assert seen == splitk_tail.CONFIG_TAIL


def test_tail_tables_built_once_per_split(monkeypatch):
    """Another R with the same s_tail reuses the cached device tables (no new copy)."""
    calls = []
    real = splitk_tail.host_table
    monkeypatch.setattr(splitk_tail, "host_table", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(splitk_tail, "_TAIL_CACHE", TableCache())
    cfg = tail(4, 1)
    assert splitk_tail.tail_plan(50, 100, cfg, 4)[2:] != splitk_tail.tail_plan(50, 140, cfg, 4)[2:]  # another chunk
    assert splitk_tail.tail_plan(50, 100, cfg, 4)[2] == splitk_tail.tail_plan(50, 140, cfg, 4)[2] == 2
    gen = torch.Generator().manual_seed(12)
    for R in (100, 140, 100):
        x = torch.randn(R, 49, generator=gen).to(DEV)
        f0 = sym_factor(50, gen)
        ref64, ref32 = oracles(reference.update_factor_, f0, x, 0.5, 0.5, append_ones=True)
        out = poison_lower(f0)
        factor_update.update_factor_(out, x, 0.5, 0.5, append_ones=True, config=cfg)
        assert_error_rule(out, ref64, ref32)
    assert len(calls) == 2  # the work list and the reduce list, once
    assert splitk_tail.sm_count("cpu", {}) == 132 and splitk_tail.sm_count("cpu", cfg) == 4


def test_tail_candidate_tile_shape():
    """The candidate's own 128x256 tiles: n = 301, 5 tiles on 2 "SMs": 4 unsplit, one in 2."""
    gen = torch.Generator().manual_seed(11)
    x = x_of((100, 300), torch.float16, gen, "contig")
    f0 = sym_factor(301, gen)
    cfg = dict(splitk_tail.CONFIG_TAIL, SMS=2, MIN_KSTEPS=1)
    assert shape_of(301, 100, cfg) == (5, 4, 2)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, 0.9, 0.01, append_ones=True)
    out = poison_lower(f0)
    factor_update.update_factor_(out, x, 0.9, 0.01, append_ones=True, config=cfg)
    assert torch.equal(out, out.T)
    assert_error_rule(out, ref64, ref32)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="bf16 tl.dot and the compiled 128x256 tiles are checked on a GPU only")
@pytest.mark.parametrize("d, append, rows", [(255, True, 131072), (4096, True, 8192), (4096, False, 8192)])
def test_gpu_tail_bf16(d, append, rows):
    """On a GPU (its own SM count): the tail-split schedule against float64, bitwise equal
    over two runs; tall-skinny (2 tiles, every tile split) and N = 8192, n = 4096/4097."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(rows, d, generator=gen).to(torch.bfloat16).to(DEV)
    f0 = sym_factor(d + append, gen)
    beta, alpha = torch.tensor(0.9, device=DEV), torch.tensor(1 / rows, device=DEV)
    ref64, ref32 = oracles(reference.update_factor_, f0, x, beta, alpha, append_ones=append)
    sms = splitk_tail.sm_count(x.device, {})
    # all split on an H200
    assert splitk_tail.tail_plan(d + append, rows, splitk_tail.CONFIG_TAIL, sms)[2] > 1 or sms != 132
    outs = []
    for _ in range(2):
        out = poison_lower(f0)
        factor_update.update_factor_(out, x, beta, alpha, append_ones=append, config={"SCHEDULE": "tail"})
        assert torch.equal(out, out.T)
        assert_error_rule(out, ref64, ref32)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
