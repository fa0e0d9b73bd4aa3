// Two-sided cyclic Jacobi eigensolver core, shared by the CUDA kernel and the CPU build.
//
// One "team" diagonalises one symmetric matrix: on the GPU a thread block (the matrix in
// shared memory), on the host a single thread running the very same code, so CI tests the
// algorithm without a GPU. A team member handles work items w = rank, rank + size, ...;
// `sync()` is a barrier and `sum()` a deterministic all-reduce.
//
// Algorithm (Golub & Van Loan, Matrix Computations, 4th ed., 8.5): a sweep is m-1 steps of
// the round-robin ("circle method") tournament over m = n rounded up to even indices; each
// step pairs every index exactly once, so its m/2 rotations are disjoint and are applied
// together: A <- J^T A J as (m/2)^2 independent 2x2 blocks, V^T <- J^T V^T as m/2 row pairs.
// For odd n the extra "ghost" index m-1 holds a zero row/column and its rotation is the
// identity. Sweeps repeat until off(A) <= tol * ||A||_F (Frobenius norms).
//
// Precision: the matrix, the rotation parameters and the accumulated eigenvectors are
// fp64 whatever the input dtype; fp32 inputs are converted on load, outputs rounded once.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define KF_HD __host__ __device__ __forceinline__
#else
#define KF_HD inline
#endif

