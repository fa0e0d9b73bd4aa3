"""End-to-end training step of a GPT-style stack: AdamW alone vs kfac_fast vs unfused K-FAC.

The model uses plain nn.Linear / nn.LayerNorm and F.scaled_dot_product_attention so every
projection (fused QKV, attention out, the MLP pair) is a registered K-FAC layer; the
token embedding and the tied-free LM head are skipped (an embedding-sized A would
dominate). Variants, side by side in one benchmark group per size:
- adamw: forward, backward, AdamW step (bf16 autocast on GPU);
- kfac: the same plus `KFACPreconditioner.step()`, factors every step, eigen
  decompositions every 10 steps, loss averaged over tokens;
- unfused: the same settings with bench/unfused.py's UnfusedKFAC;
- kfac_amortised (issue 19's GPU target: a K-FAC step at most 1.5x an AdamW step): the
  preconditioner with factors every 10 steps and a refresh every 100, then AdamW;
- eigen_adam: `kfac_fast.EigenAdam` (Adam in K-FAC's eigenbasis) with the same cadence.
One round is 10 steps (exactly one refresh), 100 for the amortised variants (one
refresh, ten factor updates); `main` prints per-step means over whole rounds, the
pytest benchmarks (the first three variants) per-round times.

Sizes: "gpt_small" (12 blocks, d=768, seq 1024, batch 8; GPU only, skipped on CPU) and
"gpt_tiny" (2 blocks, d=64, seq 32, batch 4; any device).

    pytest bench/bench_e2e.py
    python bench/bench_e2e.py --size gpt_tiny [--rounds 3] [--variants adamw,kfac_amortised,eigen_adam]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unfused import UnfusedKFAC

STEPS_PER_ROUND = 10
SIZES = {"gpt_small": dict(blocks=12, d=768, heads=12, seq=1024, batch=8, vocab=50304, gpu_only=True),
         "gpt_tiny": dict(blocks=2, d=64, heads=4, seq=32, batch=4, vocab=256, gpu_only=False)}
VARIANTS = ("adamw", "kfac", "unfused")
ALL_VARIANTS = VARIANTS + ("kfac_amortised", "eigen_adam")
KFAC_KW = dict(factor_update_steps=1, inv_update_steps=10, damping=1e-1, kl_clip=1e-3, lr=1e-4)
# issue 19's GPU target cadence: factors every 10 steps, a refresh every 100
AMORTISED_KW = dict(KFAC_KW, factor_update_steps=10, inv_update_steps=100)
ROUND_STEPS = {"kfac_amortised": 100, "eigen_adam": 100}
SKIP = ("wte", "lm_head")


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, blocks: int, d: int, heads: int, seq: int, vocab: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        return self.lm_head(self.ln_f(self.blocks(self.wte(idx) + self.wpe[: idx.shape[1]])))


class Trainer:
    def __init__(self, size: str, variant: str, device: torch.device, seed: int = 0):
        cfg = SIZES[size]
        torch.manual_seed(seed)
        self.model = GPT(cfg["blocks"], cfg["d"], cfg["heads"], cfg["seq"], cfg["vocab"]).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.precond = None
        self.steps_per_round = ROUND_STEPS.get(variant, STEPS_PER_ROUND)
        if variant in ("kfac", "kfac_amortised"):
            from kfac_fast import KFACPreconditioner
            kw = KFAC_KW if variant == "kfac" else AMORTISED_KW
            self.precond = KFACPreconditioner(self.model, skip_layers=SKIP, loss_average="tokens", **kw)
        elif variant == "eigen_adam":
            from kfac_fast import EigenAdam
            self.opt = EigenAdam(self.model, lr=1e-4, damping=KFAC_KW["damping"], skip_layers=SKIP,
                                 loss_average="tokens", factor_update_steps=10, inv_update_steps=100)
        elif variant == "unfused":
            names = [n for n, _ in self.model.named_modules() if n.startswith(SKIP)]
            self.precond = UnfusedKFAC(self.model, skip_layers=names, **KFAC_KW)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.idx = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device)
        self.vocab = cfg["vocab"]
        self.device = device

    def step(self):
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        self.opt.zero_grad(set_to_none=True)
        with autocast:
            logits = self.model(self.idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, self.vocab).float(), self.idx[:, 1:].reshape(-1))
        loss.backward()
        if self.precond is not None:
            self.precond.step()
        self.opt.step()

    def round(self):
        for _ in range(self.steps_per_round):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", list(SIZES))
def test_e2e_step(benchmark, size, variant):
    device = _device()
    if SIZES[size]["gpu_only"] and device.type != "cuda":
        pytest.skip(f"{size} needs a GPU")
    trainer = Trainer(size, variant, device)
    trainer.round()  # warm-up: allocations, first refresh, kernel compilation
    benchmark.group = f"e2e-{size}"
    benchmark.extra_info.update(steps_per_round=STEPS_PER_ROUND, variant=variant)
    benchmark.pedantic(trainer.round, rounds=3, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="gpt_tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, adamw first (the baseline); from {', '.join(ALL_VARIANTS)}")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown or variants[0] != "adamw":
        parser.error(f"--variants: adamw first, then any of {ALL_VARIANTS}; got {args.variants!r}")
    torch.set_num_threads(args.threads)
    device = _device()
    if SIZES[args.size]["gpu_only"] and device.type != "cuda":
        sys.exit(f"{args.size} needs a GPU")
    print(f"size={args.size} device={device} threads={args.threads} torch={torch.__version__}")
    base = None
    for variant in variants:
        trainer = Trainer(args.size, variant, device)
        trainer.round()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            trainer.round()
            times.append((time.perf_counter() - t0) / trainer.steps_per_round)
        best = min(times)
        base = base or best
        print(f"{variant:15s} {best * 1e3:9.2f} ms/step  x{best / base:5.2f} of adamw")


if __name__ == "__main__":
    main()
