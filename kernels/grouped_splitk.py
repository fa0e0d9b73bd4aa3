"""Split-K for the grouped factor update (CANDIDATE, not in `auto`: no GPU has run it):
for every layer l, F_l <- beta_l*F_l + alpha_l * x_bar_l^T x_bar_l with the rows of long
layers split over several programs (Triton).

`factor_update_grouped.update_factors_(..., config={"SPLIT_K": s})` routes here. A layer
with at least SPLIT_MIN_KSTEPS * s K-steps (or config["SPLIT_MIN_ROWS"] rows) has each
upper tile computed by s programs, program k summing the contiguous rows [k*c, (k+1)*c)
(c a multiple of BLOCK_K) into an fp32 partial tile in a workspace, the ones column's
column sums and row count included; a second kernel sums each tile's s partials in split
order k = 0, 1, ... and applies the symmetric epilogue. Shorter layers' tiles get the
epilogue in the first kernel. Deterministic (no atomics): two runs are bitwise equal. The
arithmetic per tile is `factor_update_grouped`'s (alpha == 0 reads nothing, beta == 0
overwrites without reading, upper tiles only, both triangles written).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .factor_update_grouped import _layer_row
from .guard import launch_on
from .launch import TL_DTYPES, host_table, symmetric_epilogue
from .table_cache import TableCache
from .tile_acc import tile_acc

SPLIT_MIN_KSTEPS = 8  # untuned: fewer K-steps per split leave the pipeline's prologue exposed
REDUCE_WARPS = 4  # untuned: the reduction is a load-add-store pass over 64x64 fp32 partials


@triton.jit
def _grouped_partial_kernel(work, meta, betas, alphas, Wk, X_DTYPE: tl.constexpr, INDEX64: tl.constexpr,
                            BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                            ALIGNED: tl.constexpr):
    """Work item pid = (layer, ti, tj, row_lo, row_hi, slot): x_bar^T x_bar of tile (ti, tj)
    over rows [row_lo, row_hi) to workspace slot `slot`, or (slot < 0: the layer is not
    split) the whole tile's update with its epilogue."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    item = work + 6 * tl.program_id(0)
    layer = tl.load(item)
    ti = tl.load(item + 1)
    tj = tl.load(item + 2)
    row_lo = tl.load(item + 3)
    row_hi = tl.load(item + 4)
    slot = tl.load(item + 5)
    F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f = _layer_row(meta, layer, X_DTYPE, INDEX64, ALIGNED)
    alpha = tl.load(alphas + layer)
    acc = tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, row_lo, row_hi, alpha, True, IDX, BLOCK,
                   BLOCK, BLOCK_K, INPUT_PRECISION, UNIT_COL=ALIGNED)
    if slot < 0:
        beta = tl.load(betas + layer)
        symmetric_epilogue(F, stride_f, n, ti * BLOCK + tl.arange(0, BLOCK), tj * BLOCK + tl.arange(0, BLOCK), acc,
                           beta, alpha, INDEX64)
    else:
        r = tl.arange(0, BLOCK)[:, None]
        c = tl.arange(0, BLOCK)[None, :]
        tl.store(Wk + slot.to(tl.int64) * (BLOCK * BLOCK) + (r * BLOCK + c), acc)


