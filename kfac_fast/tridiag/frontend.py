"""TridiagPreconditioner: KFACPreconditioner with the block-tridiagonal pairs plugged in.

It finds (or checks) the chains, refuses the settings the pairs do not support, and
adds a `TridiagonalCurvature` through `KFACPreconditioner.add_curvature`: the base
class's jobs do the rest. `KFAC(approx="tridiag")` constructs it.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..layers import KFACLayer, Linear
from ..preconditioner import KFACPreconditioner
from .curvature import ChainPair, TridiagonalCurvature

# modules that act elementwise, so the next Linear sees rows of the same examples
ELEMENTWISE = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid,
               nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink, nn.Identity)


def find_chains(model: nn.Module, layers: dict[str, KFACLayer]) -> list[list[str]]:
    """Chains (>= 2 names) of registered nn.Linear layers inside any nn.Sequential of
    `model`, consecutive up to elementwise activations (`ELEMENTWISE`)."""
    by_module = {id(layer.module): name for name, layer in layers.items() if isinstance(layer, Linear)}
    chains = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        current: list[str] = []
        for child in seq.children():
            name = by_module.get(id(child))
            if name is not None:
                current.append(name)
            elif not isinstance(child, ELEMENTWISE):
                if len(current) > 1:
                    chains.append(current)
                current = []
        if len(current) > 1:
            chains.append(current)
    return chains


class TridiagPreconditioner(KFACPreconditioner):
    """KFACPreconditioner with the paper's block-tridiagonal inverse on Linear chains.

    Layers in a chain (see `find_chains`, or pass `chains` as lists of registered layer
    names in forward order) are preconditioned with Xi^T Lambda Xi; every other layer
    block-diagonally with factored Tikhonov damping (method "inverse", the only method).
    Held captures only (update_factors_in_hooks=False), single process, no GradScaler.
    """

    def __init__(self, model: nn.Module, *, chains: Optional[Iterable[Sequence[str]]] = None,
                 **kwargs: Any) -> None:
        method = kwargs.setdefault("method", "inverse")
        if method != "inverse":
            raise ValueError(f"TridiagPreconditioner: method must be 'inverse' (factored Tikhonov "
                             f"damping of the diagonal factors), got {method!r}")
        if kwargs.get("update_factors_in_hooks"):
            raise ValueError("TridiagPreconditioner: update_factors_in_hooks=True is not supported "
                             "(the cross factors need both layers' captures at step())")
        if kwargs.get("grad_scaler") is not None:
            raise ValueError("TridiagPreconditioner: grad_scaler is not supported")
        kwargs.setdefault("distributed", False)
        if kwargs["distributed"] not in (False, None):
            raise ValueError("TridiagPreconditioner: distributed must be False")
        kwargs["distributed"] = False
        super().__init__(model, **kwargs)
        if chains is None:
            found = find_chains(model, self.layers)
        else:
            found = [list(c) for c in chains]
            for c in found:
                bad = [n for n in c if n not in self.layers or not isinstance(self.layers[n], Linear)]
                if bad or len(c) < 2 or len(set(c)) != len(c):
                    raise ValueError(f"chains: each chain needs >= 2 distinct registered nn.Linear "
                                     f"layer names; {c!r} has bad entries {bad!r}")
        seen = [n for c in found for n in c]
        if len(seen) != len(set(seen)):
            raise ValueError(f"chains: a layer may belong to one chain only, got {found!r}")
        self.chains: list[list[str]] = found
        self.tridiagonal = TridiagonalCurvature(found, self.layers, self.factor_dtype)
        self.add_curvature(self.tridiagonal)

    @property
    def pairs(self) -> list[ChainPair]:
        """The chain pairs (k, k+1), in chain order."""
        return self.tridiagonal.pairs

    def set_row_mask(self, mask: Optional[torch.Tensor]) -> None:
        if mask is not None:
            raise ValueError("TridiagPreconditioner: set_row_mask is not supported (the cross "
                             "factors pair every row of consecutive layers)")
        super().set_row_mask(mask)

    def inverse_snapshot(self) -> list:
        """The pairs' decompositions in use (for a caller that refreshes and may go back)."""
        return self.tridiagonal.snapshot()

    def restore_inverses(self, snapshot: list) -> None:
        self.tridiagonal.restore(snapshot)

    def tridiag_memory_usage(self) -> int:
        """Bytes the tridiagonal approximation adds over the block-diagonal one."""
        return sum(self.tridiagonal.memory_usage().values())
