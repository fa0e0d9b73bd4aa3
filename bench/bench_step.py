"""Training-step benchmark: SGD alone vs K-FAC (kfac_fast) vs the unfused per-layer K-FAC.

Networks: the demo's CURVES autoencoder (12 Linear layers, batch 512) and a small CNN
(three 3x3 convolutions, global pool and a Linear head on 3x32x32 inputs, batch 128). Variants, side by
side in one benchmark group per network:
- sgd: forward, backward, SGD-with-momentum step;
- kfac_inv1 / kfac_inv10: the same plus `KFACPreconditioner.step()`, factors every
  step, eigendecompositions every step / every 10 steps;
- kfac_inv10_warm: kfac_inv10 with warm-started refreshes (eigh_tol=0.03, see
  KFACPreconditioner's eigh_tol);
- unfused_inv1 / unfused_inv10: the same settings with bench/unfused.py's UnfusedKFAC
  (per-layer launches, per-layer host sync) as a drop-in preconditioner.
One benchmark round is 10 training steps (so every inv10 round contains exactly one
refresh); pytest-benchmark's times are per round: divide by 10 for per step (the
`--table` mode prints per-step times and the ratio to SGD).

    pytest bench/bench_step.py
    python bench/bench_step.py --table [--threads 2] [--rounds 3]

Targets (CPU): kfac_fast faster than unfused at equal settings; kfac_inv10 at most 3x
an SGD step on the demo network.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unfused import UnfusedKFAC

STEPS_PER_ROUND = 10
# A small lr keeps the 40 benchmarked steps far from divergence (NaN factors would make
# LAPACK fail); the step cost does not depend on it.
KFAC_KW = dict(factor_update_steps=1, damping=1e-1, factor_decay=0.95, kl_clip=1e-3, lr=1e-3)
VARIANTS = ("sgd", "kfac_inv1", "kfac_inv10", "kfac_inv10_warm", "unfused_inv1", "unfused_inv10")
# kfac_inv10_warm: warm-started refreshes (KFACPreconditioner(eigh_tol=WARM_TOL))
WARM_TOL = 0.03
NETWORKS = ("autoencoder", "cnn")


def small_cnn() -> nn.Module:
    """A CIFAR-sized CNN: three 3x3 convs (32, 64, 128 channels), global pool, Linear 128->10.

    The global pool keeps the head's A factor small (129^2): a flattened 4096-wide head
    would make one 4097^2 eigh dominate every variant.
    """
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


class Trainer:
    """One network, one optimiser and (maybe) one preconditioner; `round()` runs 10 steps."""

    def __init__(self, network: str, variant: str, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        if network == "autoencoder":
            from kfac_fast.curves import make_curves
            from kfac_fast.demo import bce_loss, build_autoencoder

            self.model = build_autoencoder(seed).to(device)
            x = make_curves(512, seed=seed).to(device)
            self.x, self.loss = x, lambda out: bce_loss(out, x)
        else:
            self.model = small_cnn().to(device)
            self.x = torch.randn(128, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (128,), device=device)
            self.loss = lambda out: nn.functional.cross_entropy(out, y)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=KFAC_KW["lr"], momentum=0.9)
        self.precond = None
        if variant != "sgd":
            kind, inv = variant.split("_inv")
            warm = inv.endswith("_warm")
            inv = inv.removesuffix("_warm")
            if kind == "kfac":
                from kfac_fast import KFACPreconditioner

                self.precond = KFACPreconditioner(self.model, inv_update_steps=int(inv),
                                                  eigh_tol=WARM_TOL if warm else None, **KFAC_KW)
            else:
                self.precond = UnfusedKFAC(self.model, inv_update_steps=int(inv), **KFAC_KW)
        self.device = device

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model(self.x)).backward()
        if self.precond is not None:
            self.precond.step()
        self.opt.step()

    def round(self) -> None:
        for _ in range(STEPS_PER_ROUND):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("network", NETWORKS)
def test_step(benchmark, device, network, variant):
    t = Trainer(network, variant, device)
    t.round()  # warm-up: first factors, first decomposition, allocator
    benchmark.group = f"step:{network} ({STEPS_PER_ROUND} training steps per round)"
    benchmark.extra_info.update(network=network, variant=variant, steps_per_round=STEPS_PER_ROUND)
    benchmark.pedantic(t.round, rounds=3, iterations=1)


def table(device: torch.device, rounds: int):
    """Yield the lines of a table: median ms per training step of every variant, x SGD."""
    yield from [f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
             f"median over {rounds} rounds of {STEPS_PER_ROUND} steps",
             f"{'network':<13}{'variant':<15}{'ms/step':>9}{'x SGD':>8}"]
    for network in NETWORKS:
        sgd = None
        for variant in VARIANTS:
            t = Trainer(network, variant, device)
            t.round()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                t.round()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times) / STEPS_PER_ROUND
            sgd = sgd or ms
            yield f"{network:<13}{variant:<15}{ms:>9.2f}{ms / sgd:>8.2f}"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="print the plain table (the only mode)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for line in table(dev, a.rounds):
        print(line, flush=True)