@triton.jit
def _grouped_reduce_kernel(rwork, meta, betas, alphas, Wk, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
    """Item pid = (layer, ti, tj, first slot, splits): the sum of the tile's partials in
    split order, then the symmetric epilogue."""
    item = rwork + 5 * tl.program_id(0)
    layer = tl.load(item)
    ti = tl.load(item + 1)
    tj = tl.load(item + 2)
    slot0 = tl.load(item + 3)
    splits = tl.load(item + 4)
    F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f = _layer_row(meta, layer, tl.float32, INDEX64, False)
    beta = tl.load(betas + layer)
    alpha = tl.load(alphas + layer)
    ptrs = Wk + slot0.to(tl.int64) * (BLOCK * BLOCK) + (tl.arange(0, BLOCK)[:, None] * BLOCK
                                                        + tl.arange(0, BLOCK)[None, :])
    acc = tl.load(ptrs)
    for k in range(1, splits):
        acc += tl.load(ptrs + k * (BLOCK * BLOCK))
    symmetric_epilogue(F, stride_f, n, ti * BLOCK + tl.arange(0, BLOCK), tj * BLOCK + tl.arange(0, BLOCK), acc,
                       beta, alpha, INDEX64)


def partial_config(cfg: dict, x_dtype: torch.dtype) -> dict:
    """The partial kernel's launch options: the group's, one stage for float32 inputs (with
    2 the unaligned fp32 partial spilled 48 bytes under Triton 3.6.0; 1 stage: 0 spills
    under 3.6.0/3.8.0/3.9.0, bench/kernel_report.py --compile --filter grouped_splitk)."""
    return dict(cfg, num_stages=1) if x_dtype == torch.float32 else dict(cfg)


def layer_splits(R: int, cfg: dict) -> int:
    """How many row splits a layer of R rows gets under a split-K config: SPLIT_K when it
    has at least SPLIT_MIN_ROWS rows (default SPLIT_MIN_KSTEPS K-steps per split), else 1."""
    s = cfg.get("SPLIT_K", 1)
    min_rows = cfg.get("SPLIT_MIN_ROWS", s * SPLIT_MIN_KSTEPS * cfg["BLOCK_K"])
    return s if s > 1 and R >= min_rows else 1


_CACHE = TableCache()


def work_lists(sizes, rows, block: int, block_k: int, splits) -> tuple:
    """Host lists (partial items, reduce items, workspace slots) over layers of these
    sizes, rows and splits; largest layers first, every tile's splits adjacent."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    items, reduce_items, slots = [], [], 0
    for layer in order:
        nt = triton.cdiv(sizes[layer], block)
        s = splits[layer]
        chunk = triton.cdiv(triton.cdiv(max(rows[layer], 1), s), block_k) * block_k
        for tj in range(nt):
            for ti in range(tj + 1):
                if s == 1:
                    items.append((layer, ti, tj, 0, rows[layer], -1))
                    continue
                reduce_items.append((layer, ti, tj, slots, s))
                for k in range(s):
                    lo = min(k * chunk, rows[layer])
                    items.append((layer, ti, tj, lo, min(lo + chunk, rows[layer]), slots + k))
                slots += s
    return items, reduce_items, slots


def launch(tensors: dict, meta_t, b, a, sizes, rows, cfg: dict, device, x_dtype: torch.dtype, idx64: bool,
           precision: str, aligned: bool) -> None:
    """Both kernels of one (dtype, alignment) group of factor_update_grouped.update_factors_,
    under launch_on for `tensors` (the group's factors, rows views and scalars)."""
    splits = [layer_splits(r, cfg) for r in rows]

    def build():
        items, reduce_items, slots = work_lists(sizes, rows, cfg["BLOCK"], cfg["BLOCK_K"], splits)
        work = host_table(items, torch.int32, device).reshape(-1, 6) if items else None
        rwork = host_table(reduce_items, torch.int32, device).reshape(-1, 5) if reduce_items else None
        return work, rwork, slots
    # Safe to use on any stream (`table_cache`); bounded, as row counts may vary per step.
    key = (tuple(sizes), tuple(rows), tuple(splits), cfg["BLOCK"], cfg["BLOCK_K"], str(device))
    work, rwork, slots = _CACHE.get(key, device, build)
    if work is None:
        return
    with launch_on("update_factors_", tensors):
        # The workspace comes from the caching allocator on the current (the factors') stream.
        wk = torch.empty((max(slots, 1), cfg["BLOCK"], cfg["BLOCK"]), dtype=torch.float32, device=device)
        opts = partial_config(cfg, x_dtype)
        _grouped_partial_kernel[(work.shape[0],)](
            work, meta_t, b, a, wk, X_DTYPE=TL_DTYPES[x_dtype], INDEX64=idx64, BLOCK=cfg["BLOCK"],
            BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=precision, ALIGNED=aligned, num_warps=opts["num_warps"],
            num_stages=opts["num_stages"])
        if rwork is not None:
            _grouped_reduce_kernel[(rwork.shape[0],)](rwork, meta_t, b, a, wk, INDEX64=idx64, BLOCK=cfg["BLOCK"],
                                                      num_warps=REDUCE_WARPS)
