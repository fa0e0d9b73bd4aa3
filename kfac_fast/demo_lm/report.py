"""What the transformer demo prints and plots: per method the best grid value (mean over
seeds), its loss at equal steps and at equal seconds, and the steps it needs to reach
AdamW's final loss."""
from __future__ import annotations

import math
import statistics
from typing import Optional

from .methods import METHODS


def mean_curve(runs: list) -> tuple:
    """(steps, seconds, losses) averaged over seeds at the shared evaluation steps."""
    steps = runs[0].steps
    secs = [statistics.fmean(r.seconds[i] for r in runs) for i in range(len(steps))]
    losses = [statistics.fmean(r.losses[i] for r in runs) for i in range(len(steps))]
    return steps, secs, losses


def best_runs(runs: list) -> dict:
    """method -> the runs (all seeds) of its grid value with the lowest mean final loss."""
    out: dict = {}
    for key in dict.fromkeys(r.method for r in runs):
        by_value: dict = {}
        for r in runs:
            if r.method == key:
                by_value.setdefault(r.value, []).append(r)
        finals = {v: (math.inf if any(r.diverged for r in rs) else statistics.fmean(r.losses[-1] for r in rs))
                  for v, rs in by_value.items()}
        best = min(finals, key=lambda v: finals[v])
        if math.isfinite(finals[best]):
            out[key] = by_value[best]
    return out


def loss_at_seconds(curve: tuple, seconds: float) -> tuple:
    """(step, loss) of the last evaluation at or before `seconds` training seconds."""
    steps, secs, losses = curve
    last = (steps[0], losses[0])
    for st, sec, loss in zip(steps, secs, losses):
        if sec <= seconds:
            last = (st, loss)
    return last


def steps_to_reach(curve: tuple, target: float) -> Optional[int]:
    steps, _, losses = curve
    return next((st for st, loss in zip(steps, losses) if loss <= target), None)


def table(runs: list) -> list:
    """The result table (lines of text) and the target lines under it."""
    best = best_runs(runs)
    curves = {k: mean_curve(rs) for k, rs in best.items()}
    adamw = curves.get("adamw")
    lines = [f"{'method':16s} {'grid value':>16s} {'val nats/char':>15s} {'at AdamW s':>11s} "
             f"{'AdamW final at':>15s} {'s/step':>7s} {'x AdamW':>7s}"]
    for key, rs in best.items():
        finals = [r.losses[-1] for r in rs]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        curve = curves[key]
        at_s = f"{loss_at_seconds(curve, adamw[1][-1])[1]:.3f}" if adamw else "-"
        reach = steps_to_reach(curve, adamw[2][-1]) if adamw else None
        reach_s = f"{reach} ({100 * reach / adamw[0][-1]:.0f}%)" if reach is not None else "not reached"
        per_step = curve[1][-1] / curve[0][-1]
        ratio = f"{per_step / (adamw[1][-1] / adamw[0][-1]):.2f}" if adamw else "-"
        lines.append(f"{METHODS[key].name:16s} {METHODS[key].knob + ' ' + format(rs[0].value, 'g'):>16s} "
                     f"{statistics.fmean(finals):9.3f}±{spread:.3f} {at_s:>11s} {reach_s:>15s} {per_step:7.3f} "
                     f"{ratio:>7s}")
    return lines + targets(curves)


def targets(curves: dict) -> list:
    """Issue 19's targets, checked for every K-FAC row, as text: it reaches AdamW's final
    loss in at most 60% of AdamW's steps, ends below SOAP and Muon at equal steps, and its
    step costs at most 2x AdamW's."""
    kfac = [k for k in ("kfac", "kfac-adam", "kfac-opt") if k in curves]
    if not kfac or "adamw" not in curves:
        return []
    adamw = curves["adamw"]
    adamw_step = adamw[1][-1] / adamw[0][-1]
    lines, winners = ["targets (issue 19): AdamW's final loss in <= 60% of its steps, below SOAP and Muon at "
                      "equal steps, a step <= 2x AdamW's"], []
    for key in kfac:
        curve = curves[key]
        reach = steps_to_reach(curve, adamw[2][-1])
        frac = 100 * reach / adamw[0][-1] if reach is not None else math.inf
        cost = (curve[1][-1] / curve[0][-1]) / adamw_step
        checks = [(f"AdamW's final loss at {frac:.0f}% of its steps" if reach is not None
                   else "AdamW's final loss never reached", frac <= 60)]
        for other in ("soap", "muon"):
            if other in curves:
                checks.append((f"{curve[2][-1]:.3f} vs {METHODS[other].name} {curves[other][2][-1]:.3f}",
                               curve[2][-1] < curves[other][2][-1]))
        checks.append((f"step {cost:.2f}x AdamW's", cost <= 2))
        met = all(ok for _, ok in checks)
        winners += [METHODS[key].name] if met else []
        lines.append(f"  {METHODS[key].name}: " + "; ".join(f"{text} ({'met' if ok else 'NOT met'})"
                                                          for text, ok in checks))
    lines.append(f"K-FAC rows meeting every target: {', '.join(winners) if winners else 'none'}")
    return lines


def plot(runs: list, path: str, title: str) -> None:
    """Validation loss against steps and against training seconds, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rs in best_runs(runs).items():
        steps, secs, losses = mean_curve(rs)
        label = f"{METHODS[key].name} ({METHODS[key].knob} {rs[0].value:g})"
        axes[0].plot(steps, losses, label=label)
        axes[1].plot(secs, losses, label=label)
    for ax, xlabel in zip(axes, ("step", "training seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
