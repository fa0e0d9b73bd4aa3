"""Adversarial data-parallel cases (issue 18 items 3 and 4): two gloo ranks whose data,
branches, settings or failures differ. Every rank must take the same kfac_fast
collectives, and a failure on one rank must surface on every rank as a clear error
within a bounded time, never a hang or a gloo abort.

All cases run in one spawned world of 2 (spawning is slow), under a hard wall-clock
limit (`_dist_harness.spawn`): a hang shows as a missing rank, never a stuck job.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner, load_checkpoint, save_checkpoint
from kfac_fast import distributed as kd

from ._dist_harness import spawn

pytestmark = [pytest.mark.adversarial,
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

WORLD = 2
LIMIT_S = float(os.environ.get("KFAC_ADV_DIST_LIMIT_S", 120))
KW = dict(inv_update_steps=2, damping=1e-2, kl_clip=1e-3, lr=0.3, factor_dtype=torch.float64)


class Branchy(nn.Module):
    """fc1 -> (extra, on some ranks / steps only) -> fc2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.extra = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x, use_extra=True):
        h = torch.tanh(self.fc1(x))
        if use_extra:
            h = torch.tanh(self.extra(h))
        return self.fc2(h)


def make():
    torch.manual_seed(0)
    return Branchy().double()


def batch(rank, step):
    gen = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (3,), generator=gen)


def train_step(model, precond, rank, step, use_extra=True, *, update=True, grad_timeout=None):
    x, y = batch(rank, step)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, use_extra), y).backward()
    kd.average_gradients_(model.parameters(), timeout=grad_timeout)
    precond.step()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    if update:
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    return grads


def same_on_every_rank(t):
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    torch.distributed.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def check_grads(bad, step, grads):
    if not torch.isfinite(grads).all():
        bad.append(f"step {step}: non-finite .grad")
    if not same_on_every_rank(grads):
        bad.append(f"step {step}: the preconditioned gradients differ across ranks (replicas diverge)")


# ---- the cases (each returns what went wrong; [] is a pass) -------------------------------
def case_layer_fires_on_one_rank(rank, strategy, factor_sync):
    """`extra` runs on rank 0 at every step and on rank 1 only at step 3 (first seen there
    on a step that does not refresh)."""
    model = make()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy=strategy, factor_sync=factor_sync),
                                 **KW)
    bad: list = []
    for step in range(5):
        check_grads(bad, step, train_step(model, precond, rank, step, use_extra=rank == 0 or step == 3))
        if factor_sync == "update":
            for name, layer in precond.layers.items():
                f = torch.cat([layer.a_factor.reshape(-1), layer.g_factor.reshape(-1)])
                if not same_on_every_rank(f):
                    bad.append(f"step {step}: factors of {name} differ across ranks")
        if step == 0 and factor_sync == "update":
            # only rank 0 saw `extra`: every rank must now hold rank 0's factors (the average
            # over the ranks that hold it), not half of them (the average over all ranks)
            ref_model = make()
            ref = KFACPreconditioner(ref_model, distributed=False, **KW)
            x, y = batch(0, 0)
            F.cross_entropy(ref_model(x), y).backward()
            ref.step()
            got, want = precond.layers["extra"], ref.layers["extra"]
            if not (torch.allclose(got.a_factor, want.a_factor, rtol=1e-12, atol=1e-14)
                    and torch.allclose(got.g_factor, want.g_factor, rtol=1e-12, atol=1e-14)):
                bad.append("step 0: extra's factors are not the average over the ranks that ran it")
            if (got.a_count, got.g_count) != (1, 1):
                bad.append(f"step 0: extra's k is {(got.a_count, got.g_count)}, not 1 on every rank")
    # extra is resynchronised at step 0 (only rank 0 holds it); at step 3 rank 1 fires it
    # too but both already hold it: one partial participation, counted on every rank
    if precond.health().get("partial_participation") != 1:
        bad.append(f"health() partial_participation {precond.health().get('partial_participation')} != 1")
    extra = precond.layers["extra"]
    if extra.a_count == 0 or not torch.isfinite(extra.a_factor).all():
        bad.append(f"rank {rank}: extra has no agreed, finite factors")
    return bad


