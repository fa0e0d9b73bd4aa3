"""K-FAC state through torch.distributed.checkpoint (kfac_fast.distributed.KFACState), CPU gloo.

One spawn of 2 ranks runs every check and reports through a queue: a fully_shard model, a
torch SGD with momentum (its state through get_optimizer_state_dict) and a
KFACPreconditioner trained 5 steps (refreshes at steps 0 and 3, so the save falls between
refreshes and the first resumed step uses the loaded decompositions), saved with dcp.save,
(also "memory" under plain data parallelism, where every rank holds every factor),
then 2 more steps (the second refreshes); a FRESH model, optimizer and
preconditioner dcp.load the checkpoint and take the same 2 steps: parameters, gradients and
factors must equal the continuing run's bit for bit. The continuing run is the reference
because a save under factor_sync="inverse" averages the factors in place (as
synced_state_dict does). The same for kfac_fast.KFAC on a bare module. The main process
then loads the 2-rank checkpoints at world 1 (one process, the whole batch) and checks the
layout: under "memory" each layer's tensors are in its owner's file only. A "memory"
preconditioner also loads the "communication" checkpoint (equal to rounding: the two
strategies order their floating-point work differently).
"""
from __future__ import annotations

import functools
import io
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast import distributed as kd
from tests.adversarial._dist_harness import collect_world, every_rank, reporting_rank

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SIZES = [2, 5]
SAVE_AT, STEPS = 5, 7  # refreshes at steps 0, 3 and 6: saved after a factor update between refreshes,
KW = dict(method="eigen", inv_update_steps=3, damping=1e-2, kl_clip=1e-3, lr=0.3, factor_dtype=torch.float64)
CASES = [("communication", "inverse"), ("memory", "update")]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5, bias=False), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def shard(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    for sub in (model[0], model[4]):  # model[2] stays in the root's group
        fully_shard(sub, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_data(step: int):
    gen = torch.Generator().manual_seed(300 + step)
    return (torch.randn(sum(SIZES), 6, generator=gen, dtype=torch.float64),
            torch.randn(sum(SIZES), 3, generator=gen, dtype=torch.float64))


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(model, precond, opt, rank, steps) -> list:
    """rank None: one process on the whole batch (mean loss); a rank: its shard, loss rule
    of docs/distributed.md (sum * world / N, loss_average N / world; / 3 outputs as the mean)."""
    records = []
    for step in steps:
        x, y = make_data(step)
        opt.zero_grad()
        if rank is None:
            loss = F.mse_loss(model(x), y)
        else:
            lo = sum(SIZES[:rank])
            loss = F.mse_loss(model(x[lo:lo + SIZES[rank]]), y[lo:lo + SIZES[rank]], reduction="sum") \
                * len(SIZES) / (sum(SIZES) * y.shape[1])  # the whole batch's mean over examples and outputs
        loss.backward()
        if rank is not None and not hasattr(next(model.parameters()), "full_tensor"):
            kd.average_gradients_(model.parameters(), timeout=60)  # plain data parallelism (the DDP case)
        precond.step()
        grads = {k: whole(p.grad).clone() for k, p in model.named_parameters()}
        opt.step()
        records.append({"grads": grads, "params": {k: whole(p).detach().clone() for k, p in model.named_parameters()},
                        "factors": {k: (v.a_factor, v.g_factor) for k, v in precond.layers.items()}})
    return records


def differences(got: list, want: list) -> list[str]:
    bad = []
    for step, (g, w) in enumerate(zip(got, want)):
        for kind in ("grads", "params"):
            for k, t in w[kind].items():
                if not torch.equal(g[kind][k], t):
                    bad.append(f"step {SAVE_AT + step}: {kind} of {k} differ "
                               f"(max {(g[kind][k] - t).abs().max():.2e})")
        for k, (a, gg) in w["factors"].items():
            ga, gg2 = g["factors"][k]
            if (a is None) != (ga is None) or (a is not None and not (torch.equal(a, ga) and torch.equal(gg, gg2))):
                bad.append(f"step {SAVE_AT + step}: factors of {k} differ")
    return bad


def build(world: int, strategy: str, factor_sync: str, ddp: bool = False, method: str = "eigen"):
    from torch.optim import SGD
    model = make_model() if ddp else shard(make_model(), world)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(model, loss_average=sum(SIZES) / world, **dict(KW, method=method),
                                 distributed=kd.DistributedOptions(strategy=strategy, factor_sync=factor_sync,
                                                                   timeout=60))
    return model, opt, precond


def check_fsdp(rank, world, root, strategy, factor_sync, ddp=False, method="eigen", save_at=SAVE_AT) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    path = f"{root}/{'ddp-' if ddp else ''}{strategy}-{factor_sync}" + ("" if method == "eigen" else f"-{method}") \
        + ("" if save_at == SAVE_AT else f"-at{save_at}")
    model, opt, precond = build(world, strategy, factor_sync, ddp, method)
    run(model, precond, opt, rank, range(save_at))
    if rank == 1:  # a health counter of one rank only: each rank must get its own back
        precond._health.count("nonfinite_grad", torch.zeros((), dtype=torch.bool))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "kfac": kd.KFACState(precond)}, checkpoint_id=path)
    counters = (dict(precond.refresh_stats), precond.health())
    want = run(model, precond, opt, rank, range(save_at, save_at + 2))
    fresh, fresh_opt, fresh_precond = build(world, strategy, factor_sync, ddp, method)
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt),
             "kfac": kd.KFACState(fresh_precond)}
    dcp.load(state, checkpoint_id=path, planner=kd.WeightsOnlyLoadPlanner())
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    held = sorted(n for n, layer in fresh_precond.layers.items()
                  if getattr(layer, "a_inv" if method == "inverse" else "qa") is not None)
    loaded = (dict(fresh_precond.refresh_stats), fresh_precond.health())
    got = run(fresh, fresh_precond, fresh_opt, rank, range(save_at, save_at + 2))
    owners = {n: fresh_precond.distributed.owners()[(n, "a")] for n in fresh_precond.layers}
    params = io.BytesIO()  # bytes, not tensors: the queue would share tensors through fds of a finished process
    torch.save([w["params"] for w in want], params)
    bad = differences(got, want) + ([] if loaded == counters else [f"counters {loaded} != saved {counters}"])
    if counters[1]["nonfinite_grad"] != rank:
        bad.append(f"the raised health counter was not saved: {counters}")
    if not ddp and method == "eigen" and save_at == SAVE_AT:  # the other strategy loads it too (owners re-derived)
        other_strategy, other_sync = (("memory", "update") if strategy == "communication"
                                      else ("communication", "inverse"))
        other, other_opt, other_precond = build(world, other_strategy, other_sync)
        state = {"model": get_model_state_dict(other), "optim": get_optimizer_state_dict(other, other_opt),
                 "kfac": kd.KFACState(other_precond)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(other, state["model"])
        set_optimizer_state_dict(other, other_opt, state["optim"])
        for step, (g, w) in enumerate(zip(run(other, other_precond, other_opt, rank, range(SAVE_AT, STEPS)), want)):
            bad += [f"{other_strategy!r} from a {strategy!r} checkpoint, step {SAVE_AT + step}: {k} differs"
                    for k, t in w["params"].items() if not torch.allclose(g["params"][k], t, rtol=1e-9, atol=1e-12)]
    return {"bad": bad, "want": params.getvalue() if rank == 0 else None, "owners": owners,
            "held": held}


def check_damaged(rank, world, root) -> dict:
    """A "memory" checkpoint whose eigenbasis of a layer rank 1 owns is not finite: only
    rank 1 reads it, and its load_state_dict refuses it after DCP's collectives; every rank
    must raise (not rank 0 run on into the next collective alone)."""
    import torch.distributed.checkpoint as dcp
    path = f"{root}/damaged"
    model, opt, precond = build(world, "memory", "update", ddp=True)
    run(model, precond, opt, rank, range(2))
    owners = precond.distributed.owners()
    name = next(n for n in precond.layers if owners[(n, "a")] == 1)
    if rank == 1:
        precond.layers[name].qa[0, 0] = float("nan")
    dcp.save({"kfac": kd.KFACState(precond)}, checkpoint_id=path)
    fresh_precond = build(world, "memory", "update", ddp=True)[2]
    try:
        dcp.load({"kfac": kd.KFACState(fresh_precond)}, checkpoint_id=path)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "layer": name}
    return {"error": None, "layer": name}


