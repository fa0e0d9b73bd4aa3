"""kfac_fast.KFAC's per-step record (`last_metrics`) and its log lines (issue 21 item 8):
the paper's quantities, recorded without host syncs, skipped updates read from the health
counter, INFO on damping changes and skips, DEBUG per step, silence by default."""
from __future__ import annotations

import collections
import logging
import math

import pytest
import torch
from torch import nn

import kfac_fast.optimizer as optimizer_module
from kfac_fast import KFAC
from kfac_fast.metrics import StepMetrics, logger
from tests._bce_problem import bce_closure as closure_of
from tests._bce_problem import random_batches as data

DT = torch.float64
NAMES = ["loss", "lr", "damping", "gamma", "alpha", "mu", "rho", "loss_after", "damping_adapted", "gamma_searched",
         "damping_next", "gamma_next", "skipped", "nonfinite_updates"]
DEVICE_VALUES = {"loss", "alpha", "mu", "skipped"}  # nonfinite_updates too, once something was counted


def net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6)).to(DT)


def make(model, **kw):
    kw.setdefault("damping", 1.0)
    return KFAC(model, "bce_with_logits", factor_dtype=DT, generator=torch.Generator().manual_seed(0), **kw)


def test_record_holds_the_papers_quantities_of_each_step():
    model = net()
    opt = make(model, gamma_interval=10, damping_interval=5, lr=0.5)
    assert opt.last_metrics is None
    for k, x in enumerate(data(7)):
        damping, gamma = opt.damping, opt.gamma
        loss = opt.step(closure_of(model, x))
        m = opt.last_metrics
        assert isinstance(m, StepMetrics) and m.step == k and m.names() == NAMES
        assert all(isinstance(m._values[n], torch.Tensor) for n in DEVICE_VALUES)
        d = m.as_dict()
        assert d["loss"] == loss.item()
        assert d["alpha"] == opt.last["alpha"].item() and d["mu"] == opt.last["mu"].item()
        assert d["lr"] == 0.5 and d["damping"] == damping and d["damping_next"] == opt.damping
        assert d["gamma_next"] == opt.gamma
        assert d["damping_adapted"] is (k % 5 == 0) and d["gamma_searched"] is (k % 10 == 0)
        if k % 5 == 0:
            assert d["rho"] == opt.last["rho"] and d["loss_after"] == opt.last["loss_after"]
            assert math.isfinite(d["rho"]) and d["damping_next"] != damping
        else:
            assert math.isnan(d["rho"]) and math.isnan(d["loss_after"])
            assert d["damping_next"] == damping and d["gamma"] == gamma == d["gamma_next"]
        if k == 0:  # the search's winner is the gamma the step used; no delta0 yet
            assert d["gamma"] == opt.gamma and d["mu"] == 0.0
        assert d["skipped"] == 0.0 and d["nonfinite_updates"] == 0


def test_skipped_updates_come_from_the_health_counter():
    model = net()
    opt = make(model, damping_interval=100, gamma_interval=None)
    xs = data(4)
    xs[1] = xs[1].clone()
    xs[1][3, 2] = float("nan")
    records = []
    for x in xs:
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure_of(model, x))
        records.append(opt.last_metrics)
        if x is xs[1]:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    got = [r.as_dict() for r in records]
    assert [g["skipped"] for g in got] == [0.0, 1.0, 0.0, 0.0]
    # a copy per step: a later step does not change an earlier record
    assert [g["nonfinite_updates"] for g in got] == [0, 1.0, 1.0, 1.0]
    assert opt.preconditioner.health()["kfac_nonfinite_update"] == 1
    assert math.isnan(got[1]["loss"]) and got[1]["alpha"] == 0.0


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _sync_counts(monkeypatch, opt, model, xs):
    """Host reads of tensors per step (item, tolist, bool, float, int, index, cpu, numpy)."""
    counts: list = []
    current: collections.Counter = collections.Counter()
    with monkeypatch.context() as m:
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **k):
                current[_name] += 1
                return _original(self, *a, **k)
            m.setattr(torch.Tensor, name, counted)
        for x in xs:
            current.clear()
            opt.step(closure_of(model, x))
            counts.append(dict(current))
    return counts


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO], ids=["default", "info"])
def test_recording_and_info_logging_add_no_host_sync(monkeypatch, level):
    """Steps 1-4 (no adaptation, no refresh) read the host exactly as often with the record
    and INFO logging as with recording switched off."""
    xs = data(6)
    kw = dict(damping_interval=5, gamma_interval=None, inv_update_steps=100)
    old = logger.level
    logger.setLevel(level)  # (setLevel, not .level: the logger caches isEnabledFor)
    try:
        assert logger.isEnabledFor(logging.INFO) is (level == logging.INFO)
        model = net()
        with_record = _sync_counts(monkeypatch, make(model, **kw), model, xs)
        model = net()
        opt = make(model, **kw)
        monkeypatch.setattr(optimizer_module, "record_step", lambda *a, **k: None)
        without = _sync_counts(monkeypatch, opt, model, xs)
    finally:
        logger.setLevel(old)
    assert opt.last_metrics is None  # the patched run recorded nothing
    assert with_record[1:5] == without[1:5]


