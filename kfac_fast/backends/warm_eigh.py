"""Warm-started eigenbasis refresh: reuse the previous eigenvectors while they still fit.

Between two inverse refreshes a K-FAC factor moves little (a running average with decay
0.95), so the previous eigenbasis Q nearly diagonalises the new factor A. `warm_eigh`
measures how nearly, and pays for a full eigendecomposition only when it must:

1. B = Q^T A Q (two GEMMs, batched over same-size factors) and the off-diagonal ratio
   r = ||offdiag(B)||_F / ||A||_F, plus the orthogonality defect ||Q^T Q - I||_F from
   the same GEMM (Q^T [A Q | Q]). One host read of r per refresh decides the path.
2. KEPT (0): r <= tol. Eigenvalues are diag(B), sorted ascending with Q's columns.
3. REFINED (1): tol < r <= max_refine_ratio. Rotate B towards diagonal, re-measure:
   - n <= jacobi_max_n: sweeps of parallel (round-robin) Jacobi. Each round applies
     n/2 disjoint plane rotations, each annihilating its pair (p, q), so every round
     lowers ||offdiag(B)||_F^2 by exactly 2 * sum b_pq^2: r decreases monotonically,
     and quadratically once B is nearly diagonal (cyclic Jacobi's asymptotic rate).
   - larger n: a simultaneous rotation step. With B = D + E, every pair (i, j) gets its
     2x2 Jacobi angle theta_ij (|theta| <= pi/4; ~ E_ij / (d_j - d_i) when the pair is
     well separated), X = antisymmetric(theta), V = (I - X/2)^-1 (I + X/2) (Cayley,
     orthogonal, = exp(X) to second order), Q <- Q V, B <- V^T B V. To first order
     [D, X] = -E, so the new off-diagonal is O(||E||^2 / gap): quadratic convergence
     while ||E|| is small against the eigenvalue gaps. Near-degenerate, strongly coupled
     pairs (|E_ij| > |d_i - d_j| / 4) are left alone: there the step need not reduce r.
     Each step is re-measured, a step that does not halve r ends the refinement, and
     the orthogonality defect of Q V is bounded from the measured ||V^T V - I||.
   (Plain subspace iteration Q <- qr(A Q) is not used: over the full space it only
   converges at the rate |lambda_{k+1} / lambda_k|, hopeless for clustered spectra.)
4. FULL (2): no previous basis, a non-finite r, a defect above ortho_tol, r above
   max_refine_ratio (a factor that jumped), or a refinement that stalls or runs out of
   steps. All such factors go to one call of the injected `full_solve`.

The guarantee: for KEPT and REFINED factors the returned (d, Q) has r <= tol (measured,
in the factor's dtype) and ||Q^T Q - I||_F <= ortho_tol; FULL factors are whatever
`full_solve` returns (an exact solve meets any tol above the dtype's rounding floor,
about n * eps * ||A||_F in B's off-diagonal: tol below ~1e-5 in float32 means FULL).

What tol buys (the bound the tests check). Let B = Q^T A Q = diag(d) + E with
||E||_F = r ||A||_F and Q orthonormal, and A~ = Q diag(d) Q^T. Then A - A~ = Q E Q^T,
so (d, Q) is the exact eigendecomposition of a factor with ||A - A~||_F = r ||A||_F.
Clamping eigenvalues at 0 is the projection onto the PSD cone (1-Lipschitz in the
Frobenius norm), so ||A+ - A~+||_F <= r ||A||_F. The eigen-method preconditioned
gradient is P = (K + lam I)^-1 vec(dW) with K = A+ (x) G+; with K~ = A~+ (x) G~+,
P~ - P = (K~ + lam I)^-1 (K - K~) P, hence
    ||P~ - P||_F / ||P||_F <= ||K - K~||_2 / lam
        <= (r_A ||A||_F ||G||_2 + r_G ||G||_F (||A||_2 + r_A ||A||_F)) / lam
        <= (r_A + r_G + r_A r_G) ||A||_F ||G||_F / lam.
(to first order in the orthogonality defect, which adds O(defect) terms). The bound is
pessimistic: errors in directions with large eigenvalues are damped by them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

KEPT, REFINED, FULL = 0, 1, 2
PATH_NAMES = ("kept", "refined", "full")

FullSolve = Callable[[list], tuple]


def default_ortho_tol(n: int, dtype: torch.dtype) -> float:
    """Largest ||Q^T Q - I||_F accepted for a kept or refined basis of size n.

    torch.linalg.eigh in float32 gives ~ sqrt(n) * eps * 5 (measured n = 256..1024); the
    margin lets a basis be refined many times before drift sends it to a full solve.
    """
    return 200.0 * math.sqrt(n) * torch.finfo(dtype).eps


def warm_eigh(
    matrices: Sequence[torch.Tensor],
    previous: Sequence[Optional[torch.Tensor]],
    tol: float,
    *,
    full_solve: FullSolve,
    clamp: bool = True,
    max_steps: int = 3,
    jacobi_max_n: int = 128,
    max_refine_ratio: float = 0.1,
    ortho_tol: Optional[float] = None,
) -> tuple[list, list, torch.Tensor]:
    """Eigendecompositions of `matrices`, warm-started from the bases in `previous`.

    matrices: symmetric (n_i, n_i) float32/float64 tensors on one device. previous: one
    (n_i, n_i) basis (same dtype and device) or None per matrix. tol: the off-diagonal
    ratio to meet. full_solve(list of matrices) -> (eigenvalues list, eigenvectors list),
    ascending, is called at most once, with the factors that need a full solve.
    max_steps: Jacobi sweeps (n <= jacobi_max_n) or rotation steps (larger n) per
    refinement. max_refine_ratio: r above it is not refined (the factor jumped).
    ortho_tol: accepted ||Q^T Q - I||_F (default `default_ortho_tol`).

    Returns (eigenvalues, eigenvectors, paths): eigenvalues ascending (clamped at 0 when
    `clamp`), and a CPU int64 tensor with KEPT (0), REFINED (1) or FULL (2) per matrix.
    """
    matrices = list(matrices)
    previous = list(previous)
    _validate(matrices, previous, tol, max_steps, max_refine_ratio, ortho_tol)
    count = len(matrices)
    evals: list = [None] * count
    evecs: list = [None] * count
    paths = torch.full((count,), FULL, dtype=torch.int64)

    buckets: dict = {}
    for i, (a, q) in enumerate(zip(matrices, previous)):
        if q is not None:
            buckets.setdefault((a.shape[0], a.dtype, a.device), []).append(i)

    for (n, dtype, _), idx in buckets.items():
        otol = default_ortho_tol(n, dtype) if ortho_tol is None else ortho_tol
        a = torch.stack([matrices[i] for i in idx])
        q = torch.stack([previous[i] for i in idx])
        b, a_norm, r, defect = _rotate(a, q)
        r_host, defect_host = torch.stack((r, defect)).tolist()  # the one decision sync

        keep = [k for k in range(len(idx)) if r_host[k] <= tol and defect_host[k] <= otol]
        refine = [
            k for k in range(len(idx))
            if tol < r_host[k] <= max_refine_ratio and defect_host[k] <= otol
        ]
        for k in keep:
            evals[idx[k]], evecs[idx[k]] = b[k].diagonal(), q[k]
            paths[idx[k]] = KEPT
        if refine and max_steps > 0:
            sel = torch.tensor(refine, device=a.device)
            refiner = _refine_jacobi if n <= jacobi_max_n else _refine_rotation
            done = refiner(
                b.index_select(0, sel), q.index_select(0, sel), a_norm.index_select(0, sel),
                [defect_host[k] for k in refine], tol, otol, max_steps,
            )
            for k, result in zip(refine, done):
                if result is not None:
                    evals[idx[k]], evecs[idx[k]] = result
                    paths[idx[k]] = REFINED

    for i in range(count):
        if evals[i] is not None:
            evals[i], evecs[i] = _ascending(evals[i], evecs[i])

    todo = [i for i in range(count) if paths[i] == FULL]
    if todo:
        d_full, q_full = full_solve([matrices[i] for i in todo])
        for i, d, v in zip(todo, d_full, q_full):
            evals[i], evecs[i] = d, v

    if clamp:  # one fused launch for all matrices on CUDA
        evals = list(torch._foreach_clamp_min(evals, 0.0)) if evals else evals
    return evals, evecs, paths


def offdiag_ratio(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """r = ||offdiag(Q^T A Q)||_F / ||A||_F for (..., n, n) A and Q (0 when A is 0)."""
    return _rotate(matrix, basis)[2]


def _rotate(a, q):
    """B = Q^T A Q, ||A||_F, r and ||Q^T Q - I||_F, batched; Q^T Q rides in B's GEMM."""
    n = a.shape[-1]
    both = q.mT @ torch.cat((a @ q, q), dim=-1)
    b, gram = both[..., :n], both[..., n:]
    b = 0.5 * (b + b.mT)  # rounding makes B slightly asymmetric; the rotations assume symmetry
    a_norm = torch.linalg.matrix_norm(a)
    r = _offdiag_norm(b) / a_norm.clamp_min(torch.finfo(a.dtype).tiny)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    defect = torch.linalg.matrix_norm(gram - eye)
    return b, a_norm, r, defect


