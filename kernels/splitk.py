"""Fused factor update on rectangular tiles, optionally split over the rows (split-K):
factor <- beta*factor + alpha * x_bar^T x_bar, the arithmetic of `factor_update` (upper
tiles only, both triangles written, fp32 accumulation, the ones column out of the K loop,
alpha == 0 reads nothing, beta == 0 overwrites without reading).

CANDIDATES, not in `auto` (no GPU has run them): reachable with `update_factor_(...,
config=CONFIG_128x256 | {"SPLIT_K": s})` only.
- BLOCK_M x BLOCK_N tiles (e.g. 128x256): tile (ti, tj) of the rectangular grid is
  computed iff it holds an element with r <= c; the epilogue masks r <= c, so every
  element of the upper triangle lies in exactly one computed tile.
- SPLIT_K = s > 1: split k of each tile sums the rows [k*rows_per_split, (k+1)*...)
  (contiguous chunks, multiples of BLOCK_K) and writes its fp32 partial tile to a
  workspace; a second kernel sums a tile's s partials in split order (k = 0, 1, ...) and
  applies the symmetric epilogue. Deterministic (no atomics): two runs are bitwise equal.
  SPLIT_K = 1 is one kernel, the epilogue in place. `pick_split` says which s a launch
  would want (tiles vs SMs, at least MIN_KSTEPS K-steps per split).
- SCHEDULE = "tail": `splitk_tail.py` (whole waves unsplit, only the tail tiles split).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .guard import launch_on
from .launch import column_halves, halves, host_table, load_scalar, symmetric_epilogue
from .table_cache import TableCache
from .tile_acc import tile_acc

# 128x256 fp32 accumulators over 8 warps are 128 registers per thread. BLOCK_K=32 with 4
# stages, chosen by compiling (bench/kernel_report.py --compile --filter 128x256, sm_90):
# BLOCK_K=64 with 3 stages (144 KiB of shared memory) spilled at odd d under Triton 3.8.0
# (144/72 bytes with SPLIT_K=1, 4/4 with SPLIT_K=4); BLOCK_K=32 x 4 stages (96 KiB)
# compiles without spills under 3.6.0/3.8.0/3.9.0 at n = d, d + 1 and odd d, 196-247
# registers. Otherwise untuned (no GPU has run it). Per K-step the tile loads 1.5x the
# bytes of 128x128 for 2x the FLOPs (the L2 term of bench/kernel_report.py's model).
CONFIG_128x256 = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=4, SPLIT_K=1)
# IEEE float32 runs on FMA units: the fused kernel's CONFIG_FP32 tiles (64x64, BLOCK_K=16,
# 4 warps, 2 stages); 128x256 spilled 580/476 bytes there (sm_90, Triton 3.9, ptxas -v).
CONFIG_FP32_RECT = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2, SPLIT_K=1)
# TF32: the fused kernel's CONFIG_TF32 tiles (128x128, BLOCK_K=32, 3 stages); 128x256 with
# 4-byte operands spilled 144-276 bytes at odd d under Triton 3.6.0/3.8.0/3.9.0
# (bench/kernel_report.py --compile --filter "fp32,").
CONFIG_TF32_RECT = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3, SPLIT_K=1)
# untuned: the reduction kernel is a load-add-store pass over the workspace.
REDUCE_WARPS = 8
MIN_KSTEPS = 8  # untuned: fewer K-steps per split leave the pipeline's prologue exposed
MAX_SPLIT = 4  # untuned: bounds the workspace traffic (s x tiles x BM x BN x 8 bytes)


@triton.jit
def _rect_kernel(F, X, Wk, work, beta_ptr, alpha_ptr, beta_val, alpha_val, R, d, n, L_inner,
                 s_outer, s_inner, s_col, stride_f, rows_per_split,
                 BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, TWO_LEVEL: tl.constexpr,
                 INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Program (tile, k): split k of one upper tile; SPLIT_K == 1 applies the epilogue,
    else the fp32 partial goes to the workspace Wk[tile * SPLIT_K + k]."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    k = pid % SPLIT_K
    ti = tl.load(work + 2 * tile)
    tj = tl.load(work + 2 * tile + 1)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    row_lo = k * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, R)
    acc = tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, row_lo, row_hi, alpha,
                    TWO_LEVEL, IDX, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, ROW_ALIGN)
    if SPLIT_K == 1:
        _rect_epilogue(F, stride_f, n, ti, tj, acc, load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE), alpha,
                       INDEX64, BLOCK_M, BLOCK_N)
    else:
        _store_partial(Wk, pid, acc, BLOCK_M, BLOCK_N)


@triton.jit
def _rect_epilogue(F, stride_f, n, ti, tj, acc, beta, alpha, INDEX64: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """symmetric_epilogue of tile (ti, tj) in two column halves, each in the epilogue's
    quarters: 128x256 as one tile spilled 8 bytes at n = d + 1 (Triton 3.9), halves do not."""
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    a0, a1 = column_halves(acc)
    j0, j1 = halves(tj * BLOCK_N + tl.arange(0, BLOCK_N))
    symmetric_epilogue(F, stride_f, n, offs_i, j0, a0, beta, alpha, INDEX64)
    symmetric_epilogue(F, stride_f, n, offs_i, j1, a1, beta, alpha, INDEX64)


@triton.jit
def _store_partial(Wk, slot, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fp32 partial tile to workspace slot `slot` (row-major BLOCK_M x BLOCK_N)."""
    base = Wk + slot.to(tl.int64) * (BLOCK_M * BLOCK_N)
    tl.store(base + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]), acc)


