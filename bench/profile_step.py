"""Where a training step's time goes on a GPU: torch.profiler over one round (10 steps) of
bench/bench_step.py's Trainer, per network and variant. Prints per variant the wall time
per step, the GPU kernel time per step, the host syncs (cudaStreamSynchronize,
cudaDeviceSynchronize, device-to-host copies) and the top ops by self CPU and by self GPU
time; full tables go to --out.

    python bench/profile_step.py --out DIR [--device cuda] [--networks cnn ...] [--variants kfac_inv10 ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import STEPS_PER_ROUND, Trainer

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _gpu_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_one(network: str, variant: str, out: str, device: torch.device) -> None:
    t = Trainer(network, variant, device)
    for _ in range(2):  # warm-up: compiles, first refresh, allocator
        t.round()
    t0 = time.perf_counter()
    t.round()
    wall_ms = (time.perf_counter() - t0) * 1e3 / STEPS_PER_ROUND
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t.round()
    events = prof.key_averages()
    with open(os.path.join(out, f"profile_{network}_{variant}.txt"), "w") as f:
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))
        f.write("\n")
        f.write(events.table(sort_by="self_cuda_time_total", row_limit=40))
    gpu_total = sum(_gpu_us(e) for e in events) / 1e3 / STEPS_PER_ROUND
    syncs = {e.key: e.count for e in events if e.key in SYNC_CALLS or "DtoH" in e.key or e.key == "aten::item"
             or e.key == "aten::_local_scalar_dense"}
    print(f"\n## {network} {variant}: wall {wall_ms:.2f} ms/step, GPU kernels {gpu_total:.2f} ms/step; "
          f"per round: {syncs}")
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print("  self CPU ms/step: " + "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / 1e3 / STEPS_PER_ROUND:.2f} "
                                             f"(x{e.count})" for e in by_cpu))
    by_gpu = sorted(events, key=_gpu_us, reverse=True)[:6]
    print("  self GPU ms/step: " + "; ".join(f"{e.key[:48]} {_gpu_us(e) / 1e3 / STEPS_PER_ROUND:.2f} "
                                             f"(x{e.count})" for e in by_gpu))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--networks", nargs="+", default=["cnn", "autoencoder"])
    p.add_argument("--variants", nargs="+", default=["kfac_inv10", "unfused_inv10", "kfac_inv1"])
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for network in args.networks:
        for variant in args.variants:
            profile_one(network, variant, args.out, torch.device(args.device))


if __name__ == "__main__":
    main()
