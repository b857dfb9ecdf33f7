// CPU kernels for masked_linear's sparse path (raw pointers, OpenMP; no torch headers so
// this translation unit compiles in seconds). The binding owns tensors and checks.
//
// The masked weight is held as ONE CSR with the mask's structure (entries kept even where the
// weight value is 0, so grad_weight covers every kept position); the input gradient
// scatters through that same CSR, so no transposed copy is held. Column indices are int16
// when the row length allows (half the index bytes), else int32.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/vec_bytes.h"

#ifdef _OPENMP
#include <omp.h>
#endif

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

// One CSR row times a BC-wide slab of xT. Accumulators are explicit vectors (GCC vector
// extensions, common/vec_bytes.h) kept in registers, and two nonzeros are processed per
// step into separate accumulators so the FMA latency chains overlap; the slab width keeps
// xT's slab (K x BC) resident in L2.
template <typename T, typename I, int BC>
inline void row_slab(const int64_t* rowptr, const I* col, const T* val, int64_t r,
                     const T* xT, int64_t B, int64_t b0, T* out) {
  typedef T V __attribute__((vector_size(saf_common::kVecBytes)));
  constexpr int VL = saf_common::kVecBytes / sizeof(T), NV = BC / VL;
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

template <typename T, typename I>
inline void row_slab_tail(const int64_t* rowptr, const I* col, const T* val, int64_t r,
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
template <typename T, typename I>
void spmm_xAt(const int64_t* rowptr, const I* col, const T* val, int64_t R,
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
          row_slab<T, I, BC>(rowptr, col, val, r0 + r, xT, B, b0, tile[r]);
        else
          row_slab_tail<T, I>(rowptr, col, val, r0 + r, xT, B, b0, bn, tile[r]);
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

// gx (B x K) = gy (B x R) A, with A (R x K) in the same CSR the forward uses and
// gyT = gy^T (R x B) contiguous: the transposed product without a transposed CSR. Each task
// owns a BC-wide batch slab and scatters into a private (K x BC) accumulator (sized to stay
// in L2), so no two threads write the same output; the slab is then written to gx.
template <typename T, typename I>
void spmm_gyA(const int64_t* rowptr, const I* col, const T* val, int64_t R, int64_t K,
              const T* gyT, int64_t B, T* gx) {
  typedef T V __attribute__((vector_size(saf_common::kVecBytes)));
  constexpr int BC = 32;
  constexpr int VL = saf_common::kVecBytes / sizeof(T), NV = BC / VL;
  constexpr int64_t PF = 8;  // prefetch distance in nonzeros (accumulator rows live in L2)
  // An empty batch or input has an empty gx: nothing to write, and nbc = 0 below would
  // divide by zero when splitting the work over threads.
  if (B == 0 || K == 0) return;
  const int64_t nbc = (B + BC - 1) / BC;
  // Small batches have fewer slabs than threads: split the columns too (each task then owns
  // a (slab, column range) block of gx; a row's range is found by binary search, since
  // the CSR columns ascend within a row).
#ifdef _OPENMP
  const int64_t nth = omp_get_max_threads();
#else
  const int64_t nth = 1;
#endif
  const int64_t ns = std::min<int64_t>(std::max<int64_t>(1, (nth + nbc - 1) / nbc), K);
#pragma omp parallel
  {
    // 64-byte aligned so each accumulator row spans whole cache lines.
    std::vector<T> accv(static_cast<size_t>(K) * BC + 64 / sizeof(T));
    T* acc = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(accv.data()) + 63) &
                                  ~uintptr_t(63));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t cb = 0; cb < nbc; ++cb) {
     for (int64_t s = 0; s < ns; ++s) {
      const int64_t b0 = cb * BC, bn = std::min<int64_t>(BC, B - b0);
      const int64_t cs0 = K * s / ns, cs1 = K * (s + 1) / ns;
      std::fill(acc + cs0 * BC, acc + cs1 * BC, T(0));
      for (int64_t r = 0; r < R; ++r) {
        int64_t k0 = rowptr[r], k1 = rowptr[r + 1];
        if (ns > 1) {
          k0 = std::lower_bound(col + k0, col + k1, static_cast<I>(cs0)) - col;
          if (cs1 < K) k1 = std::lower_bound(col + k0, col + k1, static_cast<I>(cs1)) - col;
        }
        if (k0 == k1) continue;
        const T* g = gyT + r * B + b0;
        if (bn == BC) {
          V gv[NV];
#pragma GCC unroll 16
          for (int q = 0; q < NV; ++q) __builtin_memcpy(&gv[q], g + q * VL, sizeof(V));
          for (int64_t k = k0; k < k1; ++k) {
            T* a = acc + static_cast<int64_t>(col[k]) * BC;
            const T v = val[k];
            if (k + PF < k1) __builtin_prefetch(acc + static_cast<int64_t>(col[k + PF]) * BC, 1);
#pragma GCC unroll 16
            for (int q = 0; q < NV; ++q) {
              V av;
              __builtin_memcpy(&av, a + q * VL, sizeof(V));
              av += v * gv[q];
              __builtin_memcpy(a + q * VL, &av, sizeof(V));
            }
          }
        } else {
          for (int64_t k = k0; k < k1; ++k) {
            T* a = acc + static_cast<int64_t>(col[k]) * BC;
            const T v = val[k];
            for (int64_t j = 0; j < bn; ++j) a[j] += v * g[j];
          }
        }
      }
      constexpr int64_t CB = 64;  // column block: transposed copy out of the accumulator
      for (int64_t c0 = cs0; c0 < cs1; c0 += CB) {
        const int64_t c1 = std::min(cs1, c0 + CB);
        for (int64_t j = 0; j < bn; ++j) {
          T* gr = gx + (b0 + j) * K;
          for (int64_t c = c0; c < c1; ++c) gr[c] = acc[c * BC + j];
        }
      }
     }
    }
  }
}

// <a, b> over n contiguous elements with four independent vector accumulators (hides the
// FMA latency that a single reduction chain would expose).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  typedef T V __attribute__((vector_size(saf_common::kVecBytes)));
  constexpr int VL = saf_common::kVecBytes / sizeof(T);
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
template <typename T, typename I>
void sddmm(const int64_t* rowptr, const I* col, int64_t R, int64_t K, const T* gyT,
           const T* xT, int64_t B, T* gw) {
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t r = 0; r < R; ++r) {
    const T* g = gyT + r * B;
    for (int64_t k = rowptr[r]; k < rowptr[r + 1]; ++k)
      gw[r * K + static_cast<int64_t>(col[k])] = dot(g, xT + static_cast<int64_t>(col[k]) * B, B);
  }
}

#define SAF_INSTANTIATE(T, I)                                                              \
  template void spmm_xAt<T, I>(const int64_t*, const I*, const T*, int64_t, const T*,      \
                               int64_t, const T*, T*);                                     \
  template void spmm_gyA<T, I>(const int64_t*, const I*, const T*, int64_t, int64_t,       \
                               const T*, int64_t, T*);                                     \
  template void sddmm<T, I>(const int64_t*, const I*, int64_t, int64_t, const T*,          \
                            const T*, int64_t, T*);
template void transpose<float>(const float*, float*, int64_t, int64_t);
template void transpose<double>(const double*, double*, int64_t, int64_t);
SAF_INSTANTIATE(float, int16_t)
SAF_INSTANTIATE(float, int32_t)
SAF_INSTANTIATE(double, int16_t)
SAF_INSTANTIATE(double, int32_t)
#undef SAF_INSTANTIATE

}  // namespace saf_ml
