// CPU kernels for masked_conv2d's sparse path: direct sparse convolution over the kept
// weights (raw pointers, OpenMP, NCHW; no torch headers so this compiles in seconds). Vectors
// are 64 bytes where the compiler targets AVX-512, 32 otherwise.
//
// Forward CSR: rows = output channels, column code = cl*KH*KW + ky*KW + kx (cl = input
// channel within the group). Transposed CSR (grad_input): rows = global input channel,
// code = ocl*KH*KW + ky*KW + kx (ocl = output channel within the group). Codes are int16
// when they fit (the Python layer picks the width), else int32.
//
// A following ReLU can be fused (the attack path): the forward clamps its tiles as it
// stores them, and the input gradient reads gy through the ReLU's output (gate).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/vec_bytes.h"

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

// Forward, any stride: each image is copied into a per-thread buffer of zero-padded phase
// planes (see FlatPlan) that stays cache-resident, where every kept tap of a channel reads
// the plane at a fixed offset from the output pixel. Output tiles accumulate in registers
// over all kept taps of their channel and are stored once: row tiles when an output row is
// a whole number of vectors wide, else flat tiles over the phase grid flattened (output
// pixel (oh, ow) at oh*Wq + ow), whose positions in the padding columns (ow >= OW) are
// computed and dropped. Flat tiles keep small planes (8x8, 4x4) vectorised where a per-row
// loop would not be.
using saf_common::kVecBytes;
constexpr int kMaxNV = 8;

template <typename T, int VB, int NV>
inline void flat_tile(const T* xb, const int32_t* off, const T* vals, int64_t nk, T b0,
                      T* out) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int VL = VB / sizeof(T);
  V acc[NV];
  for (int q = 0; q < NV; ++q) acc[q] = V{} + b0;
  for (int64_t k = 0; k < nk; ++k) {
    const T* p = xb + off[k];
    const T v = vals[k];
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) {
      V xv;
      __builtin_memcpy(&xv, p + q * VL, sizeof(V));
      acc[q] += v * xv;
    }
  }
  __builtin_memcpy(out, acc, sizeof(acc));
}

template <typename T, int VB>
inline void flat_tile_n(int nv, const T* xb, const int32_t* off, const T* vals, int64_t nk,
                        T b0, T* out) {
  switch (nv) {
    case 1: return flat_tile<T, VB, 1>(xb, off, vals, nk, b0, out);
    case 2: return flat_tile<T, VB, 2>(xb, off, vals, nk, b0, out);
    case 3: return flat_tile<T, VB, 3>(xb, off, vals, nk, b0, out);
    case 4: return flat_tile<T, VB, 4>(xb, off, vals, nk, b0, out);
    case 5: return flat_tile<T, VB, 5>(xb, off, vals, nk, b0, out);
    case 6: return flat_tile<T, VB, 6>(xb, off, vals, nk, b0, out);
    case 7: return flat_tile<T, VB, 7>(xb, off, vals, nk, b0, out);
    default: return flat_tile<T, VB, 8>(xb, off, vals, nk, b0, out);
  }
}

// acc[r][j] = b0 + sum over the kept taps k of vals[k] * the vector at
// xb + off[k] * Scale + r * Wp + j * VL: the register tile both row tiles (Scale 1) and
// batch-lane tiles (Scale VL, one vector a pixel) accumulate. WPC > 0 fixes Wp at compile
// time: every load is then one base register plus a constant, where a run-time stride
// needs a register per row and a 16-pixel tile spills them.
// With init, the tile starts from the sums there (same layout as acc) instead of b0.
template <typename T, int VB, int NCV, int NR, int Scale, int WPC = 0>
inline void tile_accumulate(const T* xb, int64_t Wp_, const int32_t* off, const T* vals,
                            int64_t nk, T b0, T (*acc)[NCV][VB / sizeof(T)],
                            const T* init = nullptr) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int VL = VB / sizeof(T);
  const int64_t Wp = WPC > 0 ? WPC : Wp_;
  V a[NR][NCV];
  if (init) {
    __builtin_memcpy(a, init, sizeof(a));
  } else {
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < NCV; ++j) a[r][j] = V{} + b0;
  }
  for (int64_t k = 0; k < nk; ++k) {
    const T* p = xb + static_cast<int64_t>(off[k]) * Scale;
    const T v = vals[k];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 16
      for (int j = 0; j < NCV; ++j) {
        V xv;
        __builtin_memcpy(&xv, p + r * Wp + j * VL, sizeof(V));
        a[r][j] += v * xv;
      }
    }
  }
  __builtin_memcpy(acc, a, sizeof(a));
}