def case_settings_differ(rank, **per_rank):
    """Returns the error message (or 'no error')."""
    opts = {k: v[rank] for k, v in per_rank.items() if k in ("strategy", "factor_sync", "bucket_cap_mb")}
    kw = dict(KW, **{k: v[rank] for k, v in per_rank.items() if k not in opts})
    try:
        KFACPreconditioner(make(), distributed=kd.DistributedOptions(**opts), **kw)
    except ValueError as exc:
        return str(exc)
    return "no error"


def case_save_on_one_rank(rank, tmp, strategy):
    """`if rank == 0: save_checkpoint(...)` mid-run, training goes on; then every rank
    loads rank 0's file and goes on."""
    model = make()
    opts = kd.DistributedOptions(strategy=strategy)
    precond = KFACPreconditioner(model, distributed=opts, **KW)
    bad: list = []
    path = os.path.join(tmp, f"one-rank-{strategy}.ckpt")
    for step in range(5):
        check_grads(bad, step, train_step(model, precond, rank, step))
        if step == 2 and rank == 0:
            save_checkpoint(path, precond, extra={"model": model.state_dict()})
    torch.distributed.barrier()
    fresh = KFACPreconditioner(model, distributed=opts, **KW)
    precond.remove_hooks()
    extra = load_checkpoint(path, fresh)
    model.load_state_dict(extra["model"])
    for step in range(5, 8):
        check_grads(bad, step, train_step(model, fresh, rank, step))
    return bad


def case_synced_state(rank, tmp):
    """The collective synced_state_dict() on every rank, saved by rank 0 alone, is global."""
    model = make()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy="memory"), **KW)
    for step in range(3):
        train_step(model, precond, rank, step)
    state = precond.synced_state_dict()
    bad = []
    if not state["distributed"]["synced"]:
        bad.append("synced_state_dict is not marked synced")
    for name, entry in state["layers"].items():
        if not same_on_every_rank(entry["a_factor"]) or "qa" not in entry:
            bad.append(f"synced state of {name} is not global")
    local = precond.state_dict()
    if local["distributed"] != {"rank": rank, "world_size": WORLD, "strategy": "memory",
                                "factor_sync": "inverse", "synced": False}:
        bad.append(f"state_dict's distributed entry: {local['distributed']}")
    return bad


def case_ranks_load_different_states(rank):
    """Rank 1 loads a state without decompositions, rank 0 the full one: the layers not
    decomposed on every rank are re-solved by every rank together (no lone refresh)."""
    model = make()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(), **KW)
    for step in range(3):
        train_step(model, precond, rank, step)
    state = precond.synced_state_dict()
    if rank == 1:
        for entry in state["layers"].values():
            for key in ("qa", "da", "qg", "dg"):
                entry.pop(key, None)
    fresh = KFACPreconditioner(model, distributed=kd.DistributedOptions(), **KW)
    precond.remove_hooks()
    fresh.load_state_dict(state)
    bad: list = []
    for step in range(3, 6):  # step 3 does not refresh on its own (inv_update_steps=2)
        check_grads(bad, step, train_step(model, fresh, rank, step))
    return bad


class Injected(MemoryError):
    pass


def case_local_failure(rank, where):
    """Rank 0's share of a step raises (an OOM-like error the solver fallbacks do not
    catch); every rank must raise, and the run must go on after the user catches it."""
    from kfac_fast import ops
    model = make()
    strategy = "memory" if where == "precondition_eigen" else "communication"
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy=strategy), **KW)
    real = getattr(ops, where)
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if rank == 0 and len(calls) == 1:
            raise Injected("injected failure")
        return real(*args, **kw)

    setattr(ops, where, failing)
    errors, bad = [], []
    try:
        for step in range(5):
            try:
                grads = train_step(model, precond, rank, step, update=False)
            except RuntimeError as exc:
                errors.append(str(exc))
                continue
            check_grads(bad, step, grads)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    finally:
        setattr(ops, where, real)
    if precond.health().get("rank_failure") != 1:
        bad.append(f"health() rank_failure {precond.health().get('rank_failure')} != 1")
    return {"errors": errors, "bad": bad}


