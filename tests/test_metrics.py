"""kfac_fast.metrics: the silent library logger and the sync-free per-step record."""
from __future__ import annotations

import logging

import pytest
import torch

from kfac_fast.metrics import StepMetrics, logger


def test_logger_prints_nothing_by_default(capsys):
    assert logger.name == "kfac_fast"
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    logger.warning("should not reach stderr without configuration")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_record_keeps_tensors_unread_and_as_dict_reads_them_in_order():
    m = StepMetrics(7)
    t = torch.tensor(0.25, dtype=torch.float32)
    m.record("nu", t)
    m.record("damping", 0.1)
    m.record("path", "refresh")
    m.record("skipped", torch.tensor(True))
    assert m._values["nu"] is not t and m._values["nu"].data_ptr() == t.data_ptr()  # a view, not a copy
    m.record("count", torch.tensor(3, dtype=torch.int64))
    d = m.as_dict()
    assert d == {"step": 7, "nu": 0.25, "damping": 0.1, "path": "refresh", "skipped": 1, "count": 3}
    assert type(d["count"]) is int and type(d["skipped"]) is int and type(d["nu"]) is float


@pytest.mark.parametrize("bad, error", [(torch.ones(2), ValueError), ([1.0], TypeError), (None, TypeError)])
def test_record_refuses_what_is_not_one_value(bad, error):
    with pytest.raises(error, match="StepMetrics.record: x"):
        StepMetrics(0).record("x", bad)
    with pytest.raises(ValueError, match="snake_case"):
        StepMetrics(0).record("not a name", 1.0)


def test_write_to_skips_strings_and_non_finite():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    m = StepMetrics(3)
    m.record("rho", torch.tensor(float("nan")))
    m.record("lr", 0.5)
    m.record("path", "kept")
    w = Writer()
    m.write_to(w)
    assert w.calls == [("kfac/lr", 0.5, 3)]
