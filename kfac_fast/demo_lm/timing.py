"""`python -m kfac_fast.demo_lm.timing`: the per-step cost of each demo method against
AdamW's, measured by alternation.

On a shared machine the load changes during a run; the demo's table times each method
over its own runs. Here every repetition trains each method in turn (its demo setting,
no evaluation, `--steps` steps at the demo's sizes) and the median seconds per step over
the repetitions is compared with AdamW's, which makes the ratio robust to a burst of
load in one run.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Optional

import torch

from ..optimizer import KFAC
from .methods import METHODS
from .model import CharTransformer, token_loss
from .text import Corpus
from .training import _closure

SETTINGS = {"adamw": 1e-2, "soap": 1e-2, "muon": 0.02, "kfac": 0.01, "kfac-adam": 1e-2, "kfac-opt": 0.1}


def seconds_per_step(key: str, corpus: Corpus, steps: int, seed: int, *, d: int = 64, context: int = 32,
                     batch: int = 32) -> float:
    """Training seconds per step of METHODS[key] at its demo setting (SETTINGS)."""
    torch.manual_seed(seed)
    model = CharTransformer(corpus.vocab, d=d, heads=4, blocks=2, context=context)
    opt, precond = METHODS[key].make(model, SETTINGS[key])
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = corpus.batch(corpus.train, batch, context, gen)
        if isinstance(opt, KFAC):
            opt.step(functools.partial(_closure, model, x, y))
            continue
        opt.zero_grad(set_to_none=True)
        token_loss(model(x), y).backward()
        if precond is not None:
            precond.step()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kfac_fast.demo_lm.timing", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="adamw,soap,muon,kfac,kfac-adam")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="tiny run: for tests")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    if "adamw" not in keys or any(k not in SETTINGS for k in keys):
        p.error(f"--methods: include adamw; choose from {','.join(SETTINGS)}")
    if args.reps < 1 or args.steps < 1:
        p.error("--reps and --steps must be at least 1")
    sizes = dict(d=16, context=8, batch=4) if args.quick else {}
    corpus = Corpus(train_chars=5_000, val_chars=1_000) if args.quick else Corpus()
    times: dict = {k: [] for k in keys}
    for rep in range(args.reps):
        for key in keys:
            times[key].append(seconds_per_step(key, corpus, args.steps, rep, **sizes))
    base = statistics.median(times["adamw"])
    print(f"{args.reps} alternations of {args.steps} steps; {torch.get_num_threads()} CPU threads")
    for key in keys:
        med = statistics.median(times[key])
        print(f"{METHODS[key].name:16s} {med:.4f} s/step {med / base:5.2f}x AdamW  (runs: "
              + " ".join(f"{t:.4f}" for t in times[key]) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
