"""Data-parallel K-FAC (kfac_fast.distributed) on CPU with gloo.

One spawn per world size (2 and 4 processes): every check of that world size runs
inside the one spawn and each rank reports its results back through a queue; the test
functions then assert on them. Every collective has a timeout (init_process_group's),
so a bug shows as a failed check, not a hang.

The oracle of the equivalence checks is the single-process preconditioner on the whole
global batch, run inside each worker with distributed=False (float64, tight tolerance).
Eigenvectors may differ in sign between runs, so the checks compare factors and
preconditioned gradients, never eigenvectors.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast import distributed as kd
from kfac_fast.distributed.collectives import _buckets
from tests.adversarial._dist_harness import collect_world, every_rank, reporting_rank

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-9, atol=1e-12)
STEPS = 4
PER_RANK = 3  # examples per rank (equal shards)


# ---------------------------------------------------------------------------------------
# pure functions (no processes)
# ---------------------------------------------------------------------------------------
def resnet50_factor_sizes() -> list[int]:
    """A and G sizes of ResNet-50's conv and fc layers (bias-free convs, fc with bias)."""
    sizes = [3 * 49, 64]
    in_c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out_c = width * 4
            sizes += [in_c, width, width * 9, width, width, out_c]
            if b == 0:
                sizes += [in_c, out_c]
            in_c = out_c
    sizes += [2048 + 1, 1000]
    return sizes


def curves_factor_sizes() -> list[int]:
    enc = [784, 400, 200, 100, 50, 25, 6]
    dims = enc + enc[::-1][1:]
    return [n for d_in, d_out in zip(dims[:-1], dims[1:]) for n in (d_in + 1, d_out)]


@pytest.mark.parametrize("sizes", ["resnet50", "curves"])
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_assignment_balances_realistic_layer_sizes(world, sizes):
    costs = [kd.decomposition_cost(n) for n in
             (resnet50_factor_sizes() if sizes == "resnet50" else curves_factor_sizes())]
    owners = kd.assign_work(costs, world)
    loads = kd.rank_loads(costs, owners, world)
    mean = sum(loads) / world
    # no assignment beats max(mean, largest item): one factor is never split
    best = max(mean, max(costs))
    print(f"{sizes} factors on {world} ranks: max/mean load {max(loads) / mean:.3f}, "
          f"max/lower bound {max(loads) / best:.4f}")
    # Graham's bound for largest-first greedy is 4/3; these sets land within 1%
    assert max(loads) <= 1.01 * best
    assert kd.load_imbalance(costs, owners, world) == pytest.approx(max(loads) / mean)


def test_assignment_is_least_loaded_and_deterministic():
    assert kd.assign_work([5, 4, 3, 3, 2, 2, 1], 3) == [0, 1, 2, 2, 1, 0, 1]
    assert kd.assign_work([1.0, 1.0], 1) == [0, 0]
    assert kd.assign_work([], 4) == []
    with pytest.raises(ValueError, match="world_size"):
        kd.assign_work([1.0], 0)
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        kd.assign_work([1.0, -2.0], 2)


def test_memory_owners_bound_memory_per_rank():
    """FSDP2 'memory' assigns owners on memory: per rank <= total / world + the largest
    layer's, where decomposition time (n^3) breaks it (one 1001 x 10 layer and 200 layers
    101 x 100 at world 2: 2.0M vs 8.12M elements against a bound of 7.07M)."""
    from kfac_fast.distributed.assignment import factor_owners, memory_cost
    dims = {"big": (1001, 10), **{f"l{i}": (101, 100) for i in range(200)}}
    held = {n: memory_cost(a) + memory_cost(g) for n, (a, g) in dims.items()}
    world = 2
    bound = sum(held.values()) / world + max(held.values())

    def per_rank(owners):
        loads = [0.0] * world
        for n in dims:
            loads[owners[(n, "a")]] += held[n]
        return loads

    by_time = per_rank(factor_owners(dims, world, whole_layers=True))
    assert max(by_time) > bound  # the counterexample: decomposition time is not memory
    by_memory = per_rank(factor_owners(dims, world, whole_layers=True, cost=memory_cost))
    assert max(by_memory) <= bound, (by_memory, bound)
    assert max(by_memory) < 0.6 * sum(by_memory)


