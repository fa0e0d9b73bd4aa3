"""The base of every layer kind: a registered module's K-FAC state and captures.

A `KFACLayer` wraps one registered module: it holds its K-FAC state (factors, update
counts, decompositions, EKFAC scales) and the tensors its hooks captured during the
current step. It decides nothing about *when* to update: its forward hook hands the
input and output to a sink (the preconditioner), which chooses to hold them, update a
factor at once, or ignore them.

What differs between kinds (sizes, row layout, the A update, the shape of dW_bar and
its write-back, what cannot be registered) is a method or class attribute that a
subclass in this package overrides; the preconditioner asks the layer and never its
kind. The row layouts are docs/design.md's: A rows are the (bias-extended) inputs, G
rows the output gradients, both with the batch first.
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import nn

Tensor = torch.Tensor
METHODS = ("eigen", "inverse", "ekfac")


class CaptureSink(Protocol):
    """What a layer's forward hook reports to (the preconditioner)."""

    def on_forward(self, layer: KFACLayer, x: Tensor, output: Tensor) -> None: ...


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


class KFACLayer:
    """One registered module: sizes, K-FAC state and this step's captures.

    State (all on the module's device, `factor_dtype`; None until first needed):
        a_factor: A of docs/design.md, shaped `a_shape()`, ones-column last with a bias.
        g_factor: (g_dim, g_dim), G of docs/design.md.
        a_count, g_count: k of the running average (number of updates so far).
        qa, da, qg, dg: eigendecompositions (methods "eigen" and "ekfac").
        a_inv, g_inv: damped inverses (method "inverse").
        scales, scale_count: EKFAC scales (g_dim, a_dim) and their k, restarted per basis.
    Captures of the current step (cleared by `clear_captures`):
        inputs: layer inputs (detached), held until the factor update.
        grads: output gradients in row layout (..., g_dim).
        edges: gradient edges of the outputs (for the MC Fisher's extra backward).

    Class attributes a kind sets:
        kind: its name in reprs and in the data-parallel layer check (never branched on).
        diagonal_a: A is kept as its diagonal (a vector), its own eigendecomposition; such
            a layer is preconditioned by `precondition_eigen`, not the grouped ops.
        row_maskable: `set_row_mask` applies to it (its inputs are (N, T, d) token rows).
        methods: the preconditioner methods it supports.
        data_parallel: data-parallel K-FAC supports it.
        owns_block: its Fisher block is not A (x) G but its own (a norm's per-feature
            scale-and-shift blocks, kept in a_factor): built from each capture's paired
            input and output gradient (`block_grads`, `update_block_`), applied from the
            current block at every step (`precondition_alone`), never refreshed.
        opt_in: registered only when the preconditioner is asked for it by `kind`
            (`registry.check_extra_kinds`); its parameters are otherwise not K-FAC's.
    """

    kind: ClassVar[str] = "layer"
    diagonal_a: ClassVar[bool] = False
    row_maskable: ClassVar[bool] = False
    methods: ClassVar[tuple[str, ...]] = METHODS
    data_parallel: ClassVar[bool] = True
    owns_block: ClassVar[bool] = False
    opt_in: ClassVar[bool] = False
    # the names of the persistent state tensors above (every kind has the same), in the order
    # `state_tensors()` and the preconditioner's state_dict list them
    STATE_TENSORS: ClassVar[tuple[str, ...]] = ("a_factor", "g_factor", "qa", "da", "qg", "dg",
                                                "a_inv", "g_inv", "scales")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module: Any = module
        self.has_bias = getattr(module, "bias", None) is not None

        # each a Tensor, or None until first needed (Any: the jobs that read them only
        # see layers that have them, and need no narrowing)
        self.a_factor: Any = None
        self.g_factor: Any = None
        self.a_count = 0
        self.g_count = 0
        self.qa: Any = None
        self.da: Any = None
        self.qg: Any = None
        self.dg: Any = None
        self.a_inv: Any = None
        self.g_inv: Any = None
        self.scales: Any = None
        self.scale_count = 0
        # hooks mode: the step whose first capture applied beta_k, and that step's
        # (beta_k, 1 - beta_k) of A, G and the EKFAC scales
        self._a_step: Optional[int] = None
        self._g_step: Optional[int] = None
        self._a_beta = self._a_w = self._g_beta = self._g_w = self._s_beta = self._s_w = 0.0

        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.edges: list = []
        # held captures' real-row counts under a row mask (0-dim device tensors), None
        # for unmasked captures; parallel to inputs / grads
        self.input_rows: list = []
        self.grad_tokens: list = []
        # held inputs whose output gradient arrived (parallel to inputs); bumped by
        # clear_captures so a late backward cannot pair with the next step's inputs
        self.input_paired: list[bool] = []
        self.generation = 0
        self.fired_forward = False
        self.fired_backward = False
        # a grad-enabled forward in eval mode since the last step (not captured)
        self.eval_forward = False
        self._handles: list = []
        self._warned: set = set()

    # ---- what a kind defines ------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, module: nn.Module, method: str) -> Optional[str]:
        """Why `module` cannot be registered under `method` (None when it can)."""
        if method not in cls.methods:
            return (f"{type(module).__name__} with method={method!r} "
                    f"({cls.kind}s support {' or '.join(repr(m) for m in cls.methods)} only)")
        return None

    # sizes are read from the module each time: lazy modules learn theirs at the first forward
    @property
    def in_dim(self) -> int:
        """Columns of dW (the A side without the bias)."""
        raise NotImplementedError

    @property
    def g_dim(self) -> int:
        """Rows of dW (the G side)."""
        raise NotImplementedError

    @property
    def a_dim(self) -> int:
        return self.in_dim + int(self.has_bias)

    def a_shape(self) -> tuple[int, ...]:
        """Shape of the stored A (a square matrix unless `diagonal_a`)."""
        return (self.a_dim, self.a_dim)

    def batched_input(self, x: Tensor) -> Tensor:
        """The captured input in the layout the A update reads (a batch dim added)."""
        return x

    def grad_rows(self, g: Tensor) -> Tensor:
        """Output gradient as (..., g_dim) rows, batch first (a view)."""
        return g.unsqueeze(0) if g.dim() == 1 else g

    def input_row_count(self, x: Tensor) -> int:
        """R, the number of A rows the (batched) input contributes."""
        raise NotImplementedError

    def example_inputs(self, x: Tensor) -> Tensor:
        """The input as (N, L, in_dim) per-example rows (EKFAC)."""
        return x if x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])

    def a_group_entry(self, x: Tensor, masked: bool) -> Optional[tuple[Tensor, Tensor, bool]]:
        """(factor, rows, append_ones) when this A update joins the grouped
        `ops.update_factors_` call; None when the layer updates A alone (`update_a_`)."""
        return None

    def update_a_(self, x: Tensor, beta: Any, alpha: Any, *, masked: bool = False) -> None:
        """A <- beta A + alpha (this capture's statistics); `masked`: x already holds its
        ones-column (a row-masked x_bar)."""
        raise NotImplementedError

    def diagonal_eigenvalues(self) -> Tensor:
        """A's eigenvalues of a `diagonal_a` layer (its eigenbasis is the identity)."""
        raise NotImplementedError(f"{type(self).__name__} keeps a dense A")

    def precondition_eigen(self, grad: Tensor, damping: Any) -> Tensor:
        """P of a `diagonal_a` layer from its own eigendecomposition (out of place)."""
        raise NotImplementedError(f"{type(self).__name__} is preconditioned by the grouped ops")

    @property
    def grouped(self) -> bool:
        """Whether the grouped ops precondition it (not a diagonal A, not its own block)."""
        return not (self.diagonal_a or self.owns_block)

    @property
    def appends_ones(self) -> bool:
        """Whether a row-masked input gets the ones-column of the bias (the A rows' own)."""
        return self.has_bias

    def precondition_alone(self, grad: Tensor, damping: Any) -> Tensor:
        """P of a layer the grouped ops do not serve (out of place, `grad_bar`'s layout)."""
        return self.precondition_eigen(grad, damping)

    def block_grads(self, x: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
        """An `owns_block` layer's per-example parameter gradients from one capture's
        batched input and output-gradient rows, unscaled (times S: the v of its block)."""
        raise NotImplementedError(f"{type(self).__name__} keeps A (x) G")

    def update_block_(self, v: Tensor, beta: Any, alpha: Any) -> None:
        """An `owns_block` layer's block <- beta block + alpha (statistics of v)."""
        raise NotImplementedError(f"{type(self).__name__} keeps A (x) G")

    # ---- gradients -----------------------------------------------------------------------
    def has_grads(self) -> bool:
        """Whether every parameter K-FAC rewrites has a gradient (frozen ones do not)."""
        return self.module.weight.grad is not None and (not self.has_bias or self.module.bias.grad is not None)

    def param_grads(self) -> list[Optional[Tensor]]:
        """weight.grad, then bias.grad when the layer has a bias."""
        out = [self.module.weight.grad]
        if self.has_bias:
            out.append(self.module.bias.grad)
        return out

    def grad_bar(self) -> Tensor:
        """dW_bar = [dW | db] as a (g_dim, a_dim) matrix (a copy when there is a bias)."""
        w = self.module.weight.grad.reshape(self.g_dim, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.grad.reshape(-1, 1)], dim=1)

    def write_grad(self, p: Tensor, scale: Optional[Tensor] = None) -> None:
        """Write a (g_dim, a_dim) result (times `scale` when given) into weight.grad and
        bias.grad."""
        w = self.module.weight.grad
        p_w = p[:, :self.in_dim]
        w.copy_((p_w if scale is None else p_w * scale).reshape(w.shape))
        if self.has_bias:
            self.module.bias.grad.copy_(p[:, -1] if scale is None else p[:, -1] * scale)

    # ---- hooks ----------------------------------------------------------------------------
    def install(self, sink: CaptureSink) -> None:
        """Register the forward hook that reports to `sink`."""
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if module is not self.module:
                # copy.deepcopy(model) after registration copies this hook: the copy's
                # forwards must not feed this layer's factors
                self.warn_once("copy", f"K-FAC: module {self.name!r} is a copy of a registered layer "
                               "(copy.deepcopy after KFACPreconditioner?); its forwards are not captured")
                return
            if not torch.is_grad_enabled():
                return
            if not module.training:
                # an eval pass never reaches a backward, or trains without K-FAC: step() warns
                # when such a layer then has gradients (`eval_forward`)
                self.eval_forward = True
                return
            if is_checkpoint_recompute():
                return
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                self.warn_once("input", f"K-FAC: layer {self.name!r} was called without a tensor input "
                               f"(positional or input=), got {type(x).__name__}: not captured")
                return
            self.fired_forward = True
            sink.on_forward(self, x.detach(), output)

        self._handles.append(self.module.register_forward_hook(hook, with_kwargs=True))

    def warn_once(self, key: str, message: str) -> None:
        """warnings.warn `message` the first time `key` is seen for this layer."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def remove(self) -> None:
        """Remove the hooks (the layer stops capturing)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hold_input(self, x: Tensor, rows: Any, *, paired: bool) -> int:
        """Hold a captured input (and its real-row count) until step(); its slot."""
        self.inputs.append(x)
        self.input_rows.append(rows)
        self.input_paired.append(paired)
        return len(self.inputs) - 1

    def pair_input(self, slot: int) -> None:
        """The output gradient of the input held in `slot` arrived."""
        if 0 <= slot < len(self.input_paired):
            self.input_paired[slot] = True

    def drop_unpaired_inputs(self) -> None:
        """Forget held inputs whose forward never reached a backward (forward order kept)."""
        if all(self.input_paired):
            return
        keep = [i for i, paired in enumerate(self.input_paired) if paired]
        self.inputs[:] = [self.inputs[i] for i in keep]
        self.input_rows[:] = [self.input_rows[i] for i in keep]
        self.input_paired[:] = [True] * len(keep)

    def clear_captures(self) -> None:
        self.generation += 1
        self.input_paired.clear()
        self.inputs.clear()
        self.grads.clear()
        self.edges.clear()
        self.input_rows.clear()
        self.grad_tokens.clear()
        self.fired_forward = False
        self.fired_backward = False
        self.eval_forward = False

    # ---- row helpers shared by every kind (host metadata only) --------------------------
    @staticmethod
    def row_count(rows: Tensor) -> int:
        """Rows of a (..., d) tensor."""
        return rows.numel() // rows.shape[-1] if rows.shape[-1] else 0

    @staticmethod
    def batch_size(rows: Tensor) -> int:
        return rows.shape[0]

    @staticmethod
    def example_grads(rows: Tensor) -> Tensor:
        """Output-gradient rows (N, ..., g_dim) as (N, L, g_dim) or (N, g_dim)."""
        return rows if rows.dim() <= 3 else rows.reshape(rows.shape[0], -1, rows.shape[-1])

    # ---- accounting -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Every persistent tensor of the layer's state, by name (None entries dropped)."""
        return {n: getattr(self, n) for n in self.STATE_TENSORS if getattr(self, n) is not None}

    def memory_usage(self) -> dict[str, int]:
        """Bytes held: persistent state by name, plus the current step's captures."""
        out = {n: t.numel() * t.element_size() for n, t in self.state_tensors().items()}
        out["captures"] = sum(t.numel() * t.element_size() for t in self.inputs + self.grads)
        return out

    def __repr__(self) -> str:
        return (f"KFACLayer({self.name!r}, {self.kind}, a_dim={self.a_dim}, "
                f"g_dim={self.g_dim}, bias={self.has_bias})")
