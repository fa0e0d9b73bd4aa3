"""The "torch" backend: pure-torch math of every kfac_fast op, the CPU path AND the test oracle.

Each function has exactly the signature of its op in docs/ops-api.md and follows the
math conventions of docs/design.md (vec stacks columns, dW_bar = [dW | db] with the bias
as the LAST column, A of size (d_in+1)^2 with the ones-column last, G of size d_out^2).
It serves every op on every device and dtype, so `auto` dispatch always finds it last.

Arguments arrive validated by `kfac_fast.ops`, normalised as follows:
- single scalars (`beta`, `alpha`, `damping`, `lr`, `kl_clip`) are 0-dim tensors
  (Python numbers become float64 CPU tensors). A CPU scalar may be read on the host; a
  device scalar is only used in tensor arithmetic (no sync on per-step paths);
- per-layer scalars (`betas`, `alphas`, `damping` of list ops, `beta`/`alpha` of
  `ekfac_scales_`) are a 1-D tensor of length L (CPU or the data's device).
- `precision` (keyword of the factor updates and the eigen preconditioners, passed only
  when the caller sets it) is accepted and ignored: these rows compute in IEEE math.
Tests also call these functions directly on float64 copies, so for convenience every
scalar may also be a Python number and every per-layer scalar a number, a 0-dim tensor
or a sequence (see `_common.scalar_tensor` / `_common.layer_scalar`).

The math is written to be read, batched only where it is natural (eigh and
damped_inverse stack same-size matrices). Host-side checks (`.item()`, Python
branches on tensor values) appear only on inverse-refresh paths (eigh,
damped_inverse), which docs/design.md allows, and on CPU scalars.
"""
from __future__ import annotations

from kfac_fast import _dispatch
from kfac_fast._ops import OP_NAMES

# Every op of OP_NAMES by its name in this namespace: the rows below point here.
from .factors import conv_input_factor_, pack_triangles, unpack_triangles_, update_factor_, update_factors_, with_ones  # noqa: F401
from .linalg import damped_inverse, eigh, pi_damping  # noqa: F401
from .precondition import (  # noqa: F401
    ekfac_scales_,
    kl_clip_scale,
    precondition_eigen,
    precondition_eigen_,
    precondition_ekfac,
    precondition_ekfac_,
    precondition_inverse,
    precondition_inverse_,
)

__all__ = [*OP_NAMES, "with_ones"]

_dispatch.register_backend("torch", preference=2, missing=lambda: None)
for _op in OP_NAMES:
    _dispatch.register(_op, "torch", f"{__name__}:{_op}", refuses=_dispatch.serves_all)
