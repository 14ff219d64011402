#pragma once

// Vectorised dot-product kernels for routing, one implementation per instruction set
// (AVX-512, AVX2+FMA, portable), chosen at run time from the CPU's features.
//
// Numerical contract: within one Kernels table, DotTile computes every entry exactly as Dot
// would (same lane layout, same accumulation order, same horizontal reduction), so a slow
// reference that calls Dot sees bit-identical scores. Different ISAs may differ in the last
// bits.

#include <cstdint>
#include <string_view>

namespace meft::kernels {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// out[i * ldo + j] = Dot(a[i], b + j * d, d) for i < na, j < nb. `a` holds na row pointers
// (rows need not be contiguous), `b` is nb contiguous rows of d floats. No alignment needed.
using DotTileFn = void (*)(const float* const* a, int64_t na, const float* b, int64_t nb, int64_t d,
                           float* out, int64_t ldo);
using DotFn = float (*)(const float* a, const float* b, int64_t d);

struct Kernels {
  Isa isa;
  std::string_view name;  // "avx512", "avx2", "generic"
  DotFn dot;
  DotTileFn dot_tile;
};

// True when this CPU can run `isa`.
bool IsaSupported(Isa isa);
// The fastest table this CPU supports.
const Kernels& Best();
// The table for `isa`; precondition: IsaSupported(isa).
const Kernels& ForIsa(Isa isa);

// Per-ISA tables (defined in dot_<isa>.cc, each compiled with its own target flags).
const Kernels& GenericKernels();
const Kernels& Avx2Kernels();
const Kernels& Avx512Kernels();

}  // namespace meft::kernels
