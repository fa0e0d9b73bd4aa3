"""KFAC's update: the guard on a non-finite step (zeroed on the device, not applied) and the
iterate average.

`KFAC._solve` returns the model's minimiser `x` (alpha, mu), the applied coefficients
`coeffs` (lr * x; `x` itself at lr 1) and the `update` they give; the guard zeroes all three
together, so the damping adaptation (which takes the model change at `coeffs`) and the
metrics see the step that was taken.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

from .health import all_finite

if TYPE_CHECKING:
    from .optimizer import KFAC


def guard_update(opt: KFAC, solved: dict) -> tuple:
    """(x, update) of `solved`, zeroed on the device when any entry is not finite (a NaN/Inf
    batch on a step that does not adapt damping would otherwise poison every parameter);
    counted as health()["kfac_nonfinite_update"]. No host sync; a finite step is returned
    unchanged (torch.where picks the same values). The 0-dim device bool "every entry was
    finite" is kept as solved["finite"] (None when there was nothing to check)."""
    x, update = solved["x"], solved["update"]
    ok = all_finite([x, *update])
    solved["finite"] = ok
    if ok is None:
        return x, update
    same = solved["coeffs"] is x
    x = torch.where(ok.to(x.device), x, torch.zeros_like(x))
    coeffs = x if same else torch.where(ok.to(x.device), solved["coeffs"], torch.zeros_like(x))
    update = [torch.where(ok.to(u.device), u, torch.zeros_like(u)) for u in update]
    solved["x"], solved["coeffs"], solved["update"] = x, coeffs, update
    opt.preconditioner._health.count("kfac_nonfinite_update", ok)
    return x, update


def average_iterates(opt: KFAC, live: list) -> None:
    """The exponential average of the iterates (`average_decay`), after a step."""
    decay = opt.param_groups[0]["average_decay"]
    if decay is None:
        return
    for p in live:
        avg = opt.state[p].get("average")
        if avg is None:
            opt.state[p]["average"] = p.detach().clone()
        else:
            avg.lerp_(p.detach(), 1.0 - decay)


@contextlib.contextmanager
def swap_averaged(opt: KFAC) -> Iterator[None]:
    """KFAC.swap_averaged: the parameters hold their iterate average within the block."""
    live = [p for p in opt.param_groups[0]["params"] if "average" in opt.state[p]]
    if not live:
        raise RuntimeError("no iterate average: construct KFAC with average_decay and step first")
    for p in live:
        p.data, opt.state[p]["average"] = opt.state[p]["average"], p.data
    try:
        yield
    finally:
        for p in live:
            p.data, opt.state[p]["average"] = opt.state[p]["average"], p.data
