"""KFACPreconditioner on FSDP2 (`fully_shard`) models, CPU gloo, 2 and 4 ranks.

One spawn per world size: every check runs inside it and each rank reports its results
through a queue. The oracle is the single-process preconditioner on the concatenated
global batch, run inside each worker with distributed=False (float64, tight tolerance);
the sharded `.grad` is compared through `full_tensor()`. The model has a Conv2d, Linear
layers with and without bias, and a last layer of one output row (an empty shard on every
rank but rank 0), so torch.chunk's uneven and empty shards are exercised.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kfac_fast import KFACPreconditioner
from kfac_fast import distributed as kd
from tests.adversarial._dist_harness import collect_world, every_rank, reporting_rank

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = dict(rtol=1e-9, atol=1e-12)
STEPS = 4
KW = dict(inv_update_steps=2, damping=1e-2, kl_clip=1e-3, lr=0.3, factor_dtype=torch.float64)
UNEQUAL = {2: [2, 5], 4: [1, 4, 2, 3]}


class Net(nn.Module):
    def __init__(self, ckpt: bool = False):
        super().__init__()
        self.ckpt = ckpt
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(27, 5)
        self.fc2 = nn.Linear(5, 4, bias=False)
        self.fc3 = nn.Linear(4, 1)

    def block(self, x):
        return torch.tanh(self.fc1(x))

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = checkpoint(self.block, h, use_reentrant=False) if self.ckpt else self.block(h)
        return self.fc3(torch.tanh(self.fc2(h)))


def make_model(ckpt: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Net(ckpt).double()


def shard(model: nn.Module, world: int, reshard: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.conv, model.fc1, model.fc3):  # fc2 stays in the root's group
        fully_shard(sub, mesh=mesh, reshard_after_forward=reshard)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def make_data(sizes: list, step: int):
    gen = torch.Generator().manual_seed(100 + step)
    n = sum(sizes)
    return torch.randn(n, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randn(n, 1, generator=gen,
                                                                                    dtype=torch.float64)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def split(sizes: list, step: int, rotate: bool) -> list:
    """The examples per rank at `step` (rotated by one rank per step when `rotate`)."""
    k = step % len(sizes) if rotate else 0
    return sizes[k:] + sizes[:k]


def run(model, precond, sizes, rank, rotate=False, net=None, steps=range(STEPS)):
    """STEPS steps: rank None is the single process on the whole batch (a mean), a rank
    its shard with the loss rule of docs/distributed.md (sum * world / N, loss_average N / world).
    net: what to call (a DDP wrapper of `model`)."""
    records = []
    net = net or model
    world, n = len(sizes), sum(sizes)
    for step in steps:
        x, y = make_data(sizes, step)
        sizes = split(sizes, step, rotate) if rank is not None else sizes
        model.zero_grad()  # before the forward: with reshard_after_forward=False the forward swaps in
        if rank is None:   # unsharded parameters, and the sharded grads would then accumulate
            loss = F.mse_loss(model(x), y)
        else:
            lo = sum(sizes[:rank])
            xs, ys = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
            loss = F.mse_loss(net(xs), ys, reduction="sum") * world / n
        loss.backward()
        precond.step()
        records.append({"factors": {k: (None if v.a_factor is None else v.a_factor.clone(),
                                        None if v.g_factor is None else v.g_factor.clone())
                                    for k, v in precond.layers.items()},
                        "grads": {k: whole(p.grad).clone() for k, p in model.named_parameters()}})
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.3 * p.grad)
    return records


def compare(got, want, factor_steps) -> list[str]:
    bad = []
    for step, (g, w) in enumerate(zip(got, want)):
        if step in factor_steps:
            for name, (fa, fg) in w["factors"].items():
                ga, gg = g["factors"][name]
                if not (torch.allclose(ga, fa, **TOL) and torch.allclose(gg, fg, **TOL)):
                    bad.append(f"step {step}: factors of {name} differ (max {(ga - fa).abs().max():.2e}, "
                               f"{(gg - fg).abs().max():.2e})")
        for name, wg in w["grads"].items():
            if not torch.allclose(g["grads"][name], wg, **TOL):
                bad.append(f"step {step}: grad of {name} differs (max {(g['grads'][name] - wg).abs().max():.2e})")
    return bad


def check_fsdp(rank, world, *, method, factor_sync, ckpt, unequal, reshard=True, hooks=False,
               rotate=False, ddp=False, strategy="communication") -> list[str]:
    """ddp: DistributedDataParallel instead of fully_shard (the same loss rule and weighting)."""
    sizes = UNEQUAL[world] if unequal else [3] * world
    kw = dict(KW, method=method, update_factors_in_hooks=hooks)
    ref = make_model(ckpt)
    want = run(ref, KFACPreconditioner(ref, distributed=False, loss_average=float(sum(sizes)), **kw), sizes, None)
    opts = kd.DistributedOptions(strategy=strategy, factor_sync=factor_sync, bucket_cap_mb=1e-4, timeout=60)
    memory = strategy == "memory"
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        model = make_model(ckpt)
        net = DistributedDataParallel(model)
        precond = KFACPreconditioner(net, distributed=opts, loss_average=sum(sizes) / world, **kw)
    else:
        model = net = shard(make_model(ckpt), world, reshard)
        precond = KFACPreconditioner(model, distributed=opts, loss_average=sum(sizes) / world, **kw)
    d = precond.distributed
    if d is None or (d.sharded is None) != (ddp or memory) or (d.sharded_memory is None) == memory:
        return ["no driver of the expected kind"]
    got = run(model, precond, sizes, rank, rotate=rotate, net=net)
    for rec in got:  # DDP prefixes names with "module."
        rec["factors"] = {n.removeprefix("module."): v for n, v in rec["factors"].items()}
    bad = []
    owners = d.owners()
    if memory:  # only the owner holds a layer's factors (reduced at every update) and decomposition
        for rec in got:
            for name in list(rec["factors"]):
                held = rec["factors"][name][0] is not None
                if held != (owners[(name, "a")] == rank):
                    bad.append(f"{name}: factors held {held} on rank {rank}, owner {owners[(name, 'a')]}")
                if not held:
                    del rec["factors"][name]
        for name, layer in precond.layers.items():
            if (layer.qa is not None or layer.a_inv is not None) != (owners[(name, "a")] == rank):
                bad.append(f"{name}: a decomposition is held iff owned, violated on rank {rank}")
        want = [dict(w, factors={n: f for n, f in w["factors"].items() if owners[(n, "a")] == rank}) for w in want]
    bad += compare(got, want, set(range(STEPS)) if factor_sync == "update" or memory else {0, 2})
    kind = "gradients" if memory else "gradient_gather"
    if not ddp and d.bytes[kind] == 0:
        bad.append(f"no {kind} bytes were counted")
    return bad


CASES = [
    dict(method="eigen", factor_sync="update", ckpt=False, unequal=False),
    dict(method="inverse", factor_sync="inverse", ckpt=True, unequal=False, reshard=False),
    dict(method="eigen", factor_sync="inverse", ckpt=True, unequal=True),
    dict(method="inverse", factor_sync="update", ckpt=False, unequal=True, rotate=True),
    dict(method="eigen", factor_sync="update", ckpt=False, unequal=True, rotate=True, ddp=True),
    dict(method="eigen", factor_sync="inverse", ckpt=True, unequal=True, rotate=True, strategy="memory"),
    dict(method="inverse", factor_sync="update", ckpt=False, unequal=False, reshard=False, strategy="memory"),
]


def check_state_dict(rank, world, strategy="communication") -> list[str]:
    """synced_state_dict on every rank, rank 0's copy loaded by a fresh preconditioner on
    every rank: the next step equals the uninterrupted run's bit for bit."""
    sizes = UNEQUAL[world]
    kw = dict(KW, method="eigen", loss_average=sum(sizes) / world,
              distributed=kd.DistributedOptions(strategy=strategy, factor_sync="update", timeout=60))
    ref = shard(make_model(), world, True)
    want = run(ref, KFACPreconditioner(ref, **kw), sizes, rank)
    model = shard(make_model(), world, True)
    precond = KFACPreconditioner(model, **kw)
    run(model, precond, sizes, rank, steps=range(STEPS - 1))
    state = precond.synced_state_dict()
    objs = [state if rank == 0 else None]
    torch.distributed.broadcast_object_list(objs, src=0)  # stands in for torch.save + torch.load
    precond.remove_hooks()
    fresh = KFACPreconditioner(model, **kw)
    fresh.load_state_dict(objs[0])
    got = run(model, fresh, sizes, rank, steps=range(STEPS - 1, STEPS))
    bad = []
    for name, g in got[-1]["grads"].items():
        if not torch.equal(g, want[-1]["grads"][name]):
            bad.append(f"after loading: grad of {name} is not the uninterrupted run's")
    for name, layer in objs[0]["layers"].items():
        if layer.get("a_factor") is None or layer.get("qa") is None:
            bad.append(f"the synced state lacks the factors or decomposition of {name}")
    for name, (a, g) in got[-1]["factors"].items():
        if a is None and want[-1]["factors"][name][0] is None:
            continue
        if not (torch.equal(a, want[-1]["factors"][name][0]) and torch.equal(g, want[-1]["factors"][name][1])):
            bad.append(f"after loading: factors of {name} are not the uninterrupted run's")
    return bad