def case_timeout(rank):
    """Rank 0 stays alive but does not reach K-FAC's step for 4 s (it raised and is busy
    elsewhere, or hangs); rank 1 must get a clear error within about the 2 s timeout, and
    rank 0's step() fails at once when it comes back (kfac_fast's own group is closed)."""
    model = make()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(timeout=2.0), **KW)
    train_step(model, precond, rank, 0)
    out = {}
    x, y = batch(rank, 1)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kd.average_gradients_(model.parameters())
    start = time.monotonic()
    try:
        if rank == 0:
            time.sleep(4.0)  # ... then it comes back (too late)
        precond.step()
        out["error"] = "no error"
    except RuntimeError as exc:
        out["error"] = str(exc)
    out["seconds"] = time.monotonic() - start
    return out


def case_exception_outside_agreed_phases(rank):
    """Rank 0's factor update raises (an OOM-like error) at step 2 and the user catches it
    and goes on: rank 1 waits in K-FAC's next collective; with timeout=2 it gets a clear
    error, and from then on every rank's step() raises the same clear error at once (no
    abort, no hang, no collective mismatched with the gradient average)."""
    from kfac_fast import ops
    model = make()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(timeout=2.0), **KW)
    real, calls = ops.update_factors_, []

    def failing(*args, **kw):
        calls.append(1)
        if rank == 0 and len(calls) == 3:
            raise Injected("injected failure in the factor update")
        return real(*args, **kw)

    ops.update_factors_ = failing
    errors = []
    try:
        for step in range(5):
            try:
                train_step(model, precond, rank, step)
                errors.append(None)
            except (RuntimeError, MemoryError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        ops.update_factors_ = real
    return errors


def case_hooks_mode_branch(rank):
    """update_factors_in_hooks=True agrees the non-finite flag per capture, so a layer that
    fires on one rank only makes the ranks' capture counts differ (documented limit): with
    timeouts on K-FAC's collectives and the gradient average, every rank must get a clear
    error within seconds, never a gloo abort."""
    model = make()
    precond = KFACPreconditioner(model, update_factors_in_hooks=True,
                                 distributed=kd.DistributedOptions(timeout=2.0), **KW)
    start = time.monotonic()
    try:
        for step in range(2):
            train_step(model, precond, rank, step, use_extra=rank == 0, grad_timeout=4.0)
        return {"error": "no error", "seconds": time.monotonic() - start}
    except RuntimeError as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}


def case_gradient_average_timeout(rank):
    """average_gradients_(..., timeout=1): rank 0 is 3 s late; rank 1 gets a clear error
    after about 1 s instead of the process group's 30 minutes, and the group stays usable."""
    model = make()
    x, y = batch(rank, 0)
    F.cross_entropy(model(x), y).backward()
    out = {}
    start = time.monotonic()
    try:
        if rank == 0:
            time.sleep(3.0)
        kd.average_gradients_(model.parameters(), timeout=1.0)
        out["error"] = "no error"
    except RuntimeError as exc:
        out["error"] = str(exc)
    out["seconds"] = time.monotonic() - start
    torch.distributed.barrier()
    out["after"] = same_on_every_rank(torch.ones(3))  # the group still works
    return out


