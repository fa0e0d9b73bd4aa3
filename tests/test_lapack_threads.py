"""kfac_fast.backends.lapack_threads: the OMP_WAIT_POLICY warning and the opt-in LAPACK thread limit."""
import warnings

import pytest
import torch

from kfac_fast.backends import lapack_threads as lt


@pytest.fixture
def fresh(monkeypatch):
    """No warning given yet in this process, both variables unset, 2 torch threads."""
    monkeypatch.setattr(lt, "_warned", False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(lt.ENV_THREADS, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield monkeypatch
    torch.set_num_threads(before)


def _eigh_in_context(device="cpu"):
    m = torch.randn(40, 40, dtype=torch.float64)
    with lt.cpu_lapack(torch.device(device)):
        inside = torch.get_num_threads()
        vals = torch.linalg.eigh(m + m.T).eigenvalues
    return inside, vals


def test_warns_once_naming_the_variable(fresh):
    with pytest.warns(lt.LapackThreadsWarning, match="OMP_WAIT_POLICY=PASSIVE") as record:
        inside, _ = _eigh_in_context()
    assert inside == 2 and lt.ENV_THREADS in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _eigh_in_context()  # once per process


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"},
                                 {lt.ENV_THREADS: "1"}])
def test_no_warning_when_set_or_single_threaded(fresh, env):
    for key, value in env.items():
        fresh.setenv(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _eigh_in_context()


def test_thread_limit_applies_inside_and_is_restored(fresh):
    fresh.setenv("OMP_WAIT_POLICY", "PASSIVE")
    fresh.setenv(lt.ENV_THREADS, "1")
    inside, vals = _eigh_in_context()
    assert inside == 1 and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with lt.cpu_lapack(torch.device("cpu")):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # restored after an error too
    fresh.setenv(lt.ENV_THREADS, "8")  # above the current count: left alone
    assert _eigh_in_context()[0] == 2 and torch.isfinite(vals).all()


def test_other_devices_untouched(fresh):
    fresh.setenv(lt.ENV_THREADS, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lt.cpu_lapack(torch.device("meta")):
            assert torch.get_num_threads() == 2


@pytest.mark.parametrize("raw", ["0", "-2", "two", "1.5"])
def test_bad_thread_limit_names_the_variable(fresh, raw):
    fresh.setenv(lt.ENV_THREADS, raw)
    with pytest.raises(ValueError, match=lt.ENV_THREADS):
        _eigh_in_context()


def test_ops_eigh_runs_under_cpu_lapack(fresh):
    # The call sites (backends/_common.eigh_stack, the reference damped_inverse) use the
    # helper: the public op warns, and runs LAPACK with the opt-in limit.
    from kfac_fast import ops

    x = torch.randn(50, 30)
    with pytest.warns(lt.LapackThreadsWarning, match="OMP_WAIT_POLICY"):
        ops.eigh([x.T @ x / 50])
    seen = []
    real_eigh = torch.linalg.eigh

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_eigh(*args, **kwargs)

    fresh.setattr(torch.linalg, "eigh", spy)
    fresh.setenv(lt.ENV_THREADS, "1")
    ops.eigh([x.T @ x / 50 + torch.eye(30)])
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