def check_memory_state_and_raise(rank, world) -> dict:
    """strategy 'memory' on FSDP2: (1) a step that raises after the factors were set aside
    (forced in the factor update) leaves the counts and the owner's factors as they were;
    (2) rank 0's plain state_dict() loaded on every rank is refused on every rank, naming
    synced_state_dict() (it lacks the factors of the layers other ranks own)."""
    sizes = [3] * world
    kw = dict(KW, method="eigen", loss_average=float(sizes[0]),
              distributed=kd.DistributedOptions(strategy="memory", factor_sync="update", timeout=60))
    model = shard(make_model(), world, True)
    precond = KFACPreconditioner(model, **kw)
    run(model, precond, sizes, rank, steps=range(2))
    before = {n: (layer.a_count, layer.g_count, layer.a_factor, layer.g_factor) for n, layer in precond.layers.items()}

    def fail(held):
        raise RuntimeError("forced")

    precond._update_factors = fail
    out: dict = {"raise": []}
    try:
        run(model, precond, sizes, rank, steps=range(2, 3))
        out["raise"].append("the forced error was not raised")
    except RuntimeError as exc:
        if "forced" not in str(exc):
            raise
    for n, layer in precond.layers.items():
        a, g, fa, fg = before[n]
        if (layer.a_count, layer.g_count) != (a, g) or layer.a_factor is not fa or layer.g_factor is not fg:
            out["raise"].append(f"{n}: k ({layer.a_count}, {layer.g_count}) or factors not restored after the error")
    del precond._update_factors
    from kfac_fast.distributed.assignment import factor_owners, memory_cost
    dims = {n: (layer.a_dim, layer.g_dim) for n, layer in precond.layers.items()}
    if precond.distributed.owners() != factor_owners(dims, world, whole_layers=True, cost=memory_cost):
        out["raise"].append("the owners are not balanced on memory")
    states = [precond.state_dict() if rank == 0 else None]
    torch.distributed.broadcast_object_list(states, src=0)
    precond.remove_hooks()
    fresh = KFACPreconditioner(model, **kw)
    try:
        fresh.load_state_dict(states[0])
        out["load"] = "loaded"
    except ValueError as exc:
        out["load"] = str(exc)
    fresh.remove_hooks()
    return out