def case_kl_clip_non_finite_layer(rank):
    """One layer's gradient is NaN on a step: the memory strategy's nu must leave that
    layer's <P, dW_bar> out (docs/ops-api.md), as the single-rank ops do, so the other
    layers come out as under the communication strategy (whose nu is the op's), clipped."""
    out = {}
    for strategy in ("communication", "memory"):
        model = make()
        precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy=strategy),
                                     guard_nonfinite=False, **KW)  # the guard would keep every plain grad
        for step in range(2):
            train_step(model, precond, rank, step)
        x, y = batch(rank, 2)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        kd.average_gradients_(model.parameters())
        model.extra.weight.grad[1, 2] = float("nan")
        precond.step()
        out[strategy] = torch.cat([model.fc1.weight.grad.reshape(-1), model.fc2.weight.grad.reshape(-1)])
    bad = []
    if not torch.isfinite(out["memory"]).all() or not torch.allclose(out["memory"], out["communication"],
                                                                      rtol=1e-9, atol=1e-12):
        bad.append(f"memory {out['memory'][:4].tolist()} != communication {out['communication'][:4].tolist()}")
    return bad


def worker(rank, world, port, results):
    torch.set_num_threads(1)
    tmp = os.path.join(tempfile.gettempdir(), f"kfac_adv_dist_{port}")
    os.makedirs(tmp, exist_ok=True)
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=LIMIT_S / 4))
        cases = {
            "branch-communication-inverse": lambda: case_layer_fires_on_one_rank(rank, "communication", "inverse"),
            "branch-communication-update": lambda: case_layer_fires_on_one_rank(rank, "communication", "update"),
            "branch-memory-inverse": lambda: case_layer_fires_on_one_rank(rank, "memory", "inverse"),
            "settings-inv_update_steps": lambda: case_settings_differ(rank, inv_update_steps=(10, 5)),
            "settings-strategy": lambda: case_settings_differ(rank, strategy=("communication", "memory")),
            "settings-damping": lambda: case_settings_differ(rank, damping=(1e-2, 1e-3)),
            "save-one-rank-communication": lambda: case_save_on_one_rank(rank, tmp, "communication"),
            "save-one-rank-memory": lambda: case_save_on_one_rank(rank, tmp, "memory"),
            "synced-state": lambda: case_synced_state(rank, tmp),
            "branch-load-different-states": lambda: case_ranks_load_different_states(rank),
            "kl-clip-non-finite-layer": lambda: case_kl_clip_non_finite_layer(rank),
            "fail-decomposition": lambda: case_local_failure(rank, "eigh"),
            "fail-precondition": lambda: case_local_failure(rank, "precondition_eigen"),
            "exception-outside": lambda: case_exception_outside_agreed_phases(rank),
            "gradient-average-timeout": lambda: case_gradient_average_timeout(rank),
            "timeout": lambda: case_timeout(rank),  # these two last: they break kfac_fast's own groups,
            "hooks-branch": lambda: case_hooks_mode_branch(rank),  # and this one leaves an all-reduce pending
        }
        only = os.environ.get("KFAC_ADV_DIST_ONLY")  # debugging: a comma-separated subset
        for name, run in cases.items():
            if only and name not in only.split(","):
                continue
            try:
                value = run()
            except Exception:
                value = f"crash: {traceback.format_exc()}"
            results.put((rank, name, value))
    except Exception:
        results.put((rank, "crash", traceback.format_exc()))
    finally:
        results.put((rank, None, None))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    got = spawn(worker, WORLD, LIMIT_S)
    for rank, out in got.items():
        assert "crash" not in out, f"rank {rank} crashed:\n{out['crash']}"
    return got


def results(ranks, case):
    for rank, out in ranks.items():
        assert case in out, f"rank {rank} never finished case {case!r} ({out.get('hung', 'it stopped')})"
        assert not (isinstance(out[case], str) and out[case].startswith("crash")), f"rank {rank}: {out[case]}"
    return ranks.items()


@pytest.mark.parametrize("config", ["communication-inverse", "communication-update", "memory-inverse"])
def test_safe_layer_fires_on_one_rank(ranks, config):
    for rank, out in results(ranks, f"branch-{config}"):
        assert out[f"branch-{config}"] == [], f"rank {rank}: {out[f'branch-{config}']}"


@pytest.mark.parametrize("setting,values", [("inv_update_steps", "10, 5"), ("strategy", "'communication', 'memory'"),
                                            ("damping", "0.01, 0.001")])
