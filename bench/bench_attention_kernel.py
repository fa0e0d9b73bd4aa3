"""What `kfac_fast.fvp.twice_differentiable` costs: one training forward + backward of a
small causal transformer with torch's default (fused) attention kernel against the math
kernel that KFAC's graph-bearing forward uses. Interleaved rounds, medians, same run.

    python bench/bench_attention_kernel.py [--device cuda] [--rounds 20]

Defaults: the size issue 19 reported its measurements at (2 pre-LN blocks, d=128, 4 heads,
context 64, batch 32); `make demo-lm` runs a smaller one (d=64, context 32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kfac_fast.demo_lm.model import CharTransformer
from kfac_fast.fvp import twice_differentiable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--d", type=int, default=128)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    lm = CharTransformer(65, d=args.d, heads=4, blocks=2, context=args.context).to(device)
    x = torch.randint(0, 65, (args.batch, args.context), device=device)
    y = torch.randint(0, 65, (args.batch, args.context), device=device)

    def step() -> None:
        lm.zero_grad(set_to_none=True)
        F.cross_entropy(lm(x).reshape(-1, 65), y.reshape(-1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def math_step() -> None:
        with twice_differentiable():
            step()

    times: dict[str, list[float]] = {"default kernel": [], "math kernel": []}
    for fn in (step, math_step):  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in (("default kernel", step), ("math kernel", math_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["default kernel"])
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"context {args.context}, d {args.d}: forward+backward, median of {args.rounds}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:15s} {m * 1e3:8.2f} ms  x{m / base:.2f}")


if __name__ == "__main__":
    main()