def _offdiag_norm(b):
    # ||B||^2 - ||diag B||^2 cancels catastrophically when B is nearly diagonal
    return torch.linalg.matrix_norm(b - torch.diag_embed(b.diagonal(dim1=-2, dim2=-1)))


def _ascending(d, q):
    d, order = torch.sort(d)
    return d, q.index_select(-1, order)


def _pair_tangent(app, aqq, apq):
    """tan of the Jacobi angle that zeroes apq in [[app, apq], [apq, aqq]] (|t| <= 1).

    Written without dividing by apq so that apq = 0 gives t = 0, and tied diagonals
    (aqq == app) rotate by 45 degrees.
    """
    diff = aqq - app
    sign = torch.where(diff >= 0, 1.0, -1.0).to(diff.dtype)
    denom = diff.abs() + torch.hypot(diff, 2 * apq)
    return torch.where(denom > 0, 2 * apq * sign / denom.clamp_min(torch.finfo(diff.dtype).tiny),
                       torch.zeros_like(diff))


def _rows(keep: list, *batches: torch.Tensor) -> list:
    """The batch entries `keep` of each tensor (the factors still being refined)."""
    sel = torch.tensor(keep, device=batches[0].device)
    return [m.index_select(0, sel) for m in batches]


# ---- refinement for small n: parallel Jacobi -------------------------------------------