def test_error_settings_differ_across_ranks(ranks, setting, values):
    a, b = values.split(", ")
    for rank, out in results(ranks, f"settings-{setting}"):
        msg = out[f"settings-{setting}"]
        assert f"setting {setting!r} differs across ranks" in msg, f"rank {rank}: {msg}"
        assert f"rank 0: {a}" in msg and f"rank 1: {b}" in msg, f"rank {rank}: {msg}"


@pytest.mark.parametrize("strategy", ["communication", "memory"])
def test_safe_save_checkpoint_on_one_rank(ranks, strategy):
    for rank, out in results(ranks, f"save-one-rank-{strategy}"):
        assert out[f"save-one-rank-{strategy}"] == [], f"rank {rank}: {out[f'save-one-rank-{strategy}']}"


def test_safe_synced_state_dict_is_global(ranks):
    for rank, out in results(ranks, "synced-state"):
        assert out["synced-state"] == [], f"rank {rank}: {out['synced-state']}"


def test_safe_ranks_load_different_states(ranks):
    for rank, out in results(ranks, "branch-load-different-states"):
        assert out["branch-load-different-states"] == [], f"rank {rank}: {out['branch-load-different-states']}"


def test_safe_kl_clip_leaves_a_non_finite_layer_out_memory_strategy(ranks):
    for rank, out in results(ranks, "kl-clip-non-finite-layer"):
        assert out["kl-clip-non-finite-layer"] == [], f"rank {rank}: {out['kl-clip-non-finite-layer']}"


@pytest.mark.parametrize("where", ["decomposition", "precondition"])
def test_error_local_failure_raises_on_every_rank_and_run_goes_on(ranks, where):
    for rank, out in results(ranks, f"fail-{where}"):
        got = out[f"fail-{where}"]
        assert len(got["errors"]) == 1, f"rank {rank}: {got}"
        assert "failed on rank(s) [0]" in got["errors"][0], f"rank {rank}: {got}"
        if rank == 0:
            assert "Injected" in got["errors"][0] or "injected" in got["errors"][0]
        assert got["bad"] == [], f"rank {rank}: {got['bad']}"


def test_error_timeout_surfaces_on_every_rank(ranks):
    for rank, out in results(ranks, "timeout"):
        got = out["timeout"]
        assert got["error"].startswith("kfac_fast.distributed:") and "failed" in got["error"], f"rank {rank}: {got}"
        # rank 1 waited about the 2 s timeout; rank 0 (asleep 4 s) fails at once after
        assert got["seconds"] < 12, f"rank {rank}: {got}"
    assert "timeout 2 s" in ranks[1]["timeout"]["error"] and ranks[1]["timeout"]["seconds"] < 8


def test_error_exception_outside_agreed_phases_surfaces_on_every_rank(ranks):
    items = dict(results(ranks, "exception-outside"))
    failed, waiting = items[0]["exception-outside"], items[1]["exception-outside"]
    assert failed[:2] == [None, None] and waiting[:2] == [None, None], (failed, waiting)
    assert "injected failure" in failed[2], failed
    assert "timeout 2 s" in waiting[2] and waiting[2].startswith("RuntimeError: kfac_fast.distributed:"), waiting
    for errors in (failed[3:], waiting[3:]):  # later steps: the clear error at once, on every rank
        assert all(e is not None and "kfac_fast.distributed:" in e for e in errors), (failed, waiting)


def test_error_hooks_mode_branch_is_a_clear_error_not_an_abort(ranks):
    for rank, out in results(ranks, "hooks-branch"):
        got = out["hooks-branch"]
        assert got["error"].startswith("kfac_fast.distributed:") and got["seconds"] < 12, f"rank {rank}: {got}"


def test_error_gradient_average_timeout(ranks):
    items = dict(results(ranks, "gradient-average-timeout"))
    late, waiting = items[0]["gradient-average-timeout"], items[1]["gradient-average-timeout"]
    assert "did not complete within the timeout of 1 s" in waiting["error"], waiting
    assert waiting["seconds"] < 2.5, waiting
    assert late["error"] == "no error" and late["after"] and waiting["after"], (late, waiting)
