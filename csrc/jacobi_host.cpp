// Host entry of the Jacobi eigensolver core (jacobi_core.h): the CPU build's test hook.
// It runs exactly the code the CUDA kernel runs, with a one-member team.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "jacobi_core.h"
#include "registry.h"

namespace py = pybind11;

namespace kfac_fast {
namespace {

// A team of one: every work item is this thread's, barriers are no-ops.
struct HostTeam {
  int rank = 0;
  int size = 1;
  void sync() {}
  double sum(double x) { return x; }
};

// Scratch filled with garbage, not zeros (std::vector zero-fills, cudaMalloc and shared
// memory do not): a read before a write gives NaN (doubles) or an index far outside
// [0, n) (ints), which the checks below turn into an error instead of a lucky zero.
constexpr uint64_t kGarbageDouble = 0x7ff8dead5a5a5a5aull;  // a quiet NaN
constexpr int kGarbageInt = 0x5a5a5a5a;

void fill_garbage(std::vector<double>& v) {
  for (double& x : v) std::memcpy(&x, &kGarbageDouble, sizeof x);
}

py::tuple jacobi_eigh_host(py::array_t<double, py::array::c_style | py::array::forcecast> mats,
                           double tol, int max_sweeps, bool with_status) {
  if (mats.ndim() != 3 || mats.shape(1) != mats.shape(2)) {
    throw std::invalid_argument("jacobi_eigh_host: mats must have shape (batch, n, n), got ndim " +
                                std::to_string(mats.ndim()));
  }
  const py::ssize_t batch = mats.shape(0);
  const int n = static_cast<int>(mats.shape(1));
  if (n < 1 || n > jacobi::kMaxN) {
    throw std::invalid_argument("jacobi_eigh_host: n must be in [1, " +
                                std::to_string(jacobi::kMaxN) + "], got " + std::to_string(n));
  }
  if (!(tol > 0.0)) throw std::invalid_argument("jacobi_eigh_host: tol must be > 0");
  if (max_sweeps < 0) throw std::invalid_argument("jacobi_eigh_host: max_sweeps must be >= 0");

  py::array_t<double> vals({batch, static_cast<py::ssize_t>(n)});
  py::array_t<double> vecs({batch, static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(n)});
  py::array_t<bool> converged(batch);
  py::array_t<int32_t> sweeps(batch);
  py::array_t<int32_t> status(batch);

  const int m = jacobi::padded_size(n), ld = jacobi::leading_dim(m);
  std::vector<double> a(static_cast<size_t>(m) * ld), vt(static_cast<size_t>(m) * ld);
  std::vector<double> c(m / 2), s(m / 2);
  std::vector<int> pair(m, kGarbageInt);
  fill_garbage(a);
  fill_garbage(vt);
  fill_garbage(c);
  fill_garbage(s);
  jacobi::Work w{a.data(), vt.data(), c.data(), s.data(), pair.data(), ld, ld};
  bool perm_ok = true;

  const double* in = mats.data();
  double* out_vals = vals.mutable_data();
  double* out_vecs = vecs.mutable_data();
  bool* out_conv = converged.mutable_data();
  int32_t* out_sweeps = sweeps.mutable_data();
  int32_t* out_status = status.mutable_data();
  HostTeam team;
  {
    py::gil_scoped_release nogil;
    for (py::ssize_t b = 0; b < batch; ++b) {
      const double* src = in + b * n * n;
      // Same load as the kernel: symmetrised, ghost row/column zero.
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j)
          a[i * ld + j] = (i < n && j < n) ? 0.5 * (src[i * n + j] + src[j * n + i]) : 0.0;
      const jacobi::Result res = jacobi::solve(team, w, n, tol, max_sweeps);
      // As the kernel: the permutation lives in the pair scratch (garbage from the sweeps).
      int* perm = pair.data();
      jacobi::ascending_order(team, a.data(), ld, n, perm);
      for (int r = 0; r < n; ++r) perm_ok = perm_ok && perm[r] >= 0 && perm[r] < n;
      if (!perm_ok) break;  // the kernel would read outside the matrix: an error, below
      for (int r = 0; r < n; ++r) {
        out_vals[b * n + r] = a[perm[r] * ld + perm[r]];
        for (int i = 0; i < n; ++i) out_vecs[b * n * n + i * n + r] = vt[perm[r] * ld + i];
      }
      out_conv[b] = res.converged != 0;
      out_sweeps[b] = res.sweeps;
      out_status[b] = jacobi::status_of(res);
    }
  }
  if (!perm_ok) throw std::runtime_error("jacobi_eigh_host: the eigenvalue order left a perm slot unwritten");
  if (with_status) return py::make_tuple(vals, vecs, converged, sweeps, status);
  return py::make_tuple(vals, vecs, converged, sweeps);
}

py::dict jacobi_plan(int n, std::size_t smem_limit) {
  const jacobi::Plan pl = jacobi::plan(n, smem_limit);
  py::dict d;
  d["threads"] = pl.threads;
  d["vt_in_smem"] = pl.vt_in_smem;
  d["smem_bytes"] = pl.smem;
  d["fits"] = pl.fits;
  d["workspace_doubles"] =
      pl.vt_in_smem ? 0 : jacobi::padded_size(n) * jacobi::padded_size(n);
  return d;
}

}  // namespace

void register_jacobi_host(py::module_& m) {
  m.attr("JACOBI_MAX_N") = jacobi::kMaxN;
  m.attr("JACOBI_MAX_SWEEPS") = jacobi::kMaxSweeps;
  m.def("jacobi_eigh_host", &jacobi_eigh_host, py::arg("mats"), py::arg("tol") = 1e-14,
        py::arg("max_sweeps") = jacobi::kMaxSweeps, py::arg("with_status") = false,
        "Jacobi eigensolver core on the host (fp64). mats (batch, n, n), symmetrised on load. "
        "Returns (eigenvalues (batch, n) ascending, eigenvectors (batch, n, n) as columns, "
        "converged (batch,) bool, sweeps (batch,) int32[, status (batch,) int32: 1 converged, 0 not, "
        "-1 a NaN or infinity in the input, with with_status=True]). Scratch starts as garbage.");
  m.def("jacobi_plan", &jacobi_plan, py::arg("n"), py::arg("smem_limit"),
        "The kernel's launch plan for size n under a shared-memory limit in bytes: threads, "
        "vt_in_smem, smem_bytes, fits, workspace_doubles (per matrix, fp64).");
}

}  // namespace kfac_fast
