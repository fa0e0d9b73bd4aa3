"""Registration: which modules of a model KFACPreconditioner preconditions.

Every module of a kind `kfac_fast.layers` knows (an opt-in kind only when named in
`extra_kinds`) becomes a `KFACLayer`, unless `skip_layers` matches it or an ancestor
(module name or class name, `re.search`), its kind does not support the method, or a
factor dimension exceeds `max_factor_dim`; each skipped layer is warned once, by name,
with the reason.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

from torch import nn

from ..layers import is_layer, make_layer, unsupported_reason
from .base import PreconditionerBase


class RegistrationMixin(PreconditionerBase):
    """The registration job of KFACPreconditioner."""

    _skip: list[re.Pattern]
    _extra_kinds: tuple[str, ...]  # opt-in layer kinds named by the user (e.g. "layernorm")

    def _register(self, model: nn.Module) -> None:
        def visit(module: nn.Module, name: str, skipped: bool) -> None:
            skipped = skipped or any(p.search(name) or p.search(type(module).__name__)
                                     for p in self._skip)
            if is_layer(module, self._extra_kinds) and not skipped:
                why = unsupported_reason(module, self.method, self._extra_kinds) or self._too_large(name, module)
                if why is None:
                    self.layers[name] = make_layer(name, module, self._extra_kinds)
                else:
                    warnings.warn(f"KFACPreconditioner: skipping layer {name!r}: {why}", stacklevel=4)
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name, skipped)

        visit(model, "", False)
        self._refuse_shared_parameters()

    def _refuse_shared_parameters(self) -> None:
        """Tied weights (e.g. an embedding reused as the output head) are refused: the
        parameter's .grad sums both layers' gradients, and each layer's block would
        precondition that sum in turn, the second overwriting the first: a silently wrong
        update. Skipping one of the two leaves the sum to the other layer's block."""
        owner: dict[int, tuple[str, str]] = {}
        for name, layer in self.layers.items():
            for pname, p in layer.module.named_parameters(recurse=False):
                first = owner.setdefault(id(p), (name, pname))
                if first[0] != name:
                    raise ValueError(
                        f"KFACPreconditioner: layers {first[0]!r} and {name!r} share the parameter "
                        f"{first[0]}.{first[1]} (tied weights); K-FAC's per-layer blocks cannot "
                        f"precondition a gradient that sums two layers' contributions. Pass "
                        f"skip_layers={name!r} (or {first[0]!r}) to precondition it with the other "
                        f"layer's block, or untie the weights")

    def _too_large(self, name: str, module: nn.Module) -> Optional[str]:
        """Why max_factor_dim skips the layer (None when it fits or there is no limit)."""
        if self.max_factor_dim is None:
            return None
        layer = make_layer(name, module, self._extra_kinds)
        # a diagonal A is a vector: only G is quadratic in memory
        a_dim = 0 if layer.diagonal_a else layer.a_dim
        if max(a_dim, layer.g_dim) <= self.max_factor_dim:
            return None
        return (f"factor dims {layer.a_dim} (A) and {layer.g_dim} (G) exceed max_factor_dim="
                f"{self.max_factor_dim} (its gradient is left to the optimizer)")
