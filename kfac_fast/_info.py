"""backend_info(): which implementation serves each op on each device, and why.

Never raises because `kfac_fast._C`, CUDA or Triton is missing: those facts are what it
reports.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import _dispatch


class BackendInfo(dict):
    """A dict with keys "backend_env", "devices" ({device: {op: {"backend": chosen,
    <backend>: reason}}}), "_C" (build_info dict or the reason it is missing) and
    "triton" (version or the reason it is missing); str() gives a readable table."""

    def __str__(self) -> str:
        lines = [f"KFAC_FAST_BACKEND={self['backend_env']}",
                 f"kfac_fast._C: {self['_C']}",
                 f"triton: {self['triton']}"]
        for device, ops in self["devices"].items():
            lines.append(f"[{device}]")
            width = max((len(op) for op in ops), default=0)
            for op, row in ops.items():
                reasons = "; ".join(f"{b}: {why}" for b, why in row.items() if b != "backend")
                lines.append(f"  {op:<{width}}  -> {row['backend']:<6}  ({reasons})")
        return "\n".join(lines)


def _c_info() -> Union[dict, str]:
    try:
        from . import _C
        info = dict(_C.build_info())
        if info.get("cuda") and hasattr(_C, "cuda_driver_version"):
            # what the cuda backend's driver check compares with cuda_runtime_major
            info["cuda_driver_version"] = int(_C.cuda_driver_version())
        return info
    except Exception as exc:  # ImportError, or a module built for another Python/ABI
        return f"not available ({type(exc).__name__}: {exc})"


def _triton_info() -> str:
    try:
        import triton
        return f"importable (version {triton.__version__})"
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"


def backend_info(device: Optional[Union[str, torch.device]] = None) -> BackendInfo:
    """For each op and device (the given one, else cpu plus cuda when available): the
    backend `auto` dispatch chooses and why each backend is or is not used; plus the
    build facts of `_C` and whether Triton imports. `print(kfac_fast.backend_info())`."""
    if device is None:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    else:
        devices = [torch.device(device)]
    try:
        env = _dispatch.requested_backend()
    except ValueError as exc:
        env = f"invalid ({exc})"
    return BackendInfo(
        backend_env=env,
        devices={str(d): _dispatch.describe(d) for d in devices},
        _C=_c_info(),
        triton=_triton_info(),
    )
