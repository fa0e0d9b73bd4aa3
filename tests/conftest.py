"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def float64_default():
    """Run one test with float64 as torch's default dtype, restored afterwards.

    Module-level `torch.set_default_dtype` would leak into every test collected after
    the module (pytest imports all modules before running any test).
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _default_dtype_is_restored():
    """Fail loudly if a test changes the default dtype and does not restore it."""
    before = torch.get_default_dtype()
    yield
    after = torch.get_default_dtype()
    torch.set_default_dtype(before)
    assert after == before, f"test changed torch's default dtype to {after} without restoring it"
