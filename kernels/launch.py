"""What the kernel files share: scalar arguments, offsets, host tables, the symmetric
epilogue and tile order of the factor kernels.

Host-side helpers prepare launch arguments without a device sync: host values reach the
device in one pinned, non_blocking copy, device values stay there. The device guard,
device checks and offset rules of every launch are `guard.py`'s (no Triton there, so the
CUDA backend shares them). The `@triton.jit` helpers are inlined into the kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .guard import launch_on, needs_index64, square_needs_index64

__all__ = ["launch_on", "needs_index64", "square_needs_index64"]

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ---------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------
@triton.jit
def load_scalar(ptr, value, ON_DEVICE: tl.constexpr):
    """A scalar argument as fp32: loaded from device memory when it lives there (no host
    sync to read it), else the value passed by argument."""
    if ON_DEVICE:
        value = tl.load(ptr).to(tl.float32)
    return value


@triton.jit
def upper_tile_of(pid):
    """(ti, tj), ti <= tj, of the pid-th upper-triangular tile pair (tj-major order)."""
    # The float root can be off by one for large pid; the integer checks repair it.
    tj = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    ti = pid - tj * (tj + 1) // 2
    return ti, tj


@triton.jit
def column_halves(t):
    """Columns [0, W/2) and [W/2, W) of a 2-D tile (W a power of two)."""
    return tl.split(tl.permute(tl.reshape(t, (t.shape[0], 2, t.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def halves(v):
    """[0, W/2) and [W/2, W) of a 1-D tensor (W a power of two)."""
    return tl.split(tl.permute(tl.reshape(v, (2, v.shape[0] // 2)), (1, 0)))


@triton.jit
def _epilogue_columns(F, sf, n, oi, oj, acc, beta, alpha):
    """symmetric_epilogue on the columns oj of the tile (acc: those columns)."""
    r = oi[:, None]
    c = oj[None, :]
    # Only the upper triangle is read: the lower one may hold anything (even NaN).
    upper = (r <= c) & (c < n)
    f_rc = F + (r * sf + c)
    old = tl.load(f_rc, mask=upper, other=0.0)
    # beta == 0 overwrites without reading (the op contract): 0 * NaN would leak
    out = tl.where(beta == 0, 0.0, beta * old) + alpha * acc
    tl.store(f_rc, out, mask=upper)
    # Transposed in registers so the mirrored store stays coalesced.
    f_cr = F + (oj[:, None] * sf + oi[None, :])
    tl.store(f_cr, tl.trans(out), mask=tl.trans(upper))


@triton.jit
def symmetric_epilogue(F, stride_f, n, offs_i, offs_j, acc, beta, alpha, INDEX64: tl.constexpr):
    """F[i, j] <- beta*F[i, j] + alpha*acc on and above the diagonal (i <= j), mirrored below.

    The tile (any BM x BN, BN a multiple of 4) is written in four column quarters, one
    after another: the masks, addresses and old values of one quarter are live at a time.
    Where the factor's stride is odd (n = d + 1) every element carries its own 64-bit
    address; the whole 128x128 tile at once spilled 104-184 bytes under Triton 3.6-3.9,
    quarters compile without spills (`bench/kernel_report.py --compile --filter
    factor_update[`: 164-217 registers). Same arithmetic per element as one pass.
    i*stride + j in int64 when INDEX64 (guard.square_needs_index64: from n = 46341 with a
    unit-padded stride), else int32: 64-bit offset tiles cost registers."""
    if INDEX64:
        oi = offs_i.to(tl.int64)
        oj = offs_j.to(tl.int64)
        sf = tl.cast(stride_f, tl.int64)
    else:
        oi = offs_i
        oj = offs_j
        sf = stride_f
    a0, a1 = column_halves(acc)
    j0, j1 = halves(oj)
    a00, a01 = column_halves(a0)
    a10, a11 = column_halves(a1)
    j00, j01 = halves(j0)
    j10, j11 = halves(j1)
    _epilogue_columns(F, sf, n, oi, j00, a00, beta, alpha)
    _epilogue_columns(F, sf, n, oi, j01, a01, beta, alpha)
    _epilogue_columns(F, sf, n, oi, j10, a10, beta, alpha)
    _epilogue_columns(F, sf, n, oi, j11, a11, beta, alpha)


# ---------------------------------------------------------------------------------------
# host helpers
# ---------------------------------------------------------------------------------------
def kernel_scalar(s, device) -> tuple:
    """(on_device, tensor, host float) for a 0-dim tensor or number: a tensor on the
    data's device is loaded in-kernel (no sync), a CPU one next to CUDA data is read on
    the host (no sync either), a number is passed by value."""
    if isinstance(s, torch.Tensor):
        if s.device == torch.device(device):
            return True, s, 0.0
        return False, None, float(s.item())
    return False, None, float(s)


def input_precision(x_dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input_precision: TF32 only for float32 inputs when the caller allows it."""
    return "tf32" if (x_dtype == torch.float32 and allow_tf32) else "ieee"


def host_table(rows, dtype, device) -> torch.Tensor:
    """A host list as a device tensor in one asynchronous copy (pinned when on CUDA)."""
    t = torch.tensor(rows, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _on_host(v) -> bool:
    return not isinstance(v, torch.Tensor) or v.device.type == "cpu"


def per_layer_scalars(values, L: int, device) -> torch.Tensor:
    """A (L,) float32 tensor on `device` from one scalar, a sequence or a 0-dim / 1-D
    tensor (`kfac_fast.ops` passes Python floats as CPU float64 tensors). Host values are
    read on the host (no device sync) and travel in one pinned non_blocking copy; device
    values stay on the device. Never a pageable `.to(device)`: that syncs the host."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if t.device.type == "cpu" and device.type != "cpu":
            t = t.to(torch.float32)
            t = t.expand(L) if t.dim() == 0 else t.reshape(L)
            return host_table(t.tolist(), torch.float32, device)
        t = t.to(device=device, dtype=torch.float32)
        return t.expand(L).contiguous() if t.dim() == 0 else t.reshape(L)
    if isinstance(values, (int, float)):
        return torch.full((L,), float(values), dtype=torch.float32, device=device)
    values = list(values)
    out = host_table([float(v) if _on_host(v) else 0.0 for v in values], torch.float32, device)
    for i, v in enumerate(values):
        if not _on_host(v):  # a device scalar: a device-to-device copy, no sync
            out[i].copy_(v.reshape(()))
    return out
