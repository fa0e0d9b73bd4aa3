"""The tail-split schedule of the rectangular-tile fused update (`splitk.py`'s kernels'
arithmetic): factor <- beta*factor + alpha * x_bar^T x_bar with whole waves of tiles
unsplit and only the tail split over the rows.

CANDIDATE, not in `auto` (no GPU has run it): `update_factor_(..., config={"SCHEDULE":
"tail"})` or CONFIG_TAIL. The first floor(tiles / SMs) * SMs upper tiles run whole, with
the epilogue in place; each remaining tail tile (every tile when there are fewer tiles
than SMs: the tall-skinny case) is split into contiguous row chunks that fill about one
wave, whose fp32 partials go to a workspace of the tail's slots only and are summed in
chunk order by a second kernel (deterministic, no atomics). One work-list kernel runs
both kinds of program, longest first (`tail_plan`, `tail_work`).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .guard import check_int32, launch_on
from .launch import host_table, load_scalar, symmetric_epilogue
from .splitk import (
    MIN_KSTEPS,
    REDUCE_WARPS,
    CONFIG_128x256,
    _rect_epilogue,
    _store_partial,
    _upper_tiles,
)
from .table_cache import TableCache
from .tile_acc import tile_acc

# Tail-split: tail x s <= sms, so the workspace is at most one wave of partial tiles (132 x
# 128 KiB on an H200). The cap bounds one reduce program's serial chain (s partial column
# quarters of 32 KiB); untuned: 16 lets n = 4096's 8 tail tiles (272 on 132 SMs) fill 128 SMs.
MAX_TAIL_SPLIT = 16
CONFIG_TAIL = dict(CONFIG_128x256, SCHEDULE="tail")


@triton.jit
def _tail_kernel(F, X, Wk, work, beta_ptr, alpha_ptr, beta_val, alpha_val, R, d, n, L_inner,
                 s_outer, s_inner, s_col, stride_f, rows_per_chunk,
                 BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, TWO_LEVEL: tl.constexpr,
                 INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Work item pid = (ti, tj, k, slot) of a tail-split schedule: slot < 0, all rows of
    tile (ti, tj) and the epilogue in place; else chunk k, rows [k c, (k + 1) c) (c =
    rows_per_chunk), its fp32 partial to workspace slot `slot`."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    item = work + 4 * tl.program_id(0)
    ti, tj, k, slot = tl.load(item), tl.load(item + 1), tl.load(item + 2), tl.load(item + 3)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    row_lo = tl.where(slot < 0, 0, k * rows_per_chunk)
    row_hi = tl.where(slot < 0, R, tl.minimum(row_lo + rows_per_chunk, R))
    acc = tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, row_lo, row_hi, alpha,
                    TWO_LEVEL, IDX, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, ROW_ALIGN)
    if slot < 0:
        _rect_epilogue(F, stride_f, n, ti, tj, acc, load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE), alpha,
                       INDEX64, BLOCK_M, BLOCK_N)
    else:
        _store_partial(Wk, slot, acc, BLOCK_M, BLOCK_N)


@triton.jit
def _tail_reduce_kernel(F, Wk, rwork, beta_ptr, alpha_ptr, beta_val, alpha_val, n, stride_f,
                        BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, INDEX64: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (item, q), item = (ti, tj, slot0, splits): column quarter q of the tile, the
    sum of its partials in slots slot0, slot0 + 1, ... in that order, then the epilogue."""
    item = rwork + 4 * tl.program_id(0)
    ti, tj, slot0, splits = tl.load(item), tl.load(item + 1), tl.load(item + 2), tl.load(item + 3)
    beta = load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    QN: tl.constexpr = BLOCK_N // 4
    c = tl.program_id(1) * QN + tl.arange(0, QN)
    ptrs = Wk + slot0.to(tl.int64) * (BLOCK_M * BLOCK_N) + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + c[None, :])
    acc = tl.load(ptrs)
    for k in range(1, splits):
        acc += tl.load(ptrs + k * (BLOCK_M * BLOCK_N))
    symmetric_epilogue(F, stride_f, n, ti * BLOCK_M + tl.arange(0, BLOCK_M), tj * BLOCK_N + c, acc, beta, alpha,
                       INDEX64)


def tail_plan(n: int, R: int, cfg: dict, sms: int) -> tuple:
    """(upper tiles, how many of them run unsplit, s_tail, rows per chunk) of the
    tail-split schedule: the first floor(tiles / sms) * sms tiles (whole waves) unsplit,
    each remaining tail tile split into s_tail row chunks, s_tail the largest s <=
    MAX_TAIL_SPLIT with tail * s <= sms and ceil(K-steps / s) >= MIN_KSTEPS
    (cfg["MIN_KSTEPS"] overrides it; tests), then as few chunks as hold the K-steps at
    ceil(K-steps / s) each (none empty unless R = 0); s_tail = 1 leaves every tile
    unsplit. Chunks are contiguous, rows_per_chunk a multiple of BLOCK_K, the last shorter."""
    bk = cfg["BLOCK_K"]
    tiles = _upper_tiles(n, cfg["BLOCK_M"], cfg["BLOCK_N"])  # cached: no per-call host list
    full = len(tiles) // sms * sms
    tail, ksteps, min_k = len(tiles) - full, triton.cdiv(R, bk), cfg.get("MIN_KSTEPS", MIN_KSTEPS)
    s = 1
    for c in range(2, MAX_TAIL_SPLIT + 1):
        if tail == 0 or tail * c > sms or triton.cdiv(ksteps, c) < min_k:
            break
        s = c
    q = max(triton.cdiv(ksteps, s), 1)  # K-steps per chunk
    s = triton.cdiv(ksteps, q) if ksteps else s
    return tiles, (full if s > 1 else len(tiles)), s, q * bk


