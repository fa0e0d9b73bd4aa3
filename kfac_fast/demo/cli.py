"""`python -m kfac_fast.demo`: the command line, and the whole demo run.

The arguments are parsed before the demo's optional dependencies (the `demo` extra:
matplotlib, tqdm, heavyball) are looked for, so `--help` works without them and a
missing one is named with the extra that installs it. The progress bar is drawn only on
a terminal; otherwise (a log file, a pipe) each method prints one line when it is done.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Optional

import torch

from ..curves import entropy_floor, make_curves
from .methods import METHODS
from .report import format_table, plot, target_report
from .training import choose_lr, train

DESCRIPTION = "Demo: K-FAC against SGD with momentum, Adam and SOAP on a CURVES-like autoencoder."


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kfac_fast.demo", description=DESCRIPTION)
    p.add_argument("--steps", type=int, default=400, help="training steps of each final run")
    p.add_argument("--grid-steps", type=int, default=None, help="steps of each lr-grid run (default steps/8)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-size", type=int, default=20000, help="CURVES-like training images")
    p.add_argument("--methods", default="sgd,adam,soap,kfac,kfac-opt",
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_out", help="directory for the PNG")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds): for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.train_size = 6, 64, 256
        args.grid_steps = args.grid_steps or 2
    args.grid_steps = args.grid_steps or max(1, args.steps // 8)
    return args


def missing_dependencies(keys: list, progress_bar: bool) -> list:
    """The demo extra's modules this run needs that are not installed."""
    needed = ["matplotlib"] + (["tqdm"] if progress_bar else []) + (["heavyball"] if "soap" in keys else [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


class LineProgress:
    """The progress bar's interface, silent: off a terminal `main` prints a line per method."""

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None


def main(argv: Optional[list] = None) -> list:
    """Run the demo; returns the final runs."""
    args = parse_args(argv)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if "sgd" not in keys:
        keys.insert(0, "sgd")  # the step-cost column is relative to SGD
    interactive = sys.stderr.isatty()
    missing = missing_dependencies(keys, interactive)
    if missing:
        hint = " (or leave soap out of --methods)" if missing == ["heavyball"] else ""
        raise SystemExit(f"the demo needs {', '.join(missing)}, not installed: "
                         f"pip install 'kfac_fast[demo]'{hint}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    start = time.perf_counter()
    data = make_curves(args.train_size, seed=args.seed).to(device)
    floor = entropy_floor(data)
    eval_x = data[: min(2000, data.shape[0])]
    print(f"CURVES-like data (kfac_fast.curves, not the original set): {data.shape[0]} images, "
          f"entropy floor {floor:.3f} nats/image")
    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, "
          f"{args.steps} steps per method, lr chosen on {args.grid_steps}-step runs")

    total = sum(len(METHODS[k].lrs) * args.grid_steps + args.steps for k in keys)
    runs, grids = [], {}
    if interactive:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, unit="step", desc="training", dynamic_ncols=True)
    else:
        progress = LineProgress()
    with progress as bar:
        for key in keys:
            bar.set_postfix_str(f"{METHODS[key].name} lr grid")
            lr, grids[key] = choose_lr(key, data, grid_steps=args.grid_steps, batch_size=args.batch_size,
                                       seed=args.seed, eval_x=eval_x, bar=bar)
            bar.set_postfix_str(f"{METHODS[key].name} lr {lr:g}")
            r = train(key, lr, data, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      eval_x=eval_x, eval_every=max(1, args.steps // 40), final=True, bar=bar)
            bar.update(args.steps - r.steps[-1])  # a diverged run stops early
            runs.append(r)
            if not interactive:
                print(f"{METHODS[key].name} done: {METHODS[key].knob} {lr:g} chosen on the grid, "
                      f"{r.steps[-1]} steps in {r.seconds[-1]:.1f} s", flush=True)

    print("\ngrids (error on 2000 training images after the grid run; inf = diverged; the table's "
          "lr column holds the chosen point):")
    for key in keys:
        cells = ", ".join(f"{lr:g}: {e:.2f}" for lr, e in grids[key].items())
        print(f"  {METHODS[key].name:<14}{METHODS[key].knob} {cells}   [{METHODS[key].note}]")
    sgd_step = next(r.step_time for r in runs if r.method == "sgd")
    print()
    print(format_table(runs, floor, sgd_step))
    report = target_report(runs)
    if report:
        print("\ntargets (errors on the 2000-image evaluation subset, at equal steps or seconds):")
        print("\n".join("  " + line for line in report))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "curves_error.png")
    plot(runs, floor, path)
    print(f"\nwrote {path}; total run time {time.perf_counter() - start:.0f} s")
    return runs
