"""Data-parallel K-FAC with DistributedDataParallel: the CURVES autoencoder on CURVES-like data.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 30] [--strategy memory]
        [--timeout 60] [--checkpoint run.ckpt]

Runs on CPU with gloo (NCCL when every rank has a GPU). Each rank trains on its own
shard of every global batch; DDP averages the gradients in backward, then K-FAC
preconditions them: factors averaged with bucketed all-reduces of their packed upper
triangles, eigendecompositions shared out across ranks. At the end every rank prints
its time in K-FAC's communication, inversions and preconditioning (measured with
`DistributedOptions(profile=True)`, which synchronises around each phase: leave it off
when training for real). `--timeout` bounds how long a rank waits in K-FAC's own
collectives for a failed or hung peer; `--checkpoint` saves an exact checkpoint at the end
(the collective `synced_state_dict()` on every rank, written by rank 0 alone).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kfac_fast import KFACPreconditioner, save_checkpoint
from kfac_fast.curves import make_curves
from kfac_fast.demo import bce_loss, build_autoencoder
from kfac_fast.distributed import DistributedOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (split across ranks)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--strategy", choices=("communication", "memory"), default="communication")
    parser.add_argument("--factor-sync", choices=("inverse", "update"), default="inverse")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds K-FAC's collectives wait for the other ranks (default: the group's)")
    parser.add_argument("--checkpoint", default=None, help="save an exact checkpoint here at the end")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} ranks")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    model = build_autoencoder(seed=0).to(device)  # same initial weights on every rank
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    precond = KFACPreconditioner(
        ddp, lr=args.lr, damping=3e-2, kl_clip=1e-2, inv_update_steps=10,
        distributed=DistributedOptions(strategy=args.strategy, factor_sync=args.factor_sync, profile=True,
                                       timeout=args.timeout))

    data = make_curves(args.steps * args.batch_size, seed=0).to(device)
    shard = args.batch_size // world
    start = time.perf_counter()
    for step in range(args.steps):
        batch = data[step * args.batch_size:(step + 1) * args.batch_size]
        x = batch[rank * shard:(rank + 1) * shard]
        optimizer.zero_grad()
        loss = bce_loss(ddp(x), x)  # a mean over the examples: loss_average="batch"
        loss.backward()             # DDP averages the gradients here
        precond.step()              # K-FAC rewrites .grad
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():8.3f}", flush=True)
    if use_cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    if args.checkpoint:
        state = precond.synced_state_dict()  # a collective: every rank, the same global state
        if rank == 0:  # saving is not a collective
            save_checkpoint(args.checkpoint, state, extra={"model": model.state_dict(), "step": args.steps})
            print(f"saved {args.checkpoint}", flush=True)

    kfac = precond.distributed  # None in a world of one: the single-process path
    if kfac is None:
        print(f"rank {rank}/{world}: {total:6.2f} s for {args.steps} steps (single process: no K-FAC "
              "communication)", flush=True)
        dist.destroy_process_group()
        return
    seconds, sent = kfac.seconds, kfac.bytes
    line = (f"rank {rank}/{world}: {total:6.2f} s for {args.steps} steps; K-FAC communication "
            f"{seconds['communication']:.3f} s, inversion {seconds['inversion']:.3f} s, preconditioning "
            f"{seconds['preconditioning']:.3f} s; sent {sum(sent.values()) / 2 ** 20:.1f} MiB "
            f"(factors {sent['factors'] / 2 ** 20:.1f}, decompositions {sent['decompositions'] / 2 ** 20:.1f}, "
            f"gradients {sent['gradients'] / 2 ** 20:.1f})")
    # one line per rank, in rank order
    for r in range(world):
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