def check_kfac(rank, world, root, fsdp) -> dict:
    """kfac_fast.KFAC (momentum, the LM adaptation, the gamma search) on a bare module or
    an FSDP2 one: 3 steps, dcp.save, 2 steps; a fresh one loaded takes the same 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from kfac_fast import KFAC
    kw = dict(damping=1.0, damping_interval=2, gamma_interval=3, inv_update_steps=2, factor_dtype=torch.float64,
              distributed=kd.DistributedOptions(timeout=60))

    def steps(model, opt, which) -> list:
        out = []
        for step in which:
            gen = torch.Generator().manual_seed(400 + step)
            x, y = torch.randn(sum(SIZES), 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,),
                                                                                                  generator=gen)
            lo = sum(SIZES[:rank])
            xs, ys = x[lo:lo + SIZES[rank]], y[lo:lo + SIZES[rank]]

            def closure(xs=xs, ys=ys):
                out = model(xs)
                return F.cross_entropy(out, ys), out
            opt.step(closure)
            out.append(torch.cat([whole(p).detach().reshape(-1) for p in model.parameters()]).clone())
        return out

    def build():
        model = shard(make_model(), world) if fsdp else make_model()
        return model, KFAC(model, **kw)

    path = f"{root}/kfac-{'fsdp' if fsdp else 'bare'}"
    model, opt = build()
    steps(model, opt, range(3))
    dcp.save({"model": get_model_state_dict(model), "kfac": kd.KFACState(opt)}, checkpoint_id=path)
    want = steps(model, opt, range(3, 5))
    fresh, fresh_opt = build()
    fresh_opt.mc_seed = drawn = (opt.mc_seed + 1) % 2 ** 64  # not the saved seed: the load must replace it
    state = {"model": get_model_state_dict(fresh), "kfac": kd.KFACState(fresh_opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(fresh, state["model"])
    got = steps(fresh, fresh_opt, range(3, 5))
    bad = [f"KFAC step {3 + i}: parameters differ" for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w)]
    seeds = (fresh_opt.mc_seed, opt.mc_seed, drawn)
    step_counts = (fresh_opt.param_groups[0]["step"], opt.param_groups[0]["step"])
    if seeds[0] != seeds[1] or seeds[2] == seeds[1] or step_counts[0] != step_counts[1]:
        bad.append(f"KFAC's MC seed (loaded, saved, fresh's own) {seeds} or step count {step_counts} was not restored")
    if not all("prev_update" in s for s in fresh_opt.state.values()) or not fresh_opt.state:
        bad.append("KFAC's momentum state (prev_update) was not restored")
    return {"bad": bad}


def check_example(rank, world, root) -> dict:
    """examples/fsdp_train.py (strategy "memory"): 2 steps, --save, 2 steps --resume print the
    losses of 4 steps in one run."""
    import contextlib
    import pathlib
    import runpy
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"
    main = runpy.run_path(str(path), run_name="fsdp_train")["main"]
    common = ["--batch-size", "33", "--strategy", "memory"]
    runs = [["--steps", "4"], ["--steps", "2", "--save", f"{root}/example"], ["--steps", "2", "--resume",
                                                                             f"{root}/example"]]
    out = []
    for extra in runs:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(common + extra)
        out.append([line for line in buf.getvalue().splitlines() if line.startswith("step")])
    return {"straight": out[0], "resumed": out[1] + out[2]}


def worker(root: str, rank: int, world: int, port: int, results) -> None:
    torch.set_num_threads(1)
    with reporting_rank(rank, world, port, results, timeout_s=60) as out:
        for strategy, factor_sync in CASES:
            out[strategy] = check_fsdp(rank, world, root, strategy, factor_sync)
        out["ddp_memory"] = check_fsdp(rank, world, root, "memory", "inverse", ddp=True)
        out["inverse_memory"] = check_fsdp(rank, world, root, "memory", "update", method="inverse")
        out["inverse_communication"] = check_fsdp(rank, world, root, "communication", "inverse", method="inverse")
        out["step0_memory"] = check_fsdp(rank, world, root, "memory", "update", save_at=0)
        out["step0_communication"] = check_fsdp(rank, world, root, "communication", "inverse", save_at=0)
        out["damaged"] = check_damaged(rank, world, root)
        out["kfac"] = check_kfac(rank, world, root, fsdp=False)
        out["kfac_fsdp"] = check_kfac(rank, world, root, fsdp=True)
        out["example"] = check_example(rank, world, root)


_RESULTS: dict = {}


@pytest.fixture(scope="module")
def world2():
    if "root" not in _RESULTS:
        _RESULTS["root"] = tempfile.mkdtemp(prefix="kfac_dcp_")
    root = _RESULTS["root"]
    return every_rank(collect_world(functools.partial(worker, root), 2, _RESULTS, join_s=30, wait_s=150), 2), root


@pytest.mark.parametrize("strategy", [s for s, _ in CASES] + ["ddp_memory", "inverse_memory", "inverse_communication",
                                                              "step0_memory", "step0_communication"])
def test_fsdp_dcp_save_load_resumes_bit_identically(world2, strategy):
    got, _ = world2
    for rank, out in got.items():
        assert out[strategy]["bad"] == [], f"rank {rank}: {out[strategy]['bad']}"


def test_damaged_owned_tensor_fails_the_load_on_every_rank(world2):
    got, _ = world2
    for rank, out in sorted(got.items()):
        error = out["damaged"]["error"]
        assert error is not None, f"rank {rank}: dcp.load returned although rank 1's share failed"
        assert "failed on rank(s) [1]" in error, (rank, error)
    assert "not finite" in got[1]["damaged"]["error"] and repr(got[1]["damaged"]["layer"]) in got[1]["damaged"]["error"]


def test_memory_strategy_loads_owned_decompositions_only(world2):
    got, _ = world2
    owners = got[0]["memory"]["owners"]
    assert sorted(set(owners.values())) == [0, 1]
    for rank, out in got.items():
        assert out["memory"]["held"] == sorted(n for n, r in owners.items() if r == rank)
    assert got[0]["communication"]["held"] == sorted(owners)


def test_memory_layout_is_sharded_by_owner(world2):
    from torch.distributed.checkpoint import FileSystemReader
    got, root = world2
    owners = got[0]["memory"]["owners"]
    for strategy, factor_sync in CASES:
        md = FileSystemReader(f"{root}/{strategy}-{factor_sync}").read_metadata()
        files = {}
        for index, info in md.storage_data.items():
            if index.fqn.startswith("kfac.preconditioner.layers."):
                files.setdefault(index.fqn, set()).add(info.relative_path)
        names = {fqn[len("kfac.preconditioner.layers."):].rsplit(".", 1)[0] for fqn in files}
        assert names == set(owners), (strategy, sorted(names))
        assert all(len(f) == 1 for f in files.values())  # each tensor written once (dedup under communication)
        writers = {f.split("_")[2] for fqn in files for f in files[fqn]}
        assert writers == {"0", "1"}, (strategy, writers)  # spread over both ranks in both layouts
        if strategy == "memory":
            for fqn, f in files.items():
                name = fqn[len("kfac.preconditioner.layers."):].rsplit(".", 1)[0]
                assert f == {f"__{owners[name]}_0.distcp"}, (fqn, f)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on a load without a group
@pytest.mark.parametrize("strategy", [s for s, _ in CASES])
def test_two_rank_checkpoint_loads_in_one_process(world2, strategy):
    """World 2 -> world 1: the owners are re-derived (every key read); the next steps on
    the whole batch equal the 2-rank run's to rounding (ranks vs one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.optim import SGD
    got, root = world2
    factor_sync = dict(CASES)[strategy]
    model = make_model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(model, distributed=False, **KW)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt),
             "kfac": kd.KFACState(precond)}
    dcp.load(state, checkpoint_id=f"{root}/{strategy}-{factor_sync}")
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert all(layer.qa is not None and layer.a_factor is not None for layer in precond.layers.values())
    mine = run(model, precond, opt, None, range(SAVE_AT, STEPS))
    want = torch.load(io.BytesIO(got[0][strategy]["want"]), weights_only=True)
    for step, (g, w) in enumerate(zip(mine, want)):
        for k, t in w.items():
            assert torch.allclose(g["params"][k], t, rtol=1e-9, atol=1e-12), (step, k)


