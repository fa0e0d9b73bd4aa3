"""CPU LAPACK calls (eigh, Cholesky) on a busy machine: OMP_WAIT_POLICY and a thread limit.

torch's CPU wheels run LAPACK through MKL on OpenMP threads that, by default, spin while
they wait for each other. When other processes hold the cores, a spinning thread burns
the time slice its partner needs, and one eigh becomes many times slower (issue 21: a
kfac-pytorch script took 442 s without `OMP_WAIT_POLICY=PASSIVE`, 45 s with it).

OpenMP reads `OMP_WAIT_POLICY` once, when it starts (at `import torch`), so a library
cannot change it afterwards. What the library can do, around its own LAPACK calls:

- `cpu_lapack(device)` warns once per process (`LapackThreadsWarning`, naming the
  variable) when a CPU call runs on more than one thread with `OMP_WAIT_POLICY` unset;
- and limits the threads of that call to `KFAC_FAST_LAPACK_THREADS` when it is set
  (opt-in: the default leaves the thread count, and so the numbers, exactly as before).

Measured on a 2-core machine shared with three other jobs, torch 2.13 MKL, 2 torch
threads: one float32 eigh each of 512, 768 and 1024, median seconds over 3 rounds, three
runs (two with an extra busy-loop process):

    spinning (default)          1.36   2.91 (0.50-12.7)   3.02 (2.2-6.8, no busy loop)
    OMP_WAIT_POLICY=PASSIVE     0.47   0.33               0.44
    KFAC_FAST_LAPACK_THREADS=1  0.36   0.76
    both                               0.71               0.29

PASSIVE helps most and most steadily; the thread limit is what the library can still do
once OpenMP has started. It is opt-in because MKL's eigh gives different bits on 1 and 2
threads (n = 400 and 785), so a default limit would change every CPU run's numbers.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator, Optional

import torch

ENV_THREADS = "KFAC_FAST_LAPACK_THREADS"


class LapackThreadsWarning(UserWarning):
    """CPU LAPACK runs multi-threaded with OpenMP threads that spin while they wait."""


_warned = False


def lapack_thread_limit() -> Optional[int]:
    """The thread limit from KFAC_FAST_LAPACK_THREADS, or None when it is unset or empty."""
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return None
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{ENV_THREADS} must be a positive integer (threads for CPU LAPACK calls), got {raw!r}")
    return limit


def _warn_if_spinning(threads: int) -> None:
    global _warned
    if _warned or threads <= 1 or os.environ.get("OMP_WAIT_POLICY"):
        return
    _warned = True
    warnings.warn(
        f"OMP_WAIT_POLICY is not set and CPU LAPACK (eigh, Cholesky) runs on {threads} threads: on a busy "
        "machine the threads spin while they wait and one eigh can take 10x longer. Set "
        "OMP_WAIT_POLICY=PASSIVE before Python starts (OpenMP reads it once, at start), or "
        f"{ENV_THREADS}=1 to run kfac_fast's LAPACK calls on one thread; setting OMP_WAIT_POLICY "
        "to any value silences this warning.", LapackThreadsWarning, stacklevel=3)


@contextlib.contextmanager
def cpu_lapack(device: torch.device) -> Iterator[None]:
    """Wrap one LAPACK call on `device`: on CPU, warn once about spinning threads and apply
    the KFAC_FAST_LAPACK_THREADS limit (restored on exit); elsewhere, do nothing."""
    if torch.device(device).type != "cpu":
        yield
        return
    limit = lapack_thread_limit()
    before = torch.get_num_threads()
    _warn_if_spinning(before if limit is None else min(limit, before))
    if limit is None or limit >= before:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(before)
