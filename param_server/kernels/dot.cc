#include "param_server/kernels/dot.h"

namespace meft::kernels {

bool IsaSupported(Isa isa) {
  switch (isa) {
    case Isa::kGeneric:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f");
  }
  return false;
}

const Kernels& ForIsa(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return Avx512Kernels();
    case Isa::kAvx2:
      return Avx2Kernels();
    case Isa::kGeneric:
      break;
  }
  return GenericKernels();
}

const Kernels& Best() {
  static const Kernels& best = IsaSupported(Isa::kAvx512) ? Avx512Kernels()
                               : IsaSupported(Isa::kAvx2) ? Avx2Kernels()
                                                          : GenericKernels();
  return best;
}

}  // namespace meft::kernels