def test_record_step_itself_reads_nothing(monkeypatch):
    """The record of an adaptation step and of a plain step, built with every host read
    of a tensor raising (default log level)."""
    model = net()
    opt = make(model, damping_interval=2, gamma_interval=None)
    real = optimizer_module.record_step

    def strict(*a, **k):
        with monkeypatch.context() as m:
            for name in SYNCS:
                m.setattr(torch.Tensor, name, lambda *_a, _n=name, **_k: pytest.fail(f"record_step called {_n}"))
            return real(*a, **k)

    monkeypatch.setattr(optimizer_module, "record_step", strict)
    for x in data(3):
        opt.step(closure_of(model, x))
    assert opt.last_metrics.step == 2


def test_nothing_is_printed_at_the_default_level(capfd):
    model = net()
    opt = make(model, damping_interval=1, gamma_interval=2)
    for x in data(3):
        opt.step(closure_of(model, x))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_info_logs_damping_changes_and_skips_debug_logs_each_step(caplog):
    caplog.set_level(logging.INFO, logger="kfac_fast")
    model = net()
    opt = make(model, damping_interval=3, gamma_interval=3)
    xs = data(7)
    xs[4] = xs[4].clone()
    xs[4][0, 0] = float("inf")
    for x in xs:
        opt.step(closure_of(model, x))
    kfac = [r for r in caplog.records if r.getMessage().startswith("KFAC")]
    text = [r.getMessage() for r in kfac]
    assert all(r.levelno == logging.INFO and r.name == "kfac_fast" for r in kfac)
    assert any(t.startswith("KFAC step 0: rho") and "lambda 1 ->" in t for t in text), text
    assert any(t.startswith("KFAC step 3: rho") for t in text), text
    # the step-4 skip is counted on the device and reported at the next adaptation (step 6)
    assert any(t.startswith("KFAC steps 4-6: 1 non-finite update(s) not applied") for t in text), text
    assert not any("step 1:" in t or "step 2:" in t for t in text), text

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="kfac_fast")
    opt.step(closure_of(model, xs[0]))  # step 7: no adaptation
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "KFAC step 7" in r.getMessage()]
    assert len(debug) == 1 and "'rho': nan" in debug[0] and "'lr': 1.0" in debug[0]


def test_write_to_a_tensorboard_style_writer():
    class Writer:
        def __init__(self):
            self.calls = {}

        def add_scalar(self, tag, value, step):
            self.calls[tag] = (value, step)

    model = net()
    opt = make(model, damping_interval=2, gamma_interval=None)
    for x in data(2):
        opt.step(closure_of(model, x))
    w = Writer()
    opt.last_metrics.write_to(w)
    # step 1 adapts nothing: rho and loss_after are NaN and left out
    assert set(w.calls) == {f"kfac/{n}" for n in NAMES} - {"kfac/rho", "kfac/loss_after"}
    assert w.calls["kfac/lr"] == (1.0, 1) and w.calls["kfac/damping"] == (opt.damping, 1)


def test_a_resumed_run_reports_only_its_own_skips(caplog):
    model = net()
    opt = make(model, damping_interval=2, gamma_interval=None)
    xs = data(3)
    xs[1] = xs[1].clone()
    xs[1][0, 0] = float("nan")
    for x in xs:
        opt.step(closure_of(model, x))
    state = opt.state_dict()
    model2 = net()
    model2.load_state_dict(model.state_dict())
    opt2 = make(model2, damping_interval=2, gamma_interval=None)
    opt2.load_state_dict(state)
    caplog.set_level(logging.INFO, logger="kfac_fast")
    opt2.step(closure_of(model2, data(1)[0]))  # step 3: no adaptation
    opt2.step(closure_of(model2, data(1)[0]))  # step 4: adaptation, nothing new skipped
    assert opt2.preconditioner.health()["kfac_nonfinite_update"] == 1
    assert not any("non-finite" in r.getMessage() for r in caplog.records), caplog.text
