"""pytest configuration for the benchmark suites in bench/.

- Collects `bench_*.py` (pytest's default pattern is test_*.py), so `pytest bench`
  runs the suites without extra options.
- Puts a benchmark that names no group in one of its own, "<file>:<function>" (issue
  21: the ungrouped benchmarks of several files shared the first table, whose ratio
  column compared an eigh refresh in microseconds with a tridiag step in seconds and read
  ">1000.0"); a group set by the test itself still wins.
- Pins torch's CPU threads (env KFAC_BENCH_THREADS, else OMP_NUM_THREADS, else 2) so
  CPU timings are comparable between runs and machines, and records the thread count,
  device and versions in every benchmark's extra_info (they land in the JSON).
"""
from __future__ import annotations

import os
import platform

import pytest
import torch


def bench_threads() -> int:
    """The CPU thread count every benchmark runs with."""
    return int(os.environ.get("KFAC_BENCH_THREADS") or os.environ.get("OMP_NUM_THREADS") or 2)


def bench_device() -> torch.device:
    """cuda when present (or KFAC_BENCH_DEVICE), else cpu; read lazily, never at import."""
    name = os.environ.get("KFAC_BENCH_DEVICE")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_collect_file(file_path, parent):
    # Explicit command-line paths are collected by pytest itself; collecting them here
    # too would run every case twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and str(file_path) not in {str(parent.config.rootpath / a) for a in parent.config.args} \
            and file_path.name not in parent.config.args:
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    torch.set_num_threads(bench_threads())


def pytest_report_header(config):
    return f"kfac_fast bench: torch {torch.__version__}, {torch.get_num_threads()} CPU threads pinned"


def default_group(node) -> str:
    """The group of a benchmark that sets none: its file and function, parameters side by side."""
    return f"{node.path.stem}:{getattr(node, 'originalname', node.name)}"


@pytest.fixture
def device() -> torch.device:
    return bench_device()


@pytest.fixture(autouse=True)
def _record_environment(request):
    """Write threads/device/versions into extra_info of benchmarks that use the fixture."""
    if "benchmark" not in request.fixturenames:
        yield
        return
    # Fetched at setup: pytest refuses getfixturevalue during teardown.
    bm = request.getfixturevalue("benchmark")
    if bm.group is None:
        bm.group = default_group(request.node)
    yield
    dev = bench_device()
    bm.extra_info.update(
        threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
    )
