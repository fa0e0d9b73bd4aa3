"""The "cuda" backend: kernels of `kfac_fast._C` for eigh and the eigen preconditioners.

Each function has exactly the signature of its `kfac_fast.backends.reference` counterpart and
receives arguments validated by `kfac_fast.ops`. Before a kernel call this module checks
every tensor the kernel will touch (CUDA, one device, dtype, shape, unit column stride)
and passes `data_ptr()` and the current stream as integers: `_C` does not link libtorch.

- `eigh`: same-size buckets; 32 < n <= 128 go to the batched Jacobi kernel
  (csrc/jacobi_eigh.cu), the rest to torch.linalg.eigh (see EIGH_CUTOFF_REASON).
  Unconverged or non-finite Jacobi results are redone by torch in float64.
- `precondition_eigen`, `precondition_eigen_`: the GEMMs by torch, the scale
  1 / (max(d_G,0) max(d_A,0)^T + damping) and the KL-clip term by one kernel launch for
  all layers (csrc/eigen_scale.cu); damping may stay on the device (no sync).

Importing this module never touches CUDA or `_C`; both are looked up on first use. Its
rows (bottom of the file) say which ops it serves; eigh's rule explains the size buckets.
"""
from __future__ import annotations

from typing import Optional

import torch

from kfac_fast import _dispatch
from kfac_fast._flags import matmul_precision
from kfac_fast._ops import nu_dtype
from kfac_fast.kernels.guard import launch_on

from . import cuda_driver
from ._common import buckets, eigh_stack, finite_per_matrix, finite_term, kl_nu, layer_scalar, solve_eigh

# Sizes n <= this go to torch.linalg.eigh, whose batched path (cuSOLVER's batched Jacobi)
# serves them in one call. First chosen from pytorch issue #174674 (torch loops over
# matrices above n = 32), then confirmed on an H200 (bench/RESULTS.md, 2026-11-29): torch
# wins at n <= 32 (0.18-0.44 ms vs 0.24-0.68 for batches of 64 and 512), the Jacobi kernel
# from n = 48 on (10.6x to 146x). Its vectors are also more accurate there: residual 3e-8
# vs torch's 5e-6 to 3.7e-5 at n = 33..130 (tests/test_cuda_ops.py on the H200).
EIGH_TORCH_MAX_N = 32
# The Jacobi kernel keeps the whole matrix (fp64) in shared memory: 128 x 129 x 8 B fits
# sm_80's 164 KiB. Equal to _C.JACOBI_MAX_N (tests/test_build.py checks).
EIGH_JACOBI_MAX_N = 128
EIGH_CUTOFF_REASON = (
    f"eigh buckets by size: n <= {EIGH_TORCH_MAX_N} -> torch.linalg.eigh (its batched cuSOLVER "
    f"path is fast there), {EIGH_TORCH_MAX_N} < n <= {EIGH_JACOBI_MAX_N} -> kfac_fast's batched "
    f"Jacobi kernel, n > {EIGH_JACOBI_MAX_N} -> torch.linalg.eigh; measured on an H200 (bench_eigh, "
    "fp32, batch 512): n = 32 torch 0.44 ms vs Jacobi 0.68, n = 48 torch 374 ms vs Jacobi 2.6 "
    "(torch loops over matrices above n = 32), n = 128 1024 ms vs 46"
)


def jacobi_tol(n: int) -> float:
    """Relative off-diagonal tolerance ||offdiag(A)||_F <= tol ||A||_F where the kernel stops.

    Near the fp64 rounding floor (each rotation leaves O(eps ||A||) behind, growing with
    n), so fp64 inputs get fp64 accuracy; quadratic convergence makes the last sweep cheap.
    """
    return max(1e-14, 2.0 * n * torch.finfo(torch.float64).eps)


_PLANS: dict = {}


def _lib():
    from kfac_fast import _C

    if not _C.build_info()["cuda"]:
        raise RuntimeError("kfac_fast._C was built without CUDA; the cuda backend is unavailable")
    return _C