@pytest.mark.parametrize("key", ["kfac", "kfac_fsdp"])
def test_kfac_optimizer_dcp_round_trip(world2, key):
    got, _ = world2
    for rank, out in got.items():
        assert out[key]["bad"] == [], f"rank {rank}: {out[key]['bad']}"


def test_example_save_resume(world2):
    got, _ = world2
    example = got[0]["example"]
    assert len(example["straight"]) == 4 and example["resumed"] == example["straight"], example


def test_kfac_state_argument_errors():
    with pytest.raises(TypeError, match="KFACPreconditioner or a kfac_fast.KFAC"):
        kd.KFACState(nn.Linear(2, 2))
    precond = KFACPreconditioner(make_model(), distributed=False, **KW)
    other = io.BytesIO()
    torch.save({"layout": "something else v9"}, other)
    with pytest.raises(ValueError, match="layout is 'something else v9'"):
        kd.KFACState(precond).load_state_dict({"preconditioner": {"meta": other.getvalue(), "layers": {}}})
    with pytest.raises(ValueError, match="meta does not load"):
        kd.KFACState(precond).load_state_dict({"preconditioner": {"meta": b"damaged", "layers": {}}})
    with pytest.raises(ValueError, match="must be KFACState.state_dict"):
        kd.KFACState(precond).load_state_dict({"layers": {}})


