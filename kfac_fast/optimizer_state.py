"""KFAC's checkpoints: its torch.optim state plus the preconditioner's and the MC seed.

`KFAC.state_dict()` (this rank's view, data-parallel) and `KFAC.synced_state_dict()` (a
collective: the global state, from which a resume on any number of ranks continues
exactly) both add "preconditioner" and "mc_seed" to torch's optimizer state;
`split_state` takes them back out for `KFAC.load_state_dict`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .optimizer_args import learning_rate

if TYPE_CHECKING:
    from .optimizer import KFAC


def with_preconditioner(out: dict, precond: dict, mc_seed: int) -> dict:
    """torch's optimizer state `out` with the preconditioner's state and the MC seed."""
    out["preconditioner"] = precond
    out["mc_seed"] = mc_seed
    return out


def split_state(opt: KFAC, state_dict: dict) -> tuple[dict, dict]:
    """(torch's optimizer state, the preconditioner's) of a KFAC state dict; sets the MC
    seed (a state from before it keeps this optimiser's) and reads a state from before
    `lr` existed as lr 1."""
    state_dict = dict(state_dict)
    precond = state_dict.pop("preconditioner", None)
    if precond is None:
        raise ValueError("state_dict has no 'preconditioner' entry (not from KFAC.state_dict())")
    groups = [dict(g) for g in state_dict.get("param_groups", [])]
    for g in groups:
        g["lr"] = learning_rate(g.get("lr", 1.0), name="state_dict's param_groups[0]['lr']", allow_zero=True)
    state_dict["param_groups"] = groups
    seed = state_dict.pop("mc_seed", opt.mc_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"state_dict's mc_seed must be an int in [0, 2^64), got {seed!r}")
    opt.mc_seed = seed
    return state_dict, precond