def _check(fn: str, name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype,
           shape: tuple, contiguous: bool = False) -> None:
    """Raise unless t is what a kernel expects: a CUDA tensor on `device` of `dtype` and
    `shape` with unit column stride (and fully contiguous when asked)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on {device}, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.numel() and t.dim() and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name} must have unit stride in its last dim, got {t.stride()}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")


def _check_float(fn: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on {device} (the device of the first input), got {t.device}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: {name} must be float32 or float64, got {t.dtype}")


# ---------------------------------------------------------------------------------------
# eigh
# ---------------------------------------------------------------------------------------
def _plan(device: torch.device, n: int) -> dict:
    key = (device.index, n)
    if key not in _PLANS:
        with torch.cuda.device(device):
            _PLANS[key] = dict(_lib().jacobi_cuda_plan(n))
    return _PLANS[key]


def jacobi_eigh_stack(stack: torch.Tensor, tol: Optional[float] = None, max_sweeps: Optional[int] = None):
    """The raw kernel: (vals (B, n), vecs (B, n, n), info (B, 2) int32 = (status, sweeps)),
    status 1 converged, 0 not converged, -1 a NaN or infinity in the input.

    stack: (B, n, n) contiguous float32/64 CUDA, 1 <= n <= 128, symmetrised by the kernel.
    No retry here: `eigh` adds that. Exposed for tests and benchmarks.
    """
    fn = "jacobi_eigh_stack"
    if not isinstance(stack, torch.Tensor) or stack.dim() != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"{fn}: stack must be a (B, n, n) tensor, got "
                         f"{tuple(stack.shape) if isinstance(stack, torch.Tensor) else type(stack).__name__}")
    device = stack.device
    if device.type != "cuda":
        raise ValueError(f"{fn}: stack must be a CUDA tensor, got {device}")
    b, n = stack.shape[0], stack.shape[1]
    if not 1 <= n <= EIGH_JACOBI_MAX_N:
        raise ValueError(f"{fn}: n must be in [1, {EIGH_JACOBI_MAX_N}], got {n}")
    _check(fn, "stack", stack, device, stack.dtype, (b, n, n), contiguous=True)
    if stack.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: stack must be float32 or float64, got {stack.dtype}")
    lib = _lib()
    tol = jacobi_tol(n) if tol is None else float(tol)
    max_sweeps = lib.JACOBI_MAX_SWEEPS if max_sweeps is None else int(max_sweeps)
    vals = torch.empty((b, n), dtype=stack.dtype, device=device)
    vecs = torch.empty((b, n, n), dtype=stack.dtype, device=device)
    info = torch.zeros((b, 2), dtype=torch.int32, device=device)
    if b == 0:
        return vals, vecs, info
    plan = _plan(device, n)
    work = None
    if plan["workspace_doubles"]:
        work = torch.empty(b * plan["workspace_doubles"], dtype=torch.float64, device=device)
    with launch_on(fn, {"stack": stack, "vals": vals, "vecs": vecs, "work": work, "info": info}) as stream:
        lib.jacobi_eigh_cuda(stack.element_size(), stack.data_ptr(), vals.data_ptr(), vecs.data_ptr(),
                             0 if work is None else work.data_ptr(), info.data_ptr(), b, n, tol,
                             max_sweeps, stream.cuda_stream)
    return vals, vecs, info


def _jacobi_bucket(stack: torch.Tensor, indices: list) -> tuple:
    """Jacobi on a bucket, then torch float64 for matrices that did not converge or came
    out non-finite (host reads of the flags: allowed on refresh steps)."""
    vals, vecs, info = jacobi_eigh_stack(stack)
    bad = ~((info[:, 0] == 1).cpu() & finite_per_matrix(vals, vecs))
    if bool(bad.any()):
        mask = bad.to(stack.device)
        redo = [indices[int(j)] for j in torch.nonzero(bad).flatten()]
        # Raises ValueError naming the matrix when an input is not finite, as the reference.
        d64, q64 = eigh_stack(stack[mask].to(torch.float64), redo)
        vals[mask] = d64.to(stack.dtype)
        vecs[mask] = q64.to(stack.dtype)
    return vals, vecs


def _cold_eigh(matrices: list) -> tuple:
    """Unclamped eigendecompositions by (size, dtype) bucket: the Jacobi kernel or torch."""
    vals: list = [None] * len(matrices)
    vecs: list = [None] * len(matrices)
    for (n, _dtype, _dev), idx in buckets(matrices, range(len(matrices))).items():
        stack = torch.stack([matrices[i] for i in idx])
        if EIGH_TORCH_MAX_N < n <= EIGH_JACOBI_MAX_N:
            d, q = _jacobi_bucket(stack, idx)
        else:
            d, q = eigh_stack(stack, idx)
        for i, dk, qk in zip(idx, *_own_storage(d, q)):
            vals[i], vecs[i] = dk, qk
    return vals, vecs


def _own_storage(d: torch.Tensor, q: torch.Tensor) -> tuple[list, list]:
    """A bucket's stacked results as one contiguous tensor per matrix, each with its own
    storage: the op's outputs may not alias one another (torch's custom-op check refuses
    views of one stack). Fused copies for the whole bucket (torch._foreach_copy_) instead
    of two launches per matrix; on an H200 the op cost 20-28 ms per 512 matrices over the
    kernel, host work per matrix of which these copies were a part (the saving is not yet
    measured). The stack is made contiguous first (one copy of q) because the fused copy
    needs sources laid out like their destinations; that is still a few launches in all."""
    d, q = d.contiguous(), q.contiguous()
    if d.shape[0] == 1:
        return [d[0]], [q[0]]
    d_out, q_out = [torch.empty_like(d[0]) for _ in d], [torch.empty_like(q[0]) for _ in q]
    torch._foreach_copy_(d_out, list(d.unbind(0)))
    torch._foreach_copy_(q_out, list(q.unbind(0)))
    return d_out, q_out


def eigh(matrices, *, previous=None, tol=None, clamp=True, return_paths=False) -> tuple:
    """Batched eigendecomposition of symmetric matrices of mixed sizes (the reference's contract).

    Buckets by (size, dtype); EIGH_CUTOFF_REASON says which solver serves which size.
    The Jacobi kernel symmetrises (M + M^T)/2 where torch reads the lower triangle: the
    same for the symmetric inputs the contract requires. With `previous` and `tol`, the
    shared warm refresh (`_common.solve_eigh`) with these buckets as its cold solver.
    """
    fn = "eigh"
    if len(matrices):
        device = matrices[0].device
        for i, m in enumerate(matrices):
            _check_float(fn, f"matrices[{i}]", m, device)
            if m.dim() != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"{fn}: matrices[{i}] must be square (n, n), got {tuple(m.shape)}")
    return solve_eigh(matrices, previous, tol, clamp, return_paths, _cold_eigh)


# ---------------------------------------------------------------------------------------
# eigen-method preconditioning
# ---------------------------------------------------------------------------------------
class _Damping:
    """Per-layer damping as the kernel takes it: a host value (CPU scalars are read on the
    host, no sync) or a pointer into a device tensor of the layer's dtype (no sync)."""

    def __init__(self, damping, count: int):
        self.damping, self.count = damping, count
        self._device_cache: dict = {}

    def layer(self, i: int, dtype: torch.dtype, device: torch.device) -> tuple:
        """(pointer or 0, value) for layer i; the tensors behind pointers are kept alive."""
        d = self.damping
        if isinstance(d, torch.Tensor) and d.device.type != "cpu" and d.dim() <= 1:
            key = dtype
            if key not in self._device_cache:
                if d.device != device:
                    raise ValueError(f"damping must be on the CPU or on {device}, got {d.device}")
                self._device_cache[key] = d.reshape(-1).to(dtype).contiguous()
            t = self._device_cache[key]
            j = 0 if t.numel() == 1 else i
            if j >= t.numel():
                raise ValueError(f"damping has {t.numel()} entries, need one per layer ({self.count})")
            return t.data_ptr() + j * t.element_size(), 0.0
        s = layer_scalar(d, i)
        if s.device.type != "cpu":
            if s.device != device:
                raise ValueError(f"damping[{i}] must be on the CPU or on {device}, got {s.device}")
            t = s.reshape(1).to(dtype).contiguous()
            self._device_cache[("layer", i)] = t
            return t.data_ptr(), 0.0
        return 0, float(s)


def _scale_(fn: str, xs: list, dgs: list, das: list, damping: _Damping, kl: bool) -> Optional[torch.Tensor]:
    """xs[i] <- xs[i] / (max(dg_i,0) max(da_i,0)^T + damping_i), in place, one launch per
    dtype (and per 32 layers). Returns sum_i sum(x_old * x_new) (fp64, 0-dim) when kl."""
    lib = _lib()
    device = xs[0].device
    groups: dict = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.dtype, []).append(i)
    total = None
    keep = []  # tensors whose pointers are in flight
    for dtype, idx in groups.items():
        cols = {k: [] for k in ("x", "dg", "da", "dp", "dv", "rows", "cols", "ld")}
        for i in idx:
            x = xs[i]
            rows, ncols = x.shape
            dg = dgs[i].to(dtype).contiguous()
            da = das[i].to(dtype).contiguous()
            _check(fn, f"Q_G^T dW_bar Q_A of layer {i}", x, device, dtype, (rows, ncols))
            _check(fn, f"dg[{i}]", dg, device, dtype, (rows,))
            _check(fn, f"da[{i}]", da, device, dtype, (ncols,))
            ptr, value = damping.layer(i, dtype, device)
            keep += [dg, da]
            cols["x"].append(x.data_ptr())
            cols["dg"].append(dg.data_ptr())
            cols["da"].append(da.data_ptr())
            cols["dp"].append(ptr)
            cols["dv"].append(value)
            cols["rows"].append(rows)
            cols["cols"].append(ncols)
            cols["ld"].append(x.stride(0) if rows > 1 else ncols)
        max_size = max(r * c for r, c in zip(cols["rows"], cols["cols"]))
        tiles = -(-max_size // lib.EIGEN_SCALE_TILE)
        partial = torch.empty((len(idx), tiles), dtype=torch.float64, device=device) if kl and tiles else None
        with launch_on(fn, {"xs": [xs[i] for i in idx], "keep": keep, "partial": partial}) as stream:
            lib.eigen_scale_cuda(torch.empty((), dtype=dtype).element_size(), cols["x"], cols["x"],
                                 cols["dg"], cols["da"], cols["dp"], cols["dv"], cols["rows"],
                                 cols["cols"], cols["ld"], cols["ld"],
                                 0 if partial is None else partial.data_ptr(), tiles, stream.cuda_stream)
        if partial is not None:  # a layer's term (its row of partials) counts 0 when not finite
            s = finite_term(partial.sum(dim=1)).sum()
            total = s if total is None else total + s
    if kl and total is None:
        total = torch.zeros((), dtype=torch.float64, device=device)
    return total


def _check_layers(fn: str, qa, da, qg, dg, count: int, device: torch.device) -> None:
    for name, ts in (("qa", qa), ("da", da), ("qg", qg), ("dg", dg)):
        if len(ts) != count:
            raise ValueError(f"{fn}: {name} must have {count} entries (one per layer), got {len(ts)}")
        for i, t in enumerate(ts):
            _check_float(fn, f"{name}[{i}]", t, device)


def precondition_eigen(grads, qa, da, qg, dg, damping, *, precision=None) -> list:
    """P_i = Q_G[(Q_G^T dW_bar_i Q_A) / (d_G d_A^T + damping_i)]Q_A^T (reference contract):
    computed in qa's dtype, P in grads[i]'s dtype; the scale by one kernel launch.
    `precision` ("tf32" / "ieee") sets the GEMMs' TF32 use for this call."""
    with matmul_precision(precision):
        return _precondition_eigen(grads, qa, da, qg, dg, damping)


def _precondition_eigen(grads, qa, da, qg, dg, damping) -> list:
    fn = "precondition_eigen"
    if len(grads) == 0:
        return []
    device = grads[0].device
    _check_layers(fn, qa, da, qg, dg, len(grads), device)
    xs = []
    for i, g in enumerate(grads):
        if g.device != device:
            raise ValueError(f"{fn}: grads[{i}] must be on {device}, got {g.device}")
        xs.append((qg[i].mT @ g.to(qa[i].dtype) @ qa[i]).contiguous())
    _scale_(fn, xs, dg, da, _Damping(damping, len(grads)), kl=False)
    return [(qg[i] @ x @ qa[i].mT).to(g.dtype) for i, (g, x) in enumerate(zip(grads, xs))]


def precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None, kl_clip=None,
                        precision=None) -> torch.Tensor:
    """In place: .grad <- nu * P, bias grad <- nu * P's last column (reference contract);
    `precision` as `precondition_eigen`. The work is `_precondition_eigen_`'s."""
    with matmul_precision(precision):
        return _precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, lr=lr, kl_clip=kl_clip)


