"""Numerical health of a KFACPreconditioner: the non-finite step guard and the
refresh-time solver fallbacks, with the counters that report how often each fired.

Per-step path (no host sync): `all_finite` reduces every captured tensor to one 0-dim
device bool, `guard_weights` folds it into the update's betas/alphas (beta 1, alpha 0
on a bad step: the op then never reads the non-finite rows), and
`Health.count_nonfinite` adds the bad step to a device-side counter.

Refresh path (host syncs allowed, docs/design.md): `solve_eigh` and `solve_inverse` run the
batched op and, for each factor whose result failed or is not finite, walk the chain
float64 retry -> added damping -> the previous result (or, with none, the identity
basis / the plain damped identity, so the step stays defined), counting every rung.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from . import ops

Tensor = torch.Tensor

SOLVER_COUNTERS = ("fp64_retries", "damped_retries", "kept_previous")

# why a step (or part of one) was dropped or repaired; `Health.count` accepts other names
# too (snake_case), these are always reported, 0 until they fire
CAUSES = (
    "nonfinite_capture",      # a captured input / output gradient had NaN/Inf: no factor update
    "capture_overflow",       # finite captures so large that x^T x would overflow the factor
    "nonfinite_grad",         # a .grad was not finite: left unpreconditioned
    "nonfinite_output",       # the preconditioned .grad was not finite: the plain gradient kept
    "kfac_nonfinite_update",  # KFAC (the optimizer): a non-finite update was not applied
)

# headroom of the overflow bound: entries of x^T x are at most rows * max|x|^2; a batch is
# dropped when that bound exceeds the accumulation dtype's max / 2^24 (fp32: 2e31), far
# above anything normal training produces and far enough below the max that the running
# average (beta F + alpha x^T x, alpha up to S^2/N for G) cannot overflow either
OVERFLOW_HEADROOM = 2.0 ** -24


def _inf_norms(tensors: Sequence[Optional[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """The floating, non-empty tensors among `tensors` and their max-abs norms (one fused
    launch per dtype on GPU). Integer captures (embedding indices) are finite by
    construction; empty tensors are skipped (host metadata only): their inf-norm is undefined."""
    ts = [t for t in tensors if t is not None and t.is_floating_point() and t.numel() > 0]
    return ts, (torch._foreach_norm(ts, float("inf")) if ts else [])


def _finite_norms(norms: list[Tensor]) -> Tensor:
    """0-dim device bool: every norm is finite (a NaN or Inf entry makes its norm so)."""
    return torch.isfinite(torch.cat([n.reshape(1).float() for n in norms])).all()


def all_finite(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    """0-dim bool on the tensors' device: every entry of every tensor is finite.

    None when there is nothing to check. The max-abs norm cannot overflow (unlike a sum
    of squares, which would flag large finite fp16 values) and propagates NaN.
    """
    _, norms = _inf_norms(tensors)
    return _finite_norms(norms) if norms else None


def capture_flags(tensors: Sequence[Optional[Tensor]]) -> Optional[tuple[Tensor, Tensor]]:
    """(finite, in_range): 0-dim device bools for a factor update from these captures.

    finite: every entry is finite (as `all_finite`). in_range: for every tensor,
    numel * max|x|^2 is below the accumulation dtype's max times OVERFLOW_HEADROOM, a
    bound on every entry of x^T x (numel >= its row count; a conv patch matrix repeats
    an entry at most kh*kw times, which the headroom covers), so a finite but huge batch
    cannot turn a factor into Inf. Same one max-abs reduction as `all_finite`; None when
    there is nothing to check.
    """
    ts, norms = _inf_norms(tensors)
    if not ts:
        return None
    finite = _finite_norms(norms)
    # max|x| * sqrt(numel / limit) <= 1, scaled by host scalars (no host-to-device copy)
    scales = [math.sqrt(t.numel() / (OVERFLOW_HEADROOM * torch.finfo(
        torch.float64 if t.dtype == torch.float64 else torch.float32).max)) for t in ts]
    scaled = torch._foreach_mul([n.double() for n in norms], scales)
    # NaN compares False: a non-finite batch is also out of range (counted as non-finite)
    in_range = (torch.cat([n.reshape(1) for n in scaled]) <= 1.0).all() | ~finite
    return finite, in_range


def guard_weights(ok: Optional[Tensor], betas, alphas, device: torch.device) -> tuple:
    """(betas, alphas) with a bad step turned into a no-op: beta 1, alpha 0 where not ok.

    betas/alphas: lists of host floats or 0-dim tensors, or 1-D tensors; returned as
    float64 1-D tensors on `device` when ok is given (unchanged when ok is None).
    """
    if ok is None:
        return betas, alphas
    b, a = as_device_tensor(betas, device), as_device_tensor(alphas, device)
    ok = ok.to(device)
    return torch.where(ok, b, torch.ones_like(b)), torch.where(ok, a, torch.zeros_like(a))


def as_device_tensor(values: Any, device: torch.device) -> Tensor:
    """Host numbers (and 0-dim tensors) as a float64 1-D tensor on `device`, without a
    host sync: a host list goes through pinned memory, non-blocking; with 0-dim device
    tensors among them (masked row counts) the floats are filled on the device, since a
    pageable host-to-device copy would sync. A tensor is converted as a whole."""
    if isinstance(values, torch.Tensor):
        return values.to(device=device, dtype=torch.float64).reshape(-1)
    if any(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.to(device=device, dtype=torch.float64).reshape(())
                            if isinstance(v, torch.Tensor)
                            else torch.full((), float(v), dtype=torch.float64, device=device)
                            for v in values])
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tally(counter: Optional[Tensor], ok: Tensor) -> Tensor:
    """`counter` (created as an int64 0 on ok's device, or moved there once when the model
    moved) plus 1 where the 0-dim bool `ok` is False, in place; no host sync."""
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64, device=ok.device)
    elif counter.device != ok.device:
        counter = counter.to(ok.device)
    counter.add_((~ok).to(torch.int64))
    return counter


def _finite(*tensors: Tensor) -> bool:
    """Host check (refresh steps only)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Health:
    """Counters of the non-finite guard (device tensor) and of solver fallbacks (host ints)."""

    def __init__(self) -> None:
        self.nonfinite_steps: Optional[Tensor] = None
        self.solver = {k: 0 for k in SOLVER_COUNTERS}
        self.causes: dict[str, Tensor] = {}

    def count(self, cause: str, ok: Tensor) -> None:
        """Add 1 to the device counter `cause` when the 0-dim bool `ok` is False (no host
        sync). One source of every dropped/repaired-step count (see CAUSES)."""
        self.causes[cause] = _tally(self.causes.get(cause), ok)

    def count_nonfinite(self, ok: Tensor) -> None:
        """Add 1 to the device counter of dropped steps (`nonfinite_steps`, kept apart from
        the causes) when ok is False (no host sync)."""
        self.nonfinite_steps = _tally(self.nonfinite_steps, ok)

    def report(self) -> dict:
        """All counters as Python ints (reads the device counter: a host sync)."""
        steps = 0 if self.nonfinite_steps is None else int(self.nonfinite_steps)
        causes = {k: 0 for k in CAUSES}
        causes.update((k, int(v)) for k, v in self.causes.items())
        return {"nonfinite_steps": steps, **self.solver, **causes}

    def state_dict(self) -> dict:
        steps = (torch.zeros((), dtype=torch.int64) if self.nonfinite_steps is None
                 else self.nonfinite_steps.clone())
        return {"nonfinite_steps": steps, **self.solver,
                "causes": {k: v.clone() for k, v in self.causes.items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        steps = state.get("nonfinite_steps")
        self.nonfinite_steps = None if steps is None else torch.as_tensor(steps, dtype=torch.int64).to(device)
        self.solver = {k: int(state.get(k, 0)) for k in SOLVER_COUNTERS}
        causes = state.get("causes") or {}
        self.causes = {str(k): torch.as_tensor(v, dtype=torch.int64).to(device) for k, v in causes.items()}

    # ---- refresh-time solvers (host syncs allowed) ----------------------------------
    def solve_eigh(self, factors: list, previous: list, tol: Optional[float] = None) -> tuple:
        """ops.eigh of every factor with the fallback chain for those that fail.

        previous[i]: (eigenvalues, eigenvectors) in use for factors[i], or None.
        tol: None for full solves, else ops.eigh's warm refresh from the previous bases.
        Returns (eigenvalues, eigenvectors, paths): lists, all finite, and a CPU int64
        tensor indexing `ops.EIGH_PATHS` per factor (what a warm refresh did; a factor
        the fallback chain solved counts as "full").
        """
        full = ops.EIGH_PATHS.index("full")
        try:
            warm = None if tol is None else [None if p is None else p[1] for p in previous]
            vals, vecs, paths = ops.eigh(factors, previous=warm, tol=tol, return_paths=True)
            bad = [i for i in range(len(factors)) if not _finite(vals[i], vecs[i])]
        except (RuntimeError, ValueError):
            vals, vecs = [None] * len(factors), [None] * len(factors)
            paths = torch.full((len(factors),), full, dtype=torch.int64)
            bad = list(range(len(factors)))
        for i in bad:
            vals[i], vecs[i] = self._eigh_one(factors[i], previous[i], retry_plain=vals[i] is None)
            paths[i] = full
        return vals, vecs, paths

    def _eigh_one(self, m: Tensor, previous, *, retry_plain: bool) -> tuple:
        if _finite(m):
            attempts = ([("plain", m)] if retry_plain else []) + [("fp64_retries", m.double())]
            m64 = m.double()
            m64 = (m64 + m64.mT) / 2
            # a shift far above fp64 rounding of the largest entry, far below its scale
            shift = m.shape[0] * 1e-10 * float(m64.abs().max().clamp(min=1e-300))
            attempts.append(("damped_retries", m64 + shift * torch.eye(m.shape[0], dtype=m64.dtype,
                                                                      device=m.device)))
            for counter, mat in attempts:
                try:
                    d, q = ops.eigh([mat])
                except (RuntimeError, ValueError):
                    continue
                if _finite(d[0], q[0]):
                    if counter != "plain":
                        self.solver[counter] += 1
                    return d[0].to(m.dtype), q[0].to(m.dtype)
        self.solver["kept_previous"] += 1
        if previous is not None:
            return previous
        # nothing to keep: the identity basis with zero eigenvalues preconditions by
        # 1/damping, a scaled gradient step
        n = m.shape[0]
        return (torch.zeros(n, dtype=m.dtype, device=m.device),
                torch.eye(n, dtype=m.dtype, device=m.device))

    def solve_inverse(self, factors: list, dampings: list, previous: list) -> list:
        """ops.damped_inverse of every factor with the fallback chain for those that fail.

        dampings[i]: 0-dim tensor or float; previous[i]: the inverse in use, or None.
        """
        invs: list[Optional[Tensor]]
        try:
            solved = ops.damped_inverse(factors, dampings)
            bad = [i for i, inv in enumerate(solved) if not _finite(inv)]
            invs = list(solved)
        except (RuntimeError, ValueError):
            invs, bad = [None] * len(factors), list(range(len(factors)))
        for i in bad:
            invs[i] = self._inverse_one(factors[i], dampings[i], previous[i])
        return invs

    def _inverse_one(self, m: Tensor, damping, previous) -> Tensor:
        damping = torch.as_tensor(damping, dtype=torch.float64).to(m.device)
        if _finite(m, damping):
            m64 = m.double()
            shift = m.shape[0] * 1e-10 * float(m64.abs().max().clamp(min=1e-300))
            for counter, d in (("fp64_retries", damping), ("damped_retries", damping + shift)):
                try:
                    inv = ops.damped_inverse([m64], [d.reshape(())])[0]
                except (RuntimeError, ValueError):
                    continue
                if _finite(inv):
                    self.solver[counter] += 1
                    return inv.to(m.dtype)
        self.solver["kept_previous"] += 1
        if previous is not None:
            return previous
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        return eye / damping.clamp(min=torch.finfo(m.dtype).tiny).to(m.dtype)
