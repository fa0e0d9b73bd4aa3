"""Grouped K-FAC factor updates: for every layer l, F_l <- beta_l*F_l + alpha_l * x_bar_l^T x_bar_l,
all layers of one input dtype in one launch (Triton).

The per-layer arithmetic is `factor_update`'s (upper tiles only, both triangles written,
fp32 accumulation, alpha == 0 reads nothing, deterministic); the ones column of
x_bar = [x | 1] (n = d + 1) is out of the K loop: column sums of x and the row count are
added after it, in the tile column holding column d. A work list of (layer, ti, tj)
items, largest layers first, spreads the tiles of all layers over one grid; each layer's
pointers, sizes and strides come from an int64 table copied to the device in one pinned,
non_blocking transfer. Layers are launched per (input dtype, `layer_aligned`): layers
whose rows keep the 16-byte promises go through the ALIGNED variant, whose loads carry
alignment hints (16-byte cp.async, pipelined: `bench/kernel_report.py --compile --filter
grouped`: 16-bit 8 LDGSTS and 0 LDG per K-step per warp, 194-207 instructions, under
Triton 3.6/3.8/3.9), the others through the unaligned one (scalar loads).

Preconditions of `update_factors_` (`kfac_fast.ops` checks them): as `factor_update`'s
for every layer; betas/alphas one scalar, a sequence of L scalars or a (L,) tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfac_fast._flags import allow_tf32_of

from .factor_update import index64, rows_view
from .guard import common_device, launch_on
from .launch import TL_DTYPES, host_table, input_precision, per_layer_scalars, symmetric_epilogue
from .table_cache import TableCache
from .tile_acc import tile_acc

# untuned: chosen because grouped layers are often small (d <= 256): 64x64 tiles give
# such a layer 10 programs instead of 3, and keep the 16-bit pipeline at 48 KiB. The
# ALIGNED variant's config (16-byte cp.async, 3 stages).
CONFIG_GROUPED_16BIT = dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3)
# The same tiles and num_stages for layers that cannot promise alignment (scalar 2-byte
# loads, which Triton does not pipeline through cp.async): 8 warps, because with 4 each thread kept 64 64-bit load
# addresses per K-step and ptxas spilled 172 bytes under Triton 3.6.0; with 8: 0 spills,
# 103-189 registers under 3.6.0/3.8.0/3.9.0 (bench/kernel_report.py --compile --filter grouped).
CONFIG_GROUPED_16BIT_UNALIGNED = dict(CONFIG_GROUPED_16BIT, num_warps=8)
# untuned: BLOCK_K=16 because FMA dots hold whole K slices in registers; 32 spilled on
# sm_80 (ptxas -v, bench/kernel_report.py).
CONFIG_GROUPED_FP32 = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=2)


def pick_config(x_dtype: torch.dtype, allow_tf32: bool, aligned: bool = True) -> dict:
    """The launch configuration of the grouped kernel for an input dtype and the layers'
    alignment (`layer_aligned`)."""
    if x_dtype in (torch.float16, torch.bfloat16):
        return dict(CONFIG_GROUPED_16BIT if aligned else CONFIG_GROUPED_16BIT_UNALIGNED)
    return dict(CONFIG_GROUPED_FP32)


# Per-layer int64 table of the grouped kernel, one row per layer.
_F_PTR, _X_PTR, _R, _D, _N, _L_INNER, _S_OUTER, _S_INNER, _S_COL, _STRIDE_F = range(10)
_META_COLS = 10


@triton.jit
def _layer_row(meta, layer, X_DTYPE: tl.constexpr, INDEX64: tl.constexpr, ALIGNED: tl.constexpr):
    """A layer's row of the meta table: (F, X, R, d, n, L_inner, s_outer, s_inner, s_col,
    stride_f), with the ALIGNED variant's alignment facts attached."""
    row = meta + layer.to(tl.int64) * 10
    F = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    X = tl.load(row + 1).to(tl.pointer_type(X_DTYPE))
    R = tl.load(row + 2).to(tl.int32)
    d = tl.load(row + 3).to(tl.int32)
    n = tl.load(row + 4).to(tl.int32)
    L_inner = tl.load(row + 5).to(tl.int32)
    s_outer = tl.load(row + 6)
    s_inner = tl.load(row + 7)
    s_col = tl.load(row + 8)
    if INDEX64:
        stride_f = tl.load(row + 9)
    else:
        stride_f = tl.load(row + 9).to(tl.int32)
    if ALIGNED:
        # Host-checked (`layer_aligned`): 16-byte aligned base, row strides and width in
        # whole 16-byte vectors, unit column stride. With these facts Triton emits 16-byte
        # cp.async (LDGSTS) and pipelines the loop (num_stages). Hints here, where the
        # values are defined: on a helper's arguments Triton drops them.
        VEC: tl.constexpr = 128 // X_DTYPE.primitive_bitwidth
        X = tl.multiple_of(X, 16)
        s_outer = tl.multiple_of(s_outer, VEC)
        s_inner = tl.multiple_of(s_inner, VEC)
        d = tl.multiple_of(d, VEC)
    return F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f


