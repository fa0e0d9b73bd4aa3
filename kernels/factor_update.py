"""Fused K-FAC factor update: factor <- beta*factor + alpha * x_bar^T x_bar (Triton).

A symmetric rank-k update (SYRK) with the running average in the epilogue. Only tiles
on and above the diagonal are computed (about half a GEMM of arithmetic); each one is
written to both triangles. The ones-column of x_bar = [x | 1] is synthesised in
registers (column d of a loaded tile is 1 on valid rows), so the dot itself yields the
bias row/column (column sums of x) and the corner (R); x is never copied. Accumulation
is fp32; fp32 x is multiplied in IEEE fp32 unless the caller passes `allow_tf32=True`.
Deterministic: one program owns each output tile and reduces over all rows in order.

Preconditions of the launch functions (`kfac_fast.ops` checks them): factors are
contiguous square float32 (the router sends float64 ones elsewhere), x is
float32/float16/bfloat16 with last dim d and n = d + append_ones, scalars are 0-dim
tensors (CPU ones are read on the host, device ones are loaded in-kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfac_fast._flags import allow_tf32_of

from .guard import check_int32, launch_on, needs_index64, square_needs_index64
from .launch import (
    input_precision,
    kernel_scalar,
    load_scalar,
    symmetric_epilogue,
    upper_tile_of,
)
from .tile_acc import row_offsets, tile_acc

# untuned: chosen because 128x128 fp32 accumulators with 8 warps hold 64 registers per
# thread and fit wgmma's 64-row granularity; BLOCK_K=64 with 3 stages keeps two 16-bit
# operand tiles (96 KiB of shared memory) in flight on Hopper, within Ampere's 163 KiB.
# ONES_OUTSIDE: the ones column out of the K loop (column sums and the row count after
# it, in the tile column holding column d): the loop is 4 HGMMA with both operands from
# shared memory, 8 16-byte LDGSTS, one wgmma in flight, 129-150 SASS instructions per
# K-step per warp instead of 371-418 with local_load/select round trips (bench/
# kernel_report.py --compile --filter factor_update[bf16, Triton 3.6.0/3.8.0/3.9.0).
CONFIG_16BIT = dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3, ONES_OUTSIDE=True)
# untuned: chosen because IEEE fp32 runs on FMA units, where a 64x64 tile keeps 32
# accumulators per thread over 4 warps and leaves room for the 2-stage pipeline;
# BLOCK_K=16 keeps the FMA dot's K slices in registers without spilling.
CONFIG_FP32 = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=2)
# untuned: chosen because TF32 runs on tensor cores like 16-bit inputs but its operand
# tiles are twice as large, hence BLOCK_K=32. ONES_OUTSIDE as CONFIG_16BIT.
CONFIG_TF32 = dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3, ONES_OUTSIDE=True)
# The kernel shipped before the ones column left the K loop (the in-loop ones column);
# kept reachable through `config=` for comparison (bench/kernel_report.py scores it).
CONFIG_16BIT_ONES_IN_LOOP = dict(CONFIG_16BIT, ONES_OUTSIDE=False)


# Config keys that select a candidate out of `auto` (kernels/splitk.py, splitk_tail.py):
# rectangular tiles, the tail-split schedule (and SPLIT_K > 1).
CANDIDATE_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "SCHEDULE"})


def pick_config(x_dtype: torch.dtype, allow_tf32: bool) -> dict:
    """The launch configuration this module ships for an input dtype."""
    if x_dtype in (torch.float16, torch.bfloat16):
        return dict(CONFIG_16BIT)
    return dict(CONFIG_TF32 if allow_tf32 else CONFIG_FP32)


@triton.jit
def _syrk_tile(F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f, ti, tj, beta, alpha,
               TWO_LEVEL: tl.constexpr, INDEX64: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, ONES_OUTSIDE: tl.constexpr = False,
               ROW_ALIGN: tl.constexpr = 1):
    """Tile (ti, tj) of beta*F + alpha*x_bar^T x_bar, x row r at X + off(r) + col*s_col.

    ONES_OUTSIDE: the shared tile accumulation (`tile_acc`: a plain dot in the K loop, the
    ones column after it); else the ones column synthesised in registers inside the loop
    (IEEE float32 on FMA units, where the selects cost little). ROW_ALIGN: `tile_acc`.

    INDEX64=False (x spans < 2^31 elements and the factor's i*stride+j stays below 2^31:
    `index64`) keeps offsets in int32: 64-bit offset tiles double the registers of the
    address arithmetic."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    if ONES_OUTSIDE:
        acc = tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, 0, R, alpha, TWO_LEVEL, IDX, BLOCK,
                       BLOCK, BLOCK_K, INPUT_PRECISION, ROW_ALIGN)
    else:
        acc = _ones_in_loop_acc(X, R, d, L_inner, s_outer, s_inner, s_col, offs_i, offs_j, alpha, TWO_LEVEL, IDX,
                                BLOCK, BLOCK_K, INPUT_PRECISION, ROW_ALIGN)
    symmetric_epilogue(F, stride_f, n, offs_i, offs_j, acc, beta, alpha, INDEX64)