def check_wrong_shard(rank, world) -> list[str]:
    """A gradient shard that is not its rank's torch.chunk share on the last rank only:
    that rank raises ValueError after joining the all-gather, the others drop the step as
    non-finite (plain gradient kept, counted) instead of waiting for it; the next step runs."""
    from torch.distributed.tensor import DTensor
    sizes = [3] * world
    model = shard(make_model(), world, True)
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(timeout=60),
                                 **dict(KW, method="eigen", loss_average=3.0))
    run(model, precond, sizes, rank, steps=range(1))
    x, y = make_data(sizes, 1)
    model.zero_grad()
    F.mse_loss(model(x[3 * rank:3 * rank + 3]), y[3 * rank:3 * rank + 3], reduction="sum").backward()
    plain = {n: p.grad.to_local().clone() for n, p in model.named_parameters()}
    g = model.fc1.weight.grad
    if rank == world - 1:
        bad_local = torch.ones(g.to_local().shape[0] + 1, *g.shape[1:], dtype=g.dtype)
        model.fc1.weight.grad = DTensor.from_local(bad_local, g.device_mesh, g.placements, run_check=False,
                                                   shape=g.shape, stride=g.stride())
    bad = []
    try:
        precond.step()
        if rank == world - 1:
            bad.append("the wrong shard was not refused")
    except ValueError as exc:
        if rank != world - 1 or "torch.chunk share" not in str(exc):
            bad.append(f"unexpected error: {exc}")
    if rank != world - 1:
        if precond.health()["nonfinite_steps"] != 1:
            bad.append(f"the step was not dropped as non-finite: {precond.health()}")
        for n, p in model.named_parameters():
            if not torch.equal(p.grad.to_local(), plain[n]):
                bad.append(f"{n}: the plain gradient was not kept")
    run(model, precond, sizes, rank, steps=range(2, 3))  # the group is still usable
    precond.remove_hooks()
    return bad