def _precondition_eigen_(weight_grads, bias_grads, qa, da, qg, dg, damping, *, lr=None,
                         kl_clip=None) -> torch.Tensor:
    """In place: .grad <- nu * P, bias grad <- nu * P's last column (reference contract).

    Q_G^T dW_bar Q_A is formed without concatenating [dW | db]: Q_G^T dW Q_A[:d_in] plus
    the rank-1 term (Q_G^T db) Q_A[d_in]^T. The KL-clip sum comes from the scale kernel's
    tile sums; nu stays on the device. Returns nu (0-dim, float32; float64 for float64 grads).
    """
    fn = "precondition_eigen_"
    if len(weight_grads) == 0:
        raise ValueError(f"{fn}: weight_grads must not be empty")
    device = weight_grads[0].device
    count = len(weight_grads)
    if len(bias_grads) != count:
        raise ValueError(f"{fn}: bias_grads must have {count} entries, got {len(bias_grads)}")
    _check_layers(fn, qa, da, qg, dg, count, device)
    xs, d_ins = [], []
    for i, (w, b) in enumerate(zip(weight_grads, bias_grads)):
        dtype = qa[i].dtype
        if w.device != device or (b is not None and b.device != device):
            raise ValueError(f"{fn}: weight_grads[{i}] / bias_grads[{i}] must be on {device}")
        w2 = w.reshape(w.shape[0], -1).to(dtype)
        d_in = w2.shape[1]
        x = qg[i].mT @ w2 @ qa[i][:d_in]
        if b is not None:
            x.addr_(qg[i].mT @ b.reshape(-1).to(dtype), qa[i][d_in])
        xs.append(x.contiguous())
        d_ins.append(d_in)
    want_kl = kl_clip is not None
    total = _scale_(fn, xs, dg, da, _Damping(damping, count), kl=want_kl)
    nu = kl_nu(total, lr, kl_clip, device, nu_dtype(weight_grads[0]))
    for i, (w, b, x) in enumerate(zip(weight_grads, bias_grads, xs)):
        y = qg[i] @ x
        nu_x = nu.to(y.dtype)
        w.copy_((y @ qa[i][:d_ins[i]].mT).mul_(nu_x).reshape(w.shape))
        if b is not None:
            b.copy_((y @ qa[i][d_ins[i]]).mul_(nu_x).reshape(b.shape))
    return nu


# ---------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------
def _eigh_refuses(call: _dispatch.Call) -> Optional[str]:
    """CUDA tensors only. It never refuses a size: it buckets by size itself (small and
    large n to torch.linalg.eigh, mid sizes to the Jacobi kernel), so the reason states
    that cut-off; describe() shows it for non-CUDA devices."""
    if call.device.type != "cuda":
        return f"runs on CUDA tensors only (got {call.device.type}); on CUDA, {EIGH_CUTOFF_REASON}"
    return None


_dispatch.register_backend("cuda", preference=0, missing=cuda_driver.missing)
_dispatch.register("eigh", "cuda", f"{__name__}:eigh", refuses=_eigh_refuses)
_dispatch.register("precondition_eigen", "cuda", f"{__name__}:precondition_eigen")
_dispatch.register("precondition_eigen_", "cuda", f"{__name__}:precondition_eigen_")
