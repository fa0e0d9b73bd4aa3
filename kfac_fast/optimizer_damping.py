"""KFAC's damping drivers: the gamma search (paper section 6.6) and the
Levenberg-Marquardt adaptation of lambda (section 6.5).

Both need the optimiser's whole step context (its closure, the candidate updates, the
parameters before the step), so they are functions of a `KFAC` and its step's values;
the formulas themselves are `kfac_fast.quadratic`'s.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .fvp import CurvatureProducts
from .quadratic import adapt_damping, model_change, reduction_ratio

if TYPE_CHECKING:
    from .optimizer import KFAC


@torch.no_grad()
def restore_(params: list, values: list) -> None:
    """Copy `values` back into `params` (undo a trial or a failed step)."""
    torch._foreach_copy_(params, values)


def search_gamma(opt: KFAC, closure: Callable, fisher: CurvatureProducts, live: list, grads: list,
                 prev: Optional[list], theta: list, current: dict) -> dict:
    """Paper section 6.6: gamma among gamma * {omega2, 1, 1/omega2} by h(theta + delta).

    current: the step solved with the gamma in use. Returns the winner's solve, with its
    "loss_after"; gamma (and, for method "inverse", the inverses) are left at the winner's.
    """
    group = opt.param_groups[0]
    gamma, omega2 = group["gamma"], group["omega2"]
    c = group["damping"] + group["l2_reg"]
    precond = opt.preconditioner
    inverse = precond.method == "inverse"
    layers = list(precond.layers.values())
    # every candidate's products first: moving theta bumps the parameters' version
    # counters, and the forward graph the Fisher products use must not see that
    trials = []
    for cand in (gamma, gamma * omega2, gamma / omega2):
        if cand == gamma:
            solved = current  # the inverses in use are this candidate's
        else:
            group["gamma"] = cand
            solved = opt._solve(fisher, grads, opt._precondition_again(live, grads), prev, c)
        inverses: list = [(layer.a_inv, layer.g_inv) for layer in layers] if inverse else []
        if inverse and hasattr(precond, "inverse_snapshot"):  # approx="tridiag"
            inverses.append(precond.inverse_snapshot())
        trials.append((cand, solved, inverses))
    local, l2 = [], []
    for _, solved, _ in trials:
        torch._foreach_add_(live, solved["update"])
        local.append(opt._evaluate_no_grad(closure))
        l2.append(opt._l2_term())
        restore_(live, theta)
    # the global batch's losses (data-parallel: one all-reduce), so every rank picks alike
    losses = [h + r for h, r in zip(opt._global_losses(local), l2)]
    # min compares with `<` in candidate order: the current gamma wins ties
    best = min(range(len(trials)), key=losses.__getitem__)
    (cand, solved, inverses), h = trials[best], losses[best]
    group["gamma"] = cand
    if inverse:
        if hasattr(precond, "restore_inverses"):
            precond.restore_inverses(inverses.pop())
        for layer, (a_inv, g_inv) in zip(layers, inverses):
            layer.a_inv, layer.g_inv = a_inv, g_inv
    solved["loss_after"] = h
    return solved


def adapt_lambda(opt: KFAC, closure: Callable, h_old: float, live: list, theta: list, solved: dict) -> None:
    """Levenberg-Marquardt on rho (host syncs: every T1 steps only)."""
    group = opt.param_groups[0]
    eta = group["l2_reg"]
    h_new = solved.get("loss_after")
    if h_new is None:
        h_new = opt._global_losses([opt._evaluate_no_grad(closure)])[0] + opt._l2_term()
    c = group["damping"] + eta if group["damping_in_rho"] else eta
    # the model change of the step taken: at lr * (alpha, mu) (solved["coeffs"])
    change = model_change(solved["coeffs"], solved["b"], solved["gram_f"], solved["gram_i"], c).item()
    rho = reduction_ratio(h_new, h_old, change)
    undone = not math.isfinite(h_new)
    if undone:
        # a step into overflow is undone; more damping shortens the next one
        restore_(live, theta)
        torch._foreach_zero_(solved["update"])
    group["damping"] = adapt_damping(group["damping"], rho, group["omega1"])
    if group["gamma_interval"] is None:
        group["gamma"] = math.sqrt(group["damping"] + eta)
    opt.last.update(rho=rho, loss_after=h_new, undone=undone)