def test_waits_block_the_host_only_on_cpu_tensors():
    """A timed wait blocks the host until the collective completes (NCCL): per-step waits
    on device tensors are plain wait() (the group's own timeout applies); CPU (gloo) keeps
    the explicit timeout."""
    from kfac_fast.distributed.collectives import _wait

    class Work:
        def __init__(self):
            self.calls = []

        def wait(self, **kw):
            self.calls.append(kw)

    on_device, on_cpu = Work(), Work()
    assert _wait(on_device, 5.0, torch.empty(1, device="meta"))
    assert _wait(on_cpu, 5.0, torch.empty(1))
    assert on_device.calls == [{}]
    assert len(on_cpu.calls) == 1 and on_cpu.calls[0]["timeout"].total_seconds() == 5.0


def test_buckets_respect_the_cap():
    assert _buckets([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert _buckets([], 8) == []


def test_single_process_without_init():
    assert not torch.distributed.is_initialized()
    assert kd.resolve_group(None) is None
    model = nn.Linear(3, 2)
    assert KFACPreconditioner(model).distributed is None
    with pytest.raises(RuntimeError, match="not initialised"):
        KFACPreconditioner(nn.Linear(3, 2), distributed=kd.DistributedOptions())
    with pytest.raises(ValueError, match="strategy"):
        kd.DataParallelKFAC({}, "eigen", None, strategy="fastest")
    from kfac_fast import KFAC
    assert KFAC(nn.Linear(3, 2)).preconditioner.distributed is None
    with pytest.raises(RuntimeError, match="not initialised"):
        KFAC(nn.Linear(3, 2), distributed=True)


def test_settings_are_described_as_plain_values():
    def warmup(step):
        return min(1.0, step / 10)

    precond = KFACPreconditioner(nn.Linear(3, 2), inv_update_steps=5, lr=warmup, kl_clip=None,
                                 factor_dtype=torch.float64)
    got = kd.settings_of(precond)
    assert got["inv_update_steps"] == 5 and got["kl_clip"] is None and got["damping"] == 1e-3
    assert got["factor_dtype"] == "torch.float64" and got["method"] == "eigen"
    assert got["lr"].startswith("<schedule ") and got["lr"].endswith("warmup>")
    assert set(got) >= {"factor_update_steps", "factor_decay", "guard_nonfinite", "update_factors_in_hooks"}


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "10"])
def test_timeouts_are_checked(bad):
    with pytest.raises(ValueError, match="timeout"):
        kd.DistributedOptions(timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        kd.average_gradients_([], timeout=bad)


# ---------------------------------------------------------------------------------------
# the spawned workers
# ---------------------------------------------------------------------------------------
class Net(nn.Module):
    """Conv2d (im2col rows) + Linear with and without bias: every row convention."""

    def __init__(self, hidden: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(27, hidden)
        self.fc2 = nn.Linear(hidden, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def make_data(world: int, step: int):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * PER_RANK, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (world * PER_RANK,), generator=gen)
    return x, y


def make_model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return Net(hidden).double()


KFAC_KW = dict(inv_update_steps=2, damping=1e-2, kl_clip=1e-3, lr=0.3, factor_dtype=torch.float64)


def run_steps(model, precond, rank, world, *, ddp_model=None, average=None):
    """STEPS steps; after each, the factors and the preconditioned grads of the model."""
    records = []
    net = ddp_model or model
    for step in range(STEPS):
        x, y = make_data(world, step)
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        model.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if average is not None:
            average(model.parameters())
        precond.step()
        records.append({
            "factors": {n: (layer.a_factor.clone(), layer.g_factor.clone()) for n, layer in precond.layers.items()},
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "nu": None if precond.last_nu is None else float(precond.last_nu),
        })
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.3 * p.grad
    return records


def compare(got, want, factor_steps) -> list[str]:
    """Mismatch descriptions (empty when everything agrees)."""
    bad = []
    for step, (g, w) in enumerate(zip(got, want)):
        if step in factor_steps:
            for name, (fa, fg) in w["factors"].items():
                ga, gg = g["factors"][name]
                if not torch.allclose(ga, fa, **TOL) or not torch.allclose(gg, fg, **TOL):
                    bad.append(f"step {step}: factors of {name} differ (max {(ga - fa).abs().max():.2e})")
        for name, wg in w["grads"].items():
            gg = g["grads"][name]
            if not torch.allclose(gg, wg, **TOL):
                bad.append(f"step {step}: grad of {name} differs (max {(gg - wg).abs().max():.2e})")
        if (g["nu"] is None) != (w["nu"] is None) or (w["nu"] is not None and abs(g["nu"] - w["nu"]) > 1e-9):
            bad.append(f"step {step}: nu {g['nu']} != {w['nu']}")
    return bad


def check_equivalence(rank, world, *, strategy, factor_sync, method, ddp, hooks=False,
                      group=None, extra=None, during=None, out=None) -> list[str]:
    """rank, world: this process's rank in `group` (default: the world) and its size.
    extra: more KFACPreconditioner arguments (both runs); during: a context manager
    around the distributed run only; out: receives the distributed preconditioner."""
    kw = dict(KFAC_KW, method=method, update_factors_in_hooks=hooks, **(extra or {}))
    ref_model = make_model()
    want = run_steps(ref_model, KFACPreconditioner(ref_model, distributed=False, **kw), None, world)

    model = make_model()
    ddp_model = None
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(model, process_group=group)
    opts = kd.DistributedOptions(strategy=strategy, factor_sync=factor_sync, bucket_cap_mb=1e-3)
    precond = KFACPreconditioner(ddp_model or model, process_group=group, distributed=opts, **kw)
    if precond.distributed is None:
        return ["distributed driver was not set up"]
    with during or contextlib.nullcontext():
        got = run_steps(model, precond, rank, world, ddp_model=ddp_model,
                        average=None if ddp else (lambda ps: kd.average_gradients_(ps, group)))
    if out is not None:
        out["precond"] = precond
    for rec in got:  # DDP prefixes names with "module."
        rec["factors"] = {n.removeprefix("module."): v for n, v in rec["factors"].items()}
    want_steps = set(range(STEPS)) if factor_sync == "update" else {0, 2}
    bad = compare(got, want, want_steps)
    if strategy == "memory":
        owners = precond.distributed.owners()
        for name, layer in precond.layers.items():
            if (owners[(name, "a")] == rank) != (layer.qa is not None or layer.a_inv is not None):
                bad.append(f"memory strategy: {name} holds a decomposition iff owned, violated")
    if precond.distributed.bytes["factors"] == 0:
        bad.append("no factor bytes were all-reduced")
    return bad


def check_state_dict(rank, world) -> list[str]:
    """Save on rank 0 (synced_state_dict is the collective, exact state), load on every rank, continue."""
    kw = dict(KFAC_KW, method="eigen")
    ref_model = make_model()
    want = run_steps(ref_model, KFACPreconditioner(ref_model, distributed=False, **kw), None, world)

    model = make_model()
    opts = kd.DistributedOptions(strategy="memory", factor_sync="inverse")
    precond = KFACPreconditioner(model, distributed=opts, **kw)
    for step in range(STEPS - 1):
        x, y = make_data(world, step)
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kd.average_gradients_(model.parameters())
        precond.step()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.3 * p.grad
    state = precond.synced_state_dict()
    objs = [state if rank == 0 else None]
    torch.distributed.broadcast_object_list(objs, src=0)  # stands in for torch.save + torch.load
    fresh = KFACPreconditioner(model, distributed=opts, **kw)
    precond.remove_hooks()
    fresh.load_state_dict(objs[0])
    x, y = make_data(world, STEPS - 1)
    x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kd.average_gradients_(model.parameters())
    fresh.step()
    bad = []
    for name, p in model.named_parameters():
        if not torch.allclose(p.grad, want[-1]["grads"][name], **TOL):
            bad.append(f"after load: grad of {name} differs")
    saved = objs[0]["layers"]
    for name, (fa, _fg) in want[-2]["factors"].items():
        if not torch.allclose(saved[name]["a_factor"], fa, **TOL):
            bad.append(f"saved A of {name} is not the global factor")
    return bad


def check_nonfinite_agreement(rank, world, *, hooks: bool) -> list[str]:
    """A NaN in rank 0's input on step 1 only: every rank must drop that step's factor
    statistics, exactly as the single-process guard does with the NaN in the global
    batch (its k still advances), so the factors stay equal across ranks."""
    bad_step = 1
    kw = dict(KFAC_KW, method="eigen", update_factors_in_hooks=hooks)

    def run(precond, model, shard):
        factors = []
        for step in range(STEPS):
            x, y = make_data(world, step)
            if step == bad_step:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")  # example 0 is in rank 0's shard
            if shard:
                x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if shard:
                kd.average_gradients_(model.parameters())
            precond.step()  # the parameters stay put: the NaN gradient is never applied
            factors.append({n: (layer.a_factor.clone(), layer.g_factor.clone()) for n, layer in precond.layers.items()})
        return factors

    ref_model = make_model()
    ref = KFACPreconditioner(ref_model, distributed=False, **kw)
    want = run(ref, ref_model, shard=False)
    model = make_model()
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(factor_sync="update"), **kw)
    got = run(precond, model, shard=True)
    bad = []
    for step, (g, w) in enumerate(zip(got, want)):
        for name, (wa, wg) in w.items():
            ga, gg = g[name]
            if not (torch.allclose(ga, wa, **TOL) and torch.allclose(gg, wg, **TOL)):
                bad.append(f"step {step}: factors of {name} differ from the single-process guard's")
    for name, (a, g) in got[bad_step].items():
        if not (torch.equal(a, got[bad_step - 1][name][0]) and torch.equal(g, got[bad_step - 1][name][1])):
            bad.append(f"step {bad_step}: factors of {name} took the non-finite step's statistics")
    # the same factors on every rank: rank 1 (clean input) must have dropped the step too
    flat = torch.cat([t.reshape(-1) for f in got for a, g in f.values() for t in (a, g)])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    if not all(torch.equal(t, gathered[0]) for t in gathered):
        bad.append("factors differ across ranks")
    if precond.health()["nonfinite_steps"] != 1:
        bad.append(f"nonfinite_steps {precond.health()['nonfinite_steps']} != 1 on rank {rank}")
    return bad


@contextlib.contextmanager
def first_eigh_fails():
    """The first ops.eigh call (the owner's batched refresh) returns NaN; later ones work."""
    from kfac_fast import ops
    real, calls = ops.eigh, []

    def eigh(matrices, **kw):
        calls.append(len(matrices))
        vals, vecs, *paths = real(matrices, **kw)  # paths when called with return_paths=True
        if len(calls) == 1:
            vals = [torch.full_like(v, float("nan")) for v in vals]
        return (vals, vecs, *paths)

    ops.eigh = eigh
    try:
        yield calls
    finally:
        ops.eigh = real


def check_refresh_paths(rank, world) -> dict:
    """Owner refreshes go through the health fallback chain and the warm eigh_tol path."""
    case = dict(strategy="communication", factor_sync="inverse", method="eigen", ddp=False)
    out = {}
    # first refresh: the owner's batched eigh is NaN; the fp64 retry must repair each owned factor
    slot: dict = {}
    out["fallback"] = check_equivalence(rank, world, **case, during=first_eigh_fails(), out=slot)
    owners = slot["precond"].distributed.owners()
    owned = sum(r == rank for r in owners.values())
    retries = slot["precond"].health()["fp64_retries"]
    if retries != owned:
        out["fallback"].append(f"fp64_retries {retries} != {owned} factors owned by rank {rank}")
    # warm refreshes, compared with the single-process run with the same eigh_tol
    slot = {}
    out["warm"] = check_equivalence(rank, world, **case, extra=dict(eigh_tol=0.5), out=slot)
    out["warm_stats"] = dict(slot["precond"].refresh_stats)
    out["owned"] = owned
    return out


def check_kfac_data_parallel(rank, world) -> list[str]:
    """KFAC runs data-parallel by default under torch.distributed (issue 20; its equivalence
    with one process is tests/test_optimizer_distributed.py's), and distributed=False opts out."""
    from kfac_fast import KFAC
    bad = []
    opt = KFAC(make_model())
    if opt.data_parallel is None or opt.preconditioner.distributed is None:
        bad.append("KFAC under torch.distributed did not run data-parallel")
    opt = KFAC(make_model(), distributed=False)  # the opt-out: independent per-rank runs
    if opt.preconditioner.distributed is not None:
        bad.append("KFAC(distributed=False) set up a distributed driver")
    return bad


def check_mismatch(rank, world) -> str:
    """The last rank builds a wider model: every rank must raise, none may hang."""
    model = make_model(hidden=7 if rank == world - 1 else 5)
    try:
        KFACPreconditioner(model)
    except ValueError as exc:
        return str(exc)
    return "no error"


def check_world_of_one(rank, world) -> list[str]:
    groups = [torch.distributed.new_group([r]) for r in range(world)]
    kw = dict(KFAC_KW, method="eigen")
    a_model, b_model = make_model(), make_model()
    a = KFACPreconditioner(a_model, process_group=groups[rank], **kw)
    if a.distributed is not None:
        return ["a group of one set up a distributed driver"]
    got = run_steps(a_model, a, None, world)
    want = run_steps(b_model, KFACPreconditioner(b_model, distributed=False, **kw), None, world)
    bad = []
    for g, w in zip(got, want):
        for name in w["grads"]:
            if not torch.equal(g["grads"][name], w["grads"][name]):
                bad.append(f"world of one: grad of {name} not bit-identical")
    return bad


def check_empty_masks(rank, world) -> list[str]:
    """factor_sync="update", weighted by rows: a step whose row mask is all False on every
    rank (no rows anywhere) keeps one process's F = beta F, never 0 / 0."""
    kw = dict(factor_dtype=torch.float64, inv_update_steps=1)
    torch.manual_seed(0)
    lin, ref = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    ref.load_state_dict(lin.state_dict())
    precond = KFACPreconditioner(nn.Sequential(lin), distributed=kd.DistributedOptions(factor_sync="update",
                                                                                        timeout=30), **kw)
    oracle = KFACPreconditioner(nn.Sequential(ref), distributed=False, **kw)
    bad = []
    for step in range(3):
        xs = [torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(10 * step + r), dtype=torch.float64)
              for r in range(world)]
        mask = torch.full((2, 5), step != 1)
        precond.set_row_mask(mask)
        oracle.set_row_mask(torch.cat([mask] * world))
        lin.zero_grad()
        ref.zero_grad()
        lin(xs[rank]).pow(2).mean().backward()
        ref(torch.cat(xs)).pow(2).mean().backward()
        for p in lin.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        precond.step()
        oracle.step()
        got, want = precond.layers["0"], oracle.layers["0"]
        for side in ("a", "g"):
            g, w = getattr(got, f"{side}_factor"), getattr(want, f"{side}_factor")
            if not torch.allclose(g, w, **TOL):
                bad.append(f"step {step}: {side} factor is not one process's ({g.flatten()[:2].tolist()})")
        if not torch.allclose(lin.weight.grad, ref.weight.grad, **TOL):
            bad.append(f"step {step}: the preconditioned gradient is not one process's")
    return bad


