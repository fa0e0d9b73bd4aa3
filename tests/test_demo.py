"""Smoke tests of the demo's pieces at tiny size: data, model, one step of each method."""
import math
import sys

import pytest
import torch
from torch import nn

from kfac_fast import curves, demo


def test_curves_shape_range_determinism():
    x = curves.make_curves(64, seed=3)
    assert x.shape == (64, 784) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert (x == 1).any() and (x == 0).float().mean() > 0.5  # a stroke on a dark background
    assert ((x > 0) & (x < 1)).any()  # anti-aliased edges: intensities, not just binary
    assert torch.equal(x, curves.make_curves(64, seed=3))
    assert torch.equal(x[:10], curves.make_curves(10, seed=3))  # image i does not depend on n
    assert not torch.equal(x, curves.make_curves(64, seed=4))
    train, test = curves.load_curves(8, 4, seed=0)
    assert train.shape == (8, 784) and test.shape == (4, 784) and not torch.equal(train[:4], test)


def test_entropy_floor():
    assert curves.entropy_floor(torch.tensor([[0.0, 1.0, 0.0]])) == 0.0
    assert math.isclose(curves.entropy_floor(torch.full((2, 3), 0.5)), 3 * math.log(2), rel_tol=1e-12)
    x = curves.make_curves(32, seed=0)
    # The floor is the BCE of the data with itself.
    logits = torch.logit(x.double().clamp(1e-12, 1 - 1e-12))
    assert math.isclose(demo.bce_loss(logits, x.double()).item(), curves.entropy_floor(x), rel_tol=1e-6)


