"""Layer kinds beyond Linear/Conv2d: Embedding (diagonal A), Conv1d, fused QKV Linear,
channels-last Conv2d grads, nn.MultiheadAttention (its functional projections are skipped).

Oracle: docs/design.md's dense Kronecker solve in float64 on tiny layers.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner, layers
from kfac_fast.layers.embedding import update_frequencies_

DAMPING = 1e-2


def kron_solve(a, g, dw_bar, damping=DAMPING):
    """P = (A (x) G + damping I)^-1 vec(dW_bar), docs/design.md's dense oracle."""
    k = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
    return torch.linalg.solve(k, dw_bar.mT.reshape(-1)).reshape(a.shape[0], g.shape[0]).mT


def precond(model, **kw):
    kw = {**dict(damping=DAMPING, kl_clip=None, factor_dtype=torch.float64), **kw}
    return KFACPreconditioner(model, **kw)


def keep_output_grad(module, store):
    """Record the gradient of `module`'s output in store["g"]."""
    def hook(m, i, o):
        o.register_hook(lambda g: store.setdefault("g", g))
    module.register_forward_hook(hook)


class EmbedNet(nn.Module):
    def __init__(self, v=11, d=5, c=3):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.head = nn.Linear(d, c)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def test_embedding_matches_dense_oracle():
    torch.manual_seed(0)
    model = EmbedNet().double()
    idx = torch.randint(0, 11, (4, 6))
    idx[0, :3] = 2  # repeated indices: frequencies above 1
    y = torch.randint(0, 3, (4, 6))
    outs = {}
    keep_output_grad(model.emb, outs)
    p = precond(model, loss_average="tokens")
    F.cross_entropy(model(idx).reshape(-1, 3), y.reshape(-1)).backward()
    raw = model.emb.weight.grad.clone()
    p.step()

    rows = idx.numel()
    a = torch.bincount(idx.reshape(-1), minlength=11).double() / rows
    d = outs["g"].reshape(-1, 5) * rows  # S = N*T for a token mean
    g = d.T @ d / idx.shape[0]
    layer = p.layers["emb"]
    assert layer.a_factor.shape == (11,)
    torch.testing.assert_close(layer.a_factor, a)
    torch.testing.assert_close(layer.g_factor, g)
    expected = kron_solve(torch.diag(a), g, raw.T).T
    torch.testing.assert_close(model.emb.weight.grad, expected, rtol=1e-8, atol=1e-10)


def test_embedding_kl_clip_counts_every_layer():
    torch.manual_seed(1)
    model = EmbedNet().double()
    idx = torch.randint(0, 11, (4, 6))
    clip = 1e-9  # small enough that nu < 1
    p = precond(model, loss_average="tokens", kl_clip=clip)
    model(idx).square().mean().backward()
    raw = {n: q.grad.clone() for n, q in model.named_parameters()}
    p.step()
    nu = float(p.last_nu)
    assert 0 < nu < 1
    # nu * P, so the KL sum over ALL layers of the unclipped P equals kl_clip / (nu^2 lr^2)
    total = sum(float((q.grad * raw[n]).sum()) for n, q in model.named_parameters()) / nu
    assert total * p.lr(0) ** 2 * nu ** 2 == pytest.approx(clip, rel=1e-6)


def test_embedding_skipped_for_other_methods():
    with pytest.warns(UserWarning, match="emb.*eigen"):
        p = precond(EmbedNet(), method="inverse")
    assert "emb" not in p.layers and "head" in p.layers


def test_update_frequencies_beta_zero_ignores_nan():
    f = torch.full((4,), float("nan"))
    update_frequencies_(f, torch.tensor([0, 0, 3]), 0.0, 0.5)
    torch.testing.assert_close(f, torch.tensor([1.0, 0.0, 0.0, 0.5]))


@pytest.mark.parametrize("padding,stride,bias", [(1, 1, True), (0, 2, False), ("same", 1, True)])
def test_conv1d_equals_unit_height_conv2d(padding, stride, bias):
    torch.manual_seed(2)
    c1 = nn.Conv1d(3, 4, 3, padding=padding, stride=stride, bias=bias).double()
    c2 = nn.Conv2d(3, 4, (1, 3), padding=(0, 1) if padding == "same" else (0, padding),
                   stride=(1, stride), bias=bias).double()
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        if bias:
            c2.bias.copy_(c1.bias)
    x = torch.randn(5, 3, 9, dtype=torch.float64)
    p1, p2 = precond(c1), precond(c2)
    c1(x).tanh().sum().backward()
    c2(x.unsqueeze(2)).tanh().sum().backward()
    p1.step()
    p2.step()
    l1, l2 = p1.layers[""], p2.layers[""]
    torch.testing.assert_close(l1.a_factor, l2.a_factor)
    torch.testing.assert_close(l1.g_factor, l2.g_factor)
    torch.testing.assert_close(c1.weight.grad, c2.weight.grad.squeeze(2))


def test_conv1d_unbatched_input():
    torch.manual_seed(3)
    c = nn.Conv1d(2, 3, 3).double()
    p = precond(c)
    c(torch.randn(2, 7, dtype=torch.float64)).sum().backward()
    p.step()
    assert p.layers[""].a_count == 1 and torch.isfinite(c.weight.grad).all()


