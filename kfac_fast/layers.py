"""Per-layer capture and state for `KFACPreconditioner`.

A `KFACLayer` wraps one registered module (nn.Linear with any leading dims, or
nn.Conv2d with groups=1): it knows the layer's factor sizes and row layout, holds its
K-FAC state (factors, update counts, decompositions, EKFAC scales) and the tensors its
hooks captured during the current step. It decides nothing about *when* to update: its
forward hook hands the input and output to a sink (the preconditioner), which
chooses to hold them, update a factor at once, or ignore them.

Row layouts (DESIGN.md):
- Linear: the input (..., d_in) is R = prod(...) rows; the output gradient (..., d_out)
  the same R rows; the batch is dim 0 (N = shape[0], or 1 for an unbatched 1-D input).
- Conv2d: the A rows are the N*L im2col patches of `F.unfold` (never materialised for
  K-FAC: `ops.conv_input_factor_` reads the NCHW input); the G rows are the output
  gradient (N, C_out, H', W') seen as (N, H', W', C_out), a view, not a copy.
- Conv1d: a Conv2d of unit height; Embedding: a Linear on one-hot rows with a diagonal
  A kept as a vector (both in `layer_kinds`).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .layer_kinds import conv1d_geometry, embedding_unsupported_reason


class CaptureSink(Protocol):
    """What a layer's forward hook reports to (the preconditioner)."""

    def on_forward(self, layer: "KFACLayer", x: torch.Tensor, output: torch.Tensor) -> None: ...


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be registered (None when it can).

    Only modules of a supported kind are asked; other kinds are not layers at all.
    """
    if isinstance(module, nn.Embedding):
        return embedding_unsupported_reason(module)
    if isinstance(module, nn.Conv1d):
        if module.groups != 1:
            return f"Conv1d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv1d with padding_mode={module.padding_mode!r} (only 'zeros')"
        if conv1d_geometry(module)["padding"] is None:
            return (f"Conv1d with padding={module.padding!r} that pads asymmetrically "
                    "(unfold pads both sides equally)")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros')"
        if isinstance(module.padding, str) and _string_padding(module) is None:
            return (f"Conv2d with padding={module.padding!r} that pads asymmetrically "
                    "(unfold pads both sides equally)")
    return None


def is_checkpoint_recompute() -> bool:
    """Whether this forward is non-reentrant activation checkpointing re-running itself.

    That recomputation runs inside the backward (a graph task is active) under the
    checkpoint's saved-tensor hooks; its outputs receive no gradient, and its input was
    already captured by the original forward, so capturing it again would count it
    twice. Reentrant checkpointing is the opposite case: its original forward runs under
    no_grad (not captured) and its recomputation, without saved-tensor hooks, is the
    pass whose outputs the gradients reach, so it is captured.
    """
    if torch._C._current_graph_task_id() == -1:
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def is_layer(module: nn.Module) -> bool:
    """Whether K-FAC knows this module kind (supported or not)."""
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding))


def _string_padding(module: nn.Conv2d) -> Optional[tuple[int, int]]:
    """Explicit symmetric padding for padding='valid'/'same' (None when asymmetric)."""
    if module.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(_pair(module.kernel_size), _pair(module.dilation)):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return (pads[0], pads[1])


class KFACLayer:
    """One registered module: sizes, K-FAC state and this step's captures.

    State (all on the module's device, `factor_dtype`; None until first needed):
        a_factor: (a_dim, a_dim), A of DESIGN.md, ones-column last when the layer has a bias.
        g_factor: (g_dim, g_dim), G of DESIGN.md.
        a_count, g_count: k of the running average (number of updates so far).
        qa, da, qg, dg: eigendecompositions (methods "eigen" and "ekfac").
        a_inv, g_inv: damped inverses (method "inverse").
        scales, scale_count: EKFAC scales (g_dim, a_dim) and their k, restarted per basis.
    Captures of the current step (cleared by `clear_captures`):
        inputs: layer inputs (detached), held until the factor update.
        grads: output gradients in row layout (..., g_dim).
        edges: gradient edges of the outputs (for the MC Fisher's extra backward).
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None
        # Conv1d runs as a Conv2d of unit height (layer_kinds); conv1d remembers the reshape
        self.conv1d = isinstance(module, nn.Conv1d)
        if self.conv1d:
            self.kind = "conv2d"
            geometry = conv1d_geometry(module)
            self.kernel_size, self.stride = geometry["kernel_size"], geometry["stride"]
            self.dilation, self.padding = geometry["dilation"], geometry["padding"]
        elif isinstance(module, nn.Embedding):
            # A is diagonal, stored as a (V,) vector of row frequencies (layer_kinds)
            self.kind = "embedding"
        elif isinstance(module, nn.Conv2d):
            self.kind = "conv2d"
            self.kernel_size = _pair(module.kernel_size)
            self.stride = _pair(module.stride)
            self.dilation = _pair(module.dilation)
            self.padding = (_string_padding(module) if isinstance(module.padding, str)
                            else _pair(module.padding))
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
        else:
            raise TypeError(f"KFACLayer: module {name!r} must be nn.Linear, nn.Conv1d, nn.Conv2d "
                            f"or nn.Embedding, "
                            f"got {type(module).__name__}")

        self.a_factor: Optional[torch.Tensor] = None
        self.g_factor: Optional[torch.Tensor] = None
        self.a_count = 0
        self.g_count = 0
        self.qa = self.da = self.qg = self.dg = None
        self.a_inv = self.g_inv = None
        self.scales: Optional[torch.Tensor] = None
        self.scale_count = 0

        self.inputs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.edges: list = []
        # held captures' real-row counts under a row mask (0-dim device tensors), None
        # for unmasked captures; parallel to inputs / grads
        self.input_rows: list = []
        self.grad_tokens: list = []
        self.fired_forward = False
        self.fired_backward = False
        self._handles: list = []

    # sizes are read from the module each time: lazy modules learn theirs at the first forward
    @property
    def in_dim(self) -> int:
        m = self.module
        if self.kind == "conv2d":
            return m.in_channels * self.kernel_size[0] * self.kernel_size[1]
        if self.kind == "embedding":
            return m.num_embeddings
        return m.in_features

    @property
    def g_dim(self) -> int:
        if self.kind == "embedding":
            return self.module.embedding_dim
        return self.module.out_channels if self.kind == "conv2d" else self.module.out_features

    @property
    def a_dim(self) -> int:
        return self.in_dim + int(self.has_bias)

    def __repr__(self) -> str:
        return (f"KFACLayer({self.name!r}, {self.kind}, a_dim={self.a_dim}, "
                f"g_dim={self.g_dim}, bias={self.has_bias})")

    # ---- hooks -------------------------------------------------------------------
    def install(self, sink: CaptureSink) -> None:
        """Register the forward hook that reports to `sink`."""
        def hook(module, inputs, output):
            # eval passes and no_grad passes never reach a backward: capturing them
            # would pair their inputs with another pass's gradients
            if not (module.training and torch.is_grad_enabled()):
                return
            if is_checkpoint_recompute():
                return
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            self.fired_forward = True
            sink.on_forward(self, inputs[0].detach(), output)

        self._handles.append(self.module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove the hooks (the layer stops capturing)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear_captures(self) -> None:
        self.inputs.clear()
        self.grads.clear()
        self.edges.clear()
        self.input_rows.clear()
        self.grad_tokens.clear()
        self.fired_forward = False
        self.fired_backward = False

    # ---- row layout (host metadata only: shapes, never values) -----------------------
    def batched_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input with a batch dim (unbatched Conv2d (C,H,W) / Linear (d,) inputs);
        Conv1d inputs (N, C, L) as (N, C, 1, L)."""
        if self.conv1d:
            return (x.unsqueeze(0) if x.dim() == 2 else x).unsqueeze(2)
        if self.kind == "conv2d" and x.dim() == 3:
            return x.unsqueeze(0)
        if self.kind == "linear" and x.dim() == 1:
            return x.unsqueeze(0)
        return x

    def grad_rows(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradient as (..., g_dim) rows, batch first (a view)."""
        if self.kind == "conv2d":
            if g.dim() == (2 if self.conv1d else 3):
                g = g.unsqueeze(0)
            return g.movedim(1, -1)
        return g.unsqueeze(0) if g.dim() == 1 else g

    def input_row_count(self, x: torch.Tensor) -> int:
        """R, the number of A rows the (batched) input contributes."""
        if self.kind == "conv2d":
            n, _, h, w = x.shape
            return n * self._out_size(h, 0) * self._out_size(w, 1)
        if self.kind == "embedding":
            return x.numel()  # one row per looked-up index
        return x.numel() // self.in_dim if self.in_dim else 0

    def _out_size(self, size: int, i: int) -> int:
        k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    @staticmethod
    def row_count(rows: torch.Tensor) -> int:
        """Rows of a (..., d) tensor."""
        return rows.numel() // rows.shape[-1] if rows.shape[-1] else 0

    @staticmethod
    def batch_size(rows: torch.Tensor) -> int:
        return rows.shape[0]

    # ---- per-example views for EKFAC ------------------------------------------------
    def example_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The input as (N, L, in_dim) per-example rows (conv: unfold patches, a copy)."""
        if self.kind == "conv2d":
            patches = F.unfold(x, self.kernel_size, dilation=self.dilation,
                               padding=self.padding, stride=self.stride)
            return patches.transpose(1, 2)
        return x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])

    @staticmethod
    def example_grads(rows: torch.Tensor) -> torch.Tensor:
        """Output-gradient rows (N, ..., g_dim) as (N, L, g_dim) or (N, g_dim)."""
        return rows if rows.dim() <= 3 else rows.reshape(rows.shape[0], -1, rows.shape[-1])

    # ---- accounting -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every persistent tensor of the layer's state, by name (None entries dropped)."""
        names = ("a_factor", "g_factor", "qa", "da", "qg", "dg", "a_inv", "g_inv", "scales")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def memory_usage(self) -> dict[str, int]:
        """Bytes held: persistent state by name, plus the current step's captures."""
        out = {n: t.numel() * t.element_size() for n, t in self.state_tensors().items()}
        out["captures"] = sum(t.numel() * t.element_size() for t in self.inputs + self.grads)
        return out