// Row tiles, for output rows a whole number of vectors wide: NR output rows x NCV vectors of
// one channel accumulate in registers over its kept taps and are stored straight into y
// (no padding columns computed, no staging copy).
template <typename T, int VB, int NCV, int NR>
inline void rows_tile(const T* xb, int64_t Wp, const int32_t* off, const T* vals, int64_t nk,
                      T b0, bool relu, T* yb, int64_t OW) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int VL = VB / sizeof(T);
  alignas(64) T acc[NR][NCV][VL];
  tile_accumulate<T, VB, NCV, NR, 1>(xb, Wp, off, vals, nk, b0, acc);
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NCV; ++j) {
      V a;
      __builtin_memcpy(&a, acc[r][j], sizeof(V));
      if (relu) a = a < V{} ? V{} : a;  // max(a, 0) that keeps NaN, as torch's relu does
      __builtin_memcpy(yb + r * OW + j * VL, &a, sizeof(V));
    }
}

template <typename T, int VB, int NCV, int NR = 8 / NCV>
inline void rows_tile_n(int nr, const T* xb, int64_t Wp, const int32_t* off, const T* vals,
                        int64_t nk, T b0, bool relu, T* yb, int64_t OW) {
  if constexpr (NR > 1) {
    if (nr < NR)
      return rows_tile_n<T, VB, NCV, NR - 1>(nr, xb, Wp, off, vals, nk, b0, relu, yb, OW);
  }
  rows_tile<T, VB, NCV, NR>(xb, Wp, off, vals, nk, b0, relu, yb, OW);
}

// The input of one image as the kernels read it: each channel split into sh x sw phase
// planes of Hq x Wq (phase (ry, rx) holds padded pixel (sh*i + ry, sw*j + rx) at (i, j)),
// so a strided convolution becomes a stride-1 one over the phase planes (for stride 1
// there is one phase: the zero-padded plane). Tap (cl, ky, kx) reads phase
// (ky*dh % sh, kx*dw % sw) shifted by (ky*dh / sh, kx*dw / sw).
template <typename T>
struct FlatPlan {
  int64_t Hq, Wq, plane, chan, Lf, VB, VL, tile;
  std::vector<int32_t> off;  // per stored weight: its input offset within the image buffer
  // Per phase (ry * sw + rx): whether a tap reads it. A 1x1 stride-2 shortcut reads one
  // phase of four; the others are never copied.
  std::vector<char> read;
  // Batch-lane path only (lane_blocks): input channels a block, blocks, and per output
  // channel the index of its first stored weight in each block (nb + 1 entries a row).
  int64_t cb = 0, nb = 1;
  std::vector<int64_t> split;
};

template <typename T, typename I>
FlatPlan<T> flat_plan(const Geom& g, const int64_t* rowptr, const I* col) {
  FlatPlan<T> f;
  f.Hq = g.OH + (g.KH - 1) * g.dh / g.sh;
  f.Wq = g.OW + (g.KW - 1) * g.dw / g.sw;
  f.plane = f.Hq * f.Wq;
  f.chan = g.sh * g.sw * f.plane;
  f.Lf = (g.OH - 1) * f.Wq + g.OW;
  // Flat tiles of small planes (4x4: 22 positions) in half-width vectors where that
  // rounds off at least a fifth fewer wasted lanes.
  const int64_t full = kVecBytes / sizeof(T), half = 32 / sizeof(T);
  const int64_t lanes_full = (f.Lf + full - 1) / full * full;
  const int64_t lanes_half = (f.Lf + half - 1) / half * half;
  f.VB = (kVecBytes > 32 && f.Lf < kMaxNV * full && 5 * lanes_half <= 4 * lanes_full)
             ? 32 : kVecBytes;
  f.VL = f.VB / sizeof(T);
  f.tile = kMaxNV * f.VL;
  // The offset of every column code, tabulated without a division per stored weight: this
  // runs on every call, and nnz divisions cost as much as a small layer's convolution.
  const int64_t KK = g.KH * g.KW, nnz = rowptr[g.OC], Cg = g.C / g.G;
  std::vector<int32_t> tab(static_cast<size_t>(Cg * KK));
  f.read.assign(static_cast<size_t>(g.sh * g.sw), 0);
  for (int64_t kk = 0; kk < KK; ++kk) {
    const int64_t ty = (kk / g.KW) * g.dh, tx = (kk % g.KW) * g.dw;
    const int64_t phase = (ty % g.sh) * g.sw + tx % g.sw;
    f.read[phase] = 1;
    tab[kk] = static_cast<int32_t>(phase * f.plane + (ty / g.sh) * f.Wq + tx / g.sw);
  }
  for (int64_t cl = 1; cl < Cg; ++cl)
    for (int64_t kk = 0; kk < KK; ++kk)
      tab[cl * KK + kk] = static_cast<int32_t>(cl * f.chan) + tab[kk];
  f.off.resize(static_cast<size_t>(nnz));
  for (int64_t k = 0; k < nnz; ++k) f.off[k] = tab[col[k]];
  return f;
}

