"""Op-level benchmark: kfac_fast.ops against the unfused per-layer torch sequence.

Layers: the 12 Linear layers of the demo's CURVES autoencoder (784-400-...-6-...-784),
with inputs and output gradients captured from one real forward/backward on a batch of
CURVES-like images, so the factors have realistic spectra. Per op family, side by side
(one benchmark group each):
- factors: `ops.update_factors_` (A with the ones column, G) vs per layer
  GEMM + symmetrise + scale + add (bench/unfused.py);
- eigh: `ops.eigh` on all 24 factors vs a per-factor torch.linalg.eigh loop;
- precondition: `ops.precondition_eigen_` with the fused KL clip vs per-layer
  preconditioning with a host sync per layer.

    pytest bench/bench_ops.py                 # pytest-benchmark, groups side by side
    python bench/bench_ops.py --table         # plain table: op, kfac_fast ms, unfused ms, ratio

Threads: pinned by bench/conftest.py (pytest) or --threads (script), default 2.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import unfused

BATCH = 512
DAMPING, LR, KL_CLIP, BETA = 1e-2, 0.1, 1e-2, 0.95


class Workload:
    """Captured per-layer inputs/output grads, factors, eigendecompositions and grads."""

    def __init__(self, device: torch.device, batch: int = BATCH, seed: int = 0):
        from kfac_fast.curves import make_curves
        from kfac_fast.demo import bce_loss, build_autoencoder

        model = build_autoencoder(seed).to(device)
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs, gs = [], []

        def capture(module, inputs, output):  # returns None: must not replace the output
            xs.append(inputs[0].detach())
            output.register_hook(lambda g: gs.append(g.detach()))

        for lin in self.linears:
            lin.register_forward_hook(capture)
        x = make_curves(batch, seed=seed).to(device)
        bce_loss(model(x), x).backward()
        self.xs = xs
        self.gs = [g * batch for g in reversed(gs)]  # docs/design.md's d = N * grad_output
        self.append = [True] * len(xs)
        n = len(xs)
        self.a = [torch.eye(x.shape[1] + 1, device=device) for x in xs]
        self.g = [torch.eye(g.shape[1], device=device) for g in self.gs]
        self.alphas_a = [(1 - BETA) / batch] * n
        self.alphas_g = [(1 - BETA) / batch] * n
        # Factors that look like a running average of real statistics.
        for f, r, s in zip(self.a, self.xs, self.alphas_a):
            f.copy_(torch.cat([r, r.new_ones(r.shape[0], 1)], 1).t() @ torch.cat([r, r.new_ones(r.shape[0], 1)], 1)
                    * (s / (1 - BETA)))
        for f, r, s in zip(self.g, self.gs, self.alphas_g):
            f.copy_(r.t() @ r * (s / (1 - BETA)))
        self.da, self.qa = unfused.eigh_loop(self.a)
        self.dg, self.qg = unfused.eigh_loop(self.g)
        self.wgrads = [lin.weight.grad.clone() for lin in self.linears]
        self.bgrads = [lin.bias.grad.clone() for lin in self.linears]
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- kfac_fast -------------------------------------------------------------------
    def fast_factors(self) -> None:
        from kfac_fast import ops

        ops.update_factors_(self.a, self.xs, BETA, self.alphas_a, append_ones=True)
        ops.update_factors_(self.g, self.gs, BETA, self.alphas_g, append_ones=False)
        self.sync()

    def fast_eigh(self) -> None:
        from kfac_fast import ops

        ops.eigh(self.a + self.g)
        self.sync()

    def fast_precondition(self) -> None:
        from kfac_fast import ops

        wg = [w.clone() for w in self.wgrads]
        bg = [b.clone() for b in self.bgrads]
        ops.precondition_eigen_(wg, bg, self.qa, self.da, self.qg, self.dg, DAMPING, lr=LR, kl_clip=KL_CLIP)
        self.sync()

    # --- unfused per-layer sequence --------------------------------------------------
    def unfused_factors(self) -> None:
        rows = [torch.cat([x, x.new_ones(x.shape[0], 1)], 1) for x in self.xs]  # per-layer copy
        unfused.factor_updates_(self.a, rows, [BETA] * len(rows), [1.0 / BATCH] * len(rows))
        unfused.factor_updates_(self.g, self.gs, [BETA] * len(rows), [1.0 / BATCH] * len(rows))
        self.sync()

    def unfused_eigh(self) -> None:
        unfused.eigh_loop(self.a + self.g)
        self.sync()

    def unfused_precondition(self) -> None:
        wg = [w.clone() for w in self.wgrads]
        bg = [b.clone() for b in self.bgrads]
        unfused.precondition_layers_(wg, bg, self.qa, self.da, self.qg, self.dg, DAMPING, lr=LR, kl_clip=KL_CLIP)
        self.sync()


OPS = ("factors", "eigh", "precondition")
IMPLS = ("kfac_fast", "unfused")
_WORKLOADS: dict = {}


def workload(device: torch.device) -> Workload:
    if device not in _WORKLOADS:
        _WORKLOADS[device] = Workload(device)
    return _WORKLOADS[device]


def _fn(w: Workload, op: str, impl: str):
    return getattr(w, ("fast_" if impl == "kfac_fast" else "unfused_") + op)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, device, op, impl):
    w = workload(device)
    fn = _fn(w, op, impl)
    fn()  # warm-up: dispatch caches, first-call allocations, kernel compilation
    benchmark.group = f"ops:{op} (demo autoencoder, 12 layers, batch {BATCH})"
    benchmark.extra_info.update(op=op, impl=impl)
    if op == "eigh":  # seconds per call on CPU: a few rounds suffice
        benchmark.pedantic(fn, rounds=3, iterations=1)
    else:
        benchmark(fn)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def table(device: torch.device, reps: int) -> str:
    """Plain-text table of median times, kfac_fast vs unfused, for each op family."""
    w = workload(device)
    lines = [f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
             f"demo autoencoder (12 Linear layers), batch {BATCH}, median of {reps}",
             f"{'op':<14}{'kfac_fast ms':>14}{'unfused ms':>12}{'ratio':>8}"]
    for op in OPS:
        ms = []
        for impl in IMPLS:
            fn = _fn(w, op, impl)
            fn()
            ms.append(_median_ms(fn, max(3, reps // 4) if op == "eigh" else reps))
        lines.append(f"{op:<14}{ms[0]:>14.2f}{ms[1]:>12.2f}{ms[1] / ms[0]:>7.2f}x")
    lines.append("ratio = unfused / kfac_fast (above 1: kfac_fast is faster)")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", action="store_true", help="print the plain table (the only mode)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(table(dev, a.reps))
