// CPU kernels for masked_conv2d's sparse path: direct sparse convolution over the kept
// weights (raw pointers, OpenMP, NCHW; no torch headers so this compiles in seconds).
//
// Forward CSR: rows = output channels, column code = cl*KH*KW + ky*KW + kx (cl = input
// channel within the group). Transposed CSR (grad_input): rows = global input channel,
// code = ocl*KH*KW + ky*KW + kx (ocl = output channel within the group). Codes are int16
// when they fit (the Python layer picks the width), else int32.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace saf_mc {

struct Geom {
  int64_t N, C, H, W, OC, KH, KW, G, sh, sw, ph, pw, dh, dw, OH, OW;
};

// [lo, hi) of output positions o whose input o*s + off lies in [0, size).
inline void valid_range(int64_t off, int64_t s, int64_t size, int64_t out, int64_t& lo,
                        int64_t& hi) {
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = (size - 1 - off) < 0 ? 0 : std::min<int64_t>(out, (size - 1 - off) / s + 1);
  if (hi < lo) hi = lo;
}

template <typename T, typename I>
void conv_forward(const Geom& g, const T* x, const int64_t* rowptr, const I* col,
                  const T* val, const T* bias, T* y) {
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, KK = g.KH * g.KW, P = g.OH * g.OW;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oc = 0; oc < g.OC; ++oc) {
      T* yp = y + (n * g.OC + oc) * P;
      const T b0 = bias ? bias[oc] : T(0);
      for (int64_t p = 0; p < P; ++p) yp[p] = b0;
      const int64_t grp = oc / OCg;
      for (int64_t k = rowptr[oc]; k < rowptr[oc + 1]; ++k) {
        const int64_t code = col[k], cl = code / KK, kk = code % KK;
        const int64_t ky = kk / g.KW, kx = kk % g.KW;
        const T v = val[k];
        const T* xp = x + (n * g.C + grp * Cg + cl) * g.H * g.W;
        const int64_t offy = ky * g.dh - g.ph, offx = kx * g.dw - g.pw;
        int64_t oh0, oh1, ow0, ow1;
        valid_range(offy, g.sh, g.H, g.OH, oh0, oh1);
        valid_range(offx, g.sw, g.W, g.OW, ow0, ow1);
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const T* xr = xp + (oh * g.sh + offy) * g.W + offx;
          T* yr = yp + oh * g.OW;
          if (g.sw == 1) {
#pragma omp simd
            for (int64_t ow = ow0; ow < ow1; ++ow) yr[ow] += v * xr[ow];
          } else {
            for (int64_t ow = ow0; ow < ow1; ++ow) yr[ow] += v * xr[ow * g.sw];
          }
        }
      }
    }
  }
}

// Stride-1 (along W) forward on a zero-padded input (N, C, Hp, Wp): every tap of every
// output row is in bounds, so an output row segment is accumulated in vector registers over
// all kept taps of its channel and stored once (no read-modify-write of y per tap).
template <typename T, typename I>
void conv_forward_s1(const Geom& g, const T* xpad, int64_t Hp, int64_t Wp,
                     const int64_t* rowptr, const I* col, const T* val, const T* bias,
                     T* y) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int VL = 32 / sizeof(T), NV = 4;
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, KK = g.KH * g.KW, P = g.OH * g.OW;
#pragma omp parallel
  {
    std::vector<int64_t> off;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t oc = 0; oc < g.OC; ++oc) {
        const int64_t k0 = rowptr[oc], nk = rowptr[oc + 1] - k0;
        const T* vals = val + k0;
        off.resize(static_cast<size_t>(nk));
        for (int64_t k = 0; k < nk; ++k) {
          const int64_t code = col[k0 + k], cl = code / KK, kk = code % KK;
          off[k] = (cl * Hp + (kk / g.KW) * g.dh) * Wp + (kk % g.KW) * g.dw;
        }
        const T* xb = xpad + (n * g.C + (oc / OCg) * Cg) * Hp * Wp;
        T* yp = y + (n * g.OC + oc) * P;
        const T b0 = bias ? bias[oc] : T(0);
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const T* xr = xb + oh * g.sh * Wp;
          T* yr = yp + oh * g.OW;
          int64_t ow = 0;
          for (; ow + NV * VL <= g.OW; ow += NV * VL) {
            V acc[NV];
            for (int q = 0; q < NV; ++q) acc[q] = V{} + b0;
            for (int64_t k = 0; k < nk; ++k) {
              const T* p = xr + off[k] + ow;
              const T v = vals[k];
#pragma GCC unroll 4
              for (int q = 0; q < NV; ++q) {
                V xv;
                __builtin_memcpy(&xv, p + q * VL, sizeof(V));
                acc[q] += v * xv;
              }
            }
            __builtin_memcpy(yr + ow, acc, sizeof(acc));
          }
          for (; ow + VL <= g.OW; ow += VL) {
            V acc = V{} + b0;
            for (int64_t k = 0; k < nk; ++k) {
              V xv;
              __builtin_memcpy(&xv, xr + off[k] + ow, sizeof(V));
              acc += vals[k] * xv;
            }
            __builtin_memcpy(yr + ow, &acc, sizeof(V));
          }
          for (; ow < g.OW; ++ow) {
            T a = b0;
            for (int64_t k = 0; k < nk; ++k) a += vals[k] * xr[off[k] + ow];
            yr[ow] = a;
          }
        }
      }
    }
  }
}