def test_kfac_optimizer_blob_is_built_from_host_copies(monkeypatch):
    """The per-rank sha256 check of KFAC's torch state (and the single copy saved) must not
    depend on where the tensors live: torch.save bytes name each storage's device (cuda:0 on
    rank 0, cuda:1 on rank 1), so the blob is built from CPU copies. Simulated on CPU: the
    optimizer's own storages are made to report a device "cuda:7" when serialized; the
    blob must not name it (it does without the copies). Unmeasured on GPU."""
    import torch.serialization as ser

    from kfac_fast import KFAC
    model = make_model()
    opt = KFAC(model, damping=1.0, inv_update_steps=2, factor_dtype=torch.float64, distributed=False)
    x, y = make_data(0)

    def closure():
        out = model(x)
        return F.mse_loss(out, y), out
    opt.step(closure)
    own = {t.untyped_storage().data_ptr() for s in opt.state.values() for t in s.values()
           if isinstance(t, torch.Tensor)}
    assert own
    tag = ser.location_tag
    monkeypatch.setattr(ser, "location_tag", lambda st: "cuda:7" if st.data_ptr() in own else tag(st))
    blob = kd.KFACState(opt).state_dict()["optimizer"]
    assert b"cuda:7" not in blob
    saved = torch.load(io.BytesIO(blob), weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(saved[i]["prev_update"], s["prev_update"]) for i, s in enumerate(opt.state.values()))