// Writes image n of x into buf's phase planes, at the positions that fall inside the
// image; the others (padding) are zero from the buffer's first fill and stay so. With a
// gate (x's shape), a value is read as 0 where the gate is <= 0: the backward of a ReLU
// whose output is the gate, as torch's threshold_backward computes it.
template <typename T>
inline void pad_image(const Geom& g, const FlatPlan<T>& f, const T* x, const T* gate, int64_t n,
                      T* buf) {
  const T* xi = x + n * g.C * g.H * g.W;
  const T* gi = gate ? gate + n * g.C * g.H * g.W : nullptr;
  for (int64_t ry = 0; ry < g.sh; ++ry) {
    for (int64_t rx = 0; rx < g.sw; ++rx) {
      if (!f.read[ry * g.sw + rx]) continue;
      // Columns j whose source column sw*j + rx - pw lies in [0, W).
      const int64_t j0 = std::max<int64_t>(0, (g.pw - rx + g.sw - 1) / g.sw);
      const int64_t j1 = std::min<int64_t>(f.Wq, (g.W + g.pw - rx + g.sw - 1) / g.sw);
      if (j1 <= j0) continue;
      for (int64_t c = 0; c < g.C; ++c) {
        T* ph = buf + c * f.chan + (ry * g.sw + rx) * f.plane;
        for (int64_t i = 0; i < f.Hq; ++i) {
          const int64_t h = g.sh * i + ry - g.ph;
          if (h < 0 || h >= g.H) continue;
          const T* src = xi + (c * g.H + h) * g.W + rx - g.pw;
          T* dst = ph + i * f.Wq;
          if (gi) {  // only the input gradient passes a gate (with stride 1)
            const T* gs = gi + (c * g.H + h) * g.W + rx - g.pw;
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) dst[j] = gs[j] <= T(0) ? T(0) : src[j];
          } else if (g.sw == 1) {
#pragma omp simd
            for (int64_t j = j0; j < j1; ++j) dst[j] = src[j];
          } else {
            for (int64_t j = j0; j < j1; ++j) dst[j] = src[g.sw * j];
          }
        }
      }
    }
  }
}

// Output channels [oc0, oc1) of image n by row tiles of VB-byte vectors (OW % (VB /
// sizeof(T)) == 0), NCV vectors across.
template <typename T, int VB, int NCV>
void rows_image(const Geom& g, const FlatPlan<T>& f, const T* buf, int64_t n, int64_t oc0,
                int64_t oc1, const int64_t* rowptr, const T* val, const T* bias, bool relu,
                T* y) {
  constexpr int VL = VB / sizeof(T), NR = 8 / NCV;
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, P = g.OH * g.OW;
  for (int64_t r0 = 0; r0 < g.OH; r0 += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, g.OH - r0));
    for (int64_t c0 = 0; c0 < g.OW; c0 += NCV * VL) {
      for (int64_t oc = oc0; oc < oc1; ++oc) {
        const int64_t k0 = rowptr[oc];
        const T* xb = buf + (oc / OCg) * Cg * f.chan + r0 * f.Wq + c0;
        rows_tile_n<T, VB, NCV>(nr, xb, f.Wq, f.off.data() + k0, val + k0, rowptr[oc + 1] - k0,
                                bias ? bias[oc] : T(0), relu,
                                y + (n * g.OC + oc) * P + r0 * g.OW + c0, g.OW);
      }
    }
  }
}

// Output channels [oc0, oc1) of image n from its padded copy buf, by flat tiles (any OW).
template <typename T>
void flat_image(const Geom& g, const FlatPlan<T>& f, const T* buf, int64_t n, int64_t oc0,
                int64_t oc1, const int64_t* rowptr, const T* val, const T* bias, bool relu,
                T* y) {
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, P = g.OH * g.OW;
  alignas(64) T out[kMaxNV * 64 / sizeof(T)];
  for (int64_t t0 = 0; t0 < f.Lf; t0 += f.tile) {
    const int64_t len = std::min<int64_t>(f.tile, f.Lf - t0);
    const int nv = static_cast<int>((len + f.VL - 1) / f.VL);
    const int64_t r0 = t0 / f.Wq, r1 = (t0 + len - 1) / f.Wq;
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const int64_t k0 = rowptr[oc];
      const T* xb = buf + (oc / OCg) * Cg * f.chan + t0;
      if (f.VB == kVecBytes)
        flat_tile_n<T, kVecBytes>(nv, xb, f.off.data() + k0, val + k0, rowptr[oc + 1] - k0,
                                  bias ? bias[oc] : T(0), out);
      else
        flat_tile_n<T, 32>(nv, xb, f.off.data() + k0, val + k0, rowptr[oc + 1] - k0,
                           bias ? bias[oc] : T(0), out);
      T* yp = y + (n * g.OC + oc) * P;
      for (int64_t r = r0; r <= r1; ++r) {
        const int64_t a = std::max<int64_t>(r * f.Wq, t0);
        const int64_t b = std::min<int64_t>(r * f.Wq + g.OW, t0 + len);
        for (int64_t i = a; i < b; ++i) {
          const T v = out[i - t0];
          yp[r * g.OW + (i - r * f.Wq)] = (relu && v < T(0)) ? T(0) : v;
        }
      }
    }
  }
}

// Vectors across one row tile: the largest power of two up to 8 dividing OW / VL.
inline int row_vectors(int64_t OW, int64_t VL) {
  if (OW % VL != 0) return 0;
  const int64_t m = OW / VL;
  return m % 8 == 0 ? 8 : m % 4 == 0 ? 4 : m % 2 == 0 ? 2 : 1;
}

