"""kfac_fast.KFAC on attention models (issue 19): the Fisher products take a double
backward, which torch's fused attention kernels do not have. `fvp.twice_differentiable`
runs the graph-bearing forward with the math kernel, so models built on
F.scaled_dot_product_attention or nn.MultiheadAttention train unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_fast

VOCAB, D, HEADS, T = 11, 16, 2, 8


class TinyLM(nn.Module):
    """Embedding, one causal attention block (SDPA, MultiheadAttention or an explicit
    softmax), a Linear head."""

    def __init__(self, attention: str) -> None:
        super().__init__()
        self.attention = attention
        self.emb = nn.Embedding(VOCAB, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.mha = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.emb(tokens)
        n, t, _ = z.shape
        if self.attention == "mha":
            mask = torch.ones(t, t, dtype=torch.bool, device=z.device).triu(1)
            a, _ = self.mha(z, z, z, attn_mask=mask, need_weights=False)
            return self.head(z + a)
        q, k, v = self.qkv(z).view(n, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the same attention written out: differentiable twice everywhere
            scores = (q @ k.mT) / (D // HEADS) ** 0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            a = scores.softmax(-1) @ v
        return self.head(z + self.out(a.transpose(1, 2).reshape(n, t, D)))


def _train(model, steps=3, dtype=torch.float32):
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (4, T), generator=gen)
    y = torch.randint(0, VOCAB, (4, T), generator=gen)
    opt = kfac_fast.KFAC(model, loss="cross_entropy", method="eigen", inv_update_steps=1,
                         generator=torch.Generator().manual_seed(2))

    def closure():
        out = model(x).reshape(-1, VOCAB)
        return F.cross_entropy(out, y.reshape(-1)), out

    return [float(opt.step(closure)) for _ in range(steps)]


@pytest.mark.parametrize("attention", ["sdpa", "mha"])
def test_kfac_trains_fused_attention_models_unchanged(attention):
    torch.manual_seed(0)
    losses = _train(TinyLM(attention), steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_kfac_on_sdpa_equals_the_explicit_attention_in_float64():
    torch.manual_seed(0)
    sdpa = TinyLM("sdpa")
    explicit = copy.deepcopy(sdpa)
    explicit.attention = "explicit"
    got = _train(sdpa, dtype=torch.float64)
    want = _train(explicit, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-10, atol=0)
    for p, q in zip(sdpa.parameters(), explicit.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