def test_fused_qkv_linear_matches_oracle():
    """A fused QKV projection is a plain Linear on (N, T, d) rows."""
    torch.manual_seed(4)
    d, n, t = 4, 3, 5
    qkv = nn.Linear(d, 3 * d).double()
    x = torch.randn(n, t, d, dtype=torch.float64)
    out = {}
    p = precond(qkv, loss_average="tokens")
    y = qkv(x)
    y.register_hook(lambda g: out.setdefault("g", g))
    q, k, v = y.split(d, dim=-1)
    F.scaled_dot_product_attention(q, k, v).square().mean().backward()
    raw = torch.cat([qkv.weight.grad, qkv.bias.grad[:, None]], 1)
    p.step()
    xb = torch.cat([x.reshape(-1, d), torch.ones(n * t, 1, dtype=x.dtype)], 1)
    a = xb.T @ xb / (n * t)
    dd = out["g"].reshape(-1, 3 * d) * (n * t)
    g = dd.T @ dd / n
    exp = kron_solve(a, g, raw)
    torch.testing.assert_close(qkv.weight.grad, exp[:, :d])
    torch.testing.assert_close(qkv.bias.grad, exp[:, d])


def test_channels_last_conv2d_grads():
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    cl = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    cl.load_state_dict(ref.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    pr, pc = precond(ref), precond(cl)
    ref(x).square().sum().backward()
    cl(x.to(memory_format=torch.channels_last)).square().sum().backward()
    assert cl[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    pr.step()
    pc.step()
    for a, b in zip(ref.parameters(), cl.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    assert cl[0].weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_multihead_attention_projections_are_skipped():
    """MHA calls in_proj_weight and out_proj functionally: no hook fires, grads untouched."""
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"mha": mha, "head": nn.Linear(8, 3)})
    p = precond(model)
    x = torch.randn(2, 5, 8)
    model["head"](mha(x, x, x)[0]).square().mean().backward()
    raw_out, raw_in = mha.out_proj.weight.grad.clone(), mha.in_proj_weight.grad.clone()
    raw_head = model["head"].weight.grad.clone()
    p.step()
    assert torch.equal(mha.out_proj.weight.grad, raw_out)
    assert torch.equal(mha.in_proj_weight.grad, raw_in)
    assert not torch.equal(model["head"].weight.grad, raw_head)
    assert p.layers["mha.out_proj"].a_count == 0


# ---------------------------------------------------------------------------------------
# the layer classes themselves (kfac_fast.layers)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, cls, kind", [
    (nn.Linear(3, 2), layers.Linear, "linear"),
    (nn.Conv2d(2, 3, 3), layers.Conv, "conv2d"),
    (nn.Conv1d(2, 3, 3), layers.Conv, "conv2d"),
    (nn.Embedding(7, 4), layers.Embedding, "embedding"),
])
def test_registry_maps_module_types_to_classes(module, cls, kind):
    assert layers.is_layer(module) and layers.layer_class(module) is cls
    layer = layers.make_layer("m", module)
    assert type(layer) is cls and layer.kind == kind
    assert not layers.is_layer(nn.LayerNorm(3)) and layers.layer_class(nn.ReLU()) is None
    with pytest.raises(TypeError, match="nn.Linear"):
        layers.make_layer("n", nn.LayerNorm(3))


def test_unsupported_reasons_name_the_module_and_the_method():
    assert layers.unsupported_reason(nn.Conv2d(4, 4, 3, groups=2), "eigen").startswith("Conv2d with groups=2")
    assert "asymmetrically" in layers.unsupported_reason(nn.Conv1d(2, 2, 2, padding="same"), "eigen")
    assert "sparse=True" in layers.unsupported_reason(nn.Embedding(5, 2, sparse=True), "eigen")
    assert layers.unsupported_reason(nn.Embedding(5, 2), "ekfac") == \
        "Embedding with method='ekfac' (embeddings support 'eigen' only)"
    assert layers.unsupported_reason(nn.Linear(2, 2), "ekfac") is None


@pytest.mark.parametrize("module", [nn.Linear(3, 2), nn.Linear(3, 2, bias=False), nn.Conv2d(2, 3, 2),
                                    nn.Conv1d(2, 3, 2), nn.Embedding(6, 3)], ids=repr)
def test_grad_bar_and_write_grad_round_trip(module):
    """grad_bar() is dW_bar (g_dim, a_dim) (an embedding keeps W.grad's own (V, D) layout);
    write_grad(p, scale) writes scale * p back into weight.grad and bias.grad."""
    layer = layers.make_layer("m", module)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    raw = [p.grad.clone() for p in module.parameters()]
    bar = layer.grad_bar().clone()
    if layer.diagonal_a:
        assert bar.shape == (layer.a_dim, layer.g_dim)
    else:
        assert bar.shape == (layer.g_dim, layer.a_dim)
        torch.testing.assert_close(bar[:, :layer.in_dim].reshape(module.weight.shape), module.weight.grad)
    layer.write_grad(bar)
    assert all(torch.equal(p.grad, r) for p, r in zip(module.parameters(), raw))
    layer.write_grad(bar, scale=torch.tensor(0.5))
    assert all(torch.equal(p.grad, r * 0.5) for p, r in zip(module.parameters(), raw))
