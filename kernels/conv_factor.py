"""Conv2d input factor with implicit im2col: A <- beta*A + alpha * P_bar^T P_bar (Triton).

P is the (N*L, C*kh*kw) patch matrix of `torch.nn.functional.unfold` (channel-major,
then kernel rows, then kernel cols); each program gathers its patch columns straight
from the input (NCHW or channels-last: any strides), zero where the window falls in
the padding, so P is never written to memory. The tile schedule and symmetric epilogue
are those of `factor_update` (upper tiles only, both triangles written, fp32
accumulation, alpha == 0 reads nothing, deterministic); the ones column of
P_bar = [P | 1] is out of the K loop (column sums of P and the row count added after it,
in the tile column holding column d).

Preconditions of the launch function (`kfac_fast.ops` checks them): factor contiguous
float32 (n, n), n = C*kh*kw + append_ones; x (N, C, H, W) float32/float16/bfloat16;
kernel_size/stride/padding/dilation ints or pairs; scalars 0-dim tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfac_fast._flags import allow_tf32_of
from kfac_fast._validate import as_pair

from .guard import check_int32, launch_on, needs_index64, square_needs_index64
from .launch import (
    column_halves,
    halves,
    input_precision,
    kernel_scalar,
    load_scalar,
    symmetric_epilogue,
    upper_tile_of,
)

# untuned: the im2col gather needs per-element bounds masks and offsets; BLOCK_K=64
# spilled (ptxas -v) where 32 does not. With the ones column out of the K loop: 0 spills at
# n = d, n = d + 1 and odd d under Triton 3.6.0, 3.8.0 and 3.9.0 (bench/kernel_report.py
# --compile --filter conv_factor; in the loop it spilled 136-308 bytes under 3.6/3.8).
CONFIG_CONV_16BIT = dict(BLOCK=128, BLOCK_K=32, num_warps=8, num_stages=3)
# With 64-bit offsets (x spans 2^31 elements) the 16-bit gather's addresses double:
# BLOCK_K=32 spilled 428-440 bytes under Triton 3.6.0 (sm_90, n = d, d + 1, odd d);
# BLOCK_K=16: 0 spills under 3.6.0/3.8.0/3.9.0 (bench/kernel_report.py --compile).
INDEX64_16BIT = dict(BLOCK_K=16)
# The fused kernel's IEEE fp32 tiles (factor_update.CONFIG_FP32), one stage: with 2 stages
# the 4-byte gathers went through cp.async and ptxas spilled 16-36 bytes (3.6.0, 3.9.0,
# kernel_report --compile --filter conv_factor); 1 stage: 0 spills, 127-204 registers.
CONFIG_CONV_FP32 = dict(BLOCK=64, BLOCK_K=16, num_warps=4, num_stages=1)
# TF32: the fused kernel's CONFIG_TF32 (BLOCK_K=32, 3 stages) spilled 268-272 bytes here
# under Triton 3.6.0 and 56-84 under 3.8.0/3.9.0 (the 4-byte gathers); BLOCK_K=16 with 2
# stages: 0 spills at n = d, d + 1 and odd d under all three, 174-195 registers. Chosen
# by compiling 5 variants (128/64 tiles, BLOCK_K 16/32, 1-2 stages) with
# bench/kernel_report.py's specs; otherwise untuned.
CONFIG_CONV_TF32 = dict(BLOCK=128, BLOCK_K=16, num_warps=8, num_stages=2)


# CANDIDATES, not in `auto` (no GPU has run them; reachable with `config=`): the patch
# columns gathered in (kh, kw, c) order (CL), so that for a channels-last input consecutive
# columns are consecutive channels in memory, unfold's (c, kh, kw) order restored in the
# epilogue (`unfold_order_epilogue`). Any input layout gives the same factor. The kernel is
# specialised on the channel count (constexpr C_CL): Triton then sees runs of C columns
# contiguous under one padding mask, and with channels-last strides that are multiples of
# 16 the gather becomes 16-byte cp.async, pipelined (bench/kernel_report.py --compile
# --filter channels-last, bf16 C = 64: per K-step per warp 2 LDGSTS, 0 LDG, 131-143
# instructions for 16 rows, where the shipped gather takes 32 LDG and 654-1315 for 32).
# BLOCK_K=16: at 32 the scalar gather of a channel count that is no multiple of 16 (C = 3)
# spilled 144 bytes under Triton 3.6.0; at 16, 0 spills under 3.6.0/3.8.0/3.9.0.
CONFIG_CONV_16BIT_CL = dict(CONFIG_CONV_16BIT, BLOCK_K=16, CL=True)
# One compile per (C, kernel size, dtype): C_CL is a constant of the kernel.
CONFIG_CONV_FP32_CL = dict(CONFIG_CONV_FP32, CL=True)
# CANDIDATE, not in `auto`: split-K, config={"SPLIT_K": s}. Each of the
# few upper tiles of a conv factor (ResNet-50 3x3: 15 tiles of 128 on 132 SMs) walks all
# N*L patch rows alone; s programs per tile each sum a contiguous chunk of rows (a multiple
# of BLOCK_K) into an fp32 workspace partial, `splitk._splitk_reduce_kernel` sums them in
# split order and applies the symmetric epilogue (no atomics: bitwise deterministic).
# untuned: s = 8 puts 15 tiles x 8 = 120 programs on 132 SMs.
CONFIG_CONV_16BIT_SPLIT = dict(CONFIG_CONV_16BIT, SPLIT_K=8)
# CANDIDATE: both, the (kh, kw, c) order's partials reduced by `_cl_reduce_kernel`.
CONFIG_CONV_16BIT_CL_SPLIT = dict(CONFIG_CONV_16BIT_CL, SPLIT_K=8)
CL_REDUCE_WARPS = 8  # untuned: a load-add pass over 128x128 fp32 partials, then the epilogue


def pick_config(x_dtype: torch.dtype, allow_tf32: bool) -> dict:
    """The launch configuration of the conv kernel for an input dtype."""
    if x_dtype in (torch.float16, torch.bfloat16):
        return dict(CONFIG_CONV_16BIT)
    return dict(CONFIG_CONV_TF32) if allow_tf32 else dict(CONFIG_CONV_FP32)


def candidate_base(x_dtype: torch.dtype, allow_tf32: bool, config: dict) -> dict:
    """The configuration a `config=` override starts from: the (kh, kw, c) order's own
    tiles when it asks for CL (BLOCK_K=16: the shipped BLOCK_K=32 spilled there), else the
    shipped one (`pick_config`)."""
    if config.get("CL", False):
        return dict(CONFIG_CONV_16BIT_CL if x_dtype in (torch.float16, torch.bfloat16) else CONFIG_CONV_FP32_CL)
    return pick_config(x_dtype, allow_tf32)


@triton.jit
def _patch_rows(kb, row_lo, row_hi, L, OW, sN, sH, sW, stride_h, stride_w, pad_h, pad_w, BLOCK_K: tl.constexpr,
                IDX: tl.constexpr):
    """Rows row_lo + kb*BLOCK_K.. of the patch matrix: (offset of the window's origin, its
    top row, its left column, row valid: below row_hi)."""
    rows = row_lo + kb * BLOCK_K + tl.arange(0, BLOCK_K)
    img = rows // L
    loc = rows % L
    ih0 = (loc // OW) * stride_h - pad_h
    iw0 = (loc % OW) * stride_w - pad_w
    # May point before the image (padding): the per-element mask covers that.
    roff = img.to(IDX) * tl.cast(sN, IDX) + ih0.to(IDX) * tl.cast(sH, IDX) + iw0.to(IDX) * tl.cast(sW, IDX)
    return roff, ih0, iw0, rows < row_hi


@triton.jit
def _patch_tile(X, roff, ih0, iw0, rmask, offs_c, d, H, W, sC, sH, sW, dil_h, dil_w,
                KH: tl.constexpr, KW: tl.constexpr, IDX: tl.constexpr, CL: tl.constexpr, C_CL: tl.constexpr):
    """(BLOCK_K, BLOCK) tile of the patch matrix (0 in the padding and past column d - 1);
    CL: columns in (kh, kw, c) order, consecutive columns consecutive channels; the channel
    count C_CL is a constant, so Triton sees runs of C_CL columns contiguous in memory
    under one padding mask (16-byte cp.async where the strides allow)."""
    if CL:
        d = C_CL * KH * KW  # a constant too: the column mask's runs are known
        ch = offs_c % C_CL
        rem = offs_c // C_CL
    else:
        ch = offs_c // (KH * KW)
        rem = offs_c % (KH * KW)
    dh = (rem // KW) * dil_h
    dw = (rem % KW) * dil_w
    col_off = ch.to(IDX) * tl.cast(sC, IDX) + dh.to(IDX) * tl.cast(sH, IDX) + dw.to(IDX) * tl.cast(sW, IDX)
    ih = ih0[:, None] + dh[None, :]
    iw = iw0[:, None] + dw[None, :]
    # 0 <= ih < H as one unsigned compare (a negative ih wraps above H).
    inside = (ih.to(tl.uint32) < tl.cast(H, tl.uint32)) & (iw.to(tl.uint32) < tl.cast(W, tl.uint32))
    mask = rmask[:, None] & (offs_c < d)[None, :] & inside
    return tl.load(X + roff[:, None] + col_off[None, :], mask=mask, other=0.0)


@triton.jit
def _unfold_index(q, d, KHW: tl.constexpr):
    """unfold's (c, kh, kw) column of the (kh, kw, c)-ordered column q (q >= d: itself)."""
    C = d // KHW
    return tl.where(q < d, (q % C) * KHW + q // C, q)


@triton.jit
def _unfold_order_columns(F, sf, n, qi, qj, pi, pj, acc, beta, alpha):
    """unfold_order_epilogue on the columns qj (unfold columns pj) of the tile."""
    # Each unordered pair once: q-space upper triangle; q -> p is a bijection on [0, n).
    upper = (qi[:, None] <= qj[None, :]) & (qj[None, :] < n)
    lo = tl.minimum(pi[:, None], pj[None, :])
    hi = tl.maximum(pi[:, None], pj[None, :])
    # Only the upper triangle is read: the lower one may hold anything (even NaN).
    old = tl.load(F + (lo * sf + hi), mask=upper, other=0.0)
    out = tl.where(beta == 0, 0.0, beta * old) + alpha * acc
    tl.store(F + (pi[:, None] * sf + pj[None, :]), out, mask=upper)
    tl.store(F + (pj[:, None] * sf + pi[None, :]), tl.trans(out), mask=tl.trans(upper))


@triton.jit
def _unfold_order_half(F, sf, n, qi, qj, pi, pj, acc, beta, alpha):
    """_unfold_order_columns on the two column halves of (qj, pj, acc), one after another."""
    a0, a1 = column_halves(acc)
    q0, q1 = halves(qj)
    p0, p1 = halves(pj)
    _unfold_order_columns(F, sf, n, qi, q0, pi, p0, a0, beta, alpha)
    _unfold_order_columns(F, sf, n, qi, q1, pi, p1, a1, beta, alpha)


@triton.jit
def unfold_order_epilogue(F, stride_f, n, d, offs_i, offs_j, acc, beta, alpha, KHW: tl.constexpr,
                          INDEX64: tl.constexpr):
    """symmetric_epilogue for a tile computed on (kh, kw, c)-ordered columns: entry (qi, qj),
    qi <= qj, goes to F[p(qi), p(qj)] and F[p(qj), p(qi)] in unfold's order, beta*F read
    from the upper triangle (F[min, max]); in four column quarters as symmetric_epilogue."""
    pi = _unfold_index(offs_i, d, KHW)
    pj = _unfold_index(offs_j, d, KHW)
    if INDEX64:
        pi = pi.to(tl.int64)
        pj = pj.to(tl.int64)
        sf = tl.cast(stride_f, tl.int64)
    else:
        sf = stride_f
    a0, a1 = column_halves(acc)
    q0, q1 = halves(offs_j)
    p0, p1 = halves(pj)
    _unfold_order_half(F, sf, n, offs_i, q0, pi, p0, a0, beta, alpha)
    _unfold_order_half(F, sf, n, offs_i, q1, pi, p1, a1, beta, alpha)


@triton.jit
def _conv_factor_kernel(F, X, beta_ptr, alpha_ptr, beta_val, alpha_val, R, L, OW, d, n, H, W,
                        sN, sC, sH, sW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, stride_f,
                        KH: tl.constexpr, KW: tl.constexpr,
                        BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, INDEX64: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                        CL: tl.constexpr, Wk, rows_per_split, SPLIT_K: tl.constexpr, C_CL: tl.constexpr = 0):
    """One upper tile of A <- beta*A + alpha*P_bar^T P_bar, patches gathered in-kernel;
    the K loop is a plain dot over patch rows, the ones column (n = d + 1: column sums
    of P, the row count) is added after it. SPLIT_K > 1 (candidate): program
    (tile, k) sums the rows [k*rows_per_split, ...) and stores its fp32 partial to
    Wk[tile*SPLIT_K + k] for `splitk._splitk_reduce_kernel` (CL: `_cl_reduce_kernel`).

    INDEX64=False (x spans < 2^31 elements, the factor's i*stride+j below 2^31) keeps
    offsets in int32 to save registers."""
    if INDEX64:
        IDX: tl.constexpr = tl.int64
    else:
        IDX: tl.constexpr = tl.int32
    pid = tl.program_id(0)
    if SPLIT_K == 1:
        ti, tj = upper_tile_of(pid)
        row_lo = 0
        row_hi = R
    else:
        ti, tj = upper_tile_of(pid // SPLIT_K)
        row_lo = (pid % SPLIT_K) * rows_per_split
        row_hi = row_lo + tl.minimum(rows_per_split, R - row_lo)  # no int32 overflow near 2^31
    beta = load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    num_k = tl.where(alpha == 0.0, 0, tl.cdiv(tl.maximum(row_hi - row_lo, 0), BLOCK_K))
    for kb in range(0, num_k):
        roff, ih0, iw0, rmask = _patch_rows(kb, row_lo, row_hi, L, OW, sN, sH, sW, stride_h, stride_w, pad_h, pad_w,
                                            BLOCK_K, IDX)
        a = _patch_tile(X, roff, ih0, iw0, rmask, offs_i, d, H, W, sC, sH, sW, dil_h, dil_w, KH, KW, IDX, CL, C_CL)
        b = _patch_tile(X, roff, ih0, iw0, rmask, offs_j, d, H, W, sC, sH, sW, dil_h, dil_w, KH, KW, IDX, CL, C_CL)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    if (n > d) & (tj * BLOCK <= d) & (d < tj * BLOCK + BLOCK):
        # Only the tile column holding column d: P^T 1 as a dot with a 16-wide ones block
        # (the same products and fp32 accumulation as an in-loop ones column), the row
        # count in the corner.
        cs16 = tl.zeros((BLOCK, 16), dtype=tl.float32)
        for kb in range(0, num_k):
            roff, ih0, iw0, rmask = _patch_rows(kb, row_lo, row_hi, L, OW, sN, sH, sW, stride_h, stride_w, pad_h, pad_w,
                                                BLOCK_K, IDX)
            a = _patch_tile(X, roff, ih0, iw0, rmask, offs_i, d, H, W, sC, sH, sW, dil_h, dil_w, KH, KW, IDX, CL, C_CL)
            one = tl.where(rmask[:, None], tl.full((BLOCK_K, 16), 1.0, a.dtype), tl.zeros((BLOCK_K, 16), a.dtype))
            cs16 = tl.dot(tl.trans(a), one, cs16, input_precision=INPUT_PRECISION)
        cs = tl.sum(tl.where((tl.arange(0, 16) == 0)[None, :], cs16, 0.0), axis=1)
        ones_col = tl.where(offs_i == d, tl.maximum(row_hi - row_lo, 0) * 1.0, cs)
        acc = tl.where((offs_j == d)[None, :], ones_col[:, None], acc)
    if SPLIT_K > 1:
        tl.store(Wk + pid.to(tl.int64) * (BLOCK * BLOCK) + (tl.arange(0, BLOCK)[:, None] * BLOCK
                                                            + tl.arange(0, BLOCK)[None, :]), acc)
    elif CL:
        unfold_order_epilogue(F, stride_f, n, d, offs_i, offs_j, acc, beta, alpha, KH * KW, INDEX64)
    else:
        symmetric_epilogue(F, stride_f, n, offs_i, offs_j, acc, beta, alpha, INDEX64)


@triton.jit
def _cl_reduce_kernel(F, Wk, beta_ptr, alpha_ptr, beta_val, alpha_val, d, n, stride_f,
                      BETA_ON_DEVICE: tl.constexpr, ALPHA_ON_DEVICE: tl.constexpr, INDEX64: tl.constexpr,
                      BLOCK: tl.constexpr, SPLIT_K: tl.constexpr, KHW: tl.constexpr):
    """Split-K with the (kh, kw, c) order: one tile's SPLIT_K partials summed in split
    order, then `unfold_order_epilogue` (splitk's reduce writes unfold's order only)."""
    tile = tl.program_id(0)
    ti, tj = upper_tile_of(tile)
    beta = load_scalar(beta_ptr, beta_val, BETA_ON_DEVICE)
    alpha = load_scalar(alpha_ptr, alpha_val, ALPHA_ON_DEVICE)
    offs = tl.arange(0, BLOCK)
    ptrs = Wk + tile.to(tl.int64) * (SPLIT_K * BLOCK * BLOCK) + (offs[:, None] * BLOCK + offs[None, :])
    acc = tl.load(ptrs)
    for k in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptrs + k * (BLOCK * BLOCK))
    unfold_order_epilogue(F, stride_f, n, d, ti * BLOCK + offs, tj * BLOCK + offs, acc, beta, alpha, KHW, INDEX64)


def conv_input_factor_(factor, x, beta, alpha, kernel_size, stride, padding, dilation, *,
                       append_ones=False, allow_tf32=False, config=None, precision=None):
    """A <- beta*A + alpha*P_bar^T P_bar for Conv2d input x in one launch; returns factor.

    Preconditions: as the module docstring. `config` overrides the tile sizes."""
    allow_tf32 = allow_tf32_of(precision, allow_tf32)
    kh, kw = as_pair(kernel_size)
    sh, sw = as_pair(stride)
    ph, pw = as_pair(padding)
    dh, dw = as_pair(dilation)
    N, C, H, W = x.shape
    OH = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    OH, OW = max(OH, 0), max(OW, 0)
    n = factor.shape[0]
    b_dev, b_t, b_val = kernel_scalar(beta, factor.device)
    a_dev, a_t, a_val = kernel_scalar(alpha, factor.device)
    cfg = candidate_base(x.dtype, allow_tf32, config or {})
    cfg.update(config or {})
    nt = triton.cdiv(n, cfg["BLOCK"])
    L = OH * OW
    fn = "conv_input_factor_"
    idx64 = needs_index64(x) or square_needs_index64(n, factor.stride(0), cfg["BLOCK"])
    if idx64 and x.dtype != torch.float32 and "BLOCK_K" not in (config or {}):
        cfg.update(INDEX64_16BIT)
    check_int32(fn, "x", N * L + cfg["BLOCK_K"], "patch rows")
    split, block = cfg.get("SPLIT_K", 1), cfg["BLOCK"]
    tiles = nt * (nt + 1) // 2
    rows_per_split = triton.cdiv(triton.cdiv(max(N * L, 1), split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    bp, ap = (b_t if b_dev else factor), (a_t if a_dev else factor)
    with launch_on(fn, {"factor": factor, "x": x, "beta": b_t, "alpha": a_t}):
        # Split-K's partials: a workspace from the caching allocator on the factor's stream.
        wk = torch.empty((tiles * split, block, block), dtype=torch.float32, device=factor.device) \
            if split > 1 else factor
        _conv_factor_kernel[(tiles * split,)](
            factor, x, bp, ap, b_val, a_val,
            N * L, max(L, 1), max(OW, 1), C * kh * kw, n, H, W, *x.stride(), sh, sw, ph, pw, dh, dw,
            factor.stride(0), KH=kh, KW=kw, BETA_ON_DEVICE=b_dev, ALPHA_ON_DEVICE=a_dev,
            INDEX64=idx64, BLOCK=block, BLOCK_K=cfg["BLOCK_K"],
            INPUT_PRECISION=input_precision(x.dtype, allow_tf32), CL=cfg.get("CL", False),
            C_CL=C if cfg.get("CL", False) else 0, Wk=wk,
            rows_per_split=rows_per_split, SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        if split > 1 and cfg.get("CL", False):  # partials summed in split order, unfold's order restored
            _cl_reduce_kernel[(tiles,)](
                factor, wk, bp, ap, b_val, a_val, C * kh * kw, n, factor.stride(0), BETA_ON_DEVICE=b_dev,
                ALPHA_ON_DEVICE=a_dev, INDEX64=idx64, BLOCK=block, SPLIT_K=split, KHW=kh * kw,
                num_warps=CL_REDUCE_WARPS)
        elif split > 1:  # the tile's partials summed in split order, then the symmetric epilogue
            from . import splitk

            splitk._splitk_reduce_kernel[(tiles,)](
                factor, wk, splitk._tile_table(n, block, block, factor.device), bp, ap, b_val, a_val, n,
                factor.stride(0), BETA_ON_DEVICE=b_dev, ALPHA_ON_DEVICE=a_dev, INDEX64=idx64, BLOCK_M=block,
                BLOCK_N=block, SPLIT_K=split, num_warps=splitk.REDUCE_WARPS)
    return factor
