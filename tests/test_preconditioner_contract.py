"""What KFACPreconditioner's docstring and errors promise, checked against the code.

- the "no layer left" error names every layer kind the registry knows (generated from it);
- guard_nonfinite: held captures drop every factor update of a bad step; with
  update_factors_in_hooks=True the updates made in hooks before the first bad capture
  stay (the layer whose backward ran first keeps its new A and G).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.layers import registry


def test_no_layer_error_names_every_registered_kind():
    kinds = [t.__name__ for t, _ in registry._KINDS]
    assert {"Linear", "Conv1d", "Conv2d", "Embedding"} <= set(kinds)
    with pytest.raises(ValueError, match="no layer left to precondition") as info:
        KFACPreconditioner(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), skip_layers=["Linear"])
    for kind in kinds:
        assert f"nn.{kind}" in str(info.value)


def test_docstring_names_every_registered_kind():
    doc = KFACPreconditioner.__doc__ or ""
    first = doc.split("Args:")[0]
    for module_type, _ in registry._KINDS:
        assert f"nn.{module_type.__name__}" in first


class _NanBackward(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (a non-finite output gradient of the layer
    before it, with every earlier capture finite)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * float("nan")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 7)
        self.second = nn.Linear(7, 3)
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.poison:
            h = _NanBackward.apply(h)
        return self.second(h)


def _step(model: _Net, precond: KFACPreconditioner, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 5, generator=gen), torch.randn(9, 3, generator=gen)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    precond.step()


@pytest.mark.parametrize("in_hooks", [False, True])
def test_bad_capture_in_hooks_mode_keeps_earlier_updates(in_hooks):
    torch.manual_seed(0)
    model = _Net()
    precond = KFACPreconditioner(model, inv_update_steps=10, update_factors_in_hooks=in_hooks)
    for seed in range(2):
        _step(model, precond, seed)
    before = {n: (layer.a_factor.clone(), layer.g_factor.clone()) for n, layer in precond.layers.items()}
    model.poison = True  # the output gradient of `first` is NaN; `second`'s backward runs before it
    _step(model, precond, 7)
    assert precond.health()["nonfinite_steps"] == 1
    first, second = precond.layers["first"], precond.layers["second"]
    assert torch.equal(first.a_factor, before["first"][0]) and torch.equal(first.g_factor, before["first"][1])
    assert torch.isfinite(second.a_factor).all() and torch.isfinite(second.g_factor).all()
    kept = torch.equal(second.a_factor, before["second"][0]) and torch.equal(second.g_factor, before["second"][1])
    # held captures: the whole step is dropped; hooks: `second` was updated before the NaN
    assert kept is not in_hooks


def test_state_tensor_names_are_the_layer_list():
    """state_dict, load_state_dict's shape check and the layer's own accounting use one list
    (KFACLayer.STATE_TENSORS)."""
    from kfac_fast.layers import KFACLayer
    from kfac_fast.preconditioner.state import _expected_shapes

    torch.manual_seed(0)
    model = _Net()
    precond = KFACPreconditioner(model, method="eigen", inv_update_steps=1)
    _step(model, precond, 0)
    layer = precond.layers["first"]
    assert set(_expected_shapes(layer)) == set(KFACLayer.STATE_TENSORS)
    assert list(layer.state_tensors()) == [n for n in KFACLayer.STATE_TENSORS if getattr(layer, n) is not None]
    entry = precond.state_dict()["layers"]["first"]
    assert set(layer.state_tensors()) <= set(entry) and not set(entry) & (set(KFACLayer.STATE_TENSORS)
                                                                          - set(layer.state_tensors()))