namespace kfac_fast {
namespace jacobi {

// Largest n the solver accepts; the matrix (fp64, padded) must fit in shared memory on
// sm_80 (164 KiB opt-in): 128x129x8 B = 129 KiB.
constexpr int kMaxN = 128;
// Sweeps before giving up (the caller retries unconverged matrices with a dense solver).
// Cyclic Jacobi converges quadratically; 6-12 sweeps are typical for n <= 128.
constexpr int kMaxSweeps = 40;

KF_HD int padded_size(int n) { return n + (n & 1); }
// Odd leading dimension (in doubles) so a column walk hits distinct shared-memory banks.
KF_HD int leading_dim(int m) { return m | 1; }

// The rotation (c, s) with J = [[c, s], [-s, c]] on indices (p, q) such that J^T A J has a
// zero (p, q) entry; t = tan(theta) is the smaller root (|theta| <= pi/4), which keeps
// the iteration convergent (Golub & Van Loan, Algorithm 8.5.1, sym.schur2).
KF_HD void rotation(double app, double aqq, double apq, double* c, double* s) {
  if (apq == 0.0) {
    *c = 1.0;
    *s = 0.0;
    return;
  }
  const double tau = (aqq - app) / (2.0 * apq);
  const double at = std::fabs(tau);
  // For huge |tau| 1 + tau^2 overflows; then t ~ 1/(2|tau|) to full precision.
  double t = at > 1e150 ? 0.5 / at : 1.0 / (at + std::sqrt(1.0 + tau * tau));
  if (tau < 0.0) t = -t;
  const double cc = 1.0 / std::sqrt(1.0 + t * t);
  *c = cc;
  *s = t * cc;
}

// Pair k (0 <= k < m/2) of round r (0 <= r < m-1) of the circle-method tournament on m
// (even) players: player m-1 stays put, the others rotate. Over m-1 rounds every pair
// meets exactly once. Returns p < q.
KF_HD void round_robin_pair(int m, int r, int k, int* p, int* q) {
  const int ring = m - 1;
  int a, b;
  if (k == 0) {
    a = r;
    b = m - 1;
  } else {
    a = (r + k) % ring;
    b = (r - k + ring) % ring;
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

struct Result {
  int converged;  // 1 when off(A) <= tol * ||A||_F was reached
  int sweeps;     // sweeps performed
  int nonfinite;  // 1 when the matrix holds a NaN or an infinity (never converged)
};

// Status the kernel writes in info[2b]: converged, not converged, or a non-finite input
// (the caller then raises the documented ValueError through its float64 retry).
constexpr int kStatusConverged = 1;
constexpr int kStatusUnconverged = 0;
constexpr int kStatusNonFinite = -1;
KF_HD int status_of(const Result& r) {
  return r.nonfinite ? kStatusNonFinite : (r.converged ? kStatusConverged : kStatusUnconverged);
}

// Workspace the solver reads and writes (all owned by the caller; on the GPU the first
// four live in shared memory, vt may be shared or global).
struct Work {
  double* a;   // m x lda, the symmetric matrix, diagonalised in place
  double* vt;  // m x ldv, V^T: row i is the eigenvector of a[i][i]
  double* c;   // m/2 rotation cosines of the current step
  double* s;   // m/2 rotation sines
  int* pair;   // m: p of pair k at [2k], q at [2k+1]; reused as the sort permutation
  int lda, ldv;
};

// Sum of squares of the off-diagonal (first) and of all entries (second) of a (m x m).
template <class Team>
KF_HD void norms(Team& team, const Work& w, int m, double* off2, double* all2) {
  double off = 0.0, all = 0.0;
  for (int e = team.rank; e < m * m; e += team.size) {
    const int i = e / m, j = e % m;
    const double x = w.a[i * w.lda + j];
    all += x * x;
    if (i != j) off += x * x;
  }
  *off2 = team.sum(off);
  *all2 = team.sum(all);
}

// One step: compute the m/2 disjoint rotations of round r, then apply them to A and V^T.
template <class Team>
KF_HD void step(Team& team, const Work& w, int m, int r) {
  const int half = m / 2;
  for (int k = team.rank; k < half; k += team.size) {
    int p, q;
    round_robin_pair(m, r, k, &p, &q);
    rotation(w.a[p * w.lda + p], w.a[q * w.lda + q], w.a[p * w.lda + q], &w.c[k], &w.s[k]);
    w.pair[2 * k] = p;
    w.pair[2 * k + 1] = q;
  }
  team.sync();
  // A <- J^T A J, one 2x2 block (rows of pair kr, columns of pair kc) per item. The blocks
  // partition A, so items never touch the same entry: no barrier between them.
  for (int e = team.rank; e < half * half; e += team.size) {
    const int kr = e / half, kc = e % half;
    const int p = w.pair[2 * kr], q = w.pair[2 * kr + 1];
    const int u = w.pair[2 * kc], v = w.pair[2 * kc + 1];
    const double cr = w.c[kr], sr = w.s[kr], cc = w.c[kc], sc = w.s[kc];
    double* ap = w.a + p * w.lda;
    double* aq = w.a + q * w.lda;
    // rows: J^T mixes rows p, q
    const double pu = cr * ap[u] - sr * aq[u], pv = cr * ap[v] - sr * aq[v];
    const double qu = sr * ap[u] + cr * aq[u], qv = sr * ap[v] + cr * aq[v];
    // columns: J mixes columns u, v
    ap[u] = cc * pu - sc * pv;
    ap[v] = sc * pu + cc * pv;
    aq[u] = cc * qu - sc * qv;
    aq[v] = sc * qu + cc * qv;
    if (kr == kc) {  // the pivot block: its off-diagonal is zero by construction
      ap[v] = 0.0;
      aq[u] = 0.0;
    }
  }
  // V <- V J: rows p, q of V^T, one column entry per item (coalesced in global memory).
  for (int e = team.rank; e < half * m; e += team.size) {
    const int k = e / m, j = e % m;
    const int p = w.pair[2 * k], q = w.pair[2 * k + 1];
    const double c = w.c[k], s = w.s[k];
    const double vp = w.vt[p * w.ldv + j], vq = w.vt[q * w.ldv + j];
    w.vt[p * w.ldv + j] = c * vp - s * vq;
    w.vt[q * w.ldv + j] = s * vp + c * vq;
  }
  team.sync();
}

// Diagonalise w.a (already loaded, m x m, ghost row/column zero) accumulating V^T from the
// identity. Non-finite input never converges (NaN compares false), so the caller retries.
template <class Team>
KF_HD Result solve(Team& team, const Work& w, int n, double tol, int max_sweeps) {
  const int m = padded_size(n);
  for (int e = team.rank; e < m * m; e += team.size) {
    const int i = e / m, j = e % m;
    w.vt[i * w.ldv + j] = i == j ? 1.0 : 0.0;
  }
  team.sync();
  double off2, all2;
  norms(team, w, m, &off2, &all2);
  const double limit2 = tol * tol * all2;
  Result res{0, 0, 0};
  while (true) {
    // A NaN or an infinity makes all2 non-finite (inf - inf and NaN - NaN are NaN).
    if (!(all2 - all2 == 0.0) || !(off2 == off2)) {
      res.nonfinite = 1;
      break;
    }
    if (off2 <= limit2) {  // also true for the zero matrix
      res.converged = 1;
      break;
    }
    if (res.sweeps >= max_sweeps) break;
    for (int r = 0; r < m - 1; ++r) step(team, w, m, r);
    ++res.sweeps;
    norms(team, w, m, &off2, &all2);
  }
  return res;
}

// Strict total order on (value, index) with every NaN after every number: NaN compares
// false with everything, so a plain `<` would give several indices the same rank.
KF_HD bool before(double dj, int j, double di, int i) {
  const bool nj = !(dj == dj), ni = !(di == di);
  if (nj && ni) return j < i;
  if (nj) return false;  // a NaN comes after every number
  if (ni) return true;
  return (dj < di) || (dj == di && j < i);
}

// Position of eigenvalue i in ascending order, NaN last, ties broken by index: over
// i = 0..n-1 the ranks are a permutation of 0..n-1 whatever the diagonal holds.
KF_HD int ascending_rank(const double* a, int lda, int n, int i) {
  const double di = a[i * lda + i];
  int rank = 0;
  for (int j = 0; j < n; ++j) rank += before(a[j * lda + j], j, di, i);
  return rank;
}

// perm[r] = index of the r-th smallest diagonal entry (NaN last). Every slot is first set
// to the identity, so even a broken order can never leave an index outside [0, n).
template <class Team>
KF_HD void ascending_order(Team& team, const double* a, int lda, int n, int* perm) {
  for (int i = team.rank; i < n; i += team.size) perm[i] = i;
  team.sync();
  for (int i = team.rank; i < n; i += team.size) perm[ascending_rank(a, lda, n, i)] = i;
  team.sync();
}

// Shared-memory bytes of one team: A, optionally V^T, c, s, pair, reduction scratch.
inline std::size_t smem_bytes(int n, bool vt_in_smem, int threads) {
  const int m = padded_size(n), ld = leading_dim(m);
  std::size_t doubles = static_cast<std::size_t>(m) * ld * (vt_in_smem ? 2 : 1) + m;
  doubles += static_cast<std::size_t>(threads / 32 + 1);  // per-warp partial sums + total
  return doubles * sizeof(double) + static_cast<std::size_t>(m) * sizeof(int);
}

// Threads per block: enough for the (m/2)^2 block updates of a step to take a few rounds,
// at most 512 so 128 registers/thread stay available. Untuned (no GPU was available when
// this was written): 16 warps keep an SM busy when one 130 KiB block is all that fits.
inline int threads_for(int n) {
  const int m = padded_size(n);
  int t = (m / 2) * (m / 2);
  t = (t + 31) / 32 * 32;
  return t < 64 ? 64 : (t > 512 ? 512 : t);
}

struct Plan {
  int threads;
  bool vt_in_smem;     // else V^T lives in a global fp64 workspace (m*m doubles/matrix)
  std::size_t smem;    // dynamic shared memory per block, bytes
  bool fits;           // false: even A alone exceeds the limit
};

// V^T goes to shared memory when both fit under `smem_limit` (the device's opt-in limit),
// else to global memory (L2-resident for modest batches): A must be in shared memory.
inline Plan plan(int n, std::size_t smem_limit) {
  Plan pl{};
  pl.threads = threads_for(n);
  const std::size_t both = smem_bytes(n, true, pl.threads);
  const std::size_t only_a = smem_bytes(n, false, pl.threads);
  pl.vt_in_smem = both <= smem_limit;
  pl.smem = pl.vt_in_smem ? both : only_a;
  pl.fits = n >= 1 && n <= kMaxN && pl.smem <= smem_limit;
  return pl;
}

}  // namespace jacobi
}  // namespace kfac_fast
