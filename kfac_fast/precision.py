"""Precision policy for the preconditioning products (`precision=` of KFACPreconditioner).

- "fp32" (default): the ops as they are, IEEE fp32 (or the factors' fp64): exact.
- "tf32": the products run with `torch.backends.cuda.matmul.allow_tf32` set, for the
  preconditioning call only (restored afterwards). CUDA only: on CPU it is a no-op. It
  reaches the torch matmuls, and the eigen preconditioning ops get `precision="tf32"`,
  which lets the Triton kernels and the CUDA path use TF32 too (factor updates stay IEEE).
- "bf16": eigenvectors and gradient are rounded to bf16 for the two GEMM sandwiches
  Q_G^T dW_bar Q_A and Q_G[.]Q_A^T, accumulated in fp32; the division by
  (d_G d_A^T + lambda) and the KL clip stay fp32. On CUDA the GEMMs are bf16 GEMMs with
  an fp32 output (`torch.mm(..., out_dtype=torch.float32)` where torch has it); on CPU
  they are emulated by rounding the operands to bf16 and multiplying in fp32, which is
  the same arithmetic. Measured on the demo autoencoder's factors and its own gradient
  (CPU, 3 K-FAC steps of the demo's settings, damping 1, batch 128; the check is
  tests/test_sequences.py::test_bf16_precision_error_on_demo_factors), relative error of
  the preconditioned gradient against a float64 computation: fp32 3.1e-5, bf16 0.31
  (per layer from 5e-3 on the 784->400 encoder layer to 0.36 on the decoder's last
  layers, whose factors are the most ill-conditioned; 0.42 after 10 steps). The error
  grows with the conditioning of d_G d_A^T + lambda: bf16 suits large damping, not exact
  curvature.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ._flags import matmul_precision, mm_has_out_dtype

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str, method: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and method == "inverse":
        raise ValueError("precision='bf16' applies to method='eigen' or 'ekfac' (it rounds the "
                         "eigenvectors); method='inverse' supports 'fp32' and 'tf32'")
    return precision


@contextlib.contextmanager
def tf32_products(device: torch.device) -> Iterator[None]:
    """allow_tf32 for CUDA matmuls inside the block (nothing on other devices)."""
    if device.type != "cuda":
        yield
        return
    with matmul_precision("tf32"):  # through whichever of torch's two APIs the user set
        yield


def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with both operands rounded to bf16, accumulated and returned in fp32."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    if a.is_cuda and mm_has_out_dtype(a.device.type):
        return torch.mm(a16, b16, out_dtype=torch.float32)
    return a16.float() @ b16.float()


def precondition_bf16(grads: list, qa: list, qg: list, denominators: list) -> list:
    """P_i = Q_G[(Q_G^T dW_bar Q_A) / denom_i]Q_A^T with bf16 GEMM operands (fp32 result).

    denominators: (d_out, a_dim) fp32 tensors, d_G d_A^T + lambda (or EKFAC's S + lambda).
    """
    out = []
    for g, a, q, den in zip(grads, qa, qg, denominators):
        rotated = _bf16_mm(_bf16_mm(q.mT, g), a)
        scaled = rotated / den.to(rotated.dtype)
        out.append(_bf16_mm(_bf16_mm(q, scaled), a.mT).to(g.dtype))
    return out


def eigen_denominators(da: list, dg: list, damping) -> list:
    """d_G d_A^T + lambda per layer (eigenvalues clamped at 0; damping a float or a list)."""
    ds = damping if isinstance(damping, (list, tuple)) else [damping] * len(da)
    return [torch.outer(g.clamp(min=0), a.clamp(min=0)) + d for a, g, d in zip(da, dg, ds)]


def ekfac_denominators(scales: list, damping) -> list:
    """S + lambda per layer."""
    ds = damping if isinstance(damping, (list, tuple)) else [damping] * len(scales)
    return [s + d for s, d in zip(scales, ds)]
