"""Which rank decomposes which factor: a deterministic greedy split on cost n^3 (or, for
FSDP2's "memory" strategy, on the elements held, `memory_cost`).

Every rank runs the same rule on the same rank-identical inputs (sizes in registration
order), so every rank computes the same owners without communicating.
"""
from __future__ import annotations

import heapq
from typing import Callable, Sequence


def assign_work(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each item: greedy least-loaded (largest cost first, ties to the
    lower item index and the lower rank), deterministic on every rank."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign_work: world_size must be an int >= 1, got {world_size!r}")
    for i, c in enumerate(costs):
        if not c >= 0:
            raise ValueError(f"assign_work: costs[{i}] must be >= 0, got {c!r}")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + costs[i], rank))
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost assigned to each rank."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners):
        loads[r] += c
    return loads


def load_imbalance(costs: Sequence[float], owners: Sequence[int], world_size: int) -> float:
    """max load / mean load (1.0 is perfect balance; 1.0 for zero total cost)."""
    loads = rank_loads(costs, owners, world_size)
    mean = sum(loads) / world_size
    return max(loads) / mean if mean > 0 else 1.0


def decomposition_cost(n: int) -> float:
    """Relative cost of one eigendecomposition or inverse of an n x n factor."""
    return float(n) ** 3


def memory_cost(n: int) -> float:
    """Elements held for one n x n factor: the factor and its decomposition (an n x n basis
    or inverse, plus n eigenvalues)."""
    return 2.0 * n * n + n


def factor_owners(dims: dict, world_size: int, *, whole_layers: bool,
                  cost: Callable[[int], float] = decomposition_cost) -> dict:
    """(layer name, "a" or "g") -> owning rank, from dims: name -> (a_dim, g_dim).

    whole_layers=False balances single factors; True keeps a layer's A and G on one rank
    (which then preconditions the layer) and balances their summed cost. cost: an item's
    weight from its dimension n, the decomposition's time by default; `memory_cost`
    balances the memory (then each rank holds at most total / world + the largest
    layer's, the greedy least-loaded bound).
    """
    names = list(dims)
    if whole_layers:
        costs = [cost(dims[n][0]) + cost(dims[n][1]) for n in names]
        owner = assign_work(costs, world_size)
        return {(n, s): r for n, r in zip(names, owner) for s in ("a", "g")}
    items = [(n, s) for n in names for s in ("a", "g")]
    costs = [cost(dims[n][0] if s == "a" else dims[n][1]) for n, s in items]
    return dict(zip(items, assign_work(costs, world_size)))
