"""The one tile accumulation every factor-update kernel shares (Triton): the (BLOCK_M,
BLOCK_N) fp32 block (ti, tj) of x_bar^T x_bar over x's rows [row_lo, row_hi), x_bar =
[x | 1] when n = d + 1.

The K loop is a plain dot on the loaded tiles; the ones column is added after it, in the
tile column holding column d only: the rows' column sums of x (x^T 1 as a dot with a
16-wide ones block: the same products and fp32 accumulation an in-loop ones column gave)
and, in the corner, the row count R, carried by the chunk that starts at row 0 alone (a
sum of per-chunk float counts would not be R past 2^24 rows). alpha == 0 reads no row.

Used by the fused update (`factor_update.py`, row_lo = 0, row_hi = R), the grouped one
(`factor_update_grouped.py`, `grouped_splitk.py`) and the candidates (`splitk.py`,
`splitk_tail.py`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, L_inner, s_outer, s_inner, TWO_LEVEL: tl.constexpr, IDX: tl.constexpr):
    """Offset of row r of x: (r // L_inner)*s_outer + (r % L_inner)*s_inner (TWO_LEVEL), else r*s_inner."""
    if TWO_LEVEL:
        return (rows // L_inner).to(IDX) * tl.cast(s_outer, IDX) + (rows % L_inner).to(IDX) * tl.cast(s_inner, IDX)
    return rows.to(IDX) * tl.cast(s_inner, IDX)


@triton.jit
def tile_acc(X, R, d, n, L_inner, s_outer, s_inner, s_col, ti, tj, row_lo, row_hi, alpha,
             TWO_LEVEL: tl.constexpr, IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr = 1,
             UNIT_COL: tl.constexpr = False):
    """x_bar^T x_bar over the rows [row_lo, row_hi) on tile (ti, tj): (BLOCK_M, BLOCK_N) fp32.

    ROW_ALIGN > 1: the host checked that X is 16-byte aligned, s_col == 1 and d, s_inner
    (and s_outer) are multiples of ROW_ALIGN elements, so every row load can be a 16-byte
    cp.async where Triton's launcher cannot mark the ints divisible by 16. UNIT_COL: the
    host checked s_col == 1 (a runtime value, as in the grouped kernel's table): columns
    are contiguous without a multiply Triton cannot see through."""
    if ROW_ALIGN > 1:  # (v // a) * a == v here (host-checked); Triton then knows a | v
        d = d // ROW_ALIGN * ROW_ALIGN
        s_inner = s_inner // ROW_ALIGN * ROW_ALIGN
        s_outer = s_outer // ROW_ALIGN * ROW_ALIGN
    offs_i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    if UNIT_COL:
        col_i = offs_i.to(IDX)
        col_j = offs_j.to(IDX)
    else:
        col_i = offs_i.to(IDX) * tl.cast(s_col, IDX)
        col_j = offs_j.to(IDX) * tl.cast(s_col, IDX)
    in_i = offs_i < d
    in_j = offs_j < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.where(alpha == 0.0, 0, tl.cdiv(tl.maximum(row_hi - row_lo, 0), BLOCK_K))
    for kb in range(0, num_k):
        rows = row_lo + kb * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < row_hi
        roff = row_offsets(rows, L_inner, s_outer, s_inner, TWO_LEVEL, IDX)
        a = tl.load(X + roff[:, None] + col_i[None, :], mask=rmask[:, None] & in_i[None, :], other=0.0)
        b = tl.load(X + roff[:, None] + col_j[None, :], mask=rmask[:, None] & in_j[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    if (n > d) & (tj * BLOCK_N <= d) & (d < tj * BLOCK_N + BLOCK_N):
        cs16 = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
        for kb in range(0, num_k):
            rows = row_lo + kb * BLOCK_K + tl.arange(0, BLOCK_K)
            rmask = rows < row_hi
            roff = row_offsets(rows, L_inner, s_outer, s_inner, TWO_LEVEL, IDX)
            a = tl.load(X + roff[:, None] + col_i[None, :], mask=rmask[:, None] & in_i[None, :], other=0.0)
            one = tl.where(rmask[:, None], tl.full((BLOCK_K, 16), 1.0, a.dtype), tl.zeros((BLOCK_K, 16), a.dtype))
            cs16 = tl.dot(tl.trans(a), one, cs16, input_precision=INPUT_PRECISION)
        cs = tl.sum(tl.where((tl.arange(0, 16) == 0)[None, :], cs16, 0.0), axis=1)
        ones_col = tl.where(offs_i == d, tl.where(row_lo == 0, R * 1.0, 0.0), cs)
        acc = tl.where((offs_j == d)[None, :], ones_col[:, None], acc)
    return acc