CALLS: list = []


def _side_effect(what: str) -> str:
    CALLS.append(what)
    return what


class _Payload:
    def __reduce__(self):
        return (_side_effect, ("ran during dcp.load",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_weights_only_load_planner_refuses_a_crafted_checkpoint(tmp_path):
    """DCP torch.save's every bytes value and its DefaultLoadPlanner reads them back with
    weights_only=False: a crafted `meta` runs code inside dcp.load, before KFACState's own
    weights_only read. WeightsOnlyLoadPlanner refuses it with no side effect, and still
    loads a genuine checkpoint (model, a torch optimizer's param_groups, K-FAC state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.optim import SGD
    model = make_model()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(model, distributed=False, **KW)
    run(model, precond, opt, None, range(2))
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt),
              "kfac": kd.KFACState(precond)}, checkpoint_id=str(tmp_path / "good"))
    fresh = make_model()
    fresh_opt = SGD(fresh.parameters(), lr=0.5, momentum=0.1)
    fresh_precond = KFACPreconditioner(fresh, distributed=False, **KW)
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, fresh_opt),
             "kfac": kd.KFACState(fresh_precond)}
    dcp.load(state, checkpoint_id=str(tmp_path / "good"), planner=kd.WeightsOnlyLoadPlanner())
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    assert fresh_opt.param_groups[0]["lr"] == 0.1 and fresh_opt.param_groups[0]["momentum"] == 0.9
    assert all(torch.equal(fresh_precond.layers[n].qa, layer.qa) for n, layer in precond.layers.items())

    crafted = kd.KFACState(precond).state_dict()
    crafted["preconditioner"]["meta"] = _Payload()
    dcp.save({"kfac": crafted}, checkpoint_id=str(tmp_path / "crafted"))
    CALLS.clear()
    with pytest.raises(BaseException) as info:  # DCP wraps it in a CheckpointException (a BaseException)
        dcp.load({"kfac": kd.KFACState(fresh_precond)}, checkpoint_id=str(tmp_path / "crafted"),
                 planner=kd.WeightsOnlyLoadPlanner())
    assert "'kfac.preconditioner.meta' does not load with weights_only=True" in str(info.value), str(info.value)
    assert "_side_effect" in str(info.value)
    assert CALLS == []
    assert isinstance(kd.WeightsOnlyLoadPlanner(), dcp.DefaultLoadPlanner)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_weights_only_load_planner_gives_kfac_fast_errors(tmp_path):
    """Through dcp.load with WeightsOnlyLoadPlanner, kfac_fast's checks run before DCP's
    ("Missing key ... a_inv" / "Size mismatch" / no 'optimizer' key otherwise)."""
    import torch.distributed.checkpoint as dcp

    from kfac_fast import KFAC
    model = make_model()
    precond = KFACPreconditioner(model, distributed=False, **KW)
    run(model, precond, torch.optim.SGD(model.parameters(), lr=0.1), None, range(2))
    path = str(tmp_path / "eigen")
    dcp.save({"kfac": kd.KFACState(precond)}, checkpoint_id=path)

    def load(obj):
        with pytest.raises(BaseException) as info:  # DCP's CheckpointException around our ValueError
            dcp.load({"kfac": kd.KFACState(obj)}, checkpoint_id=path, planner=kd.WeightsOnlyLoadPlanner())
        return str(info.value)

    inverse = load(KFACPreconditioner(make_model(), distributed=False, **dict(KW, method="inverse")))
    assert "ValueError: KFACState: the checkpoint was saved with method='eigen', this preconditioner has " \
        "method='inverse'" in inverse, inverse
    ekfac = load(KFACPreconditioner(make_model(), distributed=False, **dict(KW, method="ekfac")))
    assert "method='ekfac'" in ekfac and "['scales']" in ekfac, ekfac
    kfac = load(KFAC(make_model(), factor_dtype=torch.float64, distributed=False))
    assert "holds a KFACPreconditioner's state, not a KFAC's" in kfac, kfac
    torch.manual_seed(0)
    resized = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5, bias=False), nn.Tanh(),
                            nn.Linear(5, 3)).double()
    message = load(KFACPreconditioner(resized, distributed=False, **KW))
    assert "layer '0': g_factor has shape (7, 7) in the checkpoint, this model's layer needs (9, 9)" in message, \
        message
    wider = nn.Sequential(*make_model(), nn.Tanh(), nn.Linear(3, 2)).double()
    message = load(KFACPreconditioner(wider, distributed=False, **KW))
    assert "model layers missing from the checkpoint: ['6']" in message, message


def test_metadata_gather_sends_host_copies(monkeypatch):
    """What the metadata all_gather_object gathers (health counters are device tensors)
    goes as CPU copies, never the preconditioner's own tensors (pickling a cuda tensor
    would ship a device tensor through the gloo group). Simulated with a recording
    all_gather_object: the gathered counter must not share the live counter's storage
    (it does without the copies). Unmeasured on GPU."""
    import contextlib
    import types

    from kfac_fast.distributed import dcp as kdcp
    live = torch.ones((), dtype=torch.int64)
    sent: list = []

    def all_gather_object(out, obj, group=None):
        sent.append(obj)
        out[0] = obj
    monkeypatch.setattr(kdcp, "_dist", lambda: types.SimpleNamespace(all_gather_object=all_gather_object))
    driver = types.SimpleNamespace(world_size=1, meta_group=None, _collective=lambda what: contextlib.nullcontext())
    got = kdcp._gather(types.SimpleNamespace(distributed=driver), {"health": {"causes": {"x": live}}}, "test")
    gathered = sent[0]["health"]["causes"]["x"]
    assert gathered.device.type == "cpu" and torch.equal(gathered, live)
    assert gathered.untyped_storage().data_ptr() != live.untyped_storage().data_ptr()
    assert got == [sent[0]]
