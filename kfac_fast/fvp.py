"""Exact Fisher (GGN) quadratic forms of one mini-batch, never forming the matrix.

For a loss h(z(theta)) of the network outputs z, the generalised Gauss-Newton matrix is
F = J^T H J, J = dz/dtheta and H = d^2 h / dz^2. For the losses whose output Hessian
is the Fisher of their predictive distribution (cross-entropy on logits, binary
cross-entropy with logits, the Gaussian/MSE) F is exactly the Fisher of the batch.

`FisherProducts` applies F through Jacobian-vector products built on the graph the
user's forward already made, with the double-backward trick (no second forward, no
torch.func rewrite of the model):

    u(w) = J^T w       one backward with create_graph, w a dummy output cotangent;
    J v  = d(u . v)/dw one more backward, linear in v;
    H J v              the loss's own double backward w.r.t. z.

H comes from differentiating the user's loss twice, so its scale (mean, sum, per
example) is exactly that of the h the optimiser compares against in its reduction
ratio: no loss specification can disagree with it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import torch


class CurvatureProducts(Protocol):
    """What `kfac_fast.KFAC` needs from one batch's curvature: the interface the
    transformer work (issue 19) and the sharded optimizer (issue 20) both build on.

    Attributes:
        params: the parameters the outputs depend on, in order; every vector is a list
            with one tensor per entry.
        gradient: dh/dtheta for those parameters (detached).

    `gram(vectors)` returns the k x k float64 matrix [v_i^T F v_j] of the exact Fisher
    (GGN) F, on the outputs' device, with no host sync.

    Everything is this process's batch, in the loss's own scale. A distributed
    implementation wraps a local one (`kfac_fast.distributed.products.ReducedProducts`).
    Its `gradient` and `gram` are the sums over ranks of each rank's values weighted by
    n_rank / n_total, so that N ranks on N shards equal one process on the whole batch.
    The MC Fisher's samples then must not depend on the split: KFAC draws them per example,
    seeded by the global example index (`kfac_fast.fisher.ExampleSeed`). `FisherProducts`
    is the local implementation.
    """

    params: list[torch.Tensor]
    gradient: list[torch.Tensor]

    def gram(self, vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor: ...


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the forward whose graph the products differentiate twice.

    torch's fused attention kernels (flash, memory-efficient and cuDNN on CUDA, flash on
    the CPU) have no derivative of their backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"),
    which the double-backward trick takes. Inside this block,
    `F.scaled_dot_product_attention` (and `nn.MultiheadAttention`, which calls it) uses
    its math kernel instead. That kernel is made of differentiable ops, so the user's
    model needs no change, and there is no second forward.

    The cost is the math kernel's speed and its (B, H, T, T) attention matrix in the
    forward. Only the graph-bearing forward pays it: the closure's no-grad
    re-evaluations keep the fused kernels.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i <x_i, y_i> as a 0-dim float64 tensor (no host sync)."""
    if len(xs) != len(ys):
        raise ValueError(f"dot: xs and ys must have equal lengths, got {len(xs)} and {len(ys)}")
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    parts = [torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]
    return torch.stack([p.to(torch.float64) for p in parts]).sum()


class FisherProducts:
    """Quadratic forms v^T F w of the exact Fisher (GGN) of one batch.

    Args:
        loss: the scalar loss h, computed from `outputs` (its graph is kept).
        outputs: the network outputs z that the loss consumes.
        params: the parameters theta (the vectors below are lists shaped like them).

    The graph of `outputs` must still exist (the forward's graph, kept with
    retain_graph=True by any earlier backward). Everything returned is detached.

    Attributes:
        params: the given parameters that the outputs depend on, in order; vectors are
            lists with one tensor per entry of this list (the others have a zero Jacobian).
        gradient: dh/dtheta = J^T dh/dz for those parameters, a by-product of building
            the products. It is the loss's full gradient when the loss depends on the
            parameters only through the outputs.
    """

    def __init__(self, loss: torch.Tensor, outputs: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss must be a 0-dim tensor (the scalar mini-batch loss)")
        if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
            raise ValueError("outputs must be the model's output tensor with its graph (requires_grad)")
        self.params = list(params)
        if not self.params:
            raise ValueError("params must not be empty")
        self.outputs = outputs
        with torch.enable_grad():  # the optimiser's step runs under no_grad
            self._build(loss)

    def _build(self, loss: torch.Tensor) -> None:
        outputs = self.outputs
        # dh/dz with its own graph: differentiating it again gives H v
        (self._grad_z,) = torch.autograd.grad(loss, outputs, create_graph=True, retain_graph=True)
        # The cotangent w of the double-backward trick. J^T w is linear in w, so J v does
        # not depend on w's value; taking w = dh/dz makes J^T w the gradient of h as
        # well, and this one backward replaces the training step's own.
        self._w = self._grad_z.detach().requires_grad_(True)
        jt_w = torch.autograd.grad(outputs, self.params, self._w, create_graph=True,
                                   retain_graph=True, allow_unused=True)
        # parameters the outputs do not depend on have a zero Jacobian: drop them
        self.params = [p for p, u in zip(self.params, jt_w) if u is not None]
        self._jt_w = [u for u in jt_w if u is not None]
        self.gradient = [u.detach() for u in self._jt_w]

    def jvp(self, vector: Sequence[torch.Tensor]) -> torch.Tensor:
        """J v, shaped like the outputs."""
        if len(vector) != len(self.params):
            raise ValueError(f"vector must have one tensor per parameter ({len(self.params)}), "
                             f"got {len(vector)}")
        if not self.params:
            return torch.zeros_like(self.outputs).detach()
        (jv,) = torch.autograd.grad(self._jt_w, self._w, list(vector), retain_graph=True)
        return jv.detach()

    def hvp_outputs(self, jv: torch.Tensor) -> torch.Tensor:
        """H (J v): the loss's Hessian w.r.t. the outputs times an output-shaped tensor."""
        if not self._grad_z.requires_grad:  # a loss linear in the outputs: H = 0
            return torch.zeros_like(jv)
        (hv,) = torch.autograd.grad(self._grad_z, self.outputs, jv, retain_graph=True)
        return hv.detach()

    def gram(self, vectors: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """The k x k float64 matrix [v_i^T F v_j] for k vectors (k JVPs, k output HVPs)."""
        jvs = [self.jvp(v) for v in vectors]
        hjvs = [self.hvp_outputs(jv) for jv in jvs]
        k = len(vectors)
        out = torch.empty(k, k, dtype=torch.float64, device=self.outputs.device)
        for i in range(k):
            for j in range(i, k):
                # symmetrise: F is symmetric, rounding of the two orders is not
                v = 0.5 * (dot([jvs[i]], [hjvs[j]]) + dot([jvs[j]], [hjvs[i]]))
                out[i, j] = v
                out[j, i] = v
        return out
