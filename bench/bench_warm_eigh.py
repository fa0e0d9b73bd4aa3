"""Warm-started eigenbasis refresh vs a full torch.linalg.eigh, on a training-like drift.

Factors: zero-debiased running averages (decay 0.95) of sample covariances whose
generator drifts slowly, refreshed every 10 updates; one layer = an A and a G factor of
size n (float32). Per tol: mean time per refresh (warm_eigh of both factors vs a full
eigh of both), the fraction of factors kept / refined / solved, and the largest relative
error of the eigen-method preconditioned gradient against float64 exact bases.
`mean r`: the off-diagonal ratio of the exact previous bases on the new factors.

    python bench/bench_warm_eigh.py --table                 # CPU: n = 256, 512, 1024
    python bench/bench_warm_eigh.py --table --large         # n = 1024, 2048, 4096
    python bench/bench_warm_eigh.py --table --device cuda   # GPU (defaults to --large)
    pytest bench/bench_warm_eigh.py --benchmark-only        # pytest-benchmark, one refresh
"""
from __future__ import annotations

import argparse
import math
import time

import pytest
import torch

from kfac_fast.backends.warm_eigh import FULL, KEPT, REFINED, offdiag_ratio, warm_eigh

DECAY = 0.95
THREADS = 2
TOLS = (0.01, 0.03, 0.06)


def full_eigh(matrices):
    """The baseline the warm refresh falls back to: one batched eigh per size."""
    out = [None] * len(matrices)
    sizes: dict = {}
    for i, m in enumerate(matrices):
        sizes.setdefault(m.shape[0], []).append(i)
    for idx in sizes.values():
        d, q = torch.linalg.eigh(torch.stack([matrices[i] for i in idx]))
        for k, i in enumerate(idx):
            out[i] = (d[k], q[k])
    return [o[0] for o in out], [o[1] for o in out]


def drift_sequence(n, refreshes, seed, device, rows_per_update=None):
    """float32 factors at every 10th update (the first one is the cold start)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = rows_per_update or n
    basis = torch.linalg.qr(torch.randn(n, n, generator=g))[0].to(device)
    gen = torch.arange(1, n + 1, dtype=torch.float32, device=device).pow(-0.5)[:, None] * basis
    push = torch.randn(n, n, generator=g).to(device) / math.sqrt(n)
    factor = torch.zeros(n, n, device=device)
    for k in range(1, 10 * (refreshes + 1) + 1):
        z = torch.randn(rows, n, generator=g).to(device) @ (gen + 0.002 * k * push)
        beta = DECAY * (1 - DECAY ** (k - 1)) / (1 - DECAY ** k)
        factor = beta * factor + (1 - beta) * (z.T @ z) / rows
        if k % 10 == 0:
            yield factor.clone()


def precondition(grad, qa, da, qg, dg, damping):
    return qg @ ((qg.T @ grad @ qa) / (dg[:, None] * da[None, :] + damping)) @ qa.T


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def run_table(sizes, tols, refreshes, damping, device):
    rows = []
    for n in sizes:
        pairs = list(zip(drift_sequence(n, refreshes, 1, device),
                         drift_sequence(n, refreshes, 2, device)))
        full_eigh(list(pairs[0]))  # warm-up (library init, workspace)
        exact, t_full, drift = [], [], []
        g = torch.Generator(device="cpu").manual_seed(3)
        prev = full_eigh(list(pairs[0]))[1]
        for a, gf in pairs[1:]:
            # r of the exact previous bases on the new factors: how far a refresh moves
            drift.append(offdiag_ratio(torch.stack([a, gf]), torch.stack(prev)).mean().item())
            _, t = _timed(lambda a=a, gf=gf: full_eigh([a, gf]), device)
            t_full.append(t)
            (ea, eg), (va, vg) = full_eigh([a.double(), gf.double()])
            grad = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
            p = precondition(grad, va, ea.clamp_min(0), vg, eg.clamp_min(0), damping)
            exact.append((grad, p))
            prev = [va.float(), vg.float()]
        for tol in tols:
            prev = full_eigh(list(pairs[0]))[1]
            counts = [0, 0, 0]
            t_warm, errs = [], []
            for (a, gf), (grad, p_exact) in zip(pairs[1:], exact):
                (out, t) = _timed(lambda a=a, gf=gf, prev=prev, tol=tol: warm_eigh([a, gf], prev, tol,
                                                                                   full_solve=full_eigh),
                                  device)
                (da, dg), (qa, qg), paths = out
                t_warm.append(t)
                for path in paths.tolist():
                    counts[path] += 1
                p = precondition(grad, qa.double(), da.double(), qg.double(), dg.double(),
                                 damping)
                errs.append(((p - p_exact).norm() / p_exact.norm()).item())
                prev = [qa, qg]
            total = sum(counts)
            mean_warm = sum(t_warm) / len(t_warm)
            mean_full = sum(t_full) / len(t_full)
            rows.append((n, sum(drift) / len(drift), tol, 1e3 * mean_warm, 1e3 * mean_full, mean_full / mean_warm,
                         counts[KEPT] / total, counts[REFINED] / total, counts[FULL] / total,
                         max(errs)))
    return rows


def print_table(rows, device, damping, refreshes):
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# warm_eigh vs torch.linalg.eigh, float32, one layer (A and G of size n) per "
          f"refresh; {refreshes} refreshes; device {name}; threads {threads}; "
          f"damping {damping}; torch {torch.__version__}")
    print("| n | mean r | tol | warm ms | full eigh ms | speed-up | kept | refined | full "
          "| max P err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r, tol, tw, tf, su, kp, rf, fl, err in rows:
        print(f"| {n} | {r:.3f} | {tol:g} | {tw:.1f} | {tf:.1f} | {su:.2f}x | {kp:.0%} | {rf:.0%} | "
              f"{fl:.0%} | {err:.2%} |")


# ---- pytest-benchmark: one refresh of a drifted factor, warm vs full -------------------

@pytest.fixture(scope="module", params=[256, 512])
def drifted(request):
    torch.set_num_threads(THREADS)
    first, second = drift_sequence(request.param, 1, 1, torch.device("cpu"))
    return second, torch.linalg.eigh(first)[1]


def test_full_eigh(benchmark, drifted):
    a, _ = drifted
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark(torch.linalg.eigh, a)


@pytest.mark.parametrize("tol", [0.03, 0.1])
def test_warm_refresh(benchmark, drifted, tol):
    a, q = drifted
    benchmark.extra_info["threads"] = torch.get_num_threads()
    _, _, paths = benchmark(warm_eigh, [a], [q], tol, full_solve=full_eigh)
    benchmark.extra_info["path"] = ("kept", "refined", "full")[paths.item()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--large", action="store_true", help="n = 1024, 2048, 4096")
    parser.add_argument("--sizes", type=int, nargs="+", help="override the sizes")
    parser.add_argument("--tols", type=float, nargs="+", default=list(TOLS))
    parser.add_argument("--refreshes", type=int, default=6)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args()
    if not args.table:
        parser.error("script mode needs --table (or run it under pytest)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    large = args.large or device.type == "cuda"
    sizes = args.sizes or ([1024, 2048, 4096] if large else [256, 512, 1024])
    rows = run_table(sizes, args.tols, args.refreshes, args.damping, device)
    print_table(rows, device, args.damping, args.refreshes)


if __name__ == "__main__":
    main()