template <typename T, int VB>
bool rows_dispatch(int ncv, const Geom& g, const FlatPlan<T>& f, const T* buf, int64_t n,
                   int64_t oc0, int64_t oc1, const int64_t* rowptr, const T* val, const T* bias,
                   bool relu, T* y) {
  switch (ncv) {
    case 1: rows_image<T, VB, 1>(g, f, buf, n, oc0, oc1, rowptr, val, bias, relu, y); return true;
    case 2: rows_image<T, VB, 2>(g, f, buf, n, oc0, oc1, rowptr, val, bias, relu, y); return true;
    case 4: rows_image<T, VB, 4>(g, f, buf, n, oc0, oc1, rowptr, val, bias, relu, y); return true;
    case 8: rows_image<T, VB, 8>(g, f, buf, n, oc0, oc1, rowptr, val, bias, relu, y); return true;
    default: return false;
  }
}

// Row tiles of full vectors where OW allows (half-width vectors next), else flat tiles.
template <typename T>
void image_conv(const Geom& g, const FlatPlan<T>& f, const T* buf, int64_t n, int64_t oc0,
                int64_t oc1, const int64_t* rowptr, const T* val, const T* bias, bool relu,
                T* y) {
  constexpr int64_t VL = kVecBytes / sizeof(T);
  if (rows_dispatch<T, kVecBytes>(row_vectors(g.OW, VL), g, f, buf, n, oc0, oc1, rowptr, val,
                                  bias, relu, y))
    return;
  if constexpr (kVecBytes > 32) {
    if (rows_dispatch<T, 32>(row_vectors(g.OW, 32 / sizeof(T)), g, f, buf, n, oc0, oc1, rowptr,
                             val, bias, relu, y))
      return;
  }
  flat_image(g, f, buf, n, oc0, oc1, rowptr, val, bias, relu, y);
}

// Batch-lane tiles, for small output planes (the 4x4 and 2x2 stages of a ResNet or VGG): a
// vector holds one pixel of VL images, so every lane does useful work whatever the plane's
// width, where a flat tile of a 4x4 plane fills 16 of its 24 lanes. VL images are copied
// into the buffer lane by lane ([C][phase][Hq][Wq][VL], the flat plan's offsets times VL);
// a tile of NR x NC pixels of one channel accumulates in registers over the channel's kept
// taps and is stored image by image.
constexpr int kLanePixels = 16;  // accumulators of one tile

// Whether the batch-lane path runs: at least one full vector of images and at most 16
// output pixels a plane (beyond, row and flat tiles fill their vectors from one image and
// read an L1-resident buffer).
template <typename T>
inline bool use_lanes(const Geom& g) {
  return g.N >= static_cast<int64_t>(kVecBytes / sizeof(T)) && g.OH * g.OW <= kLanePixels;
}

// Images [n0, n0 + nl) of x into buf's lanes, channel by channel: the channel's slice of
// the buffer (a few KB) stays in L1 while every image fills its lane. Reading the VL images
// side by side instead would hit one cache set VL times (images lie a power of two apart).
template <typename T>
inline void pad_lanes(const Geom& g, const FlatPlan<T>& f, const T* x, const T* gate,
                      int64_t n0, int64_t nl, T* buf) {
  constexpr int64_t VL = kVecBytes / sizeof(T);
  const int64_t img = g.C * g.H * g.W;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t l = 0; l < nl; ++l) {
      const T* xi = x + (n0 + l) * img + c * g.H * g.W;
      const T* gi = gate ? gate + (n0 + l) * img + c * g.H * g.W : nullptr;
      for (int64_t ry = 0; ry < g.sh; ++ry) {
        for (int64_t rx = 0; rx < g.sw; ++rx) {
          if (!f.read[ry * g.sw + rx]) continue;
          const int64_t j0 = std::max<int64_t>(0, (g.pw - rx + g.sw - 1) / g.sw);
          const int64_t j1 = std::min<int64_t>(f.Wq, (g.W + g.pw - rx + g.sw - 1) / g.sw);
          if (j1 <= j0) continue;
          T* ph = buf + (c * f.chan + (ry * g.sw + rx) * f.plane) * VL + l;
          for (int64_t i = 0; i < f.Hq; ++i) {
            const int64_t h = g.sh * i + ry - g.ph;
            if (h < 0 || h >= g.H) continue;
            const T* src = xi + h * g.W + rx - g.pw;
            const T* gsrc = gi ? gi + h * g.W + rx - g.pw : nullptr;
            T* dst = ph + i * f.Wq * VL;
            for (int64_t j = j0; j < j1; ++j) {
              const T v = src[g.sw * j];
              dst[j * VL] = (gsrc && gsrc[g.sw * j] <= T(0)) ? T(0) : v;
            }
          }
        }
      }
    }
  }
}

