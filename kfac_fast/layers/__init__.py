"""Layer kinds: one `KFACLayer` subclass per module kind K-FAC preconditions.

`base.KFACLayer` holds what every kind shares (state, captures, hooks, the dense
dW_bar and its write-back); `linear`, `conv` (Conv1d and Conv2d) and `embedding` each
define one kind and register it with `registry.register_kind`. `layernorm` and `rmsnorm`
(on `scale_shift.ScaleShift`: per-feature scale-and-shift blocks, their own curvature)
are opt-in kinds: registered only when named in the preconditioner's `extra_kinds`. The
preconditioner, the tridiagonal variant and data-parallel K-FAC ask a layer, never its kind.

Adding a kind touches: a new module here with a subclass decorated
`@register_kind(ModuleType)` that sets `kind` and defines `in_dim`, `g_dim`,
`input_row_count` and `update_a_` (or `a_group_entry` to join the grouped
`ops.update_factors_` call), plus whichever of `a_shape`, `batched_input`,
`grad_rows`, `example_inputs`, `grad_bar`, `write_grad`, `unsupported_reason` and the
class attributes (`diagonal_a` with `diagonal_eigenvalues` / `precondition_eigen`,
`owns_block` with `block_grads` / `update_block_` / `precondition_alone`, `opt_in`,
`row_maskable`, `methods`, `data_parallel`) differ from the base; one import line
below; and its tests.
"""
from . import conv, embedding, layernorm, linear, rmsnorm  # noqa: F401  (each registers its kind)
from .base import CaptureSink, KFACLayer, is_checkpoint_recompute
from .conv import Conv
from .embedding import Embedding
from .layernorm import LayerNorm
from .linear import Linear
from .registry import (
    check_extra_kinds,
    is_layer,
    layer_class,
    make_layer,
    opt_in_kinds,
    register_kind,
    unsupported_reason,
)
from .rmsnorm import RMSNorm
from .scale_shift import ScaleShift

__all__ = ["CaptureSink", "Conv", "Embedding", "KFACLayer", "LayerNorm", "Linear", "RMSNorm", "ScaleShift",
           "check_extra_kinds", "is_layer", "is_checkpoint_recompute", "layer_class", "make_layer",
           "opt_in_kinds", "register_kind", "unsupported_reason"]