def check_owner_precision_and_causes(rank, world) -> dict:
    """strategy 'memory' on FSDP2: the owners precondition with precision='tf32' (the op
    receives it), a non-finite gradient on one rank is counted as nonfinite_grad on every
    rank, and the grad_scaler refusal names only the grad_scaler."""
    from kfac_fast import ops
    sizes = [3] * world
    kw = dict(KW, method="eigen", loss_average=3.0, precision="tf32",
              distributed=kd.DistributedOptions(strategy="memory", timeout=60))
    model = shard(make_model(), world, True)
    precond = KFACPreconditioner(model, **kw)
    seen, original = [], ops.precondition_eigen

    def recording(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return original(*args, **kwargs)

    ops.precondition_eigen = recording
    try:
        run(model, precond, sizes, rank, steps=range(2))
    finally:
        ops.precondition_eigen = original
    out: dict = {"owns": any(o == rank for o in precond.distributed.owners().values()), "seen": seen}
    x, y = make_data(sizes, 2)
    model.zero_grad()
    F.mse_loss(model(x[3 * rank:3 * rank + 3]), y[3 * rank:3 * rank + 3], reduction="sum").backward()
    if rank == 0:
        model.fc1.weight.grad.to_local().fill_(float("nan"))
    precond.step()
    out["health"] = precond.health()
    precond.remove_hooks()
    try:
        KFACPreconditioner(shard(make_model(), world, True), grad_scaler=torch.amp.GradScaler("cpu"), **kw)
        out["scaler"] = "no error"
    except ValueError as exc:
        out["scaler"] = str(exc)
    return out


VARYING = {2: [[2, 5], [4, 1], [3, 3], [1, 6]], 4: [[1, 4, 2, 3], [3, 3, 1, 1], [2, 2, 2, 2], [5, 1, 1, 1]]}


def check_varying_batch(rank, world) -> list[str]:
    """A global batch N that changes every step: the loss rule (sum * world / N) with
    `precond.loss_average = N / world` assigned before each step equals one process on
    each whole batch, under both strategies."""
    bad = []
    for strategy in ("communication", "memory"):
        kw = dict(KW, method="eigen")
        ref, model = make_model(), shard(make_model(), world, True)
        oracle = KFACPreconditioner(ref, distributed=False, **kw)
        precond = KFACPreconditioner(model, loss_average=1.0, **kw,
                                     distributed=kd.DistributedOptions(strategy=strategy, factor_sync="update",
                                                                       timeout=60))
        for step, sizes in enumerate(VARYING[world]):
            x, y = make_data(sizes, step)
            n, lo = sum(sizes), sum(sizes[:rank])
            ref.zero_grad()
            model.zero_grad()
            F.mse_loss(ref(x), y).backward()
            F.mse_loss(model(x[lo:lo + sizes[rank]]), y[lo:lo + sizes[rank]], reduction="sum").mul(world / n).backward()
            precond.loss_average = n / world
            oracle.step()
            precond.step()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                if not torch.allclose(whole(p.grad), q.grad, **TOL):
                    bad.append(f"{strategy} step {step}: grad of {name} is not one process's")
            with torch.no_grad():
                for p, q in zip(model.parameters(), ref.parameters()):
                    p.sub_(0.3 * p.grad)
                    q.sub_(0.3 * q.grad)
        precond.remove_hooks()
    return bad


def check_memory_refusals(rank, world) -> dict:
    """strategy='memory' on FSDP2 refuses hooks mode (ValueError) and a registered layer that
    is not sharded (NotImplementedError), naming what to change."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    out = {}
    opts = kd.DistributedOptions(strategy="memory")
    try:
        KFACPreconditioner(shard(make_model(), world, True), distributed=opts, update_factors_in_hooks=True)
        out["hooks"] = "no error"
    except ValueError as exc:
        out["hooks"] = str(exc)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fully_shard(net[1], mesh=init_device_mesh("cpu", (world,)))  # net[0] stays replicated
    try:
        KFACPreconditioner(net, distributed=opts)
        out["unsharded"] = "no error"
    except NotImplementedError as exc:
        out["unsharded"] = str(exc)
    return out


def check_mixed_precision(rank, world) -> list[str]:
    """MixedPrecisionPolicy(param_dtype=bfloat16): bf16 activations and output gradients are
    captured into float32 factors; "communication" and "memory" take the same steps, close
    to a float32 single process on the same global batches (within bf16's rounding), and
    K-FAC changed the gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    grads, plain = {}, {}
    for strategy in ("communication", "memory", "oracle"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        if strategy != "oracle":
            mesh = init_device_mesh("cpu", (world,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for sub in (net[0], net[2]):
                fully_shard(sub, mesh=mesh, mp_policy=policy)
            fully_shard(net, mesh=mesh, mp_policy=policy)
        opts = False if strategy == "oracle" else kd.DistributedOptions(strategy=strategy, timeout=60)
        precond = KFACPreconditioner(net, factor_dtype=torch.float32, inv_update_steps=2, distributed=opts)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            x, y = torch.randn(4 * world, 8, generator=gen), torch.randn(4 * world, 3, generator=gen)
            if strategy == "oracle":  # the global batch, in the ranks' order (factors are sums over rows)
                x, y = torch.cat([x[r::world] for r in range(world)]), torch.cat([y[r::world] for r in range(world)])
            else:
                x, y = x[rank::world], y[rank::world]
            net.zero_grad()
            F.mse_loss(net(x).float(), y).backward()
            plain[strategy] = [whole(p.grad).clone() for p in net.parameters()]
            precond.step()
            with torch.no_grad():
                for p in net.parameters():
                    p.sub_(0.1 * p.grad)
        grads[strategy] = [whole(p.grad) for p in net.parameters()]
        precond.remove_hooks()
    bad = []
    for a, b, o, p in zip(grads["communication"], grads["memory"], grads["oracle"], plain["memory"]):
        if a.dtype != torch.float32 or not torch.isfinite(a).all():
            bad.append("bf16 mixed precision: a gradient is not finite float32")
        # float32 factors summed in two orders (an average before inversions, a reduce per update)
        if not torch.allclose(a, b, rtol=1e-5, atol=2e-5):
            bad.append(f"bf16 mixed precision: communication and memory differ ({(a - b).abs().max():.2e})")
        # bf16 activations (8 bits of mantissa) against float32 ones: measured 2.6-5.6% after
        # 3 steps, while K-FAC changes the plain gradient by 78-770%
        rel = float((a - o).norm() / o.norm())
        if not rel <= 0.1:
            bad.append(f"bf16 mixed precision: {rel:.2e} (relative) from the float32 single process")
        if not float((b - p).norm() / p.norm()) >= 0.5:
            bad.append("bf16 mixed precision: K-FAC left the gradient (nearly) as it was")
    return bad


class Branchy(nn.Module):
    """fc1 -> (br on some ranks only) -> fc2; br's parameters always get a gradient."""

    def __init__(self):
        super().__init__()
        self.fc1, self.br, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x, use_branch):
        h = torch.tanh(self.fc1(x))
        h = h + self.br(h) if use_branch else h + 0 * (self.br.weight.sum() + self.br.bias.sum())
        return self.fc2(h)


def check_partial_memory(rank, world) -> list[str]:
    """strategy 'memory' on FSDP2: a layer that fires on rank 0 only is preconditioned, its
    factors on the owner being one process's on rank 0's batch (the other ranks weigh 0);
    a step whose row mask is all False on every rank keeps F = beta F (no 0 / 0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    ref = Branchy().double()
    torch.manual_seed(0)
    model = fully_shard(Branchy().double(), mesh=init_device_mesh("cpu", (world,)))
    kw = dict(factor_dtype=torch.float64, inv_update_steps=1, kl_clip=None)
    oracle = KFACPreconditioner(ref, distributed=False, **kw)
    precond = KFACPreconditioner(model, distributed=kd.DistributedOptions(strategy="memory", timeout=60), **kw)
    owner = precond.distributed.owners()[("br", "a")]
    bad = []
    for step in range(4):
        data = {}
        for r in (0, rank):
            gen = torch.Generator().manual_seed(1000 * step + r)
            data[r] = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64),
                       torch.randn(2, 3, 2, generator=gen, dtype=torch.float64))
        for net, pc, (x, y), branch in ((ref, oracle, data[0], True), (model, precond, data[rank], rank == 0)):
            if step == 3:
                pc.set_row_mask(torch.zeros(2, 3, dtype=torch.bool))
            net.zero_grad()
            F.mse_loss(net(x, branch), y).backward()
            plain = whole(net.br.weight.grad).clone()
            pc.step()
            changed = not torch.equal(plain, whole(net.br.weight.grad))
        if not changed:
            bad.append(f"step {step}: br's gradient was not preconditioned")
        layer, want = precond.layers["br"], oracle.layers["br"]
        if layer.a_count != want.a_count:
            bad.append(f"step {step}: br's k is {layer.a_count}, one process has {want.a_count}")
        if rank == owner:
            for side in ("a", "g"):
                got, w = getattr(layer, f"{side}_factor"), getattr(want, f"{side}_factor")
                if got is None or not torch.allclose(got, w, **TOL):
                    bad.append(f"step {step}: br's {side} factor is not one process's on rank 0's batch")
        for name, other in precond.layers.items():
            if other.a_factor is not None and not bool(torch.isfinite(other.a_factor).all()):
                bad.append(f"step {step}: {name}'s A is not finite")
    precond.remove_hooks()
    return bad


def check_example(rank, world) -> str:
    """examples/fsdp_train.py's main on this world (a batch the ranks do not divide)."""
    import contextlib
    import io
    import pathlib
    import runpy
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"
    main = runpy.run_path(str(path), run_name="fsdp_train")["main"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["--steps", "3", "--batch-size", "33", "--checkpointing"])
    return buf.getvalue()


def worker(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    with reporting_rank(rank, world, port, results, timeout_s=60) as out:
        for i, case in enumerate(CASES):
            out[f"case{i}"] = check_fsdp(rank, world, **case)
        out["state_dict"] = check_state_dict(rank, world)
        out["state_dict_memory"] = check_state_dict(rank, world, strategy="memory")
        out["memory"] = check_memory_refusals(rank, world)
        out["partial_memory"] = check_partial_memory(rank, world)
        out["memory_state"] = check_memory_state_and_raise(rank, world)
        out["wrong_shard"] = check_wrong_shard(rank, world)
        out["owner_precision"] = check_owner_precision_and_causes(rank, world)
        out["varying_batch"] = check_varying_batch(rank, world)
        out["distributed_false"] = check_distributed_false(rank, world)
        if world == 2:
            out["example"] = check_example(rank, world)
            out["mixed_precision"] = check_mixed_precision(rank, world)


_RESULTS: dict = {}


def spawn(world: int) -> dict:
    """Run `worker` on `world` processes (once per session); rank -> its results."""
    return collect_world(worker, world, _RESULTS, join_s=30, wait_s=150)


@pytest.fixture(params=[2, 4], ids=lambda w: f"world{w}")
def world_results(request):
    world = request.param
    return world, every_rank(spawn(world), world)


def _case_id(c: dict) -> str:
    return "-".join([c["method"], c["factor_sync"], "ckpt" if c["ckpt"] else "plain",
                     "unequal" if c["unequal"] else "equal"] + (["keep"] if c.get("reshard") is False else [])
                    + (["hooks"] if c.get("hooks") else []) + (["rotating"] if c.get("rotate") else [])
                    + (["ddp"] if c.get("ddp") else []) + (["memory"] if c.get("strategy") == "memory" else []))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_fsdp_matches_single_process_on_global_batch(world_results, case):
    _, got = world_results
    for rank, out in got.items():
        assert out[f"case{case}"] == [], f"rank {rank}: {out[f'case{case}']}"


@pytest.mark.parametrize("key", ["state_dict", "state_dict_memory"])
def test_fsdp_synced_state_dict_resumes_bit_identically(world_results, key):
    _, got = world_results
    for rank, out in got.items():
        assert out[key] == [], f"rank {rank}: {out[key]}"


def test_fsdp_memory_strategy_refusals(world_results):
    _, got = world_results
    for rank, out in got.items():
        msg = out["memory"]
        assert "strategy='memory'" in msg["hooks"] and "update_factors_in_hooks" in msg["hooks"], f"rank {rank}: {msg}"
        assert "'0'" in msg["unsharded"] and "not a DTensor" in msg["unsharded"], f"rank {rank}: {msg}"


def test_fsdp_example_trains(world_results):
    world, got = world_results
    if world != 2:
        pytest.skip("run in the world of 2")
    text = got[0]["example"]
    losses = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), text
    assert "gradient_gather" in text and "factors" in text, text


def test_fsdp_bf16_mixed_precision_policy(world_results):
    world, got = world_results
    if world != 2:
        pytest.skip("run in the world of 2")
    for rank, out in got.items():
        assert out["mixed_precision"] == [], f"rank {rank}: {out['mixed_precision']}"


def test_fsdp_memory_layer_fired_on_some_ranks_and_empty_masks(world_results):
    _, got = world_results
    for rank, out in got.items():
        assert out["partial_memory"] == [], f"rank {rank}: {out['partial_memory']}"


def test_fsdp_memory_error_mid_step_and_unsynced_state(world_results):
    _, got = world_results
    for rank, out in got.items():
        msg = out["memory_state"]
        assert msg["raise"] == [], f"rank {rank}: {msg}"
        assert "synced_state_dict()" in msg["load"] and "not synced" in msg["load"], f"rank {rank}: {msg}"


def test_fsdp_wrong_shard_on_one_rank_raises_there_without_a_hang(world_results):
    _, got = world_results
    for rank, out in got.items():
        assert out["wrong_shard"] == [], f"rank {rank}: {out['wrong_shard']}"


def test_fsdp_memory_owners_take_tf32_and_count_causes(world_results):
    _, got = world_results
    for rank, out in got.items():
        o = out["owner_precision"]
        assert (not o["owns"] or (o["seen"] and set(o["seen"]) == {"tf32"})), f"rank {rank}: {o}"
        assert o["health"]["nonfinite_steps"] == 1 and o["health"]["nonfinite_grad"] == 1, f"rank {rank}: {o}"
        assert o["health"]["nonfinite_output"] == 0, f"rank {rank}: {o}"
        assert "grad_scaler" in o["scaler"] and "update_factors_in_hooks" not in o["scaler"], f"rank {rank}: {o}"


def test_fsdp_global_batch_varying_per_step_with_loss_average_assigned(world_results):
    _, got = world_results
    for rank, out in got.items():
        assert out["varying_batch"] == [], f"rank {rank}: {out['varying_batch']}"


def check_distributed_false(rank, world) -> str:
    """An FSDP2 model on more than one rank with distributed=False: the ValueError naming it."""
    try:
        KFACPreconditioner(shard(make_model(), world, True), distributed=False, **KW)
    except ValueError as e:
        return str(e)
    return "no error"


def check_world_of_one(rank, world) -> dict:
    """FSDP2 on a group of one rank (single-process path: no driver, the DTensor `.grad`
    on a 1-device mesh is whole already): equal to the unwrapped model in the same process
    (eigen, inverse, ekfac, hooks mode; KL clip and non-finite guard on), and its state_dict loads."""
    bad: list = []
    for method, hooks in (("eigen", False), ("inverse", False), ("ekfac", False), ("eigen", True)):
        kw = dict(KW, method=method, guard_nonfinite=True, update_factors_in_hooks=hooks)
        ref = make_model()
        want = run(ref, KFACPreconditioner(ref, **kw), [6], None)
        model = shard(make_model(), 1, True)
        precond = KFACPreconditioner(model, **kw)
        # the loss rule with world 1 (sum * 1 / N) is the mean of the single process
        got = run(model, precond, [6], 0)
        bad += [f"{method}{' hooks' if hooks else ''}: {b}" for b in compare(got, want, factor_steps=range(STEPS))]
        state = precond.state_dict()
        fresh = KFACPreconditioner(model, **kw)
        fresh.load_state_dict(state)
        if fresh.steps != precond.steps:
            bad.append(f"{method}: state_dict did not round-trip")
        precond.remove_hooks()
        fresh.remove_hooks()
    return {"bad": bad}


def worker_one(rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    with reporting_rank(rank, world, port, results, timeout_s=60) as out:
        out.update(check_world_of_one(rank, world))


def test_fsdp_world_of_one_runs_single_process_on_the_local_gradient():
    got = collect_world(worker_one, 1, {}, join_s=30, wait_s=120)
    assert list(got) == [0], "the rank did not report"
    out = got[0]
    assert "crash" not in out, out["crash"]
    assert out["bad"] == [], out["bad"]


def test_fsdp_with_distributed_false_is_refused(world_results):
    world, got = world_results
    for rank, out in got.items():
        msg = out["distributed_false"]
        assert "distributed=False" in msg and f"mesh of {world} devices" in msg, f"rank {rank}: {msg}"


# ---- local_whole (single process, no group) ----------------------------------------------
class _FakeDTensor(torch.Tensor):
    """Stands in for a DTensor `.grad` on a 1-device mesh; `to_local` fails when `broken`."""

    broken = False

    class device_mesh:
        @staticmethod
        def size():
            return 1

    def to_local(self):
        if self.broken:
            raise RuntimeError("to_local failed")
        return self.detach().as_subclass(torch.Tensor)


def _fake_dtensor_grad(t: torch.Tensor, broken: bool) -> torch.Tensor:
    g = torch.Tensor._make_subclass(_FakeDTensor, t)
    g.broken = broken
    return g


def test_local_whole_restores_a_partial_swap(monkeypatch):
    """A swap that fails half-way (the bias's to_local raises after the weight's was
    swapped) leaves every `.grad` the DTensor it was, not the weight's local tensor."""
    from kfac_fast.distributed import sharded_grads
    monkeypatch.setattr(sharded_grads, "_dtensor_type", lambda: _FakeDTensor)
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", sys.modules.get("torch.distributed.tensor", math))
    lin = nn.Linear(3, 2).double()
    pre = KFACPreconditioner(lin)
    weight = _fake_dtensor_grad(torch.randn(2, 3, dtype=torch.float64), broken=False)
    bias = _fake_dtensor_grad(torch.randn(2, dtype=torch.float64), broken=True)
    lin.weight.grad, lin.bias.grad = weight, bias
    with pytest.raises(RuntimeError, match="to_local failed"):
        with sharded_grads.local_whole(list(pre.layers.values())):
            pass
    assert lin.weight.grad is weight and lin.bias.grad is bias
    bias.broken = False
    with sharded_grads.local_whole(list(pre.layers.values())):
        assert type(lin.weight.grad) is torch.Tensor and type(lin.bias.grad) is torch.Tensor
    assert lin.weight.grad is weight and lin.bias.grad is bias


def test_local_whole_looks_at_nothing_without_torch_distributed_tensor(monkeypatch):
    """No torch.distributed.tensor imported: no DTensor can exist, so the parameter loop
    (and the DTensor import) is skipped."""
    from kfac_fast.distributed import sharded_grads

    def no_lookup():
        raise AssertionError("looked for DTensor")
    monkeypatch.setattr(sharded_grads, "_dtensor_type", no_lookup)
    monkeypatch.delitem(sys.modules, "torch.distributed.tensor", raising=False)
    lin = nn.Linear(3, 2).double()
    pre = KFACPreconditioner(lin)
    lin(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with sharded_grads.local_whole(list(pre.layers.values())):
        pass


def test_sharded_memory_zero_factors_take_the_held_factors_dtype(monkeypatch):
    """A layer updated only on other ranks contributes zero factors to the reduce: in the
    dtype of the factors this rank holds (float64 here) when no settings say it, as
    Participation does, not float32 (the ranks' reduce buffers would disagree)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from kfac_fast.distributed.sharded_memory import ShardedMemory
    pre = KFACPreconditioner(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double())
    l0, l1 = pre.layers["0"], pre.layers["1"]
    driver = SimpleNamespace(layers=pre.layers, participation=SimpleNamespace(dtype=None), rank=0,
                             owners=lambda: {("0", "a"): 0, ("1", "a"): 1},
                             row_weights=SimpleNamespace(of=lambda layers: [5, 2]),
                             _timed=lambda what: nullcontext(), _collective=lambda what: nullcontext())
    memory = ShardedMemory.__new__(ShardedMemory)
    memory.driver, memory._prev = driver, {}
    seen = []
    monkeypatch.setattr(memory, "_reduce", lambda factors, weights, dsts: seen.extend(f.dtype for f in factors))
    memory.before_update()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    l0.a_factor, l0.g_factor = torch.cov(x.T) + 1.0, torch.eye(4, dtype=torch.float64) * 2.0  # this step's stats
    memory.after_update([l0], [l0, l1], 0.95, None)
    assert seen == [torch.float64] * 4
    assert l0.g_factor.dtype == torch.float64 and l1.a_factor is None  # layer "1" is rank 1's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_vector_is_the_elementwise_weights_in_one_stack(dtype):
    """weighting.weight_vector (the factor averaging's and ShardedMemory._reduce's weights)
    gives exactly what `ws[i] = w` gave, for Python numbers, device tensors of another
    dtype and a mix, and builds tensor weights with one stack, not one kernel per weight."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kfac_fast.distributed.weighting import weight_vector
    like = torch.ones(2, 2, dtype=dtype)
    cases = [[3, 7.25, 1 << 20], [torch.tensor(5), torch.tensor(2.5, dtype=torch.float64), torch.tensor(9)],
             [4, torch.tensor(11), 0.1, torch.tensor(1.0 / 3.0, dtype=torch.float64)]]
    for weights in cases:
        old = like.new_empty(len(weights))
        for i, w in enumerate(weights):
            old[i] = w
        got = weight_vector(weights, like)
        assert got.dtype == dtype and torch.equal(got, old)

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    weights = [torch.tensor(float(i + 1), dtype=dtype) for i in range(6)]
    with Ops() as ops_seen:
        weight_vector(weights, like)
    assert len(ops_seen.names) <= 2 and not any(n.startswith(("copy_", "fill_")) for n in ops_seen.names), \
        ops_seen.names
