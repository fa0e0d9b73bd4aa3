"""What the demo prints and plots: the result table, the targets, the error curves."""
from __future__ import annotations

import math
from typing import Optional

from .methods import METHODS
from .training import Run


def first_reach(run: Run, target: float) -> Optional[tuple]:
    """(step, seconds) of the run's first evaluation with error <= target, or None."""
    for step, sec, err in zip(run.steps, run.seconds, run.errors):
        if err <= target:
            return step, sec
    return None


def error_before(run: Run, *, step: float = math.inf, seconds: float = math.inf) -> tuple:
    """(step, error) of the run's last evaluation at or before `step` and `seconds`."""
    last = (run.steps[0], run.errors[0])
    for st, sec, err in zip(run.steps, run.seconds, run.errors):
        if st <= step and sec <= seconds:
            last = (st, err)
    return last


def target_report(runs: list) -> list:
    """The K-FAC rows against SGD's whole budget and against SOAP, as lines of text.

    All errors here are the evaluation subset's (the curves' points), so a run is
    compared with others at equal steps or at equal training seconds.
    """
    by_key = {r.method: r for r in runs if not r.diverged}
    sgd, soap = by_key.get("sgd"), by_key.get("soap")
    lines = []
    for key in ("kfac", "kfac-opt", "kfac-tri"):
        run = by_key.get(key)
        if run is None:
            continue
        name = METHODS[key].name
        if sgd is not None:
            target = sgd.errors[-1]
            hit = first_reach(run, target)
            budget = f"{sgd.steps[-1]} steps, {sgd.seconds[-1]:.1f} s"
            lines.append(f"{name}: SGD+momentum's final error {target:.2f} ({budget}) "
                         + (f"reached at step {hit[0]}, {hit[1]:.1f} s" if hit else "not reached"))
        if soap is not None:
            steps = min(run.steps[-1], soap.steps[-1])
            secs = min(run.seconds[-1], soap.seconds[-1])
            (_, e_run), (_, e_soap) = error_before(run, step=steps), error_before(soap, step=steps)
            (s_run, t_run), (s_soap, t_soap) = (error_before(run, seconds=secs),
                                                error_before(soap, seconds=secs))
            lines.append(f"{name} vs SOAP: at step {steps} {e_run:.2f} vs {e_soap:.2f}; "
                         f"at {secs:.1f} s {t_run:.2f} (step {s_run}) vs {t_soap:.2f} (step {s_soap})")
    return lines


def format_table(runs: list, floor: float, sgd_step: float) -> str:
    """The result table as plain text."""
    head = f"{'method':<14}{'lr':>8}{'steps':>7}{'train error':>13}{'above floor':>13}" \
           f"{'wall s':>9}{'ms/step':>9}{'x SGD step':>11}"
    lines = [head, "-" * len(head)]
    for r in runs:
        err = "diverged" if r.diverged else f"{r.final_error:.3f}"
        above = "" if r.diverged else f"{r.final_error - floor:.3f}"
        lines.append(f"{METHODS[r.method].name:<14}{r.lr:>8g}{r.steps[-1]:>7}{err:>13}{above:>13}"
                     f"{r.seconds[-1]:>9.1f}{1e3 * r.step_time:>9.1f}{r.step_time / sgd_step:>11.2f}")
    return "\n".join(lines)


def plot(runs: list, floor: float, path: str) -> None:
    """Error above the entropy floor against steps and against seconds (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        above = [max(e - floor, 1e-3) for e in r.errors]
        label = f"{METHODS[r.method].name} ({METHODS[r.method].knob} {r.lr:g})"
        ax1.plot(r.steps, above, label=label)
        ax2.plot(r.seconds, above, label=label)
    for ax, xl in ((ax1, "training steps"), (ax2, "training seconds")):
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("training error above entropy floor (nats/image)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle(f"CURVES-like autoencoder (entropy floor {floor:.2f} nats/image)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
