// Compiled with -mavx2 -mfma (see CMakeLists.txt); only called when the CPU has AVX2 and FMA.
#include <immintrin.h>

#include "param_server/kernels/dot.h"

namespace meft::kernels {
namespace {

struct Vec {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  // 12 accumulators + 4 loaded rows of b fit the 16 ymm registers.
  static constexpr int kTileA = 3;
  static constexpr int kTileB = 4;
  static Reg Zero() { return _mm256_setzero_ps(); }
  static Reg Load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg LoadPartial(const float* p, int n) {
    alignas(32) static constexpr int kMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
    const __m256i mask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMask + 8 - n));
    return _mm256_maskload_ps(p, mask);
  }
  static Reg Fma(Reg a, Reg b, Reg acc) { return _mm256_fmadd_ps(a, b, acc); }
  static float ReduceSum(Reg v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

#include "param_server/kernels/dot_impl.inc"

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels kTable{Isa::kAvx2, "avx2", &DotImpl, &DotTileImpl};
  return kTable;
}

}  // namespace meft::kernels
