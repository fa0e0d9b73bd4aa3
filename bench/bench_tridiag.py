"""Block-tridiagonal against block-diagonal K-FAC (kfac_fast.KFAC, approx=...), one run.

The model is the demo's CURVES autoencoder (784-400-200-100-50-25-6 and its mirror,
logistic units, one nn.Sequential: 11 consecutive pairs) on CURVES-like data; the
paper's optimizer with method "inverse", no gamma search, inverses every T2 steps.

    pytest bench/bench_tridiag.py --benchmark-only      # per-step cost, both approximations
    python bench/bench_tridiag.py [--steps 60] [--batch 500] [--threads 2]

The script form prints, for both approximations in the same process: mean seconds of an
ordinary step and of a refresh step, the curvature state's bytes (and the tridiagonal
extra), and the training error on a fixed subset against steps, from the same
initialisation and batch order.
"""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from kfac_fast import KFAC
from kfac_fast.curves import make_curves
from kfac_fast.demo import bce_loss, build_autoencoder, training_error

APPROXIMATIONS = ("blockdiag", "tridiag")
SETTINGS = dict(damping=10.0, gamma_interval=None, inv_update_steps=20, factor_update_steps=1,
                method="inverse")


def _closure(model, xb):
    def closure():
        out = model(xb)
        return bce_loss(out, xb), out
    return closure


def _optimizer(model, approx: str) -> KFAC:
    return KFAC(model, "bce_with_logits", approx=approx, generator=torch.Generator().manual_seed(0),
                **SETTINGS)


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_step(benchmark, approx):
    """One round = 20 steps, so each round contains one inverse refresh."""
    torch.manual_seed(0)
    data = make_curves(256, seed=0)
    model = build_autoencoder(0)
    opt = _optimizer(model, approx)
    closure = _closure(model, data)
    opt.step(closure)  # first refresh out of the timing

    def steps():
        for _ in range(20):
            opt.step(closure)

    benchmark.pedantic(steps, rounds=2, iterations=1)
    benchmark.extra_info["curvature_bytes"] = opt.preconditioner.total_memory_usage()


def train(approx: str, data: torch.Tensor, eval_x: torch.Tensor, steps: int, batch: int,
          every: int) -> dict:
    model = build_autoencoder(0)
    opt = _optimizer(model, approx)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(1))
    curve, plain, refresh = [(0, training_error(model, eval_x))], [], []
    for step in range(steps):
        idx = order[(step * batch) % data.shape[0]:][:batch]
        t0 = time.perf_counter()
        opt.step(_closure(model, data[idx]))
        (refresh if step % SETTINGS["inv_update_steps"] == 0 else plain).append(time.perf_counter() - t0)
        if (step + 1) % every == 0:
            curve.append((step + 1, training_error(model, eval_x)))
    precond = opt.preconditioner
    extra = precond.tridiag_memory_usage() if hasattr(precond, "tridiag_memory_usage") else 0
    return {"curve": curve, "step": sum(plain) / max(len(plain), 1),
            "refresh": sum(refresh) / max(len(refresh), 1), "bytes": precond.total_memory_usage(),
            "extra": extra}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--train", type=int, default=5000, help="training images")
    p.add_argument("--every", type=int, default=10, help="steps between error evaluations")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = make_curves(args.train, seed=0)
    eval_x = data[:2000]
    results = {a: train(a, data, eval_x, args.steps, args.batch, args.every) for a in APPROXIMATIONS}
    print(f"CURVES-like autoencoder, batch {args.batch}, {args.steps} steps, CPU threads "
          f"{args.threads}, torch {torch.__version__}; {SETTINGS}")
    print(f"{'approx':<10}{'s/step':>9}{'s/refresh':>11}{'state MB':>10}{'tridiag MB':>12}")
    for a, r in results.items():
        print(f"{a:<10}{r['step']:>9.3f}{r['refresh']:>11.3f}{r['bytes'] / 2**20:>10.1f}"
              f"{r['extra'] / 2**20:>12.1f}")
    print("training error (nats per image, first 2000 training images) against steps")
    print(f"{'step':>6}" + "".join(f"{a:>12}" for a in APPROXIMATIONS))
    for rows in zip(*(results[a]["curve"] for a in APPROXIMATIONS)):
        print(f"{rows[0][0]:>6}" + "".join(f"{e:>12.2f}" for _, e in rows))
    return results


if __name__ == "__main__":
    main()
