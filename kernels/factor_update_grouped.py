"""Grouped K-FAC factor updates: for every layer l, F_l <- beta_l*F_l + alpha_l * x_bar_l^T x_bar_l,
all layers of one input dtype in one launch (Triton).

The per-layer arithmetic is `factor_update`'s (upper tiles only, both triangles written,
fp32 accumulation, the ones column of x_bar = [x | 1] for append_ones, alpha == 0 reads
nothing, deterministic). A work list of (layer, ti, tj) items, largest layers first,
spreads the tiles of all layers over one grid; each layer's pointers, sizes and strides
come from an int64 table copied to the device in one pinned, non_blocking transfer.

Preconditions of `update_factors_` (`kfac_fast.ops` checks them): as `factor_update`'s
for every layer; betas/alphas one scalar, a sequence of L scalars or a (L,) tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfac_fast._flags import allow_tf32_of

from .factor_update import _syrk_tile, index64, rows_view
from .guard import common_device, launch_on
from .launch import TL_DTYPES, host_table, input_precision, per_layer_scalars

# untuned: chosen because grouped layers are often small (d <= 256): 64x64 tiles give
# such a layer 10 programs instead of 3, and keep the 16-bit pipeline at 48 KiB.
CONFIG_GROUPED_16BIT = dict(BLOCK=64, BLOCK_K=64, num_warps=4, num_stages=3)
# untuned: BLOCK_K=16 because FMA dots hold whole K slices in registers; 32 spilled on
# sm_80 (ptxas -v, bench/kernel_report.py).
CONFIG_GROUPED_FP32 = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=2)


def pick_config(x_dtype: torch.dtype, allow_tf32: bool) -> dict:
    """The launch configuration of the grouped kernel for an input dtype."""
    if x_dtype in (torch.float16, torch.bfloat16):
        return dict(CONFIG_GROUPED_16BIT)
    return dict(CONFIG_GROUPED_FP32)


# Per-layer int64 table of the grouped kernel, one row per layer.
_F_PTR, _X_PTR, _R, _D, _N, _L_INNER, _S_OUTER, _S_INNER, _S_COL, _STRIDE_F = range(10)
_META_COLS = 10


@triton.jit
def _factor_update_grouped_kernel(work, meta, betas, alphas, X_DTYPE: tl.constexpr,
                                  INDEX64: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                                  INPUT_PRECISION: tl.constexpr):
    """Work item pid = (layer, ti, tj): one upper tile of that layer's factor update."""
    pid = tl.program_id(0)
    layer = tl.load(work + 3 * pid)
    ti = tl.load(work + 3 * pid + 1)
    tj = tl.load(work + 3 * pid + 2)
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
    beta = tl.load(betas + layer)
    alpha = tl.load(alphas + layer)
    _syrk_tile(F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f, ti, tj, beta, alpha,
               True, INDEX64, BLOCK, BLOCK_K, INPUT_PRECISION)


_WORK_CACHE: dict = {}


def upper_work_list(sizes, block: int, device) -> torch.Tensor:
    """Cached int32 (T, 3) device tensor of (layer, ti, tj), ti <= tj, over layers of
    these sizes; largest layers first so the long tail is small tiles."""
    key = (tuple(sizes), block, str(device))
    work = _WORK_CACHE.get(key)
    if work is None:
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        items = []
        for layer in order:
            nt = triton.cdiv(sizes[layer], block)
            items += [(layer, ti, tj) for tj in range(nt) for ti in range(tj + 1)]
        work = host_table(items, torch.int32, device).reshape(-1, 3) if items else \
            torch.zeros((0, 3), dtype=torch.int32, device=device)
        _WORK_CACHE[key] = work
    return work


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


def _update_factors(factors, xs, betas, alphas, allow_tf32, config):
    L = len(factors)
    device = factors[0].device
    beta_t = per_layer_scalars(betas, L, device)
    alpha_t = per_layer_scalars(alphas, L, device)
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    for x_dtype, layers in groups.items():
        cfg = pick_config(x_dtype, allow_tf32)
        cfg.update(config or {})
        meta, keep, idx64 = [], [], False
        for i in layers:
            v, R, d, L_inner, s_outer, s_inner, s_col, _ = rows_view(xs[i])
            keep.append(v)  # a reshape copy must outlive the launch that reads its pointer
            f = factors[i]
            idx64 = idx64 or index64("update_factors_", f, v, R, cfg["BLOCK"], cfg["BLOCK_K"])
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
        with launch_on("update_factors_", {"factors": [factors[i] for i in layers], "xs": keep, "betas": b}):
            _factor_update_grouped_kernel[(work.shape[0],)](
                work, meta_t, b, a, X_DTYPE=TL_DTYPES[x_dtype], INDEX64=idx64,
                BLOCK=cfg["BLOCK"],
                BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=input_precision(x_dtype, allow_tf32),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return factors