def check_sharded_refused(rank, world) -> dict:
    """FSDP2 (fully_shard: Shard(0) on a 1-D mesh over the group) is accepted; DTensor
    parameters outside fully_shard (tensor parallelism, bare distribute_tensor, whatever
    the placement), another placement under fully_shard, and FSDP1 are refused naming the
    module or parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for key, placement in (("shard0", Shard(0)), ("shard1", Shard(1)), ("replicate", Replicate())):
        model = nn.Linear(4, 2 * world).double()
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [placement]))
        try:
            out[key] = "built" if KFACPreconditioner(model).distributed.sharded is not None else "not sharded"
        except NotImplementedError as exc:
            out[key] = str(exc)
    try:
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        tp = parallelize_module(nn.Sequential(nn.Linear(4, 2 * world).double()), mesh, {"0": ColwiseParallel()})
    except Exception as exc:  # tensor parallelism cannot be built here
        out["colwise"] = f"skipped: {exc}"
    else:
        try:
            KFACPreconditioner(tp)
            out["colwise"] = "built"
        except NotImplementedError as exc:
            out["colwise"] = str(exc)
    fsdp = fully_shard(nn.Sequential(nn.Linear(4, 2 * world).double()), mesh=mesh)
    out["fully_shard"] = "built" if KFACPreconditioner(fsdp).distributed.sharded is not None else "not sharded"
    try:
        dim1 = fully_shard(nn.Sequential(nn.Linear(2 * world, 4).double()), mesh=mesh,
                           shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
    except Exception as exc:  # this torch has no shard_placement_fn
        out["fully_shard_dim1"] = f"skipped: {exc}"
    else:
        try:
            KFACPreconditioner(dim1)
            out["fully_shard_dim1"] = "built"
        except NotImplementedError as exc:
            out["fully_shard_dim1"] = str(exc)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrapped = nn.Sequential(FullyShardedDataParallel(nn.Linear(4, 2 * world).double(),
                                                         device_id=torch.device("cpu")))
    except Exception as exc:  # FSDP1 cannot be built here: nothing to refuse
        out["fsdp1"] = f"skipped: {exc}"
    else:
        try:
            KFACPreconditioner(wrapped)
            out["fsdp1"] = "no error"
        except NotImplementedError as exc:
            out["fsdp1"] = str(exc)
    return out


CASES = [
    dict(strategy="communication", factor_sync="inverse", method="eigen", ddp=True),
    dict(strategy="communication", factor_sync="update", method="eigen", ddp=False),
    dict(strategy="memory", factor_sync="inverse", method="eigen", ddp=True),
    dict(strategy="memory", factor_sync="update", method="eigen", ddp=False),
    dict(strategy="communication", factor_sync="inverse", method="inverse", ddp=False),
    dict(strategy="memory", factor_sync="inverse", method="inverse", ddp=True),
    dict(strategy="communication", factor_sync="update", method="eigen", ddp=True, hooks=True),
]


def worker(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    with reporting_rank(rank, world, port, results, timeout_s=30) as out:
        for i, case in enumerate(CASES):
            out[f"case{i}"] = check_equivalence(rank, world, **case)
        out["state_dict"] = check_state_dict(rank, world)
        out["world_of_one"] = check_world_of_one(rank, world)
        out["mismatch"] = check_mismatch(rank, world)
        if world == 2:
            out["sharded"] = check_sharded_refused(rank, world)
            out["nonfinite"] = check_nonfinite_agreement(rank, world, hooks=False)
            out["nonfinite_hooks"] = check_nonfinite_agreement(rank, world, hooks=True)
            out["refresh"] = check_refresh_paths(rank, world)
            out["kfac"] = check_kfac_data_parallel(rank, world)
            out["empty_masks"] = check_empty_masks(rank, world)
        if world == 4:
            # two independent pairs: group ranks differ from global ranks
            pairs = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
            out["subgroups"] = check_equivalence(rank % 2, 2, strategy="memory", factor_sync="inverse",
                                                 method="eigen", ddp=True, group=pairs[rank // 2])


_RESULTS: dict = {}


def spawn(world: int) -> dict:
    """Run `worker` on `world` processes (once per session); rank -> its results."""
    return collect_world(worker, world, _RESULTS, join_s=30, wait_s=120)


@pytest.fixture(params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request):
    world = request.param
    return world, every_rank(spawn(world), world)


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{c['strategy']}-{c['factor_sync']}-{c['method']}-{'ddp' if c['ddp'] else 'plain'}"
                              + ("-hooks" if c.get("hooks") else "") for c in CASES])
def test_matches_single_process_on_global_batch(world_results, case):
    world, got = world_results
    for rank, out in got.items():
        assert out[f"case{case}"] == [], f"rank {rank}: {out[f'case{case}']}"


def test_state_dict_saves_on_rank0_and_loads_everywhere(world_results):
    _, got = world_results
    for rank, out in got.items():
        assert out["state_dict"] == [], f"rank {rank}: {out['state_dict']}"


def test_group_of_one_is_the_single_process_path(world_results):
    _, got = world_results
    for rank, out in got.items():
        assert out["world_of_one"] == [], f"rank {rank}: {out['world_of_one']}"


def test_mismatched_model_errors_on_every_rank(world_results):
    world, got = world_results
    for rank, out in got.items():
        assert f"rank {world - 1}" in out["mismatch"] and "differs across ranks" in out["mismatch"], \
            f"rank {rank}: {out['mismatch']}"


def _ranks_of_world(world_results, world: int, why: str = ""):
    """(rank, results) of the spawn of `world` processes; skips in the other world."""
    got_world, got = world_results
    if got_world != world:
        pytest.skip(f"checked in the world of {world}" + (f" ({why})" if why else ""))
    return got.items()


def test_process_group_is_a_parameter(world_results):
    for rank, out in _ranks_of_world(world_results, 4, "two groups of 2"):
        assert out["subgroups"] == [], f"rank {rank}: {out['subgroups']}"


def test_sharded_parameters_fsdp2_accepted_others_refused(world_results):
    for rank, out in _ranks_of_world(world_results, 2):
        got = out["sharded"]
        assert got["fully_shard"] == "built", f"rank {rank}: {got}"
        for key in ("shard0", "shard1", "replicate"):
            assert "'<root>'" in got[key] and "fully_shard" in got[key] and "tensor parallelism" in got[key], \
                f"rank {rank}: {got}"
        if not got["fully_shard_dim1"].startswith("skipped"):
            assert "0.weight" in got["fully_shard_dim1"] and "Shard(0) on a 1-D mesh" in got["fully_shard_dim1"], \
                f"rank {rank}: {got}"
        if not got["colwise"].startswith("skipped"):
            assert "'0'" in got["colwise"] and "FSDPModule" in got["colwise"], f"rank {rank}: {got}"
        if not got["fsdp1"].startswith("skipped"):
            assert "FSDP1" in got["fsdp1"] and "fully_shard" in got["fsdp1"], f"rank {rank}: {got}"


def test_nonfinite_step_is_dropped_on_every_rank(world_results):
    for rank, out in _ranks_of_world(world_results, 2):
        assert out["nonfinite"] == [], f"rank {rank}: {out['nonfinite']}"
        assert out["nonfinite_hooks"] == [], f"rank {rank} (hooks): {out['nonfinite_hooks']}"


def test_owner_refresh_uses_fallbacks_and_warm_eigh(world_results):
    ranks = list(_ranks_of_world(world_results, 2))
    for rank, out in ranks:
        r = out["refresh"]
        assert r["fallback"] == [], f"rank {rank}: {r['fallback']}"
        assert r["warm"] == [], f"rank {rank}: {r['warm']}"
        # two refreshes (steps 0 and 2), each counting only this rank's factors
        assert sum(r["warm_stats"].values()) == 2 * r["owned"], f"rank {rank}: {r}"
    # the second refresh reused some owner's previous basis
    assert sum(o["refresh"]["warm_stats"]["kept"] + o["refresh"]["warm_stats"]["refined"]
               for _, o in ranks) > 0


def test_kfac_optimizer_runs_data_parallel_unless_opted_out(world_results):
    for rank, out in _ranks_of_world(world_results, 2):
        assert out["kfac"] == [], f"rank {rank}: {out['kfac']}"


def test_row_masks_all_false_on_every_rank_keep_the_factors(world_results):
    for rank, out in _ranks_of_world(world_results, 2):
        assert out["empty_masks"] == [], f"rank {rank}: {out['empty_masks']}"