// A per-thread scratch array of at least n elements, kept between calls (the lane buffers
// are hundreds of KB: allocated per call, their pages would fault in on every call). Slot 0
// is the lane buffer, slot 1 the input gradient's phase planes, in use at the same time.
template <typename T, int Slot>
inline T* scratch(size_t n) {
  thread_local std::vector<T> v;
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <typename T, int NC, int NR, int WQ = 0>
inline void lanes_tile(const T* xb, int64_t WqL, const int32_t* off, const T* vals, int64_t nk,
                       T b0, T* out, const T* init) {
  constexpr int VL = kVecBytes / sizeof(T);
  tile_accumulate<T, kVecBytes, NC, NR, VL, WQ * VL>(xb, WqL, off, vals, nk, b0,
                                                     reinterpret_cast<T (*)[NC][VL]>(out), init);
}

// The whole-plane tiles of the usual small planes with their row stride fixed: 4x4 and 2x2
// outputs of a 3x3 conv, stride 1 (Wq = OW + 2) or 2 (Wq = OW + 1), and of the input
// gradients of such convs. False where the tile is another one.
template <typename T>
inline bool lanes_tile_fixed(int nc, int nr, int64_t Wq, const T* xb, int64_t WqL,
                             const int32_t* off, const T* vals, int64_t nk, T b0, T* out,
                             const T* init) {
  if (nc == 4 && nr == 4 && Wq == 6)
    lanes_tile<T, 4, 4, 6>(xb, WqL, off, vals, nk, b0, out, init);
  else if (nc == 4 && nr == 4 && Wq == 5)
    lanes_tile<T, 4, 4, 5>(xb, WqL, off, vals, nk, b0, out, init);
  else if (nc == 2 && nr == 2 && Wq == 4)
    lanes_tile<T, 2, 2, 4>(xb, WqL, off, vals, nk, b0, out, init);
  else if (nc == 2 && nr == 2 && Wq == 3)
    lanes_tile<T, 2, 2, 3>(xb, WqL, off, vals, nk, b0, out, init);
  else
    return false;
  return true;
}

template <typename T, int NC, int NR = kLanePixels / NC>
inline void lanes_tile_n(int nr, const T* xb, int64_t WqL, const int32_t* off, const T* vals,
                         int64_t nk, T b0, T* out, const T* init) {
  if constexpr (NR > 1) {
    if (nr < NR) return lanes_tile_n<T, NC, NR - 1>(nr, xb, WqL, off, vals, nk, b0, out, init);
  }
  lanes_tile<T, NC, NR>(xb, WqL, off, vals, nk, b0, out, init);
}

// Columns of the next lane tile of a plane with `left` columns still to cover: the widest
// power of two up to 16 that fits.
inline int lane_cols(int64_t left) {
  return left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

// Output channels [oc0, oc1) of the nl images from n0 held in buf's lanes. A lane buffer
// larger than L1 (a 4x4 plane of 128 channels: 295 KB) is read in blocks of f.cb input
// channels that fit it: every output channel's tiles sum one block's taps, parked in a
// per-thread buffer between blocks, and are stored after the last (L2 would otherwise
// serve every tap's loads: 4x slower than the multiply-adds).
template <typename T>
void lanes_image(const Geom& g, const FlatPlan<T>& f, const T* buf, int64_t n0, int64_t nl,
                 int64_t oc0, int64_t oc1, const int64_t* rowptr, const T* val, const T* bias,
                 bool relu, T* y) {
  constexpr int64_t VL = kVecBytes / sizeof(T);
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, P = g.OH * g.OW, WqL = f.Wq * VL;
  const int64_t nb = f.nb, tile_len = kLanePixels * VL;
  int64_t tiles = 0;  // tiles a plane, as the loop below walks them
  for (int64_t left = g.OW; left > 0;) {
    const int nc = lane_cols(left);
    tiles += (g.OH + kLanePixels / nc - 1) / (kLanePixels / nc);
    left -= nc;
  }
  alignas(64) T out[kLanePixels * VL];
  T* park = nb > 1 ? scratch<T, 2>(static_cast<size_t>((oc1 - oc0) * tiles * tile_len))
                   : nullptr;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const bool last = blk == nb - 1;
    for (int64_t oc = oc0; oc < oc1; ++oc) {
      const int64_t k0 = nb > 1 ? f.split[oc * (nb + 1) + blk] : rowptr[oc];
      const int64_t nk = (nb > 1 ? f.split[oc * (nb + 1) + blk + 1] : rowptr[oc + 1]) - k0;
      const T* xc = buf + (oc / OCg) * Cg * f.chan * VL;
      const T b0 = bias ? bias[oc] : T(0);
      const int32_t* o = f.off.data() + k0;
      int64_t tile = 0;
      for (int64_t c0 = 0; c0 < g.OW;) {
        const int64_t left = g.OW - c0;
        const int nc = lane_cols(left);
        const int nrmax = kLanePixels / nc;
        for (int64_t r0 = 0; r0 < g.OH; r0 += nrmax, ++tile) {
          const int nr = static_cast<int>(std::min<int64_t>(nrmax, g.OH - r0));
          const T* xb = xc + (r0 * f.Wq + c0) * VL;
          T* pk = park ? park + ((oc - oc0) * tiles + tile) * tile_len : nullptr;
          const T* init = blk > 0 ? pk : nullptr;
          T* acc = last ? out : pk;
          if (!lanes_tile_fixed<T>(nc, nr, f.Wq, xb, WqL, o, val + k0, nk, b0, acc, init)) {
            switch (nc) {
              case 16: lanes_tile_n<T, 16>(nr, xb, WqL, o, val + k0, nk, b0, acc, init); break;
              case 8: lanes_tile_n<T, 8>(nr, xb, WqL, o, val + k0, nk, b0, acc, init); break;
              case 4: lanes_tile_n<T, 4>(nr, xb, WqL, o, val + k0, nk, b0, acc, init); break;
              case 2: lanes_tile_n<T, 2>(nr, xb, WqL, o, val + k0, nk, b0, acc, init); break;
              default: lanes_tile_n<T, 1>(nr, xb, WqL, o, val + k0, nk, b0, acc, init); break;
            }
          }
          if (!last) continue;
          for (int64_t l = 0; l < nl; ++l) {
            T* yp = y + ((n0 + l) * g.OC + oc) * P + r0 * g.OW + c0;
            for (int r = 0; r < nr; ++r)
              for (int c = 0; c < nc; ++c) {
                const T v = out[(r * nc + c) * VL + l];
                yp[r * g.OW + c] = (relu && v < T(0)) ? T(0) : v;
              }
          }
        }
        c0 += nc;
      }
    }
  }
}

// The channel blocks of the batch-lane path (see lanes_image): f.cb channels whose lane
// buffer fits kLaneBlockBytes, and per output channel where each block's weights begin.
// The split points rise and cover the row, so every weight is summed once whatever the
// order of its columns; the order (rising with the input channel in both CSRs the kernels
// run on) only decides how local the reads are. One block, and no table, where the whole
// buffer fits.
constexpr int64_t kLaneBlockBytes = 32 * 1024;

template <typename T, typename I>
void lane_blocks(const Geom& g, FlatPlan<T>& f, const int64_t* rowptr, const I* col) {
  constexpr int64_t VL = kVecBytes / sizeof(T);
  const int64_t Cg = g.C / g.G, KK = g.KH * g.KW;
  f.cb = std::max<int64_t>(1, kLaneBlockBytes / (f.chan * VL * static_cast<int64_t>(sizeof(T))));
  f.nb = (Cg + f.cb - 1) / f.cb;
  if (f.nb <= 1) {
    f.nb = 1;
    return;
  }
  const int64_t stride = f.nb + 1, span = f.cb * KK;
  f.split.resize(static_cast<size_t>(g.OC * stride));
  for (int64_t oc = 0; oc < g.OC; ++oc) {
    int64_t* s = f.split.data() + oc * stride;
    int64_t k = rowptr[oc];
    for (int64_t blk = 0; blk < f.nb; ++blk) {
      s[blk] = k;
      const int64_t end = (blk + 1) * span;  // first column code of the next block
      while (k < rowptr[oc + 1] && static_cast<int64_t>(col[k]) < end) ++k;
    }
    s[f.nb] = rowptr[oc + 1];
  }
}

template <typename T>
void conv_forward_lanes(const Geom& g, const FlatPlan<T>& f, const T* x, const T* gate,
                        const int64_t* rowptr, const T* val, const T* bias, bool relu, T* y) {
  constexpr int64_t VL = kVecBytes / sizeof(T);
  const size_t buflen = static_cast<size_t>(g.C * f.chan * VL);
  const int64_t groups = (g.N + VL - 1) / VL;
  const int nt = omp_get_max_threads();
  if (groups >= nt) {
#pragma omp parallel
    {
      T* buf = scratch<T, 0>(buflen);
      std::fill(buf, buf + buflen, T(0));
#pragma omp for schedule(dynamic, 1)
      for (int64_t q = 0; q < groups; ++q) {
        const int64_t nl = std::min<int64_t>(VL, g.N - q * VL);
        pad_lanes(g, f, x, gate, q * VL, nl, buf);
        lanes_image(g, f, buf, q * VL, nl, 0, g.OC, rowptr, val, bias, relu, y);
      }
    }
    return;
  }
  T* buf = scratch<T, 0>(buflen);  // fewer groups than threads: split the channels
  std::fill(buf, buf + buflen, T(0));
  const int64_t chunk = std::max<int64_t>(1, (g.OC + 4 * nt - 1) / (4 * nt));
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t nl = std::min<int64_t>(VL, g.N - q * VL);
    pad_lanes(g, f, x, gate, q * VL, nl, buf);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t oc0 = 0; oc0 < g.OC; oc0 += chunk)
      lanes_image(g, f, buf, q * VL, nl, oc0, std::min(g.OC, oc0 + chunk), rowptr, val, bias,
                  relu, y);
  }
}