@triton.jit
def _splitk_reduce_kernel(F, Wk, work, beta_ptr, alpha_ptr, beta_val, alpha_val, n, stride_f,
                          BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, INDEX64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """One tile: the sum of its SPLIT_K partials in split order, then the symmetric epilogue."""
    tile = tl.program_id(0)
    ti = tl.load(work + 2 * tile)
    tj = tl.load(work + 2 * tile + 1)
    beta = load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    tile_ws = Wk + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
    # Four column chunks one after another: a whole 128x256 fp32 tile spilled.
    QN: tl.constexpr = BLOCK_N // 4
    for q in tl.static_range(4):
        c = q * QN + tl.arange(0, QN)
        ptrs = tile_ws + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + c[None, :])
        acc = tl.load(ptrs)
        for k in tl.static_range(1, SPLIT_K):
            acc += tl.load(ptrs + k * (BLOCK_M * BLOCK_N))
        symmetric_epilogue(F, stride_f, n, offs_i, tj * BLOCK_N + c, acc, beta, alpha, INDEX64)


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
def upper_rect_tiles(n: int, bm: int, bn: int) -> list:
    """(ti, tj) of the BLOCK_M x BLOCK_N grid over n x n holding an element with r <= c."""
    return list(_upper_tiles(n, bm, bn))


@functools.lru_cache(maxsize=256)
def _upper_tiles(n: int, bm: int, bn: int) -> tuple:
    return tuple((ti, tj) for tj in range(triton.cdiv(n, bn)) for ti in range(triton.cdiv(n, bm))
                 if ti * bm <= tj * bn + bn - 1)


_TILE_CACHE = TableCache()


def _tile_table(n: int, bm: int, bn: int, device) -> torch.Tensor:
    """Cached int32 (T, 2) device tensor of upper_rect_tiles (one pinned non_blocking copy;
    ordered for whichever stream uses it: `table_cache`)."""
    def build():
        tiles = upper_rect_tiles(n, bm, bn)
        return host_table(tiles, torch.int32, device).reshape(-1, 2) if tiles else \
            torch.zeros((0, 2), dtype=torch.int32, device=device)
    return _TILE_CACHE.get((n, bm, bn, str(device)), device, build)


def candidate_config(x_dtype: torch.dtype, precision: str) -> dict:
    """The candidates' default tiles for an input dtype and tl.dot precision."""
    if x_dtype == torch.float32:
        return dict(CONFIG_FP32_RECT if precision == "ieee" else CONFIG_TF32_RECT)
    return dict(CONFIG_128x256)


def pick_split(n: int, R: int, cfg: dict, sms: int = 132) -> int:
    """The SPLIT_K this module would pick for an n x n factor over R rows: the s <=
    MAX_SPLIT minimising waves x K-steps per program (ceil(tiles*s/sms) x
    ceil(ceil(R/BK)/s)), keeping at least MIN_KSTEPS K-steps per split; ties -> smaller s.
    A host computation (no device query); `sms`: the SM count (H200: 132)."""
    bk = cfg["BLOCK_K"]
    tiles = len(upper_rect_tiles(n, cfg["BLOCK_M"], cfg["BLOCK_N"]))
    ksteps = triton.cdiv(R, bk)
    best, best_cost = 1, None
    for s in range(1, MAX_SPLIT + 1):
        if s > 1 and triton.cdiv(ksteps, s) < MIN_KSTEPS:
            break
        cost = triton.cdiv(tiles * s, sms) * triton.cdiv(ksteps, s)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def launch_rect(factor, x, v, R, d, L_inner, s_outer, s_inner, s_col, two_level, scalars, cfg: dict,
                idx64: bool, precision: str, row_align: int) -> None:
    """Both kernels of one update for factor_update.update_factor_ (x and rows_view's v,
    R, ... of it; `scalars` = (b_dev, b_t, b_val, a_dev, a_t, a_val))."""
    b_dev, b_t, b_val, a_dev, a_t, a_val = scalars
    n = factor.shape[0]
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg.get("SPLIT_K", 1)
    rows_per_split = triton.cdiv(triton.cdiv(max(R, 1), split), bk) * bk
    bp, ap = (b_t if b_dev else factor), (a_t if a_dev else factor)
    with launch_on("update_factor_", {"factor": factor, "x": x, "beta": b_t, "alpha": a_t}):
        work = _tile_table(n, bm, bn, factor.device)
        tiles = work.shape[0]
        if tiles == 0:
            return
        # The workspace comes from the caching allocator on the current (the factor's) stream.
        wk = torch.empty((tiles * split, bm, bn), dtype=torch.float32, device=factor.device) if split > 1 else factor
        _rect_kernel[(tiles * split,)](
            factor, v, wk, work, bp, ap, b_val, a_val, R, d, n, L_inner, s_outer, s_inner, s_col,
            factor.stride(0), rows_per_split, BETA_ON_DEVICE=b_dev, ALPHA_ON_DEVICE=a_dev, TWO_LEVEL=two_level,
            INDEX64=idx64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, INPUT_PRECISION=precision,
            ROW_ALIGN=row_align, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if split > 1:
            _splitk_reduce_kernel[(tiles,)](
                factor, wk, work, bp, ap, b_val, a_val, n, factor.stride(0), BETA_ON_DEVICE=b_dev,
                ALPHA_ON_DEVICE=a_dev, INDEX64=idx64, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split,
                num_warps=REDUCE_WARPS)
