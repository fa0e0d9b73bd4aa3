"""Backend `cublas`: the factor updates as torch GEMMs on CUDA tensors (cuBLAS underneath).

What it computes is the reference's contract, factor <- beta*factor + alpha * x_bar^T x_bar
(`update_factor_`, `update_factors_`, `conv_input_factor_`), in the form cuBLAS runs
fastest: 16-bit rows multiplied on the tensor cores with a float32 result (no float32
copy of x), the ones-column of x_bar as column sums (no copy of x to append it), the conv
patches by `F.unfold` in x's dtype.

Why it is ahead of Triton in `auto`: on an H200 (bench/RESULTS.md, 2026-11-29: torch 2.11,
Triton 3.6) the Triton factor kernels lost to this form on every shape but one:
- one factor, bf16, N = 8192 rows: d = 1024 0.239 ms vs 0.064, d = 4096 0.720 vs 0.436;
- a ResNet-50 3x3 conv factor (N=64, 56x56, C=64, bf16): 16.9 ms vs 1.58 (unfold + GEMM);
- grouped, 24 transformer layers (d 768..3072, 2048 rows): 11.7 ms vs 3.1 (one GEMM each);
- a small CNN's training step: the conv and grouped kernels took 49.5 of its 55.8 ms
  (their single program per output tile walks up to 131072 rows alone: no split-K).
The one group Triton won: 48 layers of d 16..256 at 1024 rows, 0.63 ms vs 2.93, where a
launch per layer dominates. So this backend refuses grouped calls of that kind
(`LAUNCH_BOUND`) while Triton is installed, and takes everything else on CUDA.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from kfac_fast import _dispatch
from kfac_fast._validate import as_pair
from kfac_fast.kernels.guard import matmul_precision

from ._common import Scalar, decay_, is_host_zero, layer_scalar, scalar_tensor, scaled

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Grouped updates that go to Triton's grouped kernel instead (when Triton imports): at
# least MIN_LAYERS layers, every factor at most MAX_N wide and every x at most MAX_ROWS
# rows. The bounds are the one measured win above (48 layers, n <= 257, 1024 rows) with
# the rows stretched to 4096; the CNN's 8192+ rows and the transformer's n >= 769 lost.
LAUNCH_BOUND = dict(MIN_LAYERS=8, MAX_N=257, MAX_ROWS=4096)


def _gram(rows: torch.Tensor, dtype: torch.dtype, precision: Optional[str]) -> torch.Tensor:
    """rows^T rows in `dtype`: 16-bit rows straight into a float32 result when `dtype` is
    float32 (torch.mm's out_dtype; exact products, float32 sums), else cast first."""
    if rows.dtype in SIXTEEN_BIT and dtype == torch.float32:
        try:
            return torch.mm(rows.mT, rows, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):  # torch without it, or CPU
            pass
    rows = rows.to(dtype)
    with matmul_precision(precision):
        return rows.mT @ rows


def update_factor_(factor: torch.Tensor, x: torch.Tensor, beta: Scalar, alpha: Scalar, *,
                   append_ones: bool = False, precision: Optional[str] = None) -> torch.Tensor:
    """factor <- beta*factor + alpha * x_bar^T x_bar in place (the reference's contract)."""
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        return decay_(factor, beta)
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    d = rows.shape[1]
    gram = _gram(rows, factor.dtype, precision)
    decay_(factor, beta)
    factor[:d, :d].add_(scaled(alpha, gram))
    if append_ones:
        edge = scaled(alpha, rows.sum(0, dtype=factor.dtype))
        factor[:d, d].add_(edge)
        factor[d, :d].add_(edge)
        factor[d, d].add_(alpha.to(factor.dtype) * rows.shape[0])
    return factor


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
    """The Conv2d A update from its input: F.unfold's patch rows (in x's dtype), then
    update_factor_."""
    beta, alpha = scalar_tensor(beta), scalar_tensor(alpha)
    if is_host_zero(alpha):
        return decay_(factor, beta)
    cols = F.unfold(x, as_pair(kernel_size), dilation=as_pair(dilation), padding=as_pair(padding),
                    stride=as_pair(stride))  # (N, C*kh*kw, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return update_factor_(factor, rows, beta, alpha, append_ones=append_ones, precision=precision)


def launch_bound(factors: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> bool:
    """Whether a grouped update is of the kind Triton's one launch serves faster."""
    bound = LAUNCH_BOUND
    return (len(factors) >= bound["MIN_LAYERS"]
            and all(f.shape[0] <= bound["MAX_N"] for f in factors)
            and all(x.shape[:-1].numel() <= bound["MAX_ROWS"] for x in xs))


def _grouped_refuses(call: _dispatch.Call) -> Optional[str]:
    why = _dispatch.on_cuda(call)
    if why is None and call.args is not None and _dispatch.backend_unavailable("triton") is None:
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
