"""Subprocess worker for test_checkpoint: train a tiny model with K-FAC, optionally
stopping after a checkpoint or resuming from one, and save the final tensors.

usage: python _checkpoint_worker.py (full|first|resume) CHECKPOINT OUT K N
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

import kfac_fast

torch.set_num_threads(1)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))
    precond = kfac_fast.KFACPreconditioner(model, inv_update_steps=3, factor_decay=0.9, kl_clip=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, precond, opt


def train(model, precond, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()


def main(mode, ckpt, out, k, n):
    model, precond, opt = build()
    if mode == "resume":
        extra = kfac_fast.load_checkpoint(ckpt, precond)
        model.load_state_dict(extra["model"])
        opt.load_state_dict(extra["optimizer"])
    start = k if mode == "resume" else 0
    stop = k if mode == "first" else n
    train(model, precond, opt, range(start, stop))
    if mode == "first":
        kfac_fast.save_checkpoint(ckpt, precond, extra={"model": model.state_dict(),
                                                        "optimizer": opt.state_dict()})
        return
    torch.save({"params": [p.detach() for p in model.parameters()], "state": precond.state_dict()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
