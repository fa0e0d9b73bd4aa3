"""Backend `cublas`: the factor updates as torch GEMMs on CUDA tensors (cuBLAS underneath).

What it computes is the reference's contract, factor <- beta*factor + alpha * x_bar^T x_bar
(`update_factor_`, `update_factors_`, `conv_input_factor_`), in the form cuBLAS runs
fastest: 16-bit rows multiplied on the tensor cores with a float32 result (no float32
copy of x), the ones-column of x_bar as column sums (no copy of x to append it), the conv
patches by `F.unfold` in x's dtype, a bounded chunk of images at a time. Device scalars
(the non-finite guard's betas and alphas) are applied in place on the GEMM's own result,
compared on the device: one GEMM and about five elementwise launches per factor, no sync.

Why it is ahead of Triton in `auto`: on an H200 (bench/RESULTS.md, 2026-11-29: torch 2.11,
Triton 3.6) the Triton factor kernels lost to torch's form of the update (bench_triton's
`torch_best_update`: mm with out_dtype, then the running average with host scalars) on
every shape but one:
- one factor, bf16, N = 8192 rows: d = 1024 0.239 ms vs 0.064, d = 4096 0.720 vs 0.436;
- a ResNet-50 3x3 conv factor (N=64, 56x56, C=64, bf16): 16.9 ms vs 1.58 (unfold + GEMM);
- grouped, 24 transformer layers (d 768..3072, 2048 rows): 11.7 ms vs 3.1 (one GEMM each);
- a small CNN's training step: the conv and grouped kernels took 49.5 of its 55.8 ms
  (their single program per output tile walks up to 131072 rows alone: no split-K).
The one group Triton won: 48 layers of d 16..256 at 1024 rows, 0.63 ms vs 2.93, where a
launch per layer dominates; this backend leaves groups of that kind (`LAUNCH_BOUND`) to
Triton. This backend's own path (with device scalars) has not yet run on a GPU: the next
GPU run's `step`, `profile` and `e2e` parts measure it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from kfac_fast import _dispatch
from kfac_fast._flags import matmul_precision, mm_has_out_dtype
from kfac_fast._validate import as_pair

from ._common import Scalar, decay_, is_host_zero, layer_scalar, scalar_tensor

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Grouped updates that go to Triton's grouped kernel instead (when Triton imports and the
# factors are float32, which it serves): at least MIN_LAYERS layers, every factor at most
# MAX_N wide and every x at most MAX_ROWS rows. Only one such group was measured (48
# layers, n <= 257, 1024 rows: Triton 0.63 ms vs 2.93); MIN_LAYERS and MAX_ROWS are
# guesses around it, to be measured (the CNN's 8192+ rows and the transformer's n >= 769
# lost).
LAUNCH_BOUND = dict(MIN_LAYERS=8, MAX_N=257, MAX_ROWS=4096)
# conv patches are unfolded this many elements at a time (64 Mi: 128 MiB in 16-bit), so
# the patch matrix is never materialised whole (ResNet-50's first 3x3 stage at batch 256
# would be 0.9 GB)
CONV_CHUNK_ELEMENTS = 1 << 26


def _gram(rows: torch.Tensor, dtype: torch.dtype, precision: Optional[str]) -> torch.Tensor:
    """rows^T rows in `dtype`: 16-bit rows straight into a float32 result when `dtype` is
    float32 (exact products, float32 sums), else cast first. float32 rows multiply in IEEE
    fp32 unless precision="tf32", whatever torch's global TF32 setting, as the Triton kernels
    do, so the numbers do not depend on which backend served a layer."""
    if rows.dtype in SIXTEEN_BIT and dtype == torch.float32 and mm_has_out_dtype(rows.device.type):
        return torch.mm(rows.mT, rows, out_dtype=torch.float32)
    rows = rows.to(dtype)
    with matmul_precision(precision or "ieee"):
        return rows.mT @ rows


def _on_host(s: torch.Tensor) -> bool:
    """Whether a scalar can be read without a sync (tests force the device branch with it)."""
    return s.device.type == "cpu"


def _scale_(t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """t <- alpha * t in place, exactly 0 where alpha == 0 even if t holds NaN/Inf (a device
    alpha is compared on the device: no sync). t is a temporary of this module's."""
    if _on_host(alpha):
        return t.mul_(float(alpha))  # alpha != 0: a host zero returned before any product
    return t.mul_(alpha.to(t.dtype)).masked_fill_(alpha == 0, 0)


