"""Ranks weighted by their share of the batch when factors are averaged.

A rank's A is a mean over its own R_r rows and its G a mean over its own N_r examples
(docs/design.md), so the factors of the global batch are the row- (A) and example- (G)
weighted means over ranks, sum_r R_r A_r / sum_r R_r, not the plain mean (which is the
same only for equal shards). `RowWeights.record` notes R_r and N_r of each layer's
factor update from the captures the preconditioner held for it (the normalisers the
update itself used, a masked capture's real rows included); `allreduce_weighted_factors_`
all-reduces w_r F_r together with w_r in the same bucketed buffers (no other collective,
no host sync) and divides; where the weights sum to zero (no rank had a row: every mask
all False) each rank keeps its own factor, which is then beta F_prev on every rank under
factor_sync="update", as in one process. The weight is the latest update's: exact whenever each rank's
share stays the same between two averagings (always with factor_sync="update"; a fixed
uneven split with "inverse"). With update_factors_in_hooks=True the captures are gone by
then and ranks are weighted equally, as before (exact for equal shards).
"""
from __future__ import annotations

from typing import Any, Union

import torch

from .. import ops
from .collectives import _bucketed_mean_

Weight = Union[int, float, torch.Tensor]
_TINY = 1e-30  # the divisor's floor where no rank had rows (the quotient is not used then)


class RowWeights:
    """This rank's latest (R_r, N_r) per layer name."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[Weight, Weight]] = {}

    def record(self, layers: list) -> None:
        """Note the row and example counts of the captures `layers` hold now (the ones
        their factor update just used); layers holding none keep their previous counts."""
        for layer in layers:
            if not layer.inputs or not layer.grads:
                continue
            rows: Weight = 0
            for i, x in enumerate(layer.inputs):
                masked = layer.input_rows[i] if i < len(layer.input_rows) else None
                rows = rows + (layer.input_row_count(x) if masked is None else masked)
            examples = sum(layer.batch_size(g) for g in layer.grads)
            self.latest[layer.name] = (rows, examples)

    def of(self, layers: list) -> list[Weight]:
        """The weights of the factors A, G of each layer (1 where none was recorded)."""
        return [w for layer in layers for w in self.latest.get(layer.name, (1, 1))]


def weight_vector(weights: list, like: torch.Tensor) -> torch.Tensor:
    """`weights` (Python numbers and 0-dim device tensors) as one 1-D tensor of `like`'s
    dtype and device, the values `ws[i] = w` gives, without a kernel per weight and
    without a pageable host-to-device copy: the numbers go in one tensor (one pinned,
    non-blocking copy off the CPU), the tensors join them in one torch.stack."""
    numbers = [w for w in weights if not isinstance(w, torch.Tensor)]
    host: Any = None
    if numbers:
        host = torch.tensor(numbers, dtype=like.dtype)
        if like.device.type != "cpu":
            host = host.pin_memory().to(like.device, non_blocking=True)
        if len(numbers) == len(weights):
            return host
    rest = iter(host if host is not None else ())
    return torch.stack([w.to(device=like.device, dtype=like.dtype) if isinstance(w, torch.Tensor) else next(rest)
                        for w in weights])


def allreduce_weighted_factors_(factors: list, weights: list, group: Any, bucket_cap_bytes: int) -> int:
    """factor <- sum_r w_r factor_r / sum_r w_r over the ranks of `group`, in place;
    returns the bytes all-reduced. Each bucket is the `ops.pack_triangles` buffer of the
    weighted factors followed by the weights, one all-reduce."""
    if not factors:
        return 0
    item = factors[0].element_size()
    members = list(zip(factors, weights))

    def sizes(group_members: list) -> list:
        return [(f.shape[0] * (f.shape[0] + 1) // 2 + 1) * item for f, _ in group_members]

    def pack(bucket: list) -> torch.Tensor:
        ws = weight_vector([w for _, w in bucket], bucket[0][0])
        return torch.cat([ops.pack_triangles([f * w for f, w in bucket]), ws])

    def unpack(bucket: list, flat: torch.Tensor) -> None:
        fs = [f for f, _ in bucket]
        start = flat.numel() - len(fs)  # the summed weights follow the triangles
        local = ops.pack_triangles(fs)
        parts, offset = [], 0
        for i, f in enumerate(fs):
            count = f.shape[0] * (f.shape[0] + 1) // 2
            total = flat[start + i]
            # no rows anywhere (every rank's mask all False): keep this rank's factor, as one
            # process does (its zero statistic leaves beta F); decided on the device
            parts.append(torch.where(total > 0, flat[offset:offset + count] / total.clamp_min(_TINY),
                                     local[offset:offset + count]))
            offset += count
        ops.unpack_triangles_(fs, torch.cat(parts))

    return _bucketed_mean_([members], sizes, pack, unpack, group, bucket_cap_bytes)
