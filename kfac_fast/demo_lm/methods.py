"""The optimisers the transformer demo compares, each with a two-point grid.

Every grid has the same size (two points) and every method runs the same steps on the
same batches per seed. Each grid holds the best value of a coarse search at the demo's
defaults and a neighbour (200 steps, seed 0, validation nats/char, 2026-11-29); for
K-FAC's damping and KFAC's lambda0 the best was the smallest value tried, so a lower one
may be better still. The table picks each method's grid value on the same validation
windows it reports, for every method alike.
- AdamW: lr 3e-3 1.019, 1e-2 0.908, 2e-2 0.911.
- SOAP: lr 3e-3 0.892, 1e-2 0.822, 2e-2 0.848.
- Muon (AdamW lr 1e-2 on the rest): lr 0.01 0.854, 0.02 0.840, 0.05 0.945 (AdamW part at 3e-3).
- K-FAC + AdamW (lr 1e-2): damping 0.01 0.827, 0.03 0.854; at AdamW lr 3e-3, damping 0.003
  gave 0.924 and 0.01 0.900.
- KFAC (paper): lambda0 0.1 0.817, 1 0.855, 10 0.883 (about 50 s per run against AdamW's 6-9 s).

The K-FAC cost search (2026-11-29, one CPU thread, seed 0 unless stated, validation nats/char
after 200 steps, cost as s/step over AdamW's in the same invocation):
- K-FAC + AdamW at damping 0.01: factors every step, refresh every 10 (the old row) 0.827 at
  3.6x; factors every 5, refresh every 50: 0.853 at 1.6-2.4x (load-dependent); factors every
  10, refresh every 100: 0.855 at 1.6x; the refresh interval is what matters (factors every
  step, refresh every 50: 0.853), and with factors every 5 the decay must follow (0.95 per
  update averages over ~100 steps): factors every 5, refresh every 10, factor_decay 0.8:
  0.837±0.013 over 3 seeds at 1.4x, the row below. LayerNorm blocks (extra_kinds) 0.822 at
  3.2x; lr 2e-2 0.861.
- K-FAC eigen-Adam (Adam in the eigenbasis of K-FAC's factors, `eigen_adam.py`): factors
  every step and refresh every 10 0.809 at 2.9x; factors every 5, refresh every 50 0.855;
  every 2 / 10 0.813; every 5 / 10 0.813; every 5 / 10 with factor_decay 0.8 0.801 at 1.6x
  (3 seeds: 0.809±0.007 against SOAP's 0.819±0.004 and Muon's 0.841±0.015, at 1.3-1.9x
  AdamW's step with the machine's load): the row below. lr 2e-2 0.821; betas (0.9, 0.95)
  0.818; embeddings left to plain AdamW (skip_layers) 0.802. 3 seeds: factors every 10
  with decay 0.65 0.813±0.007 (1.54x against 1.65x in that run); warm refreshes
  (eigh_tol=0.03) 0.811±0.007 and dearer on CPU (1.88x).
- K-FAC-reduce for the Linear layers (`kfac_fast.layers.linear.use_reduce`), 3 seeds:
  eigen-Adam 0.845±0.014 (expand 0.809), K-FAC + AdamW 0.883±0.009 (expand 0.837); K-FAC +
  AdamW reduce at damping 0.0003-0.1 (seed 0) 0.871-0.896 against expand's 0.830.
  Expand, the default, stays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ..eigen_adam import EigenAdam
from ..optimizer import KFAC
from ..preconditioner import KFACPreconditioner


@dataclasses.dataclass
class Method:
    """An optimiser under test: its grid (over `knob`) and how to build it."""

    name: str
    grid: tuple
    make: Callable  # (model, value) -> (torch optimizer or KFAC, preconditioner or None)
    note: str
    knob: str = "lr"


def _adamw(model: nn.Module, lr: float) -> tuple:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), None


def _soap(model: nn.Module, lr: float) -> tuple:
    import heavyball

    heavyball.utils.compile_mode = None  # eager: torch.compile's warm-up would dominate on CPU
    soap = getattr(heavyball, "ForeachSOAP", None) or heavyball.SOAP
    return soap(model.parameters(), lr=lr, weight_decay=0.0, precondition_frequency=10), None


class _Pair(torch.optim.Optimizer):
    """Muon on the hidden weight matrices, AdamW on everything else (embeddings, head,
    LayerNorm, biases): Muon's usual split. One optimizer so the loop treats it as any."""

    def __init__(self, model: nn.Module, lr: float, adam_lr: float) -> None:
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
        ids = {id(p) for p in hidden}
        rest = [p for p in model.parameters() if id(p) not in ids]
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=adam_lr, weight_decay=0.0)
        super().__init__([*hidden, *rest], {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.muon.step()
        self.adamw.step()


ADAMW_LR = 1e-2  # AdamW's best lr in the search above, also for Muon's and K-FAC's AdamW


def _muon(model: nn.Module, lr: float) -> tuple:
    return _Pair(model, lr, ADAMW_LR), None


# factors every 5 steps (their running average over about as many steps as 0.95 every
# step), eigenbases every 10: see the cost search above
AMORTISED: dict[str, Any] = dict(factor_update_steps=5, inv_update_steps=10, factor_decay=0.8,
                                 loss_average="tokens")
KFAC_SETTINGS: dict[str, Any] = dict(method="eigen", kl_clip=None, **AMORTISED)


def _kfac_adamw(model: nn.Module, damping: float) -> tuple:
    """KFACPreconditioner's preconditioned gradient into AdamW (issue 19's best K-FAC row)."""
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, weight_decay=0.0)
    return opt, KFACPreconditioner(model, lr=ADAMW_LR, damping=damping, **KFAC_SETTINGS)


def _eigen_adam(model: nn.Module, lr: float) -> tuple:
    """Adam in the eigenbasis of K-FAC's factors (Linear layers), AdamW on the rest."""
    return EigenAdam(model, lr=lr, damping=0.01, **AMORTISED), None


def _kfac_paper(model: nn.Module, damping: float) -> tuple:
    """The paper's optimizer (MC Fisher, quadratic-model step, adaptive lambda)."""
    return KFAC(model, loss="cross_entropy", method="eigen", damping=damping, inv_update_steps=10), None


METHODS = {
    "adamw": Method("AdamW", (1e-2, 2e-2), _adamw, "weight decay 0"),
    "soap": Method("SOAP", (1e-2, 2e-2), _soap, "heavyball, precondition_frequency=10"),
    "muon": Method("Muon", (0.01, 0.02), _muon, f"torch.optim.Muon on hidden matrices, AdamW lr {ADAMW_LR} else"),
    "kfac": Method("K-FAC + AdamW", (0.01, 0.03), _kfac_adamw,
                   f"KFACPreconditioner eigen, factors every 5 steps (decay 0.8), refresh every 10, "
                   f"then AdamW lr {ADAMW_LR}", knob="damping"),
    "kfac-adam": Method("K-FAC eigen-Adam", (1e-2, 2e-2), _eigen_adam,
                        "Adam in the eigenbasis of K-FAC's factors on Linear layers (AdamW on the rest), "
                        "factors every 5 steps (decay 0.8), refresh every 10"),
    "kfac-opt": Method("KFAC (paper)", (0.1, 1.0), _kfac_paper, "kfac_fast.KFAC, eigen, MC Fisher",
                       knob="lambda0"),
}
