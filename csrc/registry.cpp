#include "registry.h"

namespace kfac_fast {
void register_all(pybind11::module_& m) {
  register_jacobi_host(m);
  register_cuda_ops(m);
}
}  // namespace kfac_fast