def tail_work(tiles: list, unsplit: int, s: int) -> tuple:
    """(items (ti, tj, k, slot), reduce items (ti, tj, slot0, s), slots): the unsplit tiles
    first (slot -1), then chunk 0 of every tail tile, chunk 1, ...: longest programs first
    (chunks only get shorter with k). Tail tile t's chunk k goes to slot t s + k."""
    tail = tiles[unsplit:]
    items = [(ti, tj, 0, -1) for ti, tj in tiles[:unsplit]]
    items += [(ti, tj, k, t * s + k) for k in range(s) for t, (ti, tj) in enumerate(tail)]
    return items, [(ti, tj, t * s, s) for t, (ti, tj) in enumerate(tail)], len(tail) * s


def tail_split_schedule(n: int, R: int, cfg: dict, sms: int) -> list:
    """The tail-split schedule's programs in work-table order, (ti, tj, row_lo, row_hi,
    slot) with rows [row_lo, row_hi) and slot -1 = unsplit (the kernel's rows, clamped to R)."""
    tiles, unsplit, s, c = tail_plan(n, R, cfg, sms)
    items, _, _ = tail_work(tiles, unsplit, s)
    return [(ti, tj, 0, R, -1) if slot < 0 else (ti, tj, min(k * c, R), min(k * c + c, R), slot)
            for ti, tj, k, slot in items]


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device, cfg: dict) -> int:
    """cfg["SMS"] (tests), else the CUDA device's SM count (cached), else 132 (H200)."""
    device = torch.device(device)
    if "SMS" in cfg or device.type != "cuda":
        return cfg.get("SMS", 132)
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


_TAIL_CACHE = TableCache()


def _tail_tables(n: int, R: int, cfg: dict, device) -> tuple:
    """(work, rwork or None, slots, s_tail, rows per chunk): device tables built once per (n,
    tiles, sms, s_tail, device) in pinned non_blocking copies; R enters only through s_tail."""
    sms = sm_count(device, cfg)
    tiles, unsplit, s, c = tail_plan(n, R, cfg, sms)
    def build():
        items, reduce_items, slots = tail_work(tiles, unsplit, s)
        return (host_table(items, torch.int32, device).reshape(-1, 4) if items else None,
                host_table(reduce_items, torch.int32, device).reshape(-1, 4) if reduce_items else None, slots)
    return (*_TAIL_CACHE.get((n, cfg["BLOCK_M"], cfg["BLOCK_N"], sms, s, str(device)), device, build), s, c)


def launch_tail(factor, x, v, R, d, L_inner, s_outer, s_inner, s_col, two_level, scalars, cfg: dict,
                 idx64: bool, precision: str, row_align: int) -> None:
    """One update under the tail-split schedule, for factor_update.update_factor_ (x and
    rows_view's v, R, ... of it; `scalars` = (b_dev, b_t, b_val, a_dev, a_t, a_val)): the
    work-list kernel, then the reduction over the split tail tiles only (four programs
    per tile, one per column quarter)."""
    b_dev, b_t, b_val, a_dev, a_t, a_val = scalars
    n = factor.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    bp, ap = (b_t if b_dev else factor), (a_t if a_dev else factor)
    with launch_on("update_factor_", {"factor": factor, "x": x, "beta": b_t, "alpha": a_t}):
        work, rwork, slots, s, chunk = _tail_tables(n, R, cfg, factor.device)
        if work is None:
            return
        check_int32("update_factor_", "x", s * chunk + bk, "rows")  # the last chunk's end + one K-step
        # The workspace comes from the caching allocator on the current (the factor's) stream.
        wk = torch.empty((slots, bm, bn), dtype=torch.float32, device=factor.device) if slots else factor
        _tail_kernel[(work.shape[0],)](
            factor, v, wk, work, bp, ap, b_val, a_val, R, d, n, L_inner, s_outer, s_inner, s_col,
            factor.stride(0), chunk, BETA_ON_DEVICE=b_dev, ALPHA_ON_DEVICE=a_dev, TWO_LEVEL=two_level,
            INDEX64=idx64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=precision, ROW_ALIGN=row_align,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if rwork is not None:
            _tail_reduce_kernel[(rwork.shape[0], 4)](
                factor, wk, rwork, bp, ap, b_val, a_val, n, factor.stride(0), BETA_ON_DEVICE=b_dev,
                ALPHA_ON_DEVICE=a_dev, INDEX64=idx64, BLOCK_M=bm, BLOCK_N=bn, num_warps=REDUCE_WARPS)
