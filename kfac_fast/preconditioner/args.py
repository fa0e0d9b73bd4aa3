"""The constructor arguments of KFACPreconditioner: their checks, and kfac-pytorch's keywords.

`check_arguments` holds the checks of the plain (non-schedule) arguments; `compile_skip`
turns `skip_layers` into regexes. `refuses_kfac_pytorch_keywords` wraps the constructor so
that a keyword of kfac-pytorch 0.4.2's `KFACPreconditioner` that kfac_fast does not have
raises a TypeError naming kfac_fast's equivalent (or why there is none) instead of
Python's bare "unexpected keyword argument"; `KFAC_PYTORCH_KEYWORDS` is that table (the
migration guide, docs/migration-kfac-pytorch.md, says the same per keyword).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Optional, TypeVar, Union

import torch
from torch import nn

from ..layers.base import METHODS
from ..schedules import require_bool, require_int, require_names, require_number

FISHERS = ("empirical", "mc")
LOSS_AVERAGES = ("batch", "tokens", "sum")


def check_arguments(model: Any, method: Any, fisher: Any, loss_average: Any, factor_dtype: Any, grad_scaler: Any,
                    accumulation_steps: Any, update_factors_in_hooks: Any) -> None:
    """TypeError / ValueError naming the first plain argument that is not allowed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if not (isinstance(loss_average, str) and loss_average in LOSS_AVERAGES):
        require_number("loss_average", loss_average, alternatives=f"one of {LOSS_AVERAGES} or ")
    if factor_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"factor_dtype must be torch.float32 or torch.float64 (or None: float32), got {factor_dtype}")
    if grad_scaler is not None and not (hasattr(grad_scaler, "scale") and hasattr(grad_scaler, "unscale_")):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    require_int("accumulation_steps", accumulation_steps)
    require_bool("update_factors_in_hooks", update_factors_in_hooks)


def compile_skip(skip_layers: Union[None, str, Iterable[str]]) -> list:
    """`skip_layers` (a regex, an iterable of regexes, or None for none) compiled."""
    if skip_layers is None:  # kfac-pytorch's default
        return []
    out = []
    for p in require_names("skip_layers", skip_layers, "a regex", "regexes"):
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"skip_layers: bad regex {p!r}: {exc}") from None
    return out


_DISTRIBUTED = "distributed=kfac_fast.distributed.DistributedOptions"

# kfac-pytorch 0.4.2 KFACPreconditioner keywords kfac_fast does not have -> what to use instead
KFAC_PYTORCH_KEYWORDS: dict[str, str] = {
    "compute_method": "kfac_fast calls it method= ('eigen', 'inverse' or 'ekfac')",
    "update_factors_in_hook": "kfac_fast calls it update_factors_in_hooks= (plural; default False here, "
                              "True in kfac-pytorch)",
    "inv_dtype": "there is none: decompositions and inverses are kept in factor_dtype= "
                 "(torch.float32 or torch.float64)",
    "assignment_strategy": "there is none: kfac_fast always assigns decompositions by their cost n^3 "
                           "(kfac-pytorch's COMPUTE); see docs/distributed.md",
    "colocate_factors": f"there is none: it follows the strategy of {_DISTRIBUTED}(strategy=...): "
                        "'memory' keeps both factors of a layer on one rank, 'communication' assigns "
                        "each factor on its own",
    "grad_worker_fraction": f"use {_DISTRIBUTED}(strategy='communication') for COMM_OPT (1.0: every "
                            "rank preconditions) or strategy='memory' for MEM_OPT (only the owner "
                            "preconditions); there is no HYBRID_OPT",
    "symmetry_aware": "there is none: kfac_fast always communicates the packed upper triangles of "
                      "the factors",
    "allreduce_bucket_cap_mb": f"use {_DISTRIBUTED}(bucket_cap_mb=...)",
    "compute_eigenvalue_outer_product": "there is none: method='eigen' forms the eigenvalue "
                                        "denominators inside its fused precondition op",
    "loglevel": "there is none: kfac_fast logs through the 'kfac_fast' logger "
                "(logging.getLogger('kfac_fast').setLevel(...); see kfac_fast.metrics)",
}


def kfac_pytorch_hint(name: str, value: Any) -> str:
    """The TypeError message for kfac-pytorch's keyword `name` given `value`."""
    hint = KFAC_PYTORCH_KEYWORDS[name]
    shown = getattr(value, "name", value)  # an enum member (ComputeMethod.EIGEN) by its name
    if name == "compute_method" and str(shown).lower() in METHODS:
        hint += f": pass method={str(shown).lower()!r}"
    elif name == "update_factors_in_hook" and isinstance(value, bool):
        hint += f": pass update_factors_in_hooks={value}"
    return (f"KFACPreconditioner got kfac-pytorch's keyword {name}={shown!r}; {hint} "
            "(docs/migration-kfac-pytorch.md)")


F = TypeVar("F", bound=Callable[..., Any])


def refuses_kfac_pytorch_keywords(init: F) -> F:
    """Wrap a constructor so kfac-pytorch's keywords raise a TypeError naming ours."""
    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        for name, value in kwargs.items():
            if name in KFAC_PYTORCH_KEYWORDS:
                raise TypeError(kfac_pytorch_hint(name, value))
        return init(self, *args, **kwargs)
    return wrapped  # type: ignore[return-value]


def default_factor_dtype(factor_dtype: Optional[torch.dtype]) -> Any:
    """kfac-pytorch's factor_dtype=None (its default) is float32 here."""
    return torch.float32 if factor_dtype is None else factor_dtype
