"""Grouped eigenbasis preconditioning with the KL clip fused (Triton).

For every layer P = Q_G[(Q_G^T dW_bar Q_A) * Rcp]Q_A^T, Rcp = 1/(max(d_G,0) max(d_A,0)^T
+ damping), as four grouped GEMM launches over all layers plus one tiny reduction:
  1. S = dW_bar Q_A      (the bias gradient is its own operand: a rank-1 term after
                          the K loop, never a concatenated copy)
  2. V = (Q_G^T S) * Rcp (epilogue also writes this tile's KL partial sum(M*V))
  3. nu = min(1, sqrt(kl_clip / |lr^2 sum of the finite layer terms|)) on device,
     fixed-order sum (a layer's term: the sum of its tiles' partials)
  4. U = Q_G V
  5. grad <- nu * U Q_A^T (epilogue splits the last column into the bias grad)
Every launch runs a cached work list of (layer, tile_i, tile_j); per-layer pointers and
strides come from one int64 device table, so no host sync and no per-layer loop.
Offsets are int32: `offsets_fit` says whether a call's operands all stay below 2^31
elements (kfac_fast.backends.triton refuses the calls where they do not, and the
launchers raise a ValueError naming the layer).
Deterministic: each output tile and each partial has one owner; the sum is in order.

Preconditions of the launch functions (`kfac_fast.ops` checks them): eigenvectors and
eigenvalues float32 (the router sends float64 ones elsewhere), gradients of one dtype
(float32/float16/bfloat16), weight grads viewable as (d_out, -1), shapes consistent
with the eigenvectors; scalars 0-dim tensors or per-layer sequences.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kfac_fast._flags import allow_tf32_of

from .guard import common_device, launch_on, offsets_fit
from .launch import TL_DTYPES, host_table, load_scalar, per_layer_scalars
from .table_cache import TableCache

# untuned: chosen because IEEE fp32 GEMMs run on FMA units, where 64x64 tiles over 4
# warps keep 32 accumulators per thread; grouped layers are small (d <= 4096), so
# bigger tiles would leave SMs idle; BLOCK_K=16 because FMA dots hold whole K slices in
# registers and 32 spilled on sm_80 (ptxas -v, bench/kernel_report.py).
CONFIG_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2)
# untuned: chosen because TF32 uses tensor cores: 128x64 tiles over 8 warps, two
# 16 KiB operand stages.
CONFIG_TF32 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
# untuned: one program sums at most a few thousand partials; 1024 lanes cover that in
# a handful of steps.
NU_BLOCK = 1024

(_M, _N, _K, _A, _A_SM, _A_SK, _A_EXTRA, _A_EXTRA_S, _HAS_A_EXTRA, _B, _B_SK, _B_SN, _C, _C_SM,
 _C_SN, _C_EXTRA, _C_EXTRA_S, _C_NMAIN, _DG, _DA) = range(20)
_META_COLS = 20

_EPI_STORE, _EPI_DAMP_KL, _EPI_SCALE_NU = 0, 1, 2


@triton.jit
def _grouped_gemm_kernel(work, meta, damping, partials, nu_ptr,
                         A_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                         A_EXTRA: tl.constexpr, C_EXTRA: tl.constexpr, EPILOGUE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         INPUT_PRECISION: tl.constexpr):
    """Work item pid = (layer, ti, tj): tile of C = [A | a_extra] B for that layer, with
    EPILOGUE 0 (store), 1 (multiply by Rcp, write the KL partial) or 2 (scale by nu)."""
    pid = tl.program_id(0)
    layer = tl.load(work + 3 * pid)
    ti = tl.load(work + 3 * pid + 1)
    tj = tl.load(work + 3 * pid + 2)
    row = meta + layer * 20
    M = tl.load(row + 0).to(tl.int32)
    N = tl.load(row + 1).to(tl.int32)
    K = tl.load(row + 2).to(tl.int32)
    A = tl.load(row + 3).to(tl.pointer_type(A_DTYPE))
    # int32 offsets (every operand spans < 2^31 elements): 64-bit offset tiles spill.
    a_sm = tl.load(row + 4).to(tl.int32)
    a_sk = tl.load(row + 5).to(tl.int32)
    B = tl.load(row + 9).to(tl.pointer_type(B_DTYPE))
    b_sk = tl.load(row + 10).to(tl.int32)
    b_sn = tl.load(row + 11).to(tl.int32)
    C = tl.load(row + 12).to(tl.pointer_type(C_DTYPE))
    c_sm = tl.load(row + 13).to(tl.int32)
    c_sn = tl.load(row + 14).to(tl.int32)

    offs_m = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    a_rows = A + offs_m[:, None] * a_sm
    b_cols = B + offs_n[None, :] * b_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * a_sk, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * b_sk, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    if A_EXTRA:
        # The bias column of dW_bar times row K of B, as a rank-1 term.
        # Bounds, not a scalar-bool mask: the interpreter rejects vector & scalar masks.
        has = tl.load(row + 8) != 0
        a_extra = tl.load(row + 6).to(tl.pointer_type(A_DTYPE))
        a_extra_s = tl.load(row + 7).to(tl.int32)
        e = tl.load(a_extra + offs_m * a_extra_s, mask=offs_m < tl.where(has, M, 0), other=0.0)
        brow = tl.load(B + K * b_sk + offs_n * b_sn,
                       mask=offs_n < tl.where(has, N, 0), other=0.0)
        acc += e.to(tl.float32)[:, None] * brow.to(tl.float32)[None, :]

    if EPILOGUE == 1:
        dg = tl.load(tl.load(row + 18).to(tl.pointer_type(tl.float32)) + offs_m, mask=mmask, other=0.0)
        da = tl.load(tl.load(row + 19).to(tl.pointer_type(tl.float32)) + offs_n, mask=nmask, other=0.0)
        lam = tl.load(damping + layer)
        rcp = 1.0 / (tl.maximum(dg, 0.0)[:, None] * tl.maximum(da, 0.0)[None, :] + lam)
        v = acc * rcp
        inside = mmask[:, None] & nmask[None, :]
        tl.store(partials + pid, tl.sum(tl.sum(tl.where(inside, acc * v, 0.0), axis=1), axis=0))
        acc = v
    if EPILOGUE == 2:
        acc = acc * tl.load(nu_ptr)

    out = acc.to(C_DTYPE)
    if C_EXTRA:
        # Columns >= nmain belong to the bias grad (only column nmain exists).
        nmain = tl.load(row + 17).to(tl.int32)
        tl.store(C + offs_m[:, None] * c_sm + offs_n[None, :] * c_sn, out,
                 mask=mmask[:, None] & (offs_n < nmain)[None, :])
        c_extra = tl.load(row + 15).to(tl.pointer_type(C_DTYPE))
        c_extra_s = tl.load(row + 16).to(tl.int32)
        in_tile = (nmain < N) & (nmain >= tj * BLOCK_N) & (nmain < tj * BLOCK_N + BLOCK_N)
        col = tl.sum(tl.where((offs_n == nmain)[None, :], acc, 0.0), axis=1)
        tl.store(c_extra + offs_m * c_extra_s, col.to(C_DTYPE), mask=offs_m < tl.where(in_tile, M, 0))
    else:
        tl.store(C + offs_m[:, None] * c_sm + offs_n[None, :] * c_sn, out,
                 mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _kl_nu_kernel(partials, starts, L, lr_ptr, lr_val, kl_ptr, kl_val, nu_ptr,
                  LR_ON_DEVICE: tl.constexpr, KL_ON_DEVICE: tl.constexpr, BLOCK: tl.constexpr):
    """nu = min(1, sqrt(kl_clip / |lr^2 total|)), 1 when the total is 0; one program, fixed
    summation order. Layer l's tiles are partials[starts[l]:starts[l+1]]; its term is their
    sum, counted as 0 when not finite (the reference's rule: one NaN layer does not lift
    the clip of the others)."""
    total = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), axis=0)
    for layer in range(0, L):
        begin = tl.load(starts + layer)
        end = tl.load(starts + layer + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for t0 in range(begin, end, BLOCK):
            offs = t0 + tl.arange(0, BLOCK)
            acc += tl.load(partials + offs, mask=offs < end, other=0.0)
        term = tl.sum(acc, axis=0)
        total += tl.where(tl.abs(term) <= 3.4028234663852886e38, term, 0.0)  # NaN and inf fail
    lr = load_scalar(lr_ptr, lr_val, LR_ON_DEVICE)
    kl = load_scalar(kl_ptr, kl_val, KL_ON_DEVICE)
    s = tl.abs(lr * lr * total)
    nu = tl.where(s > 0.0, tl.minimum(tl.sqrt(kl / tl.where(s > 0.0, s, 1.0)), 1.0), 1.0)
    tl.store(nu_ptr, nu)


# ---------------------------------------------------------------------------------------
# Launch functions (host side)
# ---------------------------------------------------------------------------------------
_WORK_CACHE = TableCache()


def tile_work_list(shapes, block_m: int, block_n: int, device) -> tuple:
    """Cached (work, starts): work, an int32 (T, 3) device tensor of (layer, ti, tj) over
    every output tile of layers with these (M, N) shapes, largest layers first (a layer's
    tiles are consecutive); starts, int32 (L + 1,): where each layer's run of tiles begins.
    Safe to use on any stream (`table_cache`)."""
    def build():
        order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
        items, starts = [], [0]
        for layer in order:
            items += [(layer, ti, tj) for ti in range(triton.cdiv(shapes[layer][0], block_m))
                      for tj in range(triton.cdiv(shapes[layer][1], block_n))]
            starts.append(len(items))
        work = host_table(items, torch.int32, device).reshape(-1, 3) if items else \
            torch.zeros((0, 3), dtype=torch.int32, device=device)
        return work, host_table(starts, torch.int32, device)
    return _WORK_CACHE.get((tuple(shapes), block_m, block_n, str(device)), device, build)


def _gemm_row(M, N, K, a, a_sm, a_sk, b, b_sk, b_sn, c, c_sm, c_sn, a_extra=None, a_extra_s=0,
              c_extra=None, c_extra_s=0, c_nmain=None, dg=0, da=0):
    return [M, N, K, a, a_sm, a_sk, a if a_extra is None else a_extra, a_extra_s, int(a_extra is not None),
            b, b_sk, b_sn, c, c_sm, c_sn, c if c_extra is None else c_extra, c_extra_s,
            N if c_nmain is None else c_nmain, dg, da]


def _precondition(w_in, b_in, w_out, b_out, qa, da, qg, dg, damping, lr, kl_clip, allow_tf32, config):
    """Core of both entry points: reads (w_in, b_in), writes nu*P into (w_out, b_out)."""
    why = offsets_fit(w_in, qa, qg)
    if why is not None:
        raise ValueError(f"precondition_eigen: {why}; use KFAC_FAST_BACKEND=cuda or torch")
    tensors = {"grads": w_in, "bias_grads": b_in, "out": w_out, "bias_out": b_out, "qa": qa, "da": da,
               "qg": qg, "dg": dg}
    common_device("precondition_eigen", tensors)  # before any allocation
    return _launch(w_in, b_in, w_out, b_out, qa, da, qg, dg, damping, lr, kl_clip, allow_tf32, config, tensors)


def _launch(w_in, b_in, w_out, b_out, qa, da, qg, dg, damping, lr, kl_clip, allow_tf32, config, tensors):
    L = len(w_in)
    device = w_in[0].device
    cfg = dict(CONFIG_TF32 if allow_tf32 else CONFIG_FP32)
    cfg.update(config or {})
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    g_dtype = TL_DTYPES[w_in[0].dtype]
    shapes = [(q_g.shape[0], q_a.shape[0]) for q_a, q_g in zip(qa, qg)]
    offsets, total = [], 0
    for m, n in shapes:
        offsets.append(total)
        total += m * n
    ws1 = torch.empty(total, dtype=torch.float32, device=device)  # S, then U
    ws2 = torch.empty(total, dtype=torch.float32, device=device)  # V
    p1, p2, es = ws1.data_ptr(), ws2.data_ptr(), ws1.element_size()
    da = [t.contiguous() for t in da]
    dg = [t.contiguous() for t in dg]
    r1, r2, r4, r5 = [], [], [], []
    for i in range(L):
        m, n = shapes[i]
        w, wo = w_in[i], w_out[i]
        bias, bias_o = b_in[i], b_out[i]
        wd = w.shape[1]
        s1, s2 = p1 + offsets[i] * es, p2 + offsets[i] * es
        QA, QG = qa[i], qg[i]
        r1.append(_gemm_row(m, n, wd, w.data_ptr(), w.stride(0), w.stride(1), QA.data_ptr(), QA.stride(0),
                            QA.stride(1), s1, n, 1,
                            a_extra=None if bias is None else bias.data_ptr(),
                            a_extra_s=0 if bias is None else bias.stride(0)))
        r2.append(_gemm_row(m, n, m, QG.data_ptr(), QG.stride(1), QG.stride(0), s1, n, 1, s2, n, 1,
                            dg=dg[i].data_ptr(), da=da[i].data_ptr()))
        r4.append(_gemm_row(m, n, m, QG.data_ptr(), QG.stride(0), QG.stride(1), s2, n, 1, s1, n, 1))
        r5.append(_gemm_row(m, n, n, s1, n, 1, QA.data_ptr(), QA.stride(1), QA.stride(0), wo.data_ptr(),
                            wo.stride(0), wo.stride(1),
                            c_extra=None if bias_o is None else bias_o.data_ptr(),
                            c_extra_s=0 if bias_o is None else bias_o.stride(0), c_nmain=wd))
    meta = host_table(r1 + r2 + r4 + r5, torch.int64, device).reshape(4, L, _META_COLS)
    work, starts = tile_work_list(shapes, bm, bn, device)
    T = work.shape[0]
    lam = per_layer_scalars(damping, L, device)
    partials = torch.empty(max(T, 1), dtype=torch.float32, device=device)
    nu = torch.ones((), dtype=torch.float32, device=device)
    if T == 0:
        return nu
    prec = "tf32" if allow_tf32 else "ieee"
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=prec, num_warps=cfg["num_warps"],
              num_stages=cfg["num_stages"])
    f32 = tl.float32
    with launch_on("precondition_eigen", tensors):
        _grouped_gemm_kernel[(T,)](work, meta[0], lam, partials, nu, A_DTYPE=g_dtype, B_DTYPE=f32,
                                   C_DTYPE=f32, A_EXTRA=True, C_EXTRA=False, EPILOGUE=_EPI_STORE, **kw)
        _grouped_gemm_kernel[(T,)](work, meta[1], lam, partials, nu, A_DTYPE=f32, B_DTYPE=f32,
                                   C_DTYPE=f32, A_EXTRA=False, C_EXTRA=False, EPILOGUE=_EPI_DAMP_KL, **kw)
        if kl_clip is not None:
            lr_dev = isinstance(lr, torch.Tensor) and lr.device == device
            kl_dev = isinstance(kl_clip, torch.Tensor) and kl_clip.device == device
            _kl_nu_kernel[(1,)](partials, starts, L, lr if lr_dev else nu, 0.0 if lr_dev else float(lr),
                                kl_clip if kl_dev else nu, 0.0 if kl_dev else float(kl_clip), nu,
                                LR_ON_DEVICE=lr_dev, KL_ON_DEVICE=kl_dev, BLOCK=NU_BLOCK)
        _grouped_gemm_kernel[(T,)](work, meta[2], lam, partials, nu, A_DTYPE=f32, B_DTYPE=f32,
                                   C_DTYPE=f32, A_EXTRA=False, C_EXTRA=False, EPILOGUE=_EPI_STORE, **kw)
        _grouped_gemm_kernel[(T,)](work, meta[3], lam, partials, nu, A_DTYPE=f32, B_DTYPE=f32,
                                   C_DTYPE=g_dtype, A_EXTRA=False, C_EXTRA=True, EPILOGUE=_EPI_SCALE_NU, **kw)
    return nu


def precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None, kl_clip=None,
                        allow_tf32=False, config=None, precision=None):
    """Writes nu*P into every weight and bias grad in five launches; returns nu (0-dim).

    Preconditions: as the module docstring, and at least one layer, each weight grad a
    view of (d_out, -1) (kfac_fast.backends.triton routes other calls elsewhere).
    `config` overrides the tile sizes."""
    allow_tf32 = allow_tf32_of(precision, allow_tf32)
    views = [w.view(w.shape[0], -1) for w in weight_grads]
    return _precondition(views, list(bias_grads), views, list(bias_grads), qa, da, qg, dg, damping, lr,
                         kl_clip, allow_tf32, config)


def precondition_eigen(grads, qa, da, qg, dg, damping, *, allow_tf32=False, config=None, precision=None):
    """P_i = Q_G[(Q_G^T dW_bar Q_A) * Rcp]Q_A^T for a list of dW_bar matrices (four launches).

    Preconditions: as the module docstring, and at least one layer."""
    allow_tf32 = allow_tf32_of(precision, allow_tf32)
    L = len(grads)
    outs = [torch.empty(g.shape, dtype=g.dtype, device=g.device) for g in grads]
    _precondition(list(grads), [None] * L, outs, [None] * L, qa, da, qg, dg, damping, None, None,
                  allow_tf32, config)
    return outs
