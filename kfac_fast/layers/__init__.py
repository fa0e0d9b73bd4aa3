"""Layer kinds: one `KFACLayer` subclass per module kind K-FAC preconditions.

`base.KFACLayer` holds what every kind shares (state, captures, hooks, the dense
dW_bar and its write-back); `linear`, `conv` (Conv1d and Conv2d) and `embedding` each
define one kind and register it with `registry.register_kind`. Adding a kind is one
new module here (imported below) plus its tests; docs/design.md walks through it.
"""
from . import conv, embedding, linear  # noqa: F401  (each registers its kind)
from .base import CaptureSink, KFACLayer, is_checkpoint_recompute
from .conv import Conv
from .embedding import Embedding
from .linear import Linear
from .registry import is_layer, layer_class, make_layer, register_kind, unsupported_reason

__all__ = ["CaptureSink", "Conv", "Embedding", "KFACLayer", "Linear", "is_checkpoint_recompute",
           "is_layer", "layer_class", "make_layer", "register_kind", "unsupported_reason"]
