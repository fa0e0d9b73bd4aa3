"""The demo's causal character transformer (pre-LayerNorm GPT blocks, GELU MLP, untied
head) and its validation loss in nats per character."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)); attention through
    F.scaled_dot_product_attention (causal), so the fused kernels run where torch has them."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"Block: d ({d}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, t, d = z.shape
        q, k, v = self.qkv(self.ln1(z)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        z = z + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return z + self.mlp(self.ln2(z))


class CharTransformer(nn.Module):
    """Token and position embeddings, `blocks` pre-LN blocks, a final LayerNorm and an
    untied Linear head to `vocab` logits."""

    def __init__(self, vocab: int, *, d: int = 64, heads: int = 4, blocks: int = 2, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(blocks)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.ln(self.blocks(z)))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens (nats per character)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> float:
    """Mean nats per character over fixed validation windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, inputs.shape[0], chunk):
        logits = model(inputs[i:i + chunk])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[i:i + chunk].reshape(-1),
                                       reduction="sum"))
    model.train(was_training)
    return total / targets.numel()