def test_autoencoder_architecture():
    model = demo.build_autoencoder(seed=0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    sizes = [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]
    assert [(lin.in_features, lin.out_features) for lin in linears] == list(zip(sizes[:-1], sizes[1:]))
    # Logistic after every layer but the code layer (6 units, linear) and the output
    # (logits: the logistic is inside the loss).
    kinds = [type(m).__name__ for m in model]
    code = [i for i, k in enumerate(kinds) if k == "Linear"][5]  # 784-...-25 -> 6
    assert kinds.count("Sigmoid") == 10 and kinds[code + 1] == "Linear" and kinds[-1] == "Linear"
    for lin in linears:
        nonzero = (lin.weight != 0).sum(1)
        assert torch.all(nonzero == min(15, lin.in_features))
        assert torch.all(lin.bias == 0)
    assert torch.equal(linears[0].weight, demo.build_autoencoder(seed=0)[0].weight)
    out = model(torch.rand(3, 784))
    assert out.shape == (3, 784)


def _has_kfac():
    try:
        from kfac_fast import KFACPreconditioner  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("key", list(demo.METHODS))
def test_one_step_each_method(key):
    if key == "soap":
        pytest.importorskip("heavyball")
    if key == "kfac" and not _has_kfac():
        pytest.skip("kfac_fast.KFACPreconditioner not available")
    torch.manual_seed(0)
    data = curves.make_curves(48, seed=0)
    run = demo.train(key, demo.METHODS[key].lrs[0], data, steps=2, batch_size=16, seed=0,
                     eval_x=data, eval_every=1, final=True)
    assert run.steps == [0, 1, 2] and len(run.errors) == 3
    assert all(math.isfinite(e) for e in run.errors) and math.isfinite(run.final_error)
    assert run.errors[-1] < run.errors[0]  # two steps already leave the random-output regime


def test_quick_cli(tmp_path, capsys):
    methods = "sgd,adam" + (",kfac" if _has_kfac() else "")
    runs = demo.main(["--quick", "--methods", methods, "--out", str(tmp_path)])
    assert [r.method for r in runs] == methods.split(",")
    assert (tmp_path / "curves_error.png").stat().st_size > 0
    captured = capsys.readouterr()
    text = captured.out
    assert "entropy floor" in text and "x SGD step" in text
    # Not a terminal (captured): no progress bar's carriage returns, a line per method.
    assert "\r" not in captured.err + text
    for key in methods.split(","):
        assert sum(line.startswith(f"{demo.METHODS[key].name} done: ") for line in text.splitlines()) == 1


_EXTRAS = ("tqdm", "matplotlib", "heavyball")


def test_help_needs_no_demo_extra(monkeypatch, capsys):
    # Issue 21: tqdm was imported before the arguments were parsed.
    for name in _EXTRAS:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec is None
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0 and "--methods" in capsys.readouterr().out


@pytest.mark.parametrize("absent, methods", [("matplotlib", "sgd"), ("heavyball", "sgd,soap")])
def test_missing_extra_is_named(monkeypatch, tmp_path, absent, methods):
    monkeypatch.setitem(sys.modules, absent, None)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--quick", "--methods", methods, "--out", str(tmp_path)])
    assert absent in str(exc.value) and "pip install 'kfac_fast[demo]'" in str(exc.value)
    assert not (tmp_path / "curves_error.png").exists()  # refused before any training


def test_kfac_grid_changes_the_result():
    # Issue 21: K-FAC's lr grid printed one error at every point (kl_clip binds, so lr*nu
    # does not depend on lr); its grid is over the damping now.
    assert demo.METHODS["kfac"].knob == "damping" and len(set(demo.METHODS["kfac"].lrs)) > 1
    data = curves.make_curves(64, seed=0)
    _, grid = demo.choose_lr("kfac", data, grid_steps=3, batch_size=32, seed=0, eval_x=data, bar=None)
    errors = list(grid.values())
    assert all(math.isfinite(e) for e in errors) and len(set(errors)) == len(errors)


def _run(method, steps, seconds, errors, diverged=False):
    return demo.Run(method, 0.1, list(steps), list(seconds), list(errors), diverged=diverged)


def test_first_reach_and_error_before():
    run = _run("kfac-opt", [0, 10, 20, 30], [0.0, 1.0, 2.5, 4.0], [800.0, 130.0, 90.0, 95.0])
    assert demo.first_reach(run, 130.0) == (10, 1.0)  # "at or below"
    assert demo.first_reach(run, 91.0) == (20, 2.5)
    assert demo.first_reach(run, 10.0) is None
    assert demo.error_before(run, step=25) == (20, 90.0)
    assert demo.error_before(run, seconds=2.4) == (10, 130.0)
    assert demo.error_before(run, step=30, seconds=3.9) == (20, 90.0)  # both bounds apply
    assert demo.error_before(run) == (30, 95.0)
    assert demo.error_before(run, seconds=-1.0) == (0, 800.0)  # nothing earlier: the start


def test_target_report_compares_at_equal_steps_and_seconds():
    sgd = _run("sgd", [0, 10, 20], [0.0, 1.0, 2.0], [800.0, 300.0, 126.0])
    soap = _run("soap", [0, 10, 20], [0.0, 3.0, 6.0], [800.0, 200.0, 77.0])
    kfac = _run("kfac-opt", [0, 10, 20], [0.0, 2.0, 4.0], [800.0, 110.0, 60.0])
    lines = demo.target_report([sgd, soap, kfac])
    assert lines == [
        "KFAC (paper): SGD+momentum's final error 126.00 (20 steps, 2.0 s) reached at step 10, 2.0 s",
        # equal seconds: the earlier finisher's 4.0 s; SOAP's last point by then is step 10
        "KFAC (paper) vs SOAP: at step 20 60.00 vs 77.00; at 4.0 s 60.00 (step 20) vs 200.00 (step 10)",
    ]
    # diverged runs and absent baselines are left out rather than compared
    assert demo.target_report([sgd, kfac]) == lines[:1]
    assert demo.target_report([sgd, soap, _run("kfac-opt", [0], [0.0], [1e9], diverged=True)]) == []