def _decay_(factor: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """factor <- beta * factor in place; beta == 0 overwrites, so NaN in an uninitialised
    factor cannot leak into the first update (the reference's `decay_`, without its
    temporaries)."""
    if _on_host(beta):
        return decay_(factor, beta)
    return factor.mul_(beta.to(factor.dtype)).masked_fill_(beta == 0, 0)


def _accumulate_(factor: torch.Tensor, gram: torch.Tensor, sums: Optional[torch.Tensor], count: int,
                 beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """factor <- beta*factor + alpha*[[gram, sums], [sums^T, count]] (no ones-column block
    when sums is None); gram and sums are temporaries and are scaled in place."""
    d = gram.shape[0]
    _decay_(factor, beta)
    factor[:d, :d].add_(_scale_(gram, alpha))
    if sums is not None:
        edge = _scale_(sums, alpha)
        factor[:d, d].add_(edge)
        factor[d, :d].add_(edge)
        factor[d, d].add_(_scale_(torch.full((), float(count), dtype=factor.dtype, device=factor.device), alpha))
    return factor


def update_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar, *,
                   append_ones: bool = False, precision: Optional[str] = None) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar in place (the reference's contract)."""
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        return decay_(factor, beta)
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    sums = rows.sum(0, dtype=factor.dtype) if append_ones else None
    return _accumulate_(factor, _gram(rows, factor.dtype, precision), sums, rows.shape[0], beta, alpha)


def update_factors_(factors: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], betas, alphas, *,
                    append_ones: Union[bool, Sequence[bool]] = False, precision: Optional[str] = None) -> list:
    """update_factor_ for every layer: one GEMM each (see the module docstring for when
    Triton's single launch serves the group instead)."""
    for i, (factor, x) in enumerate(zip(factors, xs)):
        ones = append_ones if isinstance(append_ones, bool) else bool(append_ones[i])
        update_factor_(factor, x, layer_scalar(betas, i), layer_scalar(alphas, i), append_ones=ones,
                       precision=precision)
    return factors


def conv_input_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar,
                       kernel_size, stride, padding, dilation, *, append_ones: bool = False,
                       precision: Optional[str] = None) -> torch.Tensor:
    """The Conv2d A update from its input: F.unfold's patch rows (in x's dtype), a chunk
    of images at a time (CONV_CHUNK_ELEMENTS), their grams summed, then one running-average
    update."""
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        return decay_(factor, beta)
    geometry = dict(kernel_size=as_pair(kernel_size), dilation=as_pair(dilation), padding=as_pair(padding),
                    stride=as_pair(stride))
    first = F.unfold(x[:1], **geometry)  # (1, C*kh*kw, L): the patch size of one image
    width = first.shape[1]
    step = max(1, CONV_CHUNK_ELEMENTS // max(1, first.numel()))
    gram = torch.zeros(width, width, dtype=factor.dtype, device=factor.device)
    sums = torch.zeros(width, dtype=factor.dtype, device=factor.device) if append_ones else None
    count = 0
    for start in range(0, x.shape[0], step):
        cols = F.unfold(x[start:start + step], **geometry)  # (n, C*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, width)
        gram.add_(_gram(rows, factor.dtype, precision))
        if sums is not None:
            sums.add_(rows.sum(0, dtype=factor.dtype))
        count += rows.shape[0]
    return _accumulate_(factor, gram, sums, count, beta, alpha)


def launch_bound(factors: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> bool:
    """Whether a grouped update is of the kind Triton's one launch serves faster."""
    bound = LAUNCH_BOUND
    return (len(factors) >= bound["MIN_LAYERS"]
            and all(f.shape[0] <= bound["MAX_N"] for f in factors)
            and all(x.shape[:-1].numel() <= bound["MAX_ROWS"] for x in xs))


def _grouped_refuses(call: _dispatch.Call) -> Optional[str]:
    """CUDA only; defers a launch-bound group of float32 factors to Triton when Triton
    imports, unless KFAC_FAST_BACKEND names this backend (then it serves every call)."""
    why = _dispatch.on_cuda(call)
    if (why is None and call.args is not None and _dispatch.requested_backend() != "cublas"
            and _dispatch.backend_unavailable("triton") is None
            and all(f.dtype == torch.float32 for f in call.args[0])):
        if launch_bound(call.args[0], call.args[1]):
            why = (f"a launch-bound group ({len(call.args[0])} layers, n <= {LAUNCH_BOUND['MAX_N']}, "
                   f"rows <= {LAUNCH_BOUND['MAX_ROWS']}): Triton's one launch is faster (H200)")
    return why


def _cuda_available() -> Optional[str]:
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


_NOTE = "H200 measurements in bench/RESULTS.md; grouped calls of many small layers go to triton"
_dispatch.register_backend("cublas", preference=0.5, missing=_cuda_available)
_dispatch.register("update_factor_", "cublas", f"{__name__}:update_factor_", note=_NOTE)
_dispatch.register("update_factors_", "cublas", f"{__name__}:update_factors_", refuses=_grouped_refuses, note=_NOTE)
_dispatch.register("conv_input_factor_", "cublas", f"{__name__}:conv_input_factor_", note=_NOTE)