// Row / flat tiles over every image of x: image by image, each padded into its thread's
// buffer, or (fewer images than threads) one image at a time split by output channels, in
// chunks a multiple of `align`. out(n) gives where image n's channels go (OC x OH x OW);
// done(n, oc0, oc1, o) runs once channels [oc0, oc1) of image n are in o = out(n).
template <typename T, typename Out, typename Done>
void tiled_images(const Geom& g, const FlatPlan<T>& f, const T* x, const T* gate,
                  const int64_t* rowptr, const T* val, const T* bias, bool relu, int64_t align,
                  Out out, Done done) {
  // A tile may read up to one tile past the last plane: the slack keeps that in bounds.
  const size_t buflen = static_cast<size_t>(g.C * f.chan + f.tile);
  const int nt = omp_get_max_threads();
  if (g.N >= nt) {  // one image per task, padded into the thread's own buffer
#pragma omp parallel
    {
      std::vector<T> buf(buflen, T(0));
#pragma omp for schedule(dynamic, 1)
      for (int64_t n = 0; n < g.N; ++n) {
        pad_image(g, f, x, gate, n, buf.data());
        T* o = out(n);
        image_conv(g, f, buf.data(), 0, 0, g.OC, rowptr, val, bias, relu, o);
        done(n, 0, g.OC, o);
      }
    }
    return;
  }
  std::vector<T> buf(buflen, T(0));
  const int64_t per = (g.OC + 4 * nt - 1) / (4 * nt);
  const int64_t chunk = std::max<int64_t>(1, (per + align - 1) / align) * align;
  for (int64_t n = 0; n < g.N; ++n) {
    pad_image(g, f, x, gate, n, buf.data());
    T* o = out(n);
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t oc0 = 0; oc0 < g.OC; oc0 += chunk) {
      const int64_t oc1 = std::min(g.OC, oc0 + chunk);
      image_conv(g, f, buf.data(), 0, oc0, oc1, rowptr, val, bias, relu, o);
      done(n, oc0, oc1, o);
    }
  }
}

