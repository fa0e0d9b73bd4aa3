"""kfac_fast.KFAC: cost of one step against SGD, and where the step's time goes.

The model is the demo's CURVES autoencoder (784-400-200-100-50-25-6 and its mirror,
logistic units) at batch 512; factors every step, inverses every T2 = 20 steps, the
damping adapted every T1 = 5 steps, the gamma search every T3 = 20 steps (paper
settings), so a run of 20 steps contains each periodic event once.

    pytest bench/bench_optimizer.py --benchmark-only     # KFAC vs SGD, 20 steps a round
    python bench/bench_optimizer.py [--steps 40] [--batch 512] [--threads 2] [--method eigen] [--settings demo]

The script form prints the per-step split: forward (every closure call, including the
loss re-evaluations of the damping adaptation and gamma search), factor statistics, MC
backward, Fisher-vector products (their backward also yields the gradient), inversion,
preconditioning, and the rest. Phases are
timed by wrapping the preconditioner's and the Fisher products' methods (on a GPU the
wrappers synchronise, which costs a little overlap). It ends with the last step's
`opt.last_metrics` (docs/optimizer.md), read once after the timing.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time

import pytest
import torch

from kfac_fast import KFAC
from kfac_fast.curves import make_curves
from kfac_fast.demo import KFAC_OPT_SETTINGS, bce_loss, build_autoencoder
from kfac_fast.fvp import FisherProducts

STEPS = 20


def _problem(batch: int, device):
    torch.manual_seed(0)
    data = make_curves(batch, seed=0).to(device)
    return build_autoencoder(0).to(device), data


def _kfac_steps(model, opt, data, steps):
    for _ in range(steps):
        def closure():
            out = model(data)
            return bce_loss(out, data), out
        opt.step(closure)


def _sgd_steps(model, opt, data, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        bce_loss(model(data), data).backward()
        opt.step()


@pytest.mark.parametrize("method", ["sgd", "kfac-inverse"])
def test_step_cost(benchmark, device, method):
    model, data = _problem(512, device)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        run = lambda: _sgd_steps(model, opt, data, STEPS)  # noqa: E731
    else:
        opt = KFAC(model, "bce_with_logits", method=method.split("-")[1])
        run = lambda: _kfac_steps(model, opt, data, STEPS)  # noqa: E731

    def call():
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up: allocation of factors and inverses
    benchmark.pedantic(call, rounds=3, iterations=1)
    benchmark.extra_info["steps_per_round"] = STEPS


# ---------------------------------------------------------------------------- split
class PhaseTimer:
    """Accumulates wall time per phase name; nested phases are subtracted from parents."""

    def __init__(self, device):
        self.device = device
        self.total = collections.defaultdict(float)
        self._stack: list = []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name):
        self._sync()
        t0 = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            self._sync()
            dt = time.perf_counter() - t0
            inner = self._stack.pop()
            self.total[name] += dt - inner
            if self._stack:
                self._stack[-1] += dt

    def wrap(self, obj, attr, name):
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(obj, attr, wrapped)


# the last step's record, set by split() (kept out of its return value, which sums to the step)
LAST_METRICS: dict = {}


def split(steps: int, batch: int, device, method: str = "inverse", settings: str = "paper") -> dict:
    """Mean seconds per step by phase for `steps` KFAC steps (after 2 warm-up steps).

    settings "paper": KFAC's defaults (the paper's constants) with `method`; "demo": the
    demo's KFAC (paper) row (kfac_fast.demo.KFAC_OPT_SETTINGS, which fix the method).
    """
    model, data = _problem(batch, device)
    if settings == "demo":
        opt = KFAC(model, "bce_with_logits", **KFAC_OPT_SETTINGS)
    else:
        opt = KFAC(model, "bce_with_logits", method=method)
    _kfac_steps(model, opt, data, 2)
    timer = PhaseTimer(device)
    pre = opt.preconditioner
    timer.wrap(pre, "_update_factors", "factor statistics")
    timer.wrap(pre, "sample_fisher", "MC backward")
    timer.wrap(pre, "_refresh", "inversion")
    timer.wrap(pre, "_precondition", "preconditioning")
    original_init, original_gram = FisherProducts.__init__, FisherProducts.gram

    def init(self, *a, **k):
        with timer.phase("gradient + Fisher-vector products"):
            original_init(self, *a, **k)

    def gram(self, *a, **k):
        with timer.phase("gradient + Fisher-vector products"):
            return original_gram(self, *a, **k)

    FisherProducts.__init__, FisherProducts.gram = init, gram
    try:
        def closure():
            with timer.phase("forward (all closure calls)"):
                out = model(data)
                return bce_loss(out, data), out

        with timer.phase("step total"):
            for _ in range(steps):
                opt.step(closure)
    finally:
        FisherProducts.__init__, FisherProducts.gram = original_init, original_gram
    out = {k: v / steps for k, v in timer.total.items()}
    LAST_METRICS.clear()
    LAST_METRICS.update(opt.last_metrics.as_dict())
    # "step total" holds only what no named phase covered
    out["other (2x2 solve, updates, bookkeeping)"] = out.pop("step total")
    return out


def sgd_step_time(steps: int, batch: int, device) -> float:
    model, data = _problem(batch, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    _sgd_steps(model, opt, data, 2)
    t0 = time.perf_counter()
    _sgd_steps(model, opt, data, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="KFAC per-step cost split")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", default="inverse", choices=["inverse", "eigen"])
    p.add_argument("--settings", default="paper", choices=["paper", "demo"],
                   help="paper: KFAC's defaults with --method; demo: the demo's KFAC (paper) row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sgd = sgd_step_time(args.steps, args.batch, device)
    parts = split(args.steps, args.batch, device, args.method, args.settings)
    total = sum(parts.values())
    what = (f"demo settings {KFAC_OPT_SETTINGS}" if args.settings == "demo"
            else f"paper settings, method {args.method}")
    print(f"CURVES autoencoder, batch {args.batch}, {args.steps} steps, device {device}, "
          f"{torch.get_num_threads()} threads, {what}, torch {torch.__version__}")
    print(f"{'phase':<42}{'ms/step':>9}{'share':>8}")
    for name, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{name:<42}{1e3 * sec:>9.2f}{sec / total:>8.1%}")
    print(f"{'KFAC step':<42}{1e3 * total:>9.2f}")
    print(f"{'SGD step (forward+backward+update)':<42}{1e3 * sgd:>9.2f}   KFAC/SGD = {total / sgd:.2f}")
    print("last step's opt.last_metrics: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in LAST_METRICS.items()))


if __name__ == "__main__":
    main()