@triton.jit
def _ones_in_loop_acc(X, R, d, L_inner, s_outer, s_inner, s_col, offs_i, offs_j, alpha, TWO_LEVEL: tl.constexpr,
                      IDX: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      ROW_ALIGN: tl.constexpr):
    """x_bar^T x_bar on one tile with the ones column (column d) set to 1 on valid rows of
    each loaded tile, so the dot yields the column sums and the row count itself."""
    if ROW_ALIGN > 1:  # (v // a) * a == v here; Triton's axis analysis then knows a | v
        d = d // ROW_ALIGN * ROW_ALIGN
        s_inner = s_inner // ROW_ALIGN * ROW_ALIGN
        s_outer = s_outer // ROW_ALIGN * ROW_ALIGN
    col_i = offs_i.to(IDX) * tl.cast(s_col, IDX)
    col_j = offs_j.to(IDX) * tl.cast(s_col, IDX)
    in_i = offs_i < d
    in_j = offs_j < d
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    # alpha == 0 reads no row of x, so NaN/Inf there cannot reach the factor.
    num_k = tl.where(alpha == 0.0, 0, tl.cdiv(R, BLOCK_K))
    for kb in range(0, num_k):
        rows = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < R
        roff = row_offsets(rows, L_inner, s_outer, s_inner, TWO_LEVEL, IDX)
        a = tl.load(X + roff[:, None] + col_i[None, :], mask=rmask[:, None] & in_i[None, :], other=0.0)
        b = tl.load(X + roff[:, None] + col_j[None, :], mask=rmask[:, None] & in_j[None, :], other=0.0)
        one = tl.full((BLOCK_K, BLOCK), 1.0, a.dtype)
        a = tl.where(rmask[:, None] & (offs_i == d)[None, :], one, a)
        b = tl.where(rmask[:, None] & (offs_j == d)[None, :], one, b)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _factor_update_kernel(F, X, beta_ptr, alpha_ptr, beta_val, alpha_val, R, d, n, L_inner,
                          s_outer, s_inner, s_col, stride_f,
                          BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr,
                          TWO_LEVEL: tl.constexpr, INDEX64: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                          ONES_OUTSIDE: tl.constexpr = False, ROW_ALIGN: tl.constexpr = 1):
    """One upper tile of F <- beta*F + alpha*x_bar^T x_bar per program (1-D grid)."""
    ti, tj = upper_tile_of(tl.program_id(0))
    beta = load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    _syrk_tile(F, X, R, d, n, L_inner, s_outer, s_inner, s_col, stride_f, ti, tj, beta, alpha,
               TWO_LEVEL, INDEX64, BLOCK, BLOCK_K, INPUT_PRECISION, ONES_OUTSIDE, ROW_ALIGN)


# ---------------------------------------------------------------------------------------
# Launch functions (host side)
# ---------------------------------------------------------------------------------------
def rows_view(x: torch.Tensor):
    """(x', R, d, L_inner, s_outer, s_inner, s_col, two_level): row r of the (R, d) view
    of x starts at (r // L_inner)*s_outer + (r % L_inner)*s_inner; copies only when x
    has more than 3 dims that no view flattens."""
    d = x.shape[-1]
    x2 = x.unsqueeze(0) if x.dim() == 1 else x
    try:
        v = x2.view(-1, d)
        R = v.shape[0]
        return v, R, d, max(R, 1), 0, v.stride(0), v.stride(1), False
    except RuntimeError:
        pass
    try:
        v = x2.view(-1, x2.shape[-2], d)
    except RuntimeError:
        v = x2.reshape(-1, x2.shape[-2], d)
    R = v.shape[0] * v.shape[1]
    return v, R, d, max(v.shape[1], 1), v.stride(0), v.stride(1), v.stride(2), True


