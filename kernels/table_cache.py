"""Cached device tables (work lists, tile tables) that are safe to reuse on any stream.

A launcher builds a small int table on the host once per shape and copies it to the
device with one pinned, non_blocking copy (`launch.host_table`), ordered on the stream
that was current then. A later call may run on another stream: without an ordering, its
kernel could read the table before that copy has landed (garbage tile indices on a GPU,
which the interpreter never shows). `TableCache.get` therefore records an event after
building an entry and makes every using stream wait for it (device-side, no host sync),
and tells the caching allocator about each stream that reads the tensors, so an evicted
entry's memory is not reused while a kernel on that stream may still read it. Entries
are evicted least recently used first, so shapes that vary per step (row counts) cannot
grow the cache without bound.

No Triton import here: plain torch, like `guard.py`. The stream and event hooks are
module attributes so CPU tests can replace them with mocks.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

_current_stream = torch.cuda.current_stream
_new_event = torch.cuda.Event

# untuned: enough entries for every (layer mix, tile size) a model's groups use, small
# enough that per-step varying row counts cannot hold much device memory.
DEFAULT_ENTRIES = 64


def _tensors(value: Any) -> list:
    """The tensors of a cached value (a tensor, or a tuple holding tensors, ints, None)."""
    items = value if isinstance(value, tuple) else (value,)
    return [t for t in items if hasattr(t, "record_stream")]


class TableCache:
    """key -> device tables built by `build()`, ordered for whichever stream uses them."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: Hashable, device, build: Callable[[], Any]) -> Any:
        """The cached value for `key`, built by `build()` on first use; on CUDA the
        current stream of `device` is ordered after the copy that filled it."""
        device = torch.device(device)
        entry = self._entries.get(key)
        if entry is None:
            value = build()
            event = None
            if device.type == "cuda":
                event = _new_event()
                event.record(_current_stream(device))
            entry = self._entries[key] = (value, event)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        value, event = entry
        if event is not None:
            stream = _current_stream(device)
            stream.wait_event(event)
            for t in _tensors(value):
                t.record_stream(stream)
        return value
