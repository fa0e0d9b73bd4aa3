"""`python -m kfac_fast.demo_lm` (`make demo-lm`): the command line and the whole run.

Every method runs its two grid values for every seed, full length, on the same batches
(the methods take turns, so load on a shared machine falls on all alike); the table
reports each method's best value by the mean over seeds. One line per run goes
to stderr as it finishes; the table goes to stdout and the plot to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Optional

DESCRIPTION = ("Demo: K-FAC against AdamW, SOAP and Muon on a small causal character transformer "
               "(text made by a grammar, no download).")
DEFAULT_METHODS = "adamw,soap,muon,kfac,kfac-adam,kfac-opt"


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kfac_fast.demo_lm", description=DESCRIPTION)
    p.add_argument("--steps", type=int, default=200, help="training steps of every run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per grid value (0, 1, ...)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated subset of " + DEFAULT_METHODS)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--d", type=int, default=64, help="model width")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="demo_out", help="directory for the PNG")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds): for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.context, args.batch_size, args.d = 4, 1, 8, 4, 16
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in DEFAULT_METHODS.split(",")]
    if unknown or not keys:
        p.error(f"--methods: unknown {unknown}; choose from {DEFAULT_METHODS}")
    if args.steps < 1 or args.seeds < 1:
        p.error("--steps and --seeds must be at least 1")
    args.keys = keys
    return args


def missing_dependencies(keys: list) -> list:
    needed = ["matplotlib"] + (["heavyball"] if "soap" in keys else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if "muon" in keys:
        import torch

        if not hasattr(torch.optim, "Muon"):
            missing.append(f"torch.optim.Muon (torch >= 2.9; this is {torch.__version__})")
    return missing


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies(args.keys)
    if missing:
        print(f"kfac_fast.demo_lm needs {', '.join(missing)}: pip install 'kfac_fast[demo]' (and a newer "
              "torch for Muon), or leave soap / muon out of --methods", file=sys.stderr)
        return 2
    import torch

    from .methods import METHODS
    from .report import plot, table
    from .text import Corpus
    from .training import Setup, train, validation_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(steps=args.steps, batch=args.batch_size, context=args.context, d=args.d,
                  eval_every=max(1, args.steps // 10), eval_windows=16 if args.quick else 256)
    corpus = Corpus(train_chars=20_000 if args.quick else 200_000, val_chars=4_000 if args.quick else 20_000)
    evaluation = validation_windows(corpus, setup)
    total = sum(len(METHODS[k].grid) for k in args.keys) * args.seeds
    print(f"{DESCRIPTION}\n{args.steps} steps, batch {setup.batch} x context {setup.context} characters, "
          f"d={setup.d}, {setup.blocks} blocks, {setup.heads} heads, vocabulary {corpus.vocab}; "
          f"{args.seeds} seed(s) per grid value; {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    runs, t_start = [], time.perf_counter()
    # round robin over the methods (seed by seed, grid point by grid point): a change in the
    # machine's load during the run then falls on every method alike, so the seconds compare
    for seed in range(args.seeds):
        for point in range(max(len(METHODS[k].grid) for k in args.keys)):
            for key in args.keys:
                method = METHODS[key]
                if point >= len(method.grid):
                    continue
                value = method.grid[point]
                run = train(key, value, corpus, setup, seed, evaluation)
                runs.append(run)
                print(f"[{len(runs)}/{total}] {method.name} {method.knob}={value:g} seed {seed}: "
                      f"{'diverged' if run.diverged else format(run.losses[-1], '.3f')} "
                      f"in {run.seconds[-1]:.1f} s", file=sys.stderr, flush=True)
    print("\nvalidation loss (nats/char) after the same steps, mean ± std over seeds, best grid value per method;")
    print("'at AdamW s': at AdamW's training seconds; 'AdamW final at': the step reaching AdamW's final loss; "
          "'x AdamW': s/step over AdamW's")
    for line in table(runs):
        print(line)
    for key in args.keys:
        print(f"  {METHODS[key].name}: grid {METHODS[key].knob} {METHODS[key].grid}; {METHODS[key].note}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "demo_lm.png")
    plot(runs, path, f"char transformer, {args.steps} steps, {args.seeds} seed(s)")
    print(f"plot: {path}; total {time.perf_counter() - t_start:.0f} s")
    return 0
