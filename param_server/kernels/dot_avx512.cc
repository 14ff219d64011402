// Compiled with -mavx512f -mfma (see CMakeLists.txt); only called when the CPU has AVX-512F.
// GCC 12 warns about the intentionally undefined upper half inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "param_server/kernels/dot.h"

namespace meft::kernels {
namespace {

struct Vec {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kTileA = 4;
  static constexpr int kTileB = 4;
  static Reg Zero() { return _mm512_setzero_ps(); }
  static Reg Load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg LoadPartial(const float* p, int n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static Reg Fma(Reg a, Reg b, Reg acc) { return _mm512_fmadd_ps(a, b, acc); }
  static float ReduceSum(Reg v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
};

#include "param_server/kernels/dot_impl.inc"

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels kTable{Isa::kAvx512, "avx512", &DotImpl, &DotTileImpl};
  return kTable;
}

}  // namespace meft::kernels