def row_align(v, d: int, s_outer: int, s_inner: int, s_col: int, two_level: bool) -> int:
    """ROW_ALIGN for rows_view's (v, ...): the elements in 16 bytes when X is 16-byte
    aligned, the column stride is 1 and d, s_inner (s_outer when two-level) are multiples
    of that; else 1 (no hint). Read on the host from shapes and strides: no sync."""
    a = 16 // v.element_size()
    ok = (v.data_ptr() % 16 == 0 and s_col == 1 and d % a == 0 and s_inner % a == 0
          and (not two_level or s_outer % a == 0))
    return a if ok else 1


def index64(fn: str, factor, v, R: int, block: int, block_k: int) -> bool:
    """Whether the launch needs 64-bit offsets (x's span or the factor's i*stride+j can
    pass int32); ValueError when the row count, kept in int32, could overflow."""
    check_int32(fn, "x", R + block_k, "rows")
    return needs_index64(v) or square_needs_index64(factor.shape[0], factor.stride(0), block)


def update_factor_(factor, x, beta, alpha, *, append_ones=False, allow_tf32=False, config=None,
                   precision=None):
    """factor <- beta*factor + alpha*x_bar^T x_bar in one launch; returns factor.

    Preconditions: as the module docstring. `config` overrides the shipped tile sizes
    (tests use small tiles under the interpreter); a config with BLOCK_M/BLOCK_N or
    SPLIT_K > 1 runs the rectangular-tile / split-K candidate (`kernels/splitk.py`)."""
    allow_tf32 = allow_tf32_of(precision, allow_tf32)
    n = factor.shape[0]
    b_dev, b_t, b_val = kernel_scalar(beta, factor.device)
    a_dev, a_t, a_val = kernel_scalar(alpha, factor.device)
    v, R, d, L_inner, s_outer, s_inner, s_col, two_level = rows_view(x)
    cfg = pick_config(x.dtype, allow_tf32)
    cfg.update(config or {})
    align = row_align(v, d, s_outer, s_inner, s_col, two_level)
    prec = input_precision(x.dtype, allow_tf32)
    user = config or {}
    if CANDIDATE_KEYS & user.keys() or user.get("SPLIT_K", 1) > 1:  # kernels/splitk*.py
        from . import splitk, splitk_tail

        cfg = dict(splitk.candidate_config(x.dtype, prec), **user)  # the candidates' own defaults
        if cfg.get("SCHEDULE", "tail") != "tail":
            raise ValueError(f"update_factor_: config['SCHEDULE'] must be 'tail', got {cfg['SCHEDULE']!r}")
        # row counts stay below 2^31 up to the last split's end
        idx64 = index64("update_factor_", factor, v, R, max(cfg["BLOCK_M"], cfg["BLOCK_N"]),
                        cfg["BLOCK_K"] * cfg.get("SPLIT_K", 1))
        launch = splitk_tail.launch_tail if "SCHEDULE" in cfg else splitk.launch_rect
        launch(factor, x, v, R, d, L_inner, s_outer, s_inner, s_col, two_level,
               (b_dev, b_t, b_val, a_dev, a_t, a_val), cfg, idx64, prec, align)
        return factor
    nt = triton.cdiv(n, cfg["BLOCK"])
    grid = (nt * (nt + 1) // 2,)
    idx64 = index64("update_factor_", factor, v, R, cfg["BLOCK"], cfg["BLOCK_K"])
    with launch_on("update_factor_", {"factor": factor, "x": x, "beta": b_t, "alpha": a_t}):
        _factor_update_kernel[grid](
            factor, v, b_t if b_dev else factor, a_t if a_dev else factor, b_val, a_val,
            R, d, n, L_inner, s_outer, s_inner, s_col, factor.stride(0),
            BETA_ON_DEVICE=b_dev, ALPHA_ON_DEVICE=a_dev, TWO_LEVEL=two_level, INDEX64=idx64,
            BLOCK=cfg["BLOCK"], BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=prec,
            ONES_OUTSIDE=cfg.get("ONES_OUTSIDE", False), ROW_ALIGN=align,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return factor
