"""The cost model `auto` dispatch uses to choose between Triton and CUDA for the eigen
preconditioning (`precondition_eigen`, `precondition_eigen_`). A MODEL, not a measurement:
no GPU has run these paths yet (bench/RESULTS.md); bench/bench_triton.py measures both
sides on the next one.

    t = launches * LAUNCH_US + FLOPs / rate

- FLOPs: the four GEMMs of every layer, Q_G^T dW_bar Q_A and Q_G X Q_A^T, 4 m n (m + n)
  for G of size m and A of size n.
- launches: Triton's grouped kernels take 5 launches for all layers (4 GEMMs + the
  KL-clip reduction; 4 without a clip, not modelled). The CUDA backend runs per layer
  the 4 GEMMs through torch (cuBLAS), the multiply by nu and the copy into `.grad`, plus
  one scale launch per 32 layers: 6 L + L / 32 launches (a bias adds about 5 small
  launches per layer, the nu reduction a few per call: neither is modelled).
- rates (H200, per-kernel efficiency assumed, not measured): cuBLAS IEEE fp32 50 TFLOP/s
  (75% of the 67 TFLOP/s FMA peak) and TF32 400; Triton's FMA dot 33 (50%) and TF32 300.

Triton wins where launches dominate (many small layers), cuBLAS where FLOPs do (a few
large layers). Precision reaches the model only through the call's `precision` keyword
(`ops.precondition_eigen[_](..., precision="tf32")`, which
`KFACPreconditioner(precision="tf32")` passes): "tf32" prices both sides at their TF32
rates; None, "ieee" or "fp32" at the IEEE fp32 rates, even where torch's global
`allow_tf32` would let the CUDA path use TF32.
"""
from __future__ import annotations

from typing import Optional

LAUNCH_US = 4.0
RATES = {("cuda", False): 50e12, ("cuda", True): 400e12, ("triton", False): 33e12, ("triton", True): 300e12}
MODEL = ("cost model (modelled, not measured): launches x 4 us + FLOPs / rate, rates cuBLAS fp32 50 / "
         "TF32 400, Triton fp32 33 / TF32 300 TFLOP/s; Triton 5 launches, cuda 6 per layer")


def eigen_shapes(op: str, args: tuple) -> list:
    """(m, n) of every layer from the op's arguments (qa at 1, qg at 3; one later for the
    in-place form, which also takes bias_grads)."""
    shift = 1 if op.endswith("_") else 0
    qa, qg = args[1 + shift], args[3 + shift]
    return [(q_g.shape[0], q_a.shape[0]) for q_a, q_g in zip(qa, qg)]


def modelled_us(backend: str, shapes: list, tf32: bool) -> float:
    flops = sum(4.0 * m * n * (m + n) for m, n in shapes)
    launches = 5 if backend == "triton" else 6 * len(shapes) + -(-len(shapes) // 32)
    return launches * LAUNCH_US + flops / RATES[(backend, tf32)] * 1e6


def triton_slower(op: str, args: Optional[tuple], kwargs: dict) -> Optional[str]:
    """None when the model puts Triton at or below CUDA for this call (or when there is no
    call to price), else the reason with both figures."""
    if args is None:
        return None
    shapes = eigen_shapes(op, args)
    tf32 = kwargs.get("precision") == "tf32"
    t, c = modelled_us("triton", shapes, tf32), modelled_us("cuda", shapes, tf32)
    if t <= c:
        return None
    return f"{MODEL}: this call is modelled at {t:.0f} us on triton against {c:.0f} us on cuda"