_SCHEDULES: dict = {}


def _round_robin(n_even: int, device) -> list:
    """Per round, a frame (permutation) putting each of its n/2 disjoint pairs side by side.

    Tournament order: player 0 stays, the others rotate; over n-1 rounds every pair meets
    once (one cyclic Jacobi sweep). Returned as relative gathers: frame k -> frame k+1,
    and the last -> identity, so B stays in the current frame between rounds.
    """
    key = (n_even, str(device))
    if key not in _SCHEDULES:
        others = list(range(1, n_even))
        frames = []
        for rnd in range(n_even - 1):
            players = [0] + others[rnd:] + others[:rnd]
            frame = []
            for k in range(n_even // 2):
                frame += [players[k], players[n_even - 1 - k]]
            frames.append(frame)
        frames.append(list(range(n_even)))
        steps = [torch.tensor(frames[0], device=device)]
        for prev, nxt in zip(frames[:-1], frames[1:]):
            where = {v: i for i, v in enumerate(prev)}
            steps.append(torch.tensor([where[v] for v in nxt], device=device))
        _SCHEDULES[key] = steps
    return _SCHEDULES[key]


def _jacobi_sweep(b, v):
    """One parallel cyclic Jacobi sweep on (batch, n, n) B (n even), V accumulating."""
    batch, n, _ = b.shape
    steps = _round_robin(n, b.device)
    for gather in steps[:-1]:
        b = b.index_select(1, gather).index_select(2, gather)
        v = v.index_select(2, gather)
        pairs = b.diagonal(dim1=1, dim2=2).reshape(batch, n // 2, 2)
        apq = b.diagonal(offset=1, dim1=1, dim2=2)[:, 0::2]
        t = _pair_tangent(pairs[..., 0], pairs[..., 1], apq)
        c = torch.rsqrt(1 + t * t)
        s = t * c
        # rows: B <- J^T B, J = [[c, s], [-s, c]] on each adjacent pair
        rows = b.reshape(batch, n // 2, 2, n)
        cr, sr = c[..., None], s[..., None]
        b = torch.stack((cr * rows[:, :, 0] - sr * rows[:, :, 1],
                         sr * rows[:, :, 0] + cr * rows[:, :, 1]), dim=2).reshape(batch, n, n)
        # columns: B <- B J and V <- V J
        cc, sc = c[:, None, :], s[:, None, :]
        b, v = (
            torch.stack((cc * m[..., 0] - sc * m[..., 1], sc * m[..., 0] + cc * m[..., 1]),
                        dim=-1).reshape(batch, -1, n)
            for m in (b.reshape(batch, n, n // 2, 2), v.reshape(batch, v.shape[1], n // 2, 2))
        )
    back = steps[-1]
    return b.index_select(1, back).index_select(2, back), v.index_select(2, back)


def _refine_jacobi(b, q, a_norm, defects, tol, otol, max_steps):
    """Jacobi sweeps until r <= tol; per factor (eigenvalues, Q) or None (needs FULL)."""
    batch, n, _ = b.shape
    odd = n % 2
    if odd:  # a zero row/column: its rotations have apq = 0, so they are the identity
        b = torch.nn.functional.pad(b, (0, 1, 0, 1))
    v = torch.eye(n + odd, dtype=b.dtype, device=b.device).expand(batch, -1, -1).clone()
    results: list = [None] * batch
    active = list(range(batch))
    for _ in range(max_steps):
        b, v = _jacobi_sweep(b, v)
        r = (_offdiag_norm(b) / a_norm.clamp_min(torch.finfo(b.dtype).tiny)).tolist()
        left = []
        for k, orig in enumerate(active):
            if r[k] <= tol:
                q_new = q[k] @ v[k, :n, :n]
                results[orig] = (b[k, :n, :n].diagonal(), q_new)
            elif math.isfinite(r[k]):
                left.append(k)
        if not left:
            break
        b, v, q, a_norm = _rows(left, b, v, q, a_norm)
        active = [active[k] for k in left]
    # plane rotations are orthogonal to rounding: the defect stays that of the previous Q,
    # already checked against ortho_tol (defects, otol: the rotation refiner's signature)
    return results


# ---- refinement for large n: simultaneous rotation steps -------------------------------

def _rotation_step(b, floor):
    """Orthogonal V for one simultaneous Jacobi-angle rotation of (batch, n, n) B.

    Only pairs in the first-order regime rotate: |E_ij| <= _COUPLING * |d_i - d_j|. A
    strongly coupled pair (near-degenerate eigenvalues) would take an angle up to pi/4
    that interacts with its neighbours' and can make B worse; it is left alone and, if it
    carries more than tol, sends the factor to FULL. Entries below `floor` (batch,) are
    skipped too: together they stay below tol / 2.
    """
    d = b.diagonal(dim1=-2, dim2=-1)
    gap = d[..., None, :] - d[..., :, None]
    t = _pair_tangent(d[..., :, None], d[..., None, :], b)
    live = (b.abs() <= _COUPLING * gap.abs()) & (b.abs() > floor[:, None, None])
    theta = torch.where(live, torch.atan(t), torch.zeros_like(t)).triu(1)
    half = 0.5 * (theta - theta.mT)
    # Cayley transform V = (I - H)^-1 (I + H), H = X/2: orthogonal to rounding whatever
    # ||X|| and equal to exp(X) to second order, which keeps the step quadratic (||X||_F
    # grows like n * angle, so truncated series of exp(X) lose orthogonality). Written as
    # V = (I - H^2)^-1 (I + H)^2: I - H^2 = I + H^T H is SPD with eigenvalues >= 1, so a
    # Cholesky solve needs no pivoting (batched CPU LU in torch 2.13 + MKL failed here
    # with "Pivots given to lu_solve must all be >= 1" on finite inputs).
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    plus = eye + half
    spd = eye - half @ half
    return torch.cholesky_solve(plus @ plus, torch.linalg.cholesky(spd))


_COUPLING = 0.25


def _refine_rotation(b, q, a_norm, defects, tol, otol, max_steps):
    """Rotation steps until r <= tol; per factor (eigenvalues, Q) or None (needs FULL)."""
    batch = b.shape[0]
    results: list = [None] * batch
    active = list(range(batch))
    r_prev = _offdiag_norm(b) / a_norm.clamp_min(torch.finfo(b.dtype).tiny)
    r_prev = r_prev.tolist()
    defects = list(defects)
    floor = 0.5 * tol * a_norm / b.shape[-1]
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    for _ in range(max_steps):
        v = _rotation_step(b, floor)
        q = q @ v
        b = v.mT @ (b @ v)
        b = 0.5 * (b + b.mT)
        r_t = _offdiag_norm(b) / a_norm.clamp_min(torch.finfo(b.dtype).tiny)
        # ||(QV)^T QV - I|| <= ||V||_2^2 defect(Q) + ||V^T V - I||: V's rounding is measured
        v_defect = torch.linalg.matrix_norm(v.mT @ v - eye)
        r, v_defect = torch.stack((r_t, v_defect)).tolist()
        left = []
        for k, orig in enumerate(active):
            defects[k] = (1 + v_defect[k]) * defects[k] + v_defect[k]
            if not (math.isfinite(r[k]) and defects[k] <= otol):
                continue
            if r[k] <= tol:
                results[orig] = (b[k].diagonal(), q[k])
            elif r[k] <= 0.5 * r_prev[k]:  # still converging; a stalled step means FULL
                left.append(k)
        if not left:
            break
        b, q, a_norm, floor = _rows(left, b, q, a_norm, floor)
        active = [active[k] for k in left]
        r_prev = [r[k] for k in left]
        defects = [defects[k] for k in left]
    return results


# ---- argument checks -------------------------------------------------------------------

def _validate(matrices, previous, tol, max_steps, max_refine_ratio, ortho_tol):
    if len(previous) != len(matrices):
        raise ValueError(
            f"warm_eigh: previous must have one entry per matrix ({len(matrices)}), "
            f"got {len(previous)}")
    if isinstance(tol, torch.Tensor):
        tol = float(tol)  # a refresh step may read a scalar on the host
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"warm_eigh: tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"warm_eigh: max_steps must be an int >= 0, got {max_steps!r}")
    if not max_refine_ratio >= 0:
        raise ValueError(f"warm_eigh: max_refine_ratio must be >= 0, got {max_refine_ratio!r}")
    if ortho_tol is not None and not ortho_tol > 0:
        raise ValueError(f"warm_eigh: ortho_tol must be > 0, got {ortho_tol!r}")
    for i, (a, q) in enumerate(zip(matrices, previous)):
        if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] != a.shape[1]:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"warm_eigh: matrices[{i}] must be a square 2-D tensor, got {shape}")
        if a.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"warm_eigh: matrices[{i}] must be float32 or float64, got {a.dtype}")
        if q is None:
            continue
        if not isinstance(q, torch.Tensor) or q.shape != a.shape:
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise ValueError(
                f"warm_eigh: previous[{i}] must have the shape of matrices[{i}] "
                f"{tuple(a.shape)}, got {shape}")
        if q.dtype != a.dtype or q.device != a.device:
            raise TypeError(
                f"warm_eigh: previous[{i}] must match matrices[{i}] in dtype and device "
                f"({a.dtype}, {a.device}), got ({q.dtype}, {q.device})")
