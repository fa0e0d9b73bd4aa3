"""KFACPreconditioner.last_metrics and its logging (#21 item 8): no host sync, right values."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from kfac_fast import KFACPreconditioner
from kfac_fast.health import CAUSES, SOLVER_COUNTERS
from kfac_fast.metrics import StepMetrics


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(seed: int, nan: bool = False) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g)
    if nan:
        x[2, 1] = float("nan")
    return x, torch.randint(0, 3, (6,), generator=g)


def one_step(model: nn.Module, pc: KFACPreconditioner, seed: int, nan: bool = False) -> None:
    x, y = batch(seed, nan)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pc.step()


HOST_READS = ("item", "tolist", "__float__", "__int__", "__index__", "__bool__", "cpu", "numpy")


@pytest.fixture
def no_host_reads(monkeypatch):
    """Within `with no_host_reads(names):` reading a tensor on the host by those methods raises."""
    import contextlib

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name} during step()")
        return method

    @contextlib.contextmanager
    def guard(names=HOST_READS):
        with monkeypatch.context() as m:
            for name in names:
                m.setattr(torch.Tensor, name, refuse(name))
            yield
    return guard


@pytest.mark.parametrize("hooks", [False, True])
def test_non_refresh_steps_record_without_reading_a_tensor(no_host_reads, monkeypatch, hooks):
    model = mlp()
    pc = KFACPreconditioner(model, inv_update_steps=3, kl_clip=1e-2, lr=0.1, update_factors_in_hooks=hooks)
    one_step(model, pc, 0)  # step 0 refreshes (host syncs allowed there)
    record = pc._record_step

    def guarded_record(*args):
        with no_host_reads():  # the recording itself reads nothing at all
            record(*args)
    monkeypatch.setattr(pc, "_record_step", guarded_record)
    for seed in (1, 2):
        # (the whole step cannot be guarded on CPU: the reference ops read their CPU
        # scalars, which is no device sync)
        one_step(model, pc, seed)
        # the device counters were copied in one stacked launch (kfac_nonfinite_update,
        # KFAC's own, does not exist here and is recorded as 0)
        names, (stacked, zeros) = pc._pending_metrics[3:5]
        assert stacked.shape == (len(names) - len(zeros),) and zeros == [0]
        with no_host_reads():  # building the record on access reads nothing either
            m = pc.last_metrics
        assert isinstance(m, StepMetrics) and m.step == seed
        assert isinstance(m._values["nu"], torch.Tensor) and isinstance(m._values["nonfinite_steps"], torch.Tensor)
        assert m._values["refresh"] is False and m._values["factor_update"] is True


def test_as_dict_values():
    model = mlp()
    pc = KFACPreconditioner(model, inv_update_steps=2, kl_clip=1e-2, lr=lambda s: 0.1 / (s + 1),
                            damping=3e-3, factor_decay=0.9, factor_update_steps=2)
    assert pc.last_metrics is None
    one_step(model, pc, 0)
    d = pc.last_metrics.as_dict()
    assert d["step"] == 0 and d["lr"] == 0.1 and d["kl_clip"] == 1e-2 and d["damping"] == 3e-3
    assert d["factor_decay"] == 0.9 and d["factor_update"] is True and d["refresh"] is True
    assert d["refresh_layers"] == 2 and d["refresh_full"] == 4 and d["refresh_kept"] == 0
    assert d["refresh_refined"] == 0 and d["refresh_seconds"] >= 0
    assert d["nu"] == float(pc.last_nu) and 0 < d["nu"] <= 1
    one_step(model, pc, 1)
    d = pc.last_metrics.as_dict()
    assert d["step"] == 1 and d["lr"] == 0.05 and d["factor_update"] is False and d["refresh"] is False
    assert not any(k.startswith("refresh_") for k in d)
    health = pc.health()
    assert {k: d[k] for k in health} == health
    assert set(health) == {"nonfinite_steps", *CAUSES, *SOLVER_COUNTERS}
    assert list(d)[:2] == ["step", "lr"]


def test_counters_come_from_health_and_are_snapshots():
    model = mlp()
    pc = KFACPreconditioner(model, inv_update_steps=10)
    one_step(model, pc, 0)
    before = pc.last_metrics
    one_step(model, pc, 1, nan=True)  # a non-finite input: the step is dropped
    after = pc.last_metrics.as_dict()
    assert after["nonfinite_steps"] == 1 and after["nonfinite_capture"] == 1
    assert {k: after[k] for k in pc.health()} == pc.health()
    assert before.as_dict()["nonfinite_steps"] == 0  # the earlier record did not move
    assert after["factor_update"] is True  # a factor step, dropped on the device (see the counters)


def test_per_layer_damping_and_no_kl_clip_are_left_out():
    model = mlp()
    pc = KFACPreconditioner(model, damping={"0": 1e-2, "default": 1e-3}, kl_clip=None)
    one_step(model, pc, 0)
    d = pc.last_metrics.as_dict()
    assert "damping" not in d and "lr" not in d and "kl_clip" not in d
    assert d["refresh"] is True and math.isfinite(d["nu"])


def test_inverse_method_has_no_paths():
    model = mlp()
    pc = KFACPreconditioner(model, method="inverse")
    one_step(model, pc, 0)
    d = pc.last_metrics.as_dict()
    assert d["refresh_layers"] == 2 and "refresh_full" not in d


def test_nothing_printed_at_default_level(capsys):
    model = mlp()
    pc = KFACPreconditioner(model, inv_update_steps=2)
    for seed in range(3):
        one_step(model, pc, seed, nan=seed == 1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_log_lines(caplog):
    model = mlp()
    pc = KFACPreconditioner(model, inv_update_steps=2)
    with caplog.at_level(logging.INFO, logger="kfac_fast"):
        for seed in range(3):
            one_step(model, pc, seed, nan=seed == 1)
    info = [r.getMessage() for r in caplog.records if r.name == "kfac_fast"]
    assert info[0] == "step 0: refreshed 2 layers in " + info[0].split(" in ")[1]
    assert "kept 0, refined 0, full 4" in info[0]
    assert any("since the last refresh: nonfinite_steps +1" in s and "nonfinite_capture +1" in s for s in info)
    assert not any(r.levelno == logging.DEBUG for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="kfac_fast"):
        one_step(model, pc, 3)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == ["step 3: lr=0.1 kl_clip=0.001 damping=0.001 factor_decay=0.95 factor_update=True "
                     "refresh=False fp64_retries=0 damped_retries=0 kept_previous=0"]


# ---------------------------------------------------------------------------------------
# examples/tensorboard_metrics.py
# ---------------------------------------------------------------------------------------
def _example():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tensorboard_metrics.py"
    spec = importlib.util.spec_from_file_location("tensorboard_metrics_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_prints_the_metrics(capsys):
    assert _example().main(["--steps", "12", "--every", "5", "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("'step': ")[1].split(",")[0] for line in lines] == ["0", "5", "10", "11"]
    assert "'refresh': True" in lines[0] and "'refresh': True" in lines[2] and "'refresh': False" in lines[1]
    assert all("'nu': " in line and "'nonfinite_steps': 0" in line for line in lines)


def test_example_without_tensorboard_says_so_and_prints(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert _example().main(["--steps", "3", "--every", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tensorboard is not installed") and len(lines) == 3


def test_example_writes_tensorboard_events(tmp_path, capsys):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (optional)")
    assert _example().main(["--steps", "12", "--every", "5", "--logdir", str(tmp_path)]) == 0
    assert "wrote 12 steps" in capsys.readouterr().out
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recording_and_building_never_sync():
    model = mlp().cuda()
    pc = KFACPreconditioner(model, inv_update_steps=4, kl_clip=1e-2, lr=0.1)
    x, y = torch.randn(6, 5, device="cuda"), torch.randint(0, 3, (6,), device="cuda")

    def step():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pc.step()

    step()  # step 0 refreshes (host syncs allowed there)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
            m = pc.last_metrics
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert m._values["nu"].device.type == "cuda" and m._values["nonfinite_steps"].device.type == "cuda"
    d = m.as_dict()
    assert d["step"] == 2 and d["nonfinite_steps"] == 0 and d["nu"] == float(pc.last_nu)
