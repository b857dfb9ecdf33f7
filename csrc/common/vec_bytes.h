// Width of the explicit SIMD vectors (GCC vector extensions) of the CPU sparse kernels:
// 64 bytes where the compiler targets AVX-512, 32 otherwise (AVX2 on x86; pairs of
// SSE/NEON registers elsewhere). Plain C++, no torch headers.
#pragma once

namespace saf_common {
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;
#endif
}  // namespace saf_common