template <typename T, typename I>
void conv_grad_input(const Geom& g, const T* gy, const int64_t* rowptrT, const I* colT,
                     const T* valT, T* gx) {
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, KK = g.KH * g.KW, P = g.OH * g.OW;
  const int64_t HW = g.H * g.W;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      T* gxp = gx + (n * g.C + c) * HW;
      for (int64_t i = 0; i < HW; ++i) gxp[i] = T(0);
      const int64_t grp = c / Cg;
      for (int64_t k = rowptrT[c]; k < rowptrT[c + 1]; ++k) {
        const int64_t code = colT[k], ocl = code / KK, kk = code % KK;
        const int64_t ky = kk / g.KW, kx = kk % g.KW;
        const T v = valT[k];
        const T* gyp = gy + (n * g.OC + grp * OCg + ocl) * P;
        const int64_t offy = ky * g.dh - g.ph, offx = kx * g.dw - g.pw;
        int64_t oh0, oh1, ow0, ow1;
        valid_range(offy, g.sh, g.H, g.OH, oh0, oh1);
        valid_range(offx, g.sw, g.W, g.OW, ow0, ow1);
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          T* gxr = gxp + (oh * g.sh + offy) * g.W + offx;
          const T* gyr = gyp + oh * g.OW;
          if (g.sw == 1) {
#pragma omp simd
            for (int64_t ow = ow0; ow < ow1; ++ow) gxr[ow] += v * gyr[ow];
          } else {
            for (int64_t ow = ow0; ow < ow1; ++ow) gxr[ow * g.sw] += v * gyr[ow];
          }
        }
      }
    }
  }
}

// gw at the stored positions only (SDDMM); gw (OC x Cg*KH*KW) pre-zeroed. Each thread
// sums its images into a private nnz-long buffer (images stay cache-resident), then the
// buffers are reduced.
template <typename T, typename I>
void conv_grad_weight(const Geom& g, const T* gy, const T* x, const int64_t* rowptr,
                      const I* col, T* gw) {
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, KK = g.KH * g.KW, P = g.OH * g.OW;
  const int64_t nnz = rowptr[g.OC];
  const int nt = omp_get_max_threads();
  std::vector<T> part(static_cast<size_t>(nt) * static_cast<size_t>(nnz), T(0));
#pragma omp parallel num_threads(nt)
  {
    T* acc = part.data() + static_cast<size_t>(omp_get_thread_num()) * nnz;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t oc = 0; oc < g.OC; ++oc) {
        const T* gyp = gy + (n * g.OC + oc) * P;
        const int64_t grp = oc / OCg;
        for (int64_t k = rowptr[oc]; k < rowptr[oc + 1]; ++k) {
          const int64_t code = col[k], cl = code / KK, kk = code % KK;
          const int64_t ky = kk / g.KW, kx = kk % g.KW;
          const T* xp = x + (n * g.C + grp * Cg + cl) * g.H * g.W;
          const int64_t offy = ky * g.dh - g.ph, offx = kx * g.dw - g.pw;
          int64_t oh0, oh1, ow0, ow1;
          valid_range(offy, g.sh, g.H, g.OH, oh0, oh1);
          valid_range(offx, g.sw, g.W, g.OW, ow0, ow1);
          T s = T(0);
          for (int64_t oh = oh0; oh < oh1; ++oh) {
            const T* xr = xp + (oh * g.sh + offy) * g.W + offx;
            const T* gyr = gyp + oh * g.OW;
            if (g.sw == 1) {
#pragma omp simd reduction(+ : s)
              for (int64_t ow = ow0; ow < ow1; ++ow) s += gyr[ow] * xr[ow];
            } else {
              for (int64_t ow = ow0; ow < ow1; ++ow) s += gyr[ow] * xr[ow * g.sw];
            }
          }
          acc[k] += s;
        }
      }
    }
  }
  const int64_t rowlen = Cg * KK;
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t oc = 0; oc < g.OC; ++oc) {
    for (int64_t k = rowptr[oc]; k < rowptr[oc + 1]; ++k) {
      T s = T(0);
      for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * nnz + k];
      gw[oc * rowlen + col[k]] = s;
    }
  }
}

#define SAF_INSTANTIATE(T, I)                                                              \
  template void conv_forward_s1<T, I>(const Geom&, const T*, int64_t, int64_t,             \
                                      const int64_t*, const I*, const T*, const T*, T*);   \
  template void conv_forward<T, I>(const Geom&, const T*, const int64_t*, const I*,        \
                                   const T*, const T*, T*);                                \
  template void conv_grad_input<T, I>(const Geom&, const T*, const int64_t*, const I*,     \
                                      const T*, T*);                                       \
  template void conv_grad_weight<T, I>(const Geom&, const T*, const T*, const int64_t*,    \
                                       const I*, T*);
SAF_INSTANTIATE(float, int16_t)
SAF_INSTANTIATE(float, int32_t)
SAF_INSTANTIATE(double, int16_t)
SAF_INSTANTIATE(double, int32_t)
#undef SAF_INSTANTIATE

}  // namespace saf_mc
