"""One timed training run of the transformer demo, evaluated on fixed validation windows."""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch

from ..optimizer import KFAC
from .methods import METHODS
from .model import CharTransformer, token_loss, validation_loss
from .text import Corpus


@dataclasses.dataclass
class Run:
    """What one run measured; `seconds` counts training steps only (not evaluation)."""

    method: str
    value: float  # the grid value (lr, damping or lambda0)
    seed: int
    steps: list
    seconds: list
    losses: list  # validation nats per character
    diverged: bool = False


@dataclasses.dataclass
class Setup:
    """The model and data settings shared by every run."""

    steps: int = 200
    batch: int = 32
    context: int = 32
    d: int = 64
    heads: int = 4
    blocks: int = 2
    eval_every: int = 20
    eval_windows: int = 256


def _closure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """KFAC's closure: (loss, outputs), the outputs as (tokens, vocab) logits."""
    out = model(x)
    out = out.reshape(-1, out.shape[-1])
    return token_loss(out, y), out


def validation_windows(corpus: Corpus, setup: Setup) -> tuple:
    """Fixed (inputs, targets) validation windows, the same for every run."""
    return corpus.batch(corpus.val, setup.eval_windows, setup.context, torch.Generator().manual_seed(12345))


def train(key: str, value: float, corpus: Corpus, setup: Setup, seed: int, evaluation: tuple, bar=None) -> Run:
    """Train a fresh model with METHODS[key] at `value` for setup.steps steps.

    A seed fixes the initialisation, the batches and the MC samples, so every method sees
    the same batches in the same order.
    """
    torch.manual_seed(seed)
    model = CharTransformer(corpus.vocab, d=setup.d, heads=setup.heads, blocks=setup.blocks,
                            context=setup.context)
    opt, precond = METHODS[key].make(model, value)
    batches = torch.Generator().manual_seed(seed + 1)
    run = Run(key, value, seed, [0], [0.0], [validation_loss(model, *evaluation)])
    elapsed, t0 = 0.0, time.perf_counter()
    for step in range(1, setup.steps + 1):
        x, y = corpus.batch(corpus.train, setup.batch, setup.context, batches)
        if isinstance(opt, KFAC):
            opt.step(functools.partial(_closure, model, x, y))
        else:
            opt.zero_grad(set_to_none=True)
            token_loss(model(x), y).backward()
            if precond is not None:
                precond.step()
            opt.step()
        if bar is not None:
            bar.update(1)
        if step % setup.eval_every == 0 or step == setup.steps:
            elapsed += time.perf_counter() - t0
            loss = validation_loss(model, *evaluation)
            run.steps.append(step)
            run.seconds.append(elapsed)
            run.losses.append(loss)
            if not math.isfinite(loss) or loss > 2 * run.losses[0]:
                run.diverged = True
                if bar is not None:
                    bar.update(setup.steps - step)
                break
            t0 = time.perf_counter()
    return run
