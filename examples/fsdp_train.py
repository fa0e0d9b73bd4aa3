"""K-FAC on an FSDP2 (`fully_shard`) model: the CURVES autoencoder on CURVES-like data.

    torchrun --nproc_per_node=2 examples/fsdp_train.py [--steps 20] [--checkpointing]
    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 10 --save /tmp/ckpt
    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 10 --resume /tmp/ckpt

Runs on CPU with gloo (NCCL when every rank has a GPU). Every Linear is its own
`fully_shard` unit and the root another, so each parameter and its `.grad` are DTensors
sharded on dim 0. K-FAC captures each rank's activations and output gradients (whole per
rank), averages the factors across ranks weighted by each rank's examples, gathers each
layer's sharded gradient (one bucketed all-gather), preconditions it and writes each
rank's rows back into its shard. The global batch is split unevenly when the ranks do
not divide it; the local loss is then scaled by n_local * world / N (and
loss_average=N / world), so that FSDP's equal average over ranks is the global batch's
gradient (docs/distributed.md, "FSDP2"). `--strategy memory` keeps each layer's factors,
decomposition and preconditioning on one owner rank. Prints the global loss per step,
the bytes of K-FAC's own collectives by kind and the K-FAC state each rank holds.
`--save DIR` writes the model, optimizer and K-FAC state with torch.distributed.checkpoint
at the end (`kfac_fast.distributed.KFACState`; sharded under "memory"), `--resume DIR`
loads them first and continues from the saved step: 10 steps, save, 10 steps resumed take
the same steps as 20 in one run.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from kfac_fast import KFACPreconditioner
from kfac_fast.curves import make_curves
from kfac_fast.demo import build_autoencoder
from kfac_fast.distributed import DistributedOptions, KFACState, WeightsOnlyLoadPlanner


class Checkpointed(nn.Module):
    """`inner` under non-reentrant activation checkpointing (K-FAC captures it once)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, precond: KFACPreconditioner,
                     step: int) -> dict:
    """What --save writes and --resume reads (dcp.load fills it in place)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer),
            "kfac": KFACState(precond), "step": step}


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=255, help="global batch (split across ranks, maybe unevenly)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--strategy", choices=("communication", "memory"), default="communication",
                        help="memory: factors, decompositions and preconditioning on each layer's owner only")
    parser.add_argument("--factor-sync", choices=("inverse", "update"), default="inverse")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on the encoder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--save", metavar="DIR", help="torch.distributed.checkpoint directory written at the end")
    parser.add_argument("--resume", metavar="DIR", help="torch.distributed.checkpoint directory to start from")
    args = parser.parse_args(argv)

    started = not dist.is_initialized()  # a caller (a test) may have initialised the group
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    model = build_autoencoder(seed=0).to(device)  # same initial weights on every rank
    if args.checkpointing:
        model = nn.Sequential(Checkpointed(model[:11]), *model[11:])
    mesh = init_device_mesh(device.type, (world,))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    n = args.batch_size
    precond = KFACPreconditioner(model, lr=args.lr, damping=3e-2, kl_clip=1e-2, inv_update_steps=10,
                                 loss_average=n / world,  # the loss rule below
                                 distributed=DistributedOptions(strategy=args.strategy, factor_sync=args.factor_sync))

    first = 0
    if args.resume:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        state = checkpoint_state(model, optimizer, precond, 0)
        # every rank; K-FAC's state is loaded by KFACState; non-tensor values read weights_only
        dcp.load(state, checkpoint_id=args.resume, planner=WeightsOnlyLoadPlanner())
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        first = state["step"]
    data = make_curves((first + args.steps) * n, seed=0).to(device)
    start = time.perf_counter()
    for step in range(first, first + args.steps):
        x = torch.tensor_split(data[step * n:(step + 1) * n], world)[rank]  # n_local may differ by one
        optimizer.zero_grad()
        # sum over the local examples * world / N: FSDP's average over ranks is then the
        # mean over the whole batch, whatever each rank's share
        loss = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") * world / n
        loss.backward()
        precond.step()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the global batch's mean loss, for printing only
        if rank == 0:
            print(f"step {step:3d}  loss {total.item() / world:8.3f}", flush=True)
    seconds = time.perf_counter() - start
    if args.save:
        import torch.distributed.checkpoint as dcp
        dcp.save(checkpoint_state(model, optimizer, precond, first + args.steps), checkpoint_id=args.save)
    sent = precond.distributed.bytes if precond.distributed is not None else {}
    line = ", ".join(f"{k} {v / 2 ** 20:.2f}" for k, v in sent.items())
    state = torch.tensor([float(sum(t.numel() * t.element_size() for layer in precond.layers.values()
                                    for t in layer.state_tensors().values()))], device=device)  # factors, decomps
    states = [torch.zeros(1, device=device) for _ in range(world)]  # on `device`: NCCL gathers device tensors
    dist.all_gather(states, state)
    if rank == 0:
        held = ", ".join(f"{s.item() / 2 ** 20:.2f}" for s in states)
        print(f"{world} ranks, {args.strategy}, {args.steps} steps in {seconds:.2f} s; K-FAC MiB sent by rank 0: "
              f"{line} ({sum(sent.values()) / 2 ** 20 / args.steps:.2f} MiB/step); K-FAC state per rank: "
              f"{held} MiB", flush=True)
    precond.remove_hooks()
    if started:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
