"""One training run of the demo (timed, evaluated on a fixed subset) and the lr grid."""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch

from ..optimizer import KFAC
from .methods import METHODS
from .model import bce_loss, build_autoencoder, training_error


@dataclasses.dataclass
class Run:
    """What one training run measured. `seconds` counts training steps only."""

    method: str
    lr: float
    steps: list  # steps at which the error was evaluated
    seconds: list  # training seconds elapsed at those steps
    errors: list  # training error on the evaluation subset
    step_time: float = math.nan  # mean seconds per training step
    final_error: float = math.nan  # training error on the whole training set
    diverged: bool = False


def _closure(model: torch.nn.Module, xb: torch.Tensor) -> tuple:
    """The KFAC optimiser's closure: (loss, outputs) on the batch."""
    out = model(xb)
    return bce_loss(out, xb), out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(key: str, lr: float, data: torch.Tensor, *, steps: int, batch_size: int, seed: int,
          eval_x: torch.Tensor, eval_every: int, final: bool, bar=None) -> Run:
    """Train a fresh autoencoder with METHODS[key] at lr for `steps` steps.

    Every run with the same seed sees the same initialisation, batch order and MC Fisher
    samples (torch's global generator is seeded: the K-FAC rows sample from it), so a
    rerun repeats its numbers up to floating-point reduction order. Error evaluation is
    excluded from the timing; the clock is read after a device sync.
    """
    device = data.device
    torch.manual_seed(seed + 2)
    model = build_autoencoder(seed).to(device)
    opt, precond = METHODS[key].make(model, lr)
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.empty(0, dtype=torch.long)
    run = Run(key, lr, [0], [0.0], [training_error(model, eval_x)])
    elapsed = 0.0
    _sync(device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if order.numel() < batch_size:  # a new epoch: reshuffle
            order = torch.cat([order, torch.randperm(data.shape[0], generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        xb = data[idx.to(device)]
        if isinstance(opt, KFAC):  # forward, backward and update in one closure step
            opt.step(functools.partial(_closure, model, xb))
        else:
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            if getattr(precond, "fisher", None) == "mc":  # the paper's true Fisher: sampled targets
                precond.sample_fisher(logits, "bce_with_logits")
            loss = bce_loss(logits, xb)
            loss.backward()
            if precond is not None:
                precond.step()
            opt.step()
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            _sync(device)
            elapsed += time.perf_counter() - t0
            err = training_error(model, eval_x)
            run.steps.append(step)
            run.seconds.append(elapsed)
            run.errors.append(err)
            if not math.isfinite(err) or err > 10 * run.errors[0]:
                run.diverged = True
                break
            t0 = time.perf_counter()
    run.step_time = elapsed / run.steps[-1] if run.steps[-1] else math.nan
    if final and not run.diverged:
        run.final_error = training_error(model, data)
    return run


def choose_lr(key: str, data, *, grid_steps: int, batch_size: int, seed: int, eval_x, bar) -> tuple:
    """The grid lr with the lowest error after `grid_steps` steps, and all grid results."""
    results = {}
    for lr in METHODS[key].lrs:
        r = train(key, lr, data, steps=grid_steps, batch_size=batch_size, seed=seed,
                  eval_x=eval_x, eval_every=grid_steps, final=False, bar=bar)
        results[lr] = math.inf if r.diverged else r.errors[-1]
    return min(results, key=lambda lr: results[lr]), results
