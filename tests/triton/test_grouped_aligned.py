"""The grouped factor update's two variants (kernels/factor_update_grouped.py): layers
whose rows view keeps the 16-byte promises (`layer_aligned`) go through the ALIGNED
kernel (cp.async, pipelined), the others through the unaligned one; both with the ones
column out of the K loop. Same results as the float64 reference under the error rule."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.backends import reference
from kfac_fast.kernels import factor_update_grouped as fg
from kfac_fast.kernels.factor_update import rows_view
from tests._oracle import assert_error_rule
from tests.triton.test_factor_update import DEV, NAN, SMALL, grouped_oracles, poison_lower, sym_factor

SMALL16 = dict(BLOCK=16, BLOCK_K=16)


def aligned_of(x):
    v, _, d, _, s_outer, s_inner, s_col, _ = rows_view(x)
    return fg.layer_aligned(v, d, s_outer, s_inner, s_col)


def make_x(R, d, dtype, layout, gen):
    """x of R rows and width d; `layout` decides whether it can promise alignment."""
    if layout == "contig":  # aligned when d is whole 16-byte vectors
        return torch.randn(R, d, generator=gen).to(dtype).to(DEV)
    if layout == "offset":  # base pointer one element past a 16-byte boundary
        return torch.randn(R * d + 1, generator=gen).to(dtype).to(DEV)[1:].view(R, d)
    if layout == "padded":  # row stride d + 8 (aligned), a sliced view
        return torch.randn(R, d + 8, generator=gen).to(dtype).to(DEV)[:, :d]
    if layout == "transposed":  # column stride R: never aligned
        return torch.randn(d, R, generator=gen).to(dtype).to(DEV).T
    if layout == "3d":  # (N, T, d), rows in two levels, strides T*... and d+8
        N, T = 3, max(R // 3, 1)
        return torch.randn(T, N, d + 8, generator=gen).to(dtype).to(DEV).transpose(0, 1)[:, :, :d]
    if layout == "wide-rows":  # row stride a whole vector multiple (64), width d not
        return torch.randn(R, 64, generator=gen).to(dtype).to(DEV)[:, :d]
    if layout == "every-other-col":  # column stride 2, all else aligned
        return torch.randn(R, 2 * d, generator=gen).to(dtype).to(DEV)[:, ::2]
    if layout == "3d-odd-outer":  # two-level rows: inner stride d, outer stride 4d + 1
        N, T = 3, max(R // 3, 1)
        base = torch.randn(N * (T * d + 1), generator=gen).to(dtype).to(DEV)
        return base.as_strided((N, T, d), (T * d + 1, d, 1))
    if layout == "3d-odd":  # two-level rows, the outer stride not a whole vector
        N, T = 3, max(R // 3, 1)
        return torch.randn(T, N, d + 3, generator=gen).to(dtype).to(DEV).transpose(0, 1)[:, :, :d]
    raise ValueError(layout)


def test_alignment_routing_is_decided_per_layer():
    """The host check: a layer that cannot keep a promise is not routed ALIGNED."""
    gen = torch.Generator().manual_seed(0)
    for dtype, vec in ((torch.float16, 8), (torch.float32, 4)):
        assert aligned_of(make_x(10, 4 * vec, dtype, "contig", gen))
        assert aligned_of(make_x(10, 4 * vec, dtype, "padded", gen))
        assert aligned_of(make_x(12, 4 * vec, dtype, "3d", gen))
        assert not aligned_of(make_x(10, 4 * vec + 1, dtype, "contig", gen))   # width, row stride
        assert not aligned_of(make_x(10, 4 * vec, dtype, "offset", gen))       # base pointer
        assert not aligned_of(make_x(10, 4 * vec, dtype, "transposed", gen))   # column stride
        assert not aligned_of(make_x(12, 4 * vec, dtype, "3d-odd", gen))       # both row strides
        assert not aligned_of(make_x(12, 4 * vec, dtype, "3d-odd-outer", gen))  # outer stride only
        assert not aligned_of(make_x(10, 4 * vec + 1, dtype, "wide-rows", gen))  # width only
        assert not aligned_of(make_x(10, 4 * vec, dtype, "every-other-col", gen))  # column stride only
    # fp16 width 4 is 8 bytes: aligned for nothing; fp32 width 4 is one vector.
    assert not aligned_of(make_x(10, 4, torch.float16, "contig", gen))
    assert aligned_of(make_x(10, 4, torch.float32, "contig", gen))
    assert not aligned_of(make_x(10, 12, torch.float16, "padded", gen)[:, 1:9])  # base off by 2 bytes


def test_launches_split_by_dtype_and_alignment(monkeypatch):
    """update_factors_ launches the ALIGNED variant only for layers that passed the check."""
    gen = torch.Generator().manual_seed(1)
    xs = [make_x(20, 32, torch.float16, "contig", gen), make_x(20, 32, torch.float16, "offset", gen),
          make_x(20, 16, torch.float16, "padded", gen), make_x(20, 8, torch.float32, "transposed", gen)]
    fs = [sym_factor(x.shape[-1] + 1, gen) for x in xs]
    seen = []
    real = fg._factor_update_grouped_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(work, meta, *args, **kw):
                layers = {int(m[0]) for m in meta.cpu().tolist()}  # factor pointers of this launch
                seen.append((kw["ALIGNED"], sorted(i for i, f in enumerate(fs) if f.data_ptr() in layers)))
                return real[grid](work, meta, *args, **kw)
            return launch

    monkeypatch.setattr(fg, "_factor_update_grouped_kernel", Spy())
    fg.update_factors_(fs, xs, 0.5, 0.5, config=SMALL16)
    assert sorted(seen) == [(False, [1]), (False, [3]), (True, [0, 2])]


MIX = [(40, 32, True, torch.float16, "contig"), (37, 24, False, torch.float16, "offset"),
       (33, 16, True, torch.float16, "padded"), (30, 17, True, torch.float16, "contig"),
       (30, 24, True, torch.float16, "3d"), (31, 16, False, torch.float16, "3d-odd"),
       (0, 8, True, torch.float16, "contig"), (21, 16, True, torch.float16, "every-other-col"),
       (24, 8, False, torch.float16, "3d-odd-outer"),
       (19, 9, True, torch.float16, "wide-rows"), (45, 12, True, torch.float32, "contig"),
       (29, 20, False, torch.float32, "padded"), (26, 7, True, torch.float32, "transposed"),
       (18, 33, True, torch.float32, "offset"), (0, 5, True, torch.float32, "contig")]


@pytest.mark.parametrize("config", [SMALL16, SMALL], ids=["16", "32"])
def test_grouped_aligned_and_unaligned_layers_in_one_call(config):
    gen = torch.Generator().manual_seed(2)
    xs = [make_x(R, d, dt, lay, gen) for R, d, _, dt, lay in MIX]
    appends = [a for _, _, a, _, _ in MIX]
    assert {aligned_of(x) for x in xs} == {True, False}
    f0s = [sym_factor(d + a, gen) for (_, d, a, _, _) in MIX]
    betas, alphas, ref64, ref32 = grouped_oracles(f0s, xs, appends, gen)
    outs = [poison_lower(f) for f in f0s]
    fg.update_factors_(outs, xs, betas.to(DEV, torch.float32), alphas.to(DEV, torch.float32), append_ones=appends,
                       config=config)
    for i, (out, r64, r32) in enumerate(zip(outs, ref64, ref32)):
        assert torch.equal(out, out.T), i
        assert_error_rule(out, r64, r32, what=f"layer {i} {MIX[i]}")
    again = [poison_lower(f) for f in f0s]
    fg.update_factors_(again, xs, betas.to(DEV, torch.float32), alphas.to(DEV, torch.float32), append_ones=appends,
                       config=config)
    assert all(torch.equal(a, b) for a, b in zip(outs, again)), "two runs must be bitwise equal"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grouped_aligned_alpha_zero_and_beta_zero(dtype):
    """alpha == 0 reads nothing of a NaN x; beta == 0 overwrites a NaN factor; both in
    the ALIGNED variant and the unaligned one."""
    gen = torch.Generator().manual_seed(3)
    xs = [make_x(20, 16, dtype, "contig", gen), make_x(20, 16, dtype, "offset", gen)]
    nan_xs = [torch.full_like(x, NAN) for x in xs[:1]] + [make_x(20, 16, dtype, "offset", gen).fill_(NAN)]
    assert [aligned_of(x) for x in nan_xs] == [True, False]
    f0s = [sym_factor(17, gen), sym_factor(17, gen)]
    outs = [f.clone() for f in f0s]
    fg.update_factors_(outs, nan_xs, 0.5, 0.0, append_ones=True, config=SMALL16)
    for out, f in zip(outs, f0s):
        torch.testing.assert_close(out, 0.5 * f, rtol=0, atol=0)
    outs = [torch.full((17, 17), NAN, device=DEV) for _ in xs]
    fg.update_factors_(outs, xs, 0.0, 0.5, append_ones=True, config=SMALL16)
    for out, x in zip(outs, xs):
        want = 0.5 * reference.with_ones(x.double().cpu()).T @ reference.with_ones(x.double().cpu())
        torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_every_layers_row_count_is_checked(monkeypatch):
    """The int32 row-count check runs for every layer of a launch, also after a layer
    that already needs 64-bit offsets (review B1: a short-circuit skipped it, so a later
    layer with R >= 2^31 launched and its count wrapped in the kernel)."""
    checked = []

    def index64(fn, factor, v, R, block, block_k):
        checked.append(R)
        return True  # as if the first layer's span passed int32

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(fg, "index64", index64)
    monkeypatch.setattr(fg, "_factor_update_grouped_kernel", NoLaunch())
    xs = [torch.randn(R, 8, device=DEV) for R in (5, 7, 9)]
    fs = [torch.eye(9, device=DEV) for _ in xs]
    fg.update_factors_(fs, xs, 1.0, 1.0, append_ones=True)
    assert sorted(checked) == [5, 7, 9]
