"""Cached device tables (kernels/table_cache.py): a table filled by an asynchronous copy
on one stream is waited for by every stream that later uses it, the allocator is told
about those streams, and the cache is bounded (least recently used first). CPU tests
with the CUDA stream and event mocked; needs neither Triton nor a GPU."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.kernels import table_cache

CUDA = torch.device("cuda", 0)


class FakeEvent:
    def __init__(self):
        self.recorded_on = None

    def record(self, stream):
        self.recorded_on = stream


class FakeStream:
    def __init__(self, name):
        self.name = name
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


class FakeTable:
    """Stands in for a CUDA tensor: records the streams the allocator is told about."""

    def __init__(self):
        self.streams = []

    def record_stream(self, stream):
        self.streams.append(stream)


@pytest.fixture
def streams(monkeypatch):
    state = {"current": FakeStream("s1")}
    monkeypatch.setattr(table_cache, "_current_stream", lambda device: state["current"])
    monkeypatch.setattr(table_cache, "_new_event", FakeEvent)
    return state


def test_a_second_stream_waits_for_the_copy_that_filled_the_table(streams):
    cache = table_cache.TableCache()
    built = []

    def build():
        built.append(1)
        return (FakeTable(), FakeTable(), 3, None)

    s1 = streams["current"]
    first = cache.get("key", CUDA, build)
    event = s1.waited[0]
    assert event.recorded_on is s1  # recorded after the build, on the building stream
    streams["current"] = s2 = FakeStream("s2")
    second = cache.get("key", CUDA, build)
    assert second is first and len(built) == 1  # built once
    assert s2.waited == [event]  # without this wait s2 could read the table before it lands
    for t in first[:2]:
        assert t.streams == [s1, s2]  # no reuse of the memory while s2 may read it


def test_entries_are_evicted_least_recently_used_first(streams):
    cache = table_cache.TableCache(max_entries=2)
    cache.get("a", CUDA, FakeTable)
    cache.get("b", CUDA, FakeTable)
    cache.get("a", CUDA, FakeTable)  # a is now the most recent
    cache.get("c", CUDA, FakeTable)
    assert len(cache) == 2
    rebuilt = []
    cache.get("a", CUDA, lambda: rebuilt.append("a") or FakeTable())
    cache.get("b", CUDA, lambda: rebuilt.append("b") or FakeTable())
    assert rebuilt == ["b"]


def test_cpu_tables_need_no_events():
    cache = table_cache.TableCache()
    t = torch.arange(6)
    assert cache.get("k", "cpu", lambda: t) is t
    assert cache.get("k", "cpu", lambda: torch.zeros(1)) is t


def test_max_entries_is_checked():
    with pytest.raises(ValueError, match="max_entries"):
        table_cache.TableCache(max_entries=0)


def test_every_cached_device_table_in_kernels_is_a_table_cache():
    """A module-level `*_CACHE` in kernels/ holding device tables must be a TableCache
    (ordered for every stream, bounded); a plain dict reintroduces the cross-stream race."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
    plain = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            value = getattr(node, "value", None)
            for t in targets:
                if isinstance(t, ast.Name) and t.id.endswith("CACHE"):
                    is_table_cache = isinstance(value, ast.Call) and getattr(value.func, "id", "") == "TableCache"
                    if not is_table_cache:
                        plain.append(f"{path.name}:{node.lineno} {t.id}")
    assert not plain, f"device-table caches that are not TableCache: {plain}"
