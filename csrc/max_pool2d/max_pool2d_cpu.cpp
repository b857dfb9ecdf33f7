// CPU kernels of the window max pool the attack path runs: kernel k x k, stride k (windows
// that do not overlap), no padding, dilation 1, floor mode; NCHW, raw pointers, OpenMP over
// the N*C planes (no torch headers). Each window's pick is aten's: the first maximum in
// row-major order, a NaN taken over anything and a later NaN over an earlier one. The
// forward stores the pick's offset in its window (one byte), so the backward writes every
// input gradient element once: no zero fill first.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace saf_mp {

// The planes are processed in groups of G whole planes with at least kMinRun outputs, so
// the loops over a group's outputs run long and vectorise (gathering the window's inputs,
// scattering its gradients) whatever the plane's size: a 4x4 or 2x2 plane has fewer outputs
// than one vector holds. A table computed once per call gives each output of a group its
// window's first input. Both loops are branch-free: the picks of real data are
// unpredictable.
constexpr int64_t kMinRun = 256;

struct Plan {
  int64_t k, H, W, OH, OW, P, G;
  std::vector<int32_t> first;  // per output of a group: its window's first input
};

inline Plan plan(int64_t H, int64_t W, int64_t k) {
  Plan s{k, H, W, H / k, W / k, (H / k) * (W / k), 1, {}};
  s.G = std::max<int64_t>(1, (kMinRun + s.P - 1) / s.P);
  s.first.resize(static_cast<size_t>(s.G * s.P));
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t o = 0; o < s.P; ++o)
      s.first[g * s.P + o] = static_cast<int32_t>(g * H * W + (o / s.OW) * k * W + (o % s.OW) * k);
  }
  return s;
}

template <typename T, int KC>
void forward_k(const T* x, int64_t planes, const Plan& s, T* y, uint8_t* idx) {
  const int64_t k = KC ? KC : s.k, W = s.W, groups = (planes + s.G - 1) / s.G;
  const int32_t* first = s.first.data();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t n = std::min(s.G, planes - q * s.G) * s.P;  // outputs of this group
    const T* xq = x + q * s.G * s.H * W;
    T* yq = y + q * s.G * s.P;
    uint8_t* iq = idx + q * s.G * s.P;
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      const T* b = xq + first[o];
      T best = -std::numeric_limits<T>::infinity();
      int at = 0;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = 0; j < k; ++j) {
          const T v = b[i * W + j];
          const bool take = v > best || v != v;  // v != v: NaN
          best = take ? v : best;
          at = take ? static_cast<int>(i * k + j) : at;
        }
      }
      yq[o] = best;
      iq[o] = static_cast<uint8_t>(at);
    }
  }
}

template <typename T, int KC>
void backward_k(const T* gy, const uint8_t* idx, int64_t planes, const Plan& s, T* gx) {
  const int64_t k = KC ? KC : s.k, W = s.W, HW = s.H * W, groups = (planes + s.G - 1) / s.G;
  const int32_t* first = s.first.data();
  const bool ragged = s.OH * k != s.H || s.OW * k != W;
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < groups; ++q) {
    const int64_t np = std::min(s.G, planes - q * s.G), n = np * s.P;
    const T* gq = gy + q * s.G * s.P;
    const uint8_t* iq = idx + q * s.G * s.P;
    T* xq = gx + q * s.G * HW;
    if (ragged) {  // inputs past the last window row or column take no gradient
      for (int64_t p = 0; p < np; ++p)
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t w = (h < s.OH * k ? s.OW * k : 0); w < W; ++w) xq[p * HW + h * W + w] = T(0);
    }
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) {
      T* b = xq + first[o];
      const T g = gq[o];
      const int at = iq[o];
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < k; ++j) b[i * W + j] = at == i * k + j ? g : T(0);
    }
  }
}

// The input gradient row by row, for planes at least kRowWindows windows wide: each row
// is written once, front to back (the scattered stores of backward_k would read every
// line before writing it), its picks and gradients read from one row of windows.
constexpr int64_t kRowWindows = 16;

template <typename T, int KC>
void backward_rows(const T* gy, const uint8_t* idx, int64_t planes, int64_t H, int64_t W,
                   int64_t kr, T* gx) {
  const int64_t k = KC ? KC : kr, OH = H / k, OW = W / k;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const T* gp = gy + p * OH * OW;
    const uint8_t* ip = idx + p * OH * OW;
    T* xp = gx + p * H * W;
    for (int64_t h = 0; h < H; ++h) {
      T* row = xp + h * W;
      const int64_t oh = h / k;
      if (oh >= OH) {  // rows below the last window (floor mode)
        for (int64_t w = 0; w < W; ++w) row[w] = T(0);
        continue;
      }
      const int64_t base = (h % k) * k;
      const T* g = gp + oh * OW;
      const uint8_t* pick = ip + oh * OW;
#pragma omp simd
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t j = 0; j < k; ++j)
          row[ow * k + j] = pick[ow] == base + j ? g[ow] : T(0);
      for (int64_t w = OW * k; w < W; ++w) row[w] = T(0);  // columns past the last window
    }
  }
}

template <typename T>
void forward(const T* x, int64_t planes, int64_t H, int64_t W, int64_t k, T* y, uint8_t* idx) {
  const Plan s = plan(H, W, k);
  if (k == 2) return forward_k<T, 2>(x, planes, s, y, idx);
  if (k == 3) return forward_k<T, 3>(x, planes, s, y, idx);
  forward_k<T, 0>(x, planes, s, y, idx);
}

template <typename T>
void backward(const T* gy, const uint8_t* idx, int64_t planes, int64_t H, int64_t W, int64_t k,
              T* gx) {
  if (W / k >= kRowWindows) {
    if (k == 2) return backward_rows<T, 2>(gy, idx, planes, H, W, k, gx);
    return backward_rows<T, 0>(gy, idx, planes, H, W, k, gx);
  }
  const Plan s = plan(H, W, k);
  if (k == 2) return backward_k<T, 2>(gy, idx, planes, s, gx);
  if (k == 3) return backward_k<T, 3>(gy, idx, planes, s, gx);
  backward_k<T, 0>(gy, idx, planes, s, gx);
}

template void forward<float>(const float*, int64_t, int64_t, int64_t, int64_t, float*, uint8_t*);
template void forward<double>(const double*, int64_t, int64_t, int64_t, int64_t, double*,
                              uint8_t*);
template void backward<float>(const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t,
                              float*);
template void backward<double>(const double*, const uint8_t*, int64_t, int64_t, int64_t,
                               int64_t, double*);

}  // namespace saf_mp