@triton.jit
def _factor_update_grouped_kernel(work, meta, betas, alphas, X_DTYPE: tl.constexpr,
                                  INDEX64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                                  INPUT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Work item pid = (layer, ti, tj): one upper tile of that layer's factor update."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    pid = tl.program_id(0)
    layer = tl.load(work + 3 * pid)
    ti = tl.load(work + 3 * pid + 1)
    tj = tl.load(work + 3 * pid + 2)
    F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f = _layer_row(meta, layer, X_DTYPE, INDEX64, ALIGNED)
    beta = tl.load(betas + layer)
    alpha = tl.load(alphas + layer)
    acc = tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, 0, R, alpha, True, IDX, BLOCK, BLOCK,
                   BLOCK_K, INPUT_PRECISION, UNIT_COL=ALIGNED)
    symmetric_epilogue(F, stride_f, n, ti * BLOCK + tl.arange(0, BLOCK), tj * BLOCK + tl.arange(0, BLOCK), acc,
                       beta, alpha, INDEX64)


_WORK_CACHE = TableCache()


def upper_work_list(sizes, block: int, device) -> torch.Tensor:
    """Cached int32 (T, 3) device tensor of (layer, ti, tj), ti <= tj, over layers of
    these sizes; largest layers first so the long tail is small tiles. Safe to use on any
    stream (`table_cache`)."""
    def build():
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        items = []
        for layer in order:
            nt = triton.cdiv(sizes[layer], block)
            items += [(layer, ti, tj) for tj in range(nt) for ti in range(tj + 1)]
        return host_table(items, torch.int32, device).reshape(-1, 3) if items else \
            torch.zeros((0, 3), dtype=torch.int32, device=device)
    return _WORK_CACHE.get((tuple(sizes), block, str(device)), device, build)


def update_factors_(factors, xs, betas, alphas, *, append_ones=False, allow_tf32=False, config=None,
                    precision=None):
    """L factor updates in one launch per input dtype; returns factors.

    Preconditions: as `update_factor_` for every layer; betas/alphas one scalar, a
    sequence of L scalars or a (L,) tensor."""
    allow_tf32 = allow_tf32_of(precision, allow_tf32)
    L = len(factors)
    if L == 0:
        return factors
    common_device("update_factors_", {"factors": factors, "xs": xs})  # before any allocation
    return _update_factors(factors, xs, betas, alphas, allow_tf32, config)


def layer_aligned(v: torch.Tensor, d: int, s_outer: int, s_inner: int, s_col: int) -> bool:
    """Whether a layer's rows view `v` (`rows_view`) keeps the promises of the ALIGNED
    kernel variant: unit column stride, base pointer on 16 bytes, row strides and the width
    d whole 16-byte vectors. A layer that cannot promise them goes through the unaligned
    variant (scalar loads): never a wrong number."""
    vec = 16 // v.element_size()
    return (s_col == 1 and v.data_ptr() % 16 == 0 and d % vec == 0 and s_inner % vec == 0
            and s_outer % vec == 0)


def _update_factors(factors, xs, betas, alphas, allow_tf32, config):
    L = len(factors)
    device = factors[0].device
    beta_t = per_layer_scalars(betas, L, device)
    alpha_t = per_layer_scalars(alphas, L, device)
    groups: dict = {}  # (dtype, aligned) -> [(layer, rows view, R, d, L_inner, s_outer, s_inner, s_col)]
    for i, x in enumerate(xs):
        v, R, d, L_inner, s_outer, s_inner, s_col, _ = rows_view(x)
        aligned = layer_aligned(v, d, s_outer, s_inner, s_col)
        groups.setdefault((x.dtype, aligned), []).append((i, v, R, d, L_inner, s_outer, s_inner, s_col))
    for (x_dtype, aligned), members in groups.items():
        cfg = pick_config(x_dtype, allow_tf32, aligned)
        cfg.update(config or {})
        layers = [m[0] for m in members]
        meta, keep, idx64 = [], [], False
        for i, v, R, d, L_inner, s_outer, s_inner, s_col in members:
            keep.append(v)  # a reshape copy must outlive the launch that reads its pointer
            f = factors[i]
            # index64 also refuses row counts past int32: called for every layer, never
            # short-circuited by an earlier layer that already needs 64-bit offsets.
            need64 = index64("update_factors_", f, v, R, cfg["BLOCK"], cfg["BLOCK_K"])
            idx64 = idx64 or need64
            meta.append([f.data_ptr(), v.data_ptr(), R, d, f.shape[0], L_inner, s_outer, s_inner,
                         s_col, f.stride(0)])
        meta_t = host_table(meta, torch.int64, device)
        work = upper_work_list([factors[i].shape[0] for i in layers], cfg["BLOCK"], device)
        # Pinned non_blocking copy: a pageable torch.tensor(..., device=) syncs the host.
        idx = None if len(layers) == L else host_table(layers, torch.int64, device)
        b = beta_t if idx is None else beta_t[idx]
        a = alpha_t if idx is None else alpha_t[idx]
        if work.shape[0] == 0:
            continue
        tensors = {"factors": [factors[i] for i in layers], "xs": keep, "betas": b}
        if cfg.get("SPLIT_K", 1) > 1:  # the split-K candidate (`kernels/grouped_splitk.py`)
            from . import grouped_splitk

            grouped_splitk.launch(tensors, meta_t, b, a, [factors[i].shape[0] for i in layers],
                                  [m[2] for m in members], cfg, device, x_dtype, idx64,
                                  input_precision(x_dtype, allow_tf32), aligned)
            continue
        with launch_on("update_factors_", tensors):
            _factor_update_grouped_kernel[(work.shape[0],)](
                work, meta_t, b, a, X_DTYPE=TL_DTYPES[x_dtype], INDEX64=idx64,
                BLOCK=cfg["BLOCK"],
                BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=input_precision(x_dtype, allow_tf32), ALIGNED=aligned,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return factors
