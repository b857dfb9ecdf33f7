// CPU kernels for masked_linear's sparse path (raw pointers, OpenMP; no torch headers so
// this translation unit compiles in seconds). The binding owns tensors and checks.
//
// The masked weight is held as CSR with the mask's structure (entries kept even where the
// weight value is 0, so grad_weight covers every kept position).
#include <algorithm>
#include <cstdint>
#include <vector>

namespace saf_ml {

// dst (cols x rows) = src (rows x cols)^T, cache-blocked.
template <typename T>
void transpose(const T* src, T* dst, int64_t rows, int64_t cols) {
  constexpr int64_t TB = 32;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r0 = 0; r0 < rows; r0 += TB) {
    for (int64_t c0 = 0; c0 < cols; c0 += TB) {
      const int64_t r1 = std::min(rows, r0 + TB), c1 = std::min(cols, c0 + TB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  }
}

// One CSR row times a BC-wide slab of xT. Accumulators are explicit 32-byte vectors (GCC
// vector extensions: AVX on x86, pairs of SSE/NEON registers elsewhere) kept in registers,
// and two nonzeros are processed per step into separate accumulators so the FMA latency
// chains overlap; the slab width keeps xT's slab (K x BC) resident in L2.
template <typename T, int BC>
inline void row_slab(const int64_t* rowptr, const int32_t* col, const T* val, int64_t r,
                     const T* xT, int64_t B, int64_t b0, T* out) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int VL = 32 / sizeof(T), NV = BC / VL;
  static_assert(BC % VL == 0, "slab must be a whole number of vectors");
  V a0[NV], a1[NV];
  for (int q = 0; q < NV; ++q) a0[q] = a1[q] = V{} ;
  int64_t k = rowptr[r];
  const int64_t k1 = rowptr[r + 1];
  for (; k + 1 < k1; k += 2) {
    const T* xr0 = xT + static_cast<int64_t>(col[k]) * B + b0;
    const T* xr1 = xT + static_cast<int64_t>(col[k + 1]) * B + b0;
    const T v0 = val[k], v1 = val[k + 1];
#pragma GCC unroll 16
    for (int q = 0; q < NV; ++q) {
      V x0, x1;
      __builtin_memcpy(&x0, xr0 + q * VL, sizeof(V));
      __builtin_memcpy(&x1, xr1 + q * VL, sizeof(V));
      a0[q] += v0 * x0;
      a1[q] += v1 * x1;
    }
  }
  if (k < k1) {
    const T* xr0 = xT + static_cast<int64_t>(col[k]) * B + b0;
    const T v0 = val[k];
#pragma GCC unroll 16
    for (int q = 0; q < NV; ++q) {
      V x0;
      __builtin_memcpy(&x0, xr0 + q * VL, sizeof(V));
      a0[q] += v0 * x0;
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < NV; ++q) {
    const V s = a0[q] + a1[q];
    __builtin_memcpy(out + q * VL, &s, sizeof(V));
  }
}

template <typename T>
inline void row_slab_tail(const int64_t* rowptr, const int32_t* col, const T* val, int64_t r,
                          const T* xT, int64_t B, int64_t b0, int64_t bn, T* out) {
  for (int64_t j = 0; j < bn; ++j) out[j] = T(0);
  for (int64_t k = rowptr[r]; k < rowptr[r + 1]; ++k) {
    const T v = val[k];
    const T* xr = xT + static_cast<int64_t>(col[k]) * B + b0;
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) out[j] += v * xr[j];
  }
}

// y (B x R) = x A^T + bias, with A (R x K) in CSR and xT = x^T (K x B) contiguous.
// Parallel over (batch slab, block of A rows); each task writes a disjoint tile of y.
template <typename T>
void spmm_xAt(const int64_t* rowptr, const int32_t* col, const T* val, int64_t R,
              const T* xT, int64_t B, const T* bias, T* y) {
  constexpr int RB = 16;
  constexpr int BC = 32;
  const int64_t nrb = (R + RB - 1) / RB, nbc = (B + BC - 1) / BC;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t cb = 0; cb < nbc; ++cb) {
    for (int64_t rb = 0; rb < nrb; ++rb) {
      T tile[RB][BC];
      const int64_t b0 = cb * BC, bn = std::min<int64_t>(BC, B - b0);
      const int64_t r0 = rb * RB, rn = std::min<int64_t>(RB, R - r0);
      for (int64_t r = 0; r < rn; ++r) {
        if (bn == BC)
          row_slab<T, BC>(rowptr, col, val, r0 + r, xT, B, b0, tile[r]);
        else
          row_slab_tail<T>(rowptr, col, val, r0 + r, xT, B, b0, bn, tile[r]);
        if (bias) {
          const T bv = bias[r0 + r];
          for (int64_t j = 0; j < bn; ++j) tile[r][j] += bv;
        }
      }
      for (int64_t j = 0; j < bn; ++j) {
        T* yr = y + (b0 + j) * R + r0;
        for (int64_t r = 0; r < rn; ++r) yr[r] = tile[r][j];
      }
    }
  }
}

// <a, b> over n contiguous elements with four independent vector accumulators (hides the
// FMA latency that a single reduction chain would expose).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int VL = 32 / sizeof(T);
  V s[4] = {V{}, V{}, V{}, V{}};
  int64_t i = 0;
  for (; i + 4 * VL <= n; i += 4 * VL) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      V va, vb;
      __builtin_memcpy(&va, a + i + q * VL, sizeof(V));
      __builtin_memcpy(&vb, b + i + q * VL, sizeof(V));
      s[q] += va * vb;
    }
  }
  const V t = (s[0] + s[1]) + (s[2] + s[3]);
  T r = T(0);
  for (int j = 0; j < VL; ++j) r += t[j];
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// gw[r, col] = <gyT[r, :], xT[col, :]> for every stored (r, col); gw pre-zeroed (R x K).
template <typename T>
void sddmm(const int64_t* rowptr, const int32_t* col, int64_t R, int64_t K, const T* gyT,
           const T* xT, int64_t B, T* gw) {
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t r = 0; r < R; ++r) {
    const T* g = gyT + r * B;
    for (int64_t k = rowptr[r]; k < rowptr[r + 1]; ++k)
      gw[r * K + col[k]] = dot(g, xT + static_cast<int64_t>(col[k]) * B, B);
  }
}

#define SAF_INSTANTIATE(T)                                                                 \
  template void transpose<T>(const T*, T*, int64_t, int64_t);                              \
  template void spmm_xAt<T>(const int64_t*, const int32_t*, const T*, int64_t, const T*,   \
                            int64_t, const T*, T*);                                        \
  template void sddmm<T>(const int64_t*, const int32_t*, int64_t, int64_t, const T*,       \
                         const T*, int64_t, T*);
SAF_INSTANTIATE(float)
SAF_INSTANTIATE(double)
#undef SAF_INSTANTIATE

}  // namespace saf_ml
