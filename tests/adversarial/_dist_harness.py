"""Spawn a gloo world for the adversarial distributed cases, under a hard wall-clock limit.

`spawn(target, world, limit_s)` runs `target(rank, world, port, queue)` on `world`
processes (forkserver, one thread each). A target reports each case as it finishes,
`queue.put((rank, case, result))`, and `(rank, None, None)` when done; `spawn` returns
{rank: {case: result}}. Ranks still running after `limit_s` are killed: the cases they
had not reported are missing (a hang is a failed test naming the case, never a stuck
CI job). Results are cached per (target, world).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Iterator

import torch
import torch.multiprocessing as mp

_RESULTS: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_world(target, world: int, join_s: float = 10) -> Iterator:
    """Start `target(rank, world, port, queue)` on `world` processes and yield the queue;
    on exit join them (at most `join_s` each) and kill what is still alive.

    A fork server imports torch (and torch._dynamo, which the first custom-op call pulls
    in) once; its children start from that image instead of re-importing. Each child
    runs one thread (OMP_NUM_THREADS is read at its start-up)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "kfac_fast.distributed"])
    results = ctx.Queue()
    port = free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=target, args=(r, world, port, results)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    try:
        yield results
    finally:
        for p in procs:
            p.join(timeout=join_s)
            if p.is_alive():
                p.kill()
                p.join()


def spawn(target, world: int, limit_s: float) -> dict:
    key = (target.__module__, target.__qualname__, world)
    if key in _RESULTS:
        return _RESULTS[key]
    got: dict = {r: {} for r in range(world)}
    done: set = set()
    deadline = time.monotonic() + limit_s
    with running_world(target, world) as results:
        try:
            while len(done) < world:
                rank, case, out = results.get(timeout=max(deadline - time.monotonic(), 0.1))
                if case is None:
                    done.add(rank)
                else:
                    got[rank][case] = out
        except queue_mod.Empty:
            for r in range(world):
                if r not in done:
                    got[r]["hung"] = f"rank {r} did not finish within {limit_s} s"
    _RESULTS[key] = got
    return got


@contextlib.contextmanager
def reporting_rank(rank: int, world: int, port: int, results, *, timeout_s: float = 30) -> Iterator[dict]:
    """Inside a `running_world` target: join the gloo group (every collective bounded by
    `timeout_s`) and yield the dict the checks fill. On exit it goes to the parent as
    (rank, dict), with the traceback under "crash" if a check raised (so the parent fails
    with the worker's traceback instead of a missing rank), and the group is destroyed."""
    out: dict = {}
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        yield out
    except Exception:
        out["crash"] = traceback.format_exc()
    finally:
        results.put((rank, out))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def collect_world(target, world: int, cache: dict, *, join_s: float = 30, wait_s: float = 120) -> dict:
    """rank -> what `target`'s rank reported through `reporting_rank`, running `target`
    on `world` processes once per world size (kept in `cache`). A rank that reported
    nothing within `wait_s` is missing from the result: callers assert every rank is there."""
    if world not in cache:
        got = {}
        with running_world(target, world, join_s=join_s) as results:
            try:
                for _ in range(world):
                    rank, out = results.get(timeout=wait_s)
                    got[rank] = out
            except queue_mod.Empty:
                pass
        cache[world] = got
    return cache[world]


def every_rank(got: dict, world: int) -> dict:
    """`got` (rank -> report) after asserting that every rank reported and none crashed."""
    assert sorted(got) == list(range(world)), f"only ranks {sorted(got)} of {world} reported"
    for rank, out in got.items():
        assert "crash" not in out, f"rank {rank} crashed:\n{out['crash']}"
    return got
