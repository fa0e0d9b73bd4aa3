"""Real training code: activation checkpointing and torch.compile'd models.

Each case trains the same tiny float64 network with and without the feature and asserts
equal factors and equal preconditioned gradients (the plain model is the oracle).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_fast import KFACPreconditioner

KW = dict(damping=1e-2, kl_clip=1e-2, lr=0.1, factor_dtype=torch.float64, inv_update_steps=2)


class Net(nn.Module):
    def __init__(self, ckpt=None):
        super().__init__()
        self.ckpt = ckpt
        self.l1, self.l2, self.l3 = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def block(self, h):
        return torch.tanh(self.l2(torch.tanh(self.l1(h))))

    def forward(self, x):
        if self.ckpt is None:
            h = self.block(x)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.ckpt)
        return self.l3(h)


def train(model, steps=3, seed=0, after_backward=None, **kw):
    """Steps of K-FAC + SGD; returns (preconditioner, per-step preconditioned grads)."""
    gen = torch.Generator().manual_seed(seed)
    p = KFACPreconditioner(model, **{**KW, **kw})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(steps):
        x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        opt.zero_grad()
        model(x).square().mean().backward()
        if after_backward is not None:
            after_backward(p)
        p.step()
        grads.append([q.grad.clone() for q in model.parameters()])
        opt.step()
    return p, grads


def assert_same(p_ref, g_ref, p, g):
    for name, layer in p_ref.layers.items():
        torch.testing.assert_close(p.layers[name].a_factor, layer.a_factor)
        torch.testing.assert_close(p.layers[name].g_factor, layer.g_factor)
        assert p.layers[name].a_count == layer.a_count
    for step_ref, step in zip(g_ref, g):
        for a, b in zip(step_ref, step):
            torch.testing.assert_close(b, a)


def fresh(ckpt=None):
    torch.manual_seed(0)
    return Net(ckpt).double()


@pytest.mark.parametrize("in_hooks", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_counts_each_input_once(reentrant, in_hooks):
    """Non-reentrant recomputation fires the forward hooks again inside the backward;
    a second capture would double A in the in-hook path and hold a second activation."""
    p_ref, g_ref = train(fresh(), update_factors_in_hooks=in_hooks)
    model = fresh(reentrant)
    held = []
    p, g = train(model, update_factors_in_hooks=in_hooks,
                 after_backward=lambda p: held.append(len(p.layers["l1"].inputs)))
    assert_same(p_ref, g_ref, p, g)
    assert held == [0 if in_hooks else 1] * 3


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_matches_eager(backend):
    """Hooks of a compiled model (no fullgraph): dynamo runs them (or breaks the graph
    around them); factors and preconditioned grads equal the uncompiled model's."""
    torch._dynamo.reset()
    p_ref, g_ref = train(fresh())
    model = fresh()
    compiled = torch.compile(model, backend=backend)
    p, g = train(compiled)
    assert set(p.layers) == {f"_orig_mod.{n}" for n in p_ref.layers}
    for name, layer in p_ref.layers.items():
        other = p.layers[f"_orig_mod.{name}"]
        torch.testing.assert_close(other.a_factor, layer.a_factor)
        torch.testing.assert_close(other.g_factor, layer.g_factor)
    for step_ref, step in zip(g_ref, g):
        for a, b in zip(step_ref, step):
            torch.testing.assert_close(b, a)
