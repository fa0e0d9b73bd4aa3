"""KFACPreconditioner's per-step metrics in TensorBoard (or printed when it is not installed).

    python examples/tensorboard_metrics.py [--steps 60] [--every 10] [--logdir runs/kfac]
        [--print] [--log-level INFO]
    tensorboard --logdir runs            # then open the "kfac/" scalars

After every `precond.step()`, `precond.last_metrics` records the step's learning rate,
damping, factor decay, whether factors were updated and a refresh ran (with its paths and
seconds), the KL-clip factor nu and the health counters (`kfac_fast.preconditioner.observe`).
Recording never syncs with the GPU; reading does, so this script reads (`write_to`,
`as_dict`) only every `--every` steps. Without the tensorboard package (`pip install
tensorboard`; kfac_fast does not depend on it), or with `--print`, it prints `as_dict()`
instead. `--log-level INFO` also shows the library's own log lines (`kfac_fast` logger:
refreshes, skipped steps); by default the library prints nothing.

Runs on CPU in a few seconds: a small MLP regressing a random linear map.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Optional

import torch
from torch import nn

from kfac_fast import KFACPreconditioner


def _summary_writer(logdir: str) -> Optional[Any]:
    """TensorBoard's SummaryWriter on `logdir`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(logdir)


def _shown(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) and math.isfinite(value) else value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="read and write the metrics every this many steps")
    parser.add_argument("--logdir", default="runs/kfac", help="TensorBoard log directory")
    parser.add_argument("--print", action="store_true", help="print the metrics even if tensorboard is installed")
    parser.add_argument("--log-level", default=None, help="show kfac_fast's log lines at this level (e.g. INFO)")
    args = parser.parse_args(argv)
    if args.log_level:
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("kfac_fast").setLevel(args.log_level.upper())

    writer = None if args.print else _summary_writer(args.logdir)
    if writer is None and not args.print:
        print("tensorboard is not installed (pip install tensorboard): printing the metrics instead")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    target = torch.randn(20, 10)
    precond = KFACPreconditioner(model, lr=0.1, damping=1e-2, inv_update_steps=10, kl_clip=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(args.steps):
        x = torch.randn(32, 20)
        loss = nn.functional.mse_loss(model(x), x @ target)
        optimizer.zero_grad()
        loss.backward()
        precond.step()
        optimizer.step()
        if step % args.every == 0 or step == args.steps - 1:
            metrics = precond.last_metrics
            assert metrics is not None
            if writer is not None:
                metrics.write_to(writer)  # kfac/lr, kfac/nu, kfac/refresh_seconds, ...
                writer.add_scalar("train/loss", loss.item(), step)
            else:
                values = {k: _shown(v) for k, v in metrics.as_dict().items()}
                print(f"loss {loss.item():.4f} {values}")
    if writer is not None:
        writer.close()
        print(f"wrote {args.steps} steps of metrics to {args.logdir} (tensorboard --logdir {args.logdir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