template <typename T, typename I>
void conv_forward_tiled(const Geom& g, const T* x, const T* gate, const int64_t* rowptr,
                        const I* col, const T* val, const T* bias, bool relu, T* y) {
  FlatPlan<T> f = flat_plan<T>(g, rowptr, col);
  if (use_lanes<T>(g)) {
    lane_blocks(g, f, rowptr, col);
    return conv_forward_lanes(g, f, x, gate, rowptr, val, bias, relu, y);
  }
  tiled_images(g, f, x, gate, rowptr, val, bias, relu, 1,
               [&](int64_t n) { return y + n * g.OC * g.OH * g.OW; },
               [](int64_t, int64_t, int64_t, const T*) {});
}

// Per axis of the input gradient, the polyphase view of a tap k (dilation d, padding p,
// stride s): input row u = s*q + a is reached from output row i = q + delta by taps with
// a = (k*d - p) mod s, delta = (a + p - k*d) / s. delta lies in [lo, hi]; hi <= 0 <= -lo
// holds when p <= d*(K-1), the only padding this path takes.
struct Phases {
  std::vector<int64_t> phase, delta;
  int64_t lo, hi;
};

inline Phases phases(int64_t K, int64_t d, int64_t p, int64_t s) {
  Phases r;
  r.lo = INT64_MAX;
  r.hi = INT64_MIN;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t a = ((k * d - p) % s + s) % s, delta = (a + p - k * d) / s;
    r.phase.push_back(a);
    r.delta.push_back(delta);
    r.lo = std::min(r.lo, delta);
    r.hi = std::max(r.hi, delta);
  }
  return r;
}

// Rows [c0, c1) of image n's input gradient from its phase planes sc ([C*S, Qh, Qw],
// channel c*S + a*sw + b holding gx[c, a + sh*q, b + sw*j]).
template <typename T>
void interleave(const Geom& g, int64_t Qh, int64_t Qw, const T* sc, int64_t c0, int64_t c1,
                T* gxn) {
  const int64_t S = g.sh * g.sw, Q = Qh * Qw;
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t u = 0; u < g.H; ++u) {
      const T* src = sc + (c * S + (u % g.sh) * g.sw) * Q + (u / g.sh) * Qw;
      T* dst = gxn + (c * g.H + u) * g.W;
      if (g.sw == 2) {
        const T* s1 = src + Q;
        const int64_t half = g.W / 2;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          dst[2 * j] = src[j];
          dst[2 * j + 1] = s1[j];
        }
        if (g.W % 2) dst[g.W - 1] = src[half];
      } else {
        for (int64_t v = 0; v < g.W; ++v) dst[v] = src[(v % g.sw) * Q + v / g.sw];
      }
    }
  }
}

