"""Demo: K-FAC against SGD with momentum, Adam and SOAP on a CURVES-like autoencoder.

`python -m kfac_fast.demo [--steps N] [--batch-size B] [--device D] [--out DIR] [--quick]`

Reproduces the shape of Martens & Grosse (2015)'s deep-autoencoder experiment: the
CURVES network 784-400-200-100-50-25-6 and its mirror, logistic units, a linear code
layer, sparse initialisation, per-case binary cross-entropy summed over pixels, on
CURVES-like data made by `kfac_fast.curves` (not the original set). Each method runs at
the best point of a small grid (chosen on short runs), then once for the full step
budget with the same seed, model initialisation and batch order. The grid is over the
learning rate, except for K-FAC (over the damping, at lr 0.3: its KL clip binds, so the
step lr * nu does not depend on lr) and KFAC (paper) (over the initial lambda). Prints a table
and writes `curves_error.png` (error against steps and against seconds) to --out.

K-FAC here is `KFACPreconditioner` with the paper's true Fisher (`fisher="mc"`: one
sampled-target backward per step) under SGD with momentum 0.9. Differences from the
paper, on purpose: a fixed mini-batch size instead of the growing schedule, a fixed
damping and KL clipping instead of adaptive damping and the quadratic-model step, no
l2 term. (With the empirical Fisher, K-FAC stayed on the ~127-nat plateau as long as
SGD in our trials.) The row "KFAC (paper)" is `kfac_fast.KFAC`, the paper's whole
optimizer (adaptive damping, quadratic-model step with momentum, l2 1e-5) with the
exactly damped eigenbasis inverse in place of factored Tikhonov (see KFAC_OPT_SETTINGS);
its grid column is the initial damping lambda. After the table, "targets" compares the
K-FAC rows with SGD's whole budget and with SOAP at equal steps and equal seconds.

Modules: `model` (the autoencoder and its loss), `methods` (the optimisers and their
grids), `training` (one timed run, the lr grid), `report` (table, targets, plot),
`cli` (the command line and the whole run). The demo extra (`pip install
'kfac_fast[demo]'`: matplotlib, tqdm, heavyball) is looked for after the arguments are
parsed; off a terminal there is no progress bar, one line per method instead.
"""
from .cli import main, parse_args
from .methods import (
    KFAC_OPT_SETTINGS,
    KFAC_SETTINGS,
    KFAC_TRI_SETTINGS,
    METHODS,
    MOMENTUM,
    Method,
    inv_schedule,
)
from .model import ENCODER, SPARSE_NONZERO, bce_loss, build_autoencoder, sparse_init_, training_error
from .report import error_before, first_reach, format_table, plot, target_report
from .training import Run, choose_lr, train

__all__ = [
    "ENCODER",
    "KFAC_OPT_SETTINGS",
    "KFAC_SETTINGS",
    "KFAC_TRI_SETTINGS",
    "METHODS",
    "MOMENTUM",
    "SPARSE_NONZERO",
    "Method",
    "Run",
    "bce_loss",
    "build_autoencoder",
    "choose_lr",
    "error_before",
    "first_reach",
    "format_table",
    "inv_schedule",
    "main",
    "parse_args",
    "plot",
    "sparse_init_",
    "target_report",
    "train",
    "training_error",
]
