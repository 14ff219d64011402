// Portable kernels: eight scalar lanes, so compilers can still vectorise with baseline SSE.
#include "param_server/kernels/dot.h"

namespace meft::kernels {
namespace {

struct Vec {
  struct Reg {
    float v[8];
  };
  static constexpr int kLanes = 8;
  static constexpr int kTileA = 2;
  static constexpr int kTileB = 2;
  static Reg Zero() { return Reg{}; }
  static Reg Load(const float* p) {
    Reg r;
    for (int l = 0; l < 8; ++l) r.v[l] = p[l];
    return r;
  }
  static Reg LoadPartial(const float* p, int n) {
    Reg r{};
    for (int l = 0; l < n; ++l) r.v[l] = p[l];
    return r;
  }
  static Reg Fma(Reg a, Reg b, Reg acc) {
    for (int l = 0; l < 8; ++l) acc.v[l] += a.v[l] * b.v[l];
    return acc;
  }
  static float ReduceSum(Reg r) {
    const float s0 = (r.v[0] + r.v[4]) + (r.v[2] + r.v[6]);
    const float s1 = (r.v[1] + r.v[5]) + (r.v[3] + r.v[7]);
    return s0 + s1;
  }
};

#include "param_server/kernels/dot_impl.inc"

}  // namespace

const Kernels& GenericKernels() {
  static const Kernels kTable{Isa::kGeneric, "generic", &DotImpl, &DotTileImpl};
  return kTable;
}

}  // namespace meft::kernels
