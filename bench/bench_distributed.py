"""Data-parallel K-FAC on gloo: bytes and time per step for 1, 2 and 4 CPU ranks.

    python bench/bench_distributed.py [--worlds 1 2 4] [--steps 20] [--batch-size 512] [--json out.json]

The network is the demo's CURVES autoencoder (784-400-200-100-50-25-6 and its mirror,
12 Linear layers), trained with plain data parallelism (gradients averaged with
`average_gradients_`, identical for every variant) and inv_update_steps=10, so a
20-step run holds two inversion steps. Variants:

- `fast/comm`: kfac_fast.distributed, strategy "communication", factor_sync "inverse"
  (packed triangles averaged before each inversion, decompositions shared out and
  broadcast);
- `fast/comm/update`: the same, factors averaged after every update;
- `fast/mem`: strategy "memory" (owners precondition, gradients broadcast every step);
- `baseline`: every factor all-reduced in full, layer by layer, after every update
  (two collectives per layer per step), and every rank inverts every factor.

Reported per rank and averaged over ranks: K-FAC bytes per step (payload of the
collectives K-FAC issues, gradient averaging excluded), seconds per `precond.step()`
and per whole training step. Each rank runs one torch thread; with more ranks than
cores the ranks share cores and times grow for that reason too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kfac_fast import KFACPreconditioner
from kfac_fast import distributed as kd
from kfac_fast.curves import make_curves
from kfac_fast.demo import bce_loss, build_autoencoder

KFAC = dict(lr=0.1, damping=3e-2, kl_clip=1e-2, inv_update_steps=10, factor_update_steps=1)
VARIANTS = ("fast/comm", "fast/comm/update", "fast/mem", "baseline")


class LayerByLayer(KFACPreconditioner):
    """The baseline: full factors all-reduced one by one after every factor update
    (kfac-pytorch without its inversion sharing); every rank inverts every factor."""

    sent = 0

    def _update_factors(self, layers):  # the held-capture path of one step
        super()._update_factors(layers)
        world = dist.get_world_size()
        for layer in layers:
            for factor in (layer.a_factor, layer.g_factor):
                dist.all_reduce(factor)
                factor.div_(world)
                self.sent += factor.numel() * factor.element_size()


def make_preconditioner(model, variant: str, world: int):
    if world == 1:
        return KFACPreconditioner(model, distributed=False, **KFAC)
    if variant == "baseline":
        return LayerByLayer(model, distributed=False, **KFAC)
    strategy = "memory" if variant == "fast/mem" else "communication"
    sync = "update" if variant.endswith("/update") else "inverse"
    return KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy=strategy, factor_sync=sync),
                              **KFAC)


def kfac_bytes(precond) -> int:
    if isinstance(precond, LayerByLayer):
        return precond.sent
    return 0 if precond.distributed is None else sum(precond.distributed.bytes.values())


def run_variant(rank: int, world: int, variant: str, steps: int, batch: int, data) -> dict:
    model = build_autoencoder(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=KFAC["lr"], momentum=0.9)
    precond = make_preconditioner(model, variant, world)
    shard = batch // world
    step_times, kfac_times = [], []
    for step in range(steps):
        x = data[step * batch + rank * shard: step * batch + (rank + 1) * shard]
        start = time.perf_counter()
        optimizer.zero_grad()
        bce_loss(model(x), x).backward()
        if world > 1:
            kd.average_gradients_(model.parameters())
        mid = time.perf_counter()
        precond.step()
        optimizer.step()
        end = time.perf_counter()
        step_times.append(end - start)
        kfac_times.append(end - mid)
    precond.remove_hooks()
    return {"bytes_per_step": kfac_bytes(precond) / steps, "kfac_s": statistics.mean(kfac_times),
            "step_s": statistics.mean(step_times)}


def worker(rank: int, world: int, port: int, args, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    data = make_curves(args.steps * args.batch_size, seed=0)
    out = {}
    for variant in (VARIANTS if world > 1 else ("single",)):
        dist.barrier()
        out[variant] = run_variant(rank, world, variant, args.steps, args.batch_size, data)
    results.put((rank, out))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args) -> dict:
    ctx = mp.get_context("forkserver")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in range(world))
    for p in procs:
        p.join()
    # mean over ranks of each measure
    return {v: {k: statistics.mean(got[r][v][k] for r in range(world)) for k in got[0][v]}
            for v in got[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512, help="global batch")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    print(f"CURVES autoencoder, global batch {args.batch_size}, {args.steps} steps, inv_update_steps=10, "
          f"gloo, 1 torch thread per rank, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'ranks':>5}  {'variant':<17} {'K-FAC MiB/step':>14} {'K-FAC ms/step':>14} {'step ms':>9}")
    for world in args.worlds:
        for variant, r in run_world(world, args).items():
            rows.append({"world": world, "variant": variant, **r})
            print(f"{world:>5}  {variant:<17} {r['bytes_per_step'] / 2 ** 20:>14.3f} "
                  f"{r['kfac_s'] * 1e3:>14.1f} {r['step_s'] * 1e3:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
