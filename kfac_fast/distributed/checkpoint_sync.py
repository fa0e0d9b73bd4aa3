"""The collective side of a data-parallel preconditioner's checkpoints (a mixin of
DataParallelKFAC): what `synced_state_dict` gathers and what a load keeps."""
from __future__ import annotations

from typing import Any


def result_names(method: str) -> tuple:
    """The decomposition tensors a layer holds under `method` (its EKFAC scales aside)."""
    return ("a_inv", "g_inv") if method == "inverse" else ("qa", "da", "qg", "dg")


class CheckpointSync:
    """before_state_dict / after_state_dict / after_load_state_dict of DataParallelKFAC."""

    layers: dict
    method: str
    strategy: str
    factor_sync: str
    rank: int
    sharded_memory: Any
    _ready: set

    def before_state_dict(self) -> None:
        """Make this rank's state global before a checkpoint (collective): average the
        factors under factor_sync="inverse"; under "memory" gather every decomposition
        (and, on FSDP2-sharded layers, every factor) until `after_state_dict`, so rank 0's
        checkpoint resumes exactly."""
        if self.sharded_memory is not None:
            self.sharded_memory.share_factors()
        else:
            self.before_owned_state_dict()
        if self.strategy == "memory":
            self._share_decompositions(  # type: ignore[attr-defined]
                [layer for layer in self.layers.values() if layer.name in self._ready])

    def before_owned_state_dict(self) -> None:
        """Make the factors each rank holds global without gathering anything (collective;
        for a sharded checkpoint, kfac_fast.distributed.dcp): under factor_sync="inverse"
        average them (not on FSDP2 "memory", whose owners hold global factors already)."""
        if self.sharded_memory is None and self.factor_sync == "inverse":
            self.average_factors([layer for layer in self.layers.values()  # type: ignore[attr-defined]
                                  if layer.a_factor is not None and layer.g_factor is not None], weighted=True)

    def after_owned_load(self, ready: set) -> None:
        """After this rank loaded its share of a sharded checkpoint (and `load_state_dict`
        dropped what it does not own): the ready set is the checkpoint's, the same on every
        rank, not the layers whose decompositions this rank happens to hold."""
        self._ready = set(ready)

    def after_state_dict(self) -> None:
        """Release the decompositions (and factors) `before_state_dict` gathered."""
        self._drop_unowned()

    def after_load_state_dict(self) -> None:
        """Rebuild the rank-identical ready set from the loaded state (the same on every
        rank, since every rank loads rank 0's checkpoint); under "memory" keep only the
        decompositions (and, on FSDP2-sharded layers, factors) this rank owns."""
        self._ready = {n for n, layer in self.layers.items()
                       if all(getattr(layer, a) is not None for a in self._result_names())}
        self._drop_unowned()

    def _result_names(self) -> tuple:
        return result_names(self.method)

    def _drop_unowned(self) -> None:
        if self.strategy != "memory":
            return
        owners = self.owners()  # type: ignore[attr-defined]
        for name, layer in self.layers.items():
            if owners[(name, "a")] != self.rank:
                for attr in self._result_names():
                    setattr(layer, attr, None)
        if self.sharded_memory is not None:
            self.sharded_memory.drop_unowned_factors()