// Input gradient of any stride from the forward CSR, as one stride-1 convolution of gy:
// each input channel c splits into S = sh*sw phase planes (c, a, b) holding the gradient
// at rows a + sh*q, columns b + sw*j, and a plane sees only the taps of its phase, at the
// shifts `phases` gives (for stride 1: the tap-flipped, transposed weight with padding
// d*(k-1)-p). That CSR (rows = phase planes) is rebuilt per call by a counting sort, O(nnz),
// so no transposed copy of the weight is cached. The convolution runs on the forward's
// tiled kernel; with S > 1 its phase planes go to a scratch buffer, interleaved into gx.
// Every MAC done is one of the forward's: no scatter and no zero-initialised output.
template <typename T, typename I>
void conv_grad_input_direct(const Geom& g, const T* gy, const T* gate, const int64_t* rowptr,
                            const I* col, const T* val, T* gx) {
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G, KK = g.KH * g.KW, nnz = rowptr[g.OC];
  const int64_t S = g.sh * g.sw;
  const Phases py = phases(g.KH, g.dh, g.ph, g.sh), px = phases(g.KW, g.dw, g.pw, g.sw);
  Geom t{};
  t.N = g.N; t.C = g.OC; t.H = g.OH; t.W = g.OW; t.OC = g.C * S; t.G = g.G;
  t.KH = py.hi - py.lo + 1; t.KW = px.hi - px.lo + 1;
  t.sh = t.sw = t.dh = t.dw = 1;
  t.ph = -py.lo; t.pw = -px.lo;
  t.OH = (g.H + g.sh - 1) / g.sh; t.OW = (g.W + g.sw - 1) / g.sw;
  const int64_t KT = t.KH * t.KW;
  // Per column code of the forward CSR, its row (phase plane, within the group) and column
  // code in the transposed CSR, tabulated once: per stored weight that is two lookups, not
  // the divisions that cost as much as a small layer's convolution (this runs every call).
  std::vector<int64_t> row_of(static_cast<size_t>(Cg * KK));
  std::vector<int32_t> code_of(static_cast<size_t>(Cg * KK));
  for (int64_t ky = 0; ky < g.KH; ++ky)
    for (int64_t kx = 0; kx < g.KW; ++kx) {
      const int64_t kk = ky * g.KW + kx;
      row_of[kk] = py.phase[ky] * g.sw + px.phase[kx];
      code_of[kk] = static_cast<int32_t>((py.delta[ky] - py.lo) * t.KW + px.delta[kx] - px.lo);
    }
  for (int64_t cl = 1; cl < Cg; ++cl)
    for (int64_t kk = 0; kk < KK; ++kk) {
      row_of[cl * KK + kk] = cl * S + row_of[kk];
      code_of[cl * KK + kk] = code_of[kk];
    }
  std::vector<int64_t> rpT(static_cast<size_t>(t.OC + 1), 0);
  for (int64_t oc = 0; oc < g.OC; ++oc) {
    int64_t* rp = rpT.data() + (oc / OCg) * Cg * S + 1;
    for (int64_t k = rowptr[oc]; k < rowptr[oc + 1]; ++k) ++rp[row_of[col[k]]];
  }
  for (int64_t r = 0; r < t.OC; ++r) rpT[r + 1] += rpT[r];
  std::vector<int64_t> fill(rpT.begin(), rpT.end() - 1);
  std::vector<int32_t> colT(static_cast<size_t>(nnz));
  std::vector<T> valT(static_cast<size_t>(nnz));
  for (int64_t oc = 0; oc < g.OC; ++oc) {
    int64_t* fl = fill.data() + (oc / OCg) * Cg * S;
    const int32_t base = static_cast<int32_t>((oc % OCg) * KT);
    // Reverse order within the row: for one input channel the shifted tap codes then rise.
    for (int64_t k = rowptr[oc + 1] - 1; k >= rowptr[oc]; --k) {
      const int64_t at = fl[row_of[col[k]]]++;
      colT[at] = base + code_of[col[k]];
      valT[at] = val[k];
    }
  }
  if (S == 1) {
    conv_forward_tiled<T, int32_t>(t, gy, gate, rpT.data(), colT.data(), valT.data(), nullptr,
                                   false, gx);
    return;
  }
  FlatPlan<T> f = flat_plan<T>(t, rpT.data(), colT.data());
  const int64_t planes = t.OC * t.OH * t.OW, image = g.C * g.H * g.W;
  if (use_lanes<T>(t)) {  // all images' phase planes, then interleaved
    lane_blocks(t, f, rpT.data(), colT.data());
    T* sc = scratch<T, 1>(static_cast<size_t>(g.N * planes));
    conv_forward_lanes<T>(t, f, gy, gate, rpT.data(), valT.data(), nullptr, false, sc);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < g.N; ++n)
      interleave(g, t.OH, t.OW, sc + n * planes, 0, g.C, gx + n * image);
    return;
  }
  // Image by image, into a scratch of one image's phase planes that stays in cache while it
  // is interleaved (all images' planes at once would make the interleave a memory pass).
  tiled_images<T>(t, f, gy, gate, rpT.data(), valT.data(), nullptr, false, S,
               [&](int64_t) { return scratch<T, 1>(static_cast<size_t>(planes)); },
               [&](int64_t n, int64_t oc0, int64_t oc1, const T* o) {
                 interleave(g, t.OH, t.OW, o, oc0 / S, oc1 / S, gx + n * image);
               });
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
  template void conv_forward_tiled<T, I>(const Geom&, const T*, const T*, const int64_t*,  \
                                         const I*, const T*, const T*, bool, T*);           \
  template void conv_grad_input_direct<T, I>(const Geom&, const T*, const T*,             \
                                             const int64_t*, const I*, const T*, T*);      \
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
