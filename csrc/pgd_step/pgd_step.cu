// CUDA kernels of the fused PGD step and random start, behind extern "C" launchers
// (raw pointers, sizes, a cudaStream_t): no torch header, so the file builds with nvcc alone.
//
// L-inf mirrors the torch reference's roundings exactly: every intermediate is computed in
// torch's "opmath" type (float for fp32/fp16/bf16, double for fp64) and rounded to the
// storage type where torch stores a tensor. The _rn intrinsics keep nvcc from contracting
// x + eps*noise into an FMA (the build passes --use_fast_math). Caveat: --use_fast_math
// also flushes fp32 denormals to zero, which torch does not, so inputs/outputs in the
// denormal range (|v| < 1.2e-38) may differ; image data in [0, 1] never has them.
// NaN: a NaN gradient counts as sign 0 (the reference would give NaN).
//
// L2 needs two per-sample norms: |g| and |x_adv + a*g - x|. One read of the inputs gives
// both through |d + a*g|^2 = |d|^2 + 2a<d,g> + a^2|g|^2 (d = x_adv - x), accumulated in
// double. Kernel 1 writes per-(sample, chunk) partial sums; kernel 2 reduces a sample's
// partials in a fixed order (deterministic, no atomics) and applies the step.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxChunks = 128;
constexpr int64_t kChunkTarget = 1024;  // elements per block in the per-sample kernels
constexpr double kTiny = 1e-12;         // same guard as the torch reference
constexpr int kMaxDevices = 64;

// ---- storage type <-> opmath type ----------------------------------------------------
template <typename T> struct Tr;
template <> struct Tr<float> {
  using A = float;
  static __device__ __forceinline__ A ld(float v) { return v; }
  static __device__ __forceinline__ float st(A v) { return v; }
  static __host__ __device__ __forceinline__ A from_double(double v) { return float(v); }
};
template <> struct Tr<double> {
  using A = double;
  static __device__ __forceinline__ A ld(double v) { return v; }
  static __device__ __forceinline__ double st(A v) { return v; }
  static __host__ __device__ __forceinline__ A from_double(double v) { return v; }
};
template <> struct Tr<__half> {
  using A = float;
  static __device__ __forceinline__ A ld(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half st(A v) { return __float2half_rn(v); }
  static __host__ __device__ __forceinline__ A from_double(double v) { return float(v); }
};
template <> struct Tr<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A ld(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 st(A v) { return __float2bfloat16_rn(v); }
  static __host__ __device__ __forceinline__ A from_double(double v) { return float(v); }
};

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Round an opmath value to the storage type and back (a no-op for fp32 / fp64).
template <typename T>
__device__ __forceinline__ typename Tr<T>::A rnd(typename Tr<T>::A v) {
  return Tr<T>::ld(Tr<T>::st(v));
}

template <typename A>
__device__ __forceinline__ A clamp_to(A v, A lo, A hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// 16 bytes of T: one 128-bit load or store.
template <typename T> struct alignas(16) Vec {
  static constexpr int K = 16 / sizeof(T);
  T v[K];
};

// Scalars as the reference sees them.
template <typename T> struct LinfParams {
  using A = typename Tr<T>::A;
  A step;   // alpha rounded as torch's `alpha * sign(g)` stores it
  A eps;    // opmath eps for `x - eps`, `x + eps`
  A lo, hi; // clamp bounds in the storage type
};

template <typename T>
__device__ __forceinline__ T linf_one(T xa, T g, T x, const LinfParams<T>& p) {
  using A = typename Tr<T>::A;
  const A gv = Tr<T>::ld(g);
  const A s = gv > A(0) ? p.step : (gv < A(0) ? -p.step : A(0));
  A v = rnd<T>(add_rn(Tr<T>::ld(xa), s));
  const A xv = Tr<T>::ld(x);
  const A xl = rnd<T>(sub_rn(xv, p.eps));
  const A xh = rnd<T>(add_rn(xv, p.eps));
  v = v < xl ? xl : v;
  v = v > xh ? xh : v;
  return Tr<T>::st(clamp_to(v, p.lo, p.hi));
}

template <typename T>
__device__ __forceinline__ T linf_init_one(T x, T noise, typename Tr<T>::A eps,
                                           typename Tr<T>::A lo, typename Tr<T>::A hi) {
  using A = typename Tr<T>::A;
  const A r = rnd<T>(mul_rn(eps, Tr<T>::ld(noise)));
  return Tr<T>::st(clamp_to(rnd<T>(add_rn(Tr<T>::ld(x), r)), lo, hi));
}

// ---- L-inf: flat elementwise ----------------------------------------------------------
// xa and out may be the same buffer (in-place form), so neither is __restrict__.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
linf_step_kernel(const T* xa, const T* __restrict__ g, const T* __restrict__ x, T* out,
                 int64_t n, LinfParams<T> p) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (VEC) {
    constexpr int K = Vec<T>::K;
    const int64_t nv = n / K;
    for (int64_t j = i; j < nv; j += stride) {
      const Vec<T> a = reinterpret_cast<const Vec<T>*>(xa)[j];
      const Vec<T> b = reinterpret_cast<const Vec<T>*>(g)[j];
      const Vec<T> c = reinterpret_cast<const Vec<T>*>(x)[j];
      Vec<T> r;
#pragma unroll
      for (int k = 0; k < K; ++k) r.v[k] = linf_one<T>(a.v[k], b.v[k], c.v[k], p);
      reinterpret_cast<Vec<T>*>(out)[j] = r;
    }
    done = nv * K;
  }
  for (int64_t j = done + i; j < n; j += stride) out[j] = linf_one<T>(xa[j], g[j], x[j], p);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
linf_init_kernel(const T* __restrict__ x, const T* __restrict__ noise, T* __restrict__ out,
                 int64_t n, typename Tr<T>::A eps, typename Tr<T>::A lo, typename Tr<T>::A hi) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (VEC) {
    constexpr int K = Vec<T>::K;
    const int64_t nv = n / K;
    for (int64_t j = i; j < nv; j += stride) {
      const Vec<T> a = reinterpret_cast<const Vec<T>*>(x)[j];
      const Vec<T> b = reinterpret_cast<const Vec<T>*>(noise)[j];
      Vec<T> r;
#pragma unroll
      for (int k = 0; k < K; ++k) r.v[k] = linf_init_one<T>(a.v[k], b.v[k], eps, lo, hi);
      reinterpret_cast<Vec<T>*>(out)[j] = r;
    }
    done = nv * K;
  }
  for (int64_t j = done + i; j < n; j += stride) out[j] = linf_init_one<T>(x[j], noise[j], eps, lo, hi);
}

// ---- per-sample reductions -------------------------------------------------------------
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (*smem)[kWarps]) {
#pragma unroll
  for (int k = 0; k < N; ++k)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) smem[k][warp] = v[k];
  __syncthreads();
  if (threadIdx.x == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) {
      double s = 0;
      for (int w = 0; w < kWarps; ++w) s += smem[k][w];
      v[k] = s;
    }
}

struct Plan {
  int chunks;     // per sample
  int64_t chunk;  // elements per chunk, a multiple of 8 (the widest Vec)
};

__host__ __device__ Plan make_plan(int64_t d) {
  int64_t c = (d + kChunkTarget - 1) / kChunkTarget;
  c = c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c);
  int64_t chunk = (d + c - 1) / c;
  chunk = (chunk + 7) / 8 * 8;
  const int64_t used = chunk > 0 ? (d + chunk - 1) / chunk : 1;
  return Plan{int(used < 1 ? 1 : used), chunk < 8 ? 8 : chunk};
}

// Kernel 1 of the L2 step: partial |d|^2, <d,g>, |g|^2 of one chunk of one sample.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
l2_sums_kernel(const T* __restrict__ xa, const T* __restrict__ g, const T* __restrict__ x,
               int64_t d, Plan plan, double* __restrict__ ws) {
  __shared__ double smem[3][kWarps];
  const int64_t lo = int64_t(blockIdx.x) * plan.chunk;
  const int64_t hi = lo + plan.chunk < d ? lo + plan.chunk : d;
  {
    const int64_t s = blockIdx.y;
    const int64_t o = s * d;
    double v[3] = {0, 0, 0};
    int64_t start = lo;
    if (VEC) {
      constexpr int K = Vec<T>::K;
      const int64_t nv = (hi - lo) / K;
      const Vec<T>* va = reinterpret_cast<const Vec<T>*>(xa + o + lo);
      const Vec<T>* vg = reinterpret_cast<const Vec<T>*>(g + o + lo);
      const Vec<T>* vx = reinterpret_cast<const Vec<T>*>(x + o + lo);
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
        const Vec<T> a = va[j], gg = vg[j], c = vx[j];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const double gv = Tr<T>::ld(gg.v[k]);
          const double dv = double(Tr<T>::ld(a.v[k])) - double(Tr<T>::ld(c.v[k]));
          v[0] += dv * dv;
          v[1] += dv * gv;
          v[2] += gv * gv;
        }
      }
      start = lo + nv * K;
    }
    for (int64_t j = start + threadIdx.x; j < hi; j += kThreads) {
      const double gv = Tr<T>::ld(g[o + j]);
      const double dv = double(Tr<T>::ld(xa[o + j])) - double(Tr<T>::ld(x[o + j]));
      v[0] += dv * dv;
      v[1] += dv * gv;
      v[2] += gv * gv;
    }
    block_sum<3>(v, smem);
    if (threadIdx.x == 0) {
      double* w = ws + (s * plan.chunks + blockIdx.x) * 3;
      w[0] = v[0];
      w[1] = v[1];
      w[2] = v[2];
    }
  }
}

// Between the two passes of the L2 step, one thread per sample sums its chunk partials in
// a fixed order (deterministic) and turns them into a = alpha/(|g| + tiny) and
// scale = min(eps/(|x_adv + a*g - x| + tiny), 1).
__global__ void __launch_bounds__(kThreads)
l2_coef_kernel(const double* __restrict__ part, int chunks, int64_t nb, double alpha, double eps,
               double* __restrict__ coef) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= nb) return;
  double dd = 0, dg = 0, gg = 0;
  for (int c = 0; c < chunks; ++c) {
    const double* p = part + (s * chunks + c) * 3;
    dd += p[0];
    dg += p[1];
    gg += p[2];
  }
  const double a = alpha / (sqrt(gg) + kTiny);
  const double dn2 = dd + 2.0 * a * dg + a * a * gg;
  const double sc = eps / (sqrt(dn2 > 0 ? dn2 : 0.0) + kTiny);
  coef[2 * s] = a;
  coef[2 * s + 1] = sc < 1.0 ? sc : 1.0;
}

// L2 start: radius eps*u^(1/d) with u = min(|noise[d]|, 1), over the direction's norm.
template <typename T>
__global__ void __launch_bounds__(kThreads)
l2_init_coef_kernel(const double* __restrict__ part, int chunks, const T* __restrict__ noise,
                    int64_t d, int64_t nb, double eps, double* __restrict__ coef) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= nb) return;
  double nn = 0;
  for (int c = 0; c < chunks; ++c) nn += part[s * chunks + c];
  double u = fabs(double(Tr<T>::ld(noise[s * (d + 1) + d])));
  u = u < 1.0 ? u : 1.0;
  coef[s] = eps * pow(u, 1.0 / double(d)) / (sqrt(nn) + kTiny);
}

// Kernel 2 of the L2 step: nxt = x_adv + a*g; delta = nxt - x; out = clamp(x + scale*delta),
// the reference's order, with a = alpha/(|g| + tiny), scale = min(eps/(|delta| + tiny), 1).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
l2_apply_kernel(const T* xa, const T* __restrict__ g, const T* __restrict__ x, T* out,
                int64_t d, Plan plan, const double* __restrict__ coef,
                typename Tr<T>::A lo_, typename Tr<T>::A hi_) {
  using A = typename Tr<T>::A;
  const int64_t lo = int64_t(blockIdx.x) * plan.chunk;
  const int64_t hi = lo + plan.chunk < d ? lo + plan.chunk : d;
  {
    const int64_t s = blockIdx.y;
    const A a = A(coef[2 * s]), sc = A(coef[2 * s + 1]);
    const int64_t o = s * d;
    int64_t start = lo;
    if (VEC) {
      constexpr int K = Vec<T>::K;
      const int64_t nv = (hi - lo) / K;
      const Vec<T>* va = reinterpret_cast<const Vec<T>*>(xa + o + lo);
      const Vec<T>* vg = reinterpret_cast<const Vec<T>*>(g + o + lo);
      const Vec<T>* vx = reinterpret_cast<const Vec<T>*>(x + o + lo);
      Vec<T>* vo = reinterpret_cast<Vec<T>*>(out + o + lo);
      for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
        const Vec<T> p = va[j], q = vg[j], c = vx[j];
        Vec<T> r;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const A xv = Tr<T>::ld(c.v[k]);
          const A nxt = add_rn(Tr<T>::ld(p.v[k]), mul_rn(a, Tr<T>::ld(q.v[k])));
          const A delta = sub_rn(nxt, xv);
          r.v[k] = Tr<T>::st(clamp_to(add_rn(xv, mul_rn(sc, delta)), lo_, hi_));
        }
        vo[j] = r;
      }
      start = lo + nv * K;
    }
    for (int64_t j = start + threadIdx.x; j < hi; j += kThreads) {
      const A xv = Tr<T>::ld(x[o + j]);
      const A nxt = add_rn(Tr<T>::ld(xa[o + j]), mul_rn(a, Tr<T>::ld(g[o + j])));
      const A delta = sub_rn(nxt, xv);
      out[o + j] = Tr<T>::st(clamp_to(add_rn(xv, mul_rn(sc, delta)), lo_, hi_));
    }
  }
}

// L2 random start: noise rows are (d + 1) long (direction, then the radius draw u), so
// they are not 16-byte aligned in general; scalar loads.
template <typename T>
__global__ void __launch_bounds__(kThreads)
l2_init_sums_kernel(const T* __restrict__ noise, int64_t d, Plan plan,
                    double* __restrict__ ws) {
  __shared__ double smem[1][kWarps];
  const int64_t lo = int64_t(blockIdx.x) * plan.chunk;
  const int64_t hi = lo + plan.chunk < d ? lo + plan.chunk : d;
  {
    const int64_t s = blockIdx.y;
    const T* ns = noise + s * (d + 1);
    double v[1] = {0};
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      const double nv = Tr<T>::ld(ns[j]);
      v[0] += nv * nv;
    }
    block_sum<1>(v, smem);
    if (threadIdx.x == 0) ws[s * plan.chunks + blockIdx.x] = v[0];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
l2_init_apply_kernel(const T* __restrict__ x, const T* __restrict__ noise, T* __restrict__ out,
                     int64_t d, const Plan plan, const double* __restrict__ coef,
                     typename Tr<T>::A lo_, typename Tr<T>::A hi_) {
  using A = typename Tr<T>::A;
  const int64_t lo = int64_t(blockIdx.x) * plan.chunk;
  const int64_t hi = lo + plan.chunk < d ? lo + plan.chunk : d;
  {
    const int64_t s = blockIdx.y;
    const T* ns = noise + s * (d + 1);
    const A r = A(coef[s]);
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      const A xv = Tr<T>::ld(x[s * d + j]);
      out[s * d + j] = Tr<T>::st(clamp_to(add_rn(xv, mul_rn(Tr<T>::ld(ns[j]), r)), lo_, hi_));
    }
  }
}

// ---- host side -------------------------------------------------------------------------
const char* status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int sm_count() {
  static int cache[kMaxDevices] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev < 0 || dev >= kMaxDevices) return 132;
  if (cache[dev] == 0) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = v > 0 ? v : 132;
  }
  return cache[dev];
}

// Enough blocks to fill the card (8 resident blocks of 256 per SM), fewer for small inputs.
unsigned grid_for(int64_t work) {
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sm_count()) * 8;
  return unsigned(want < 1 ? 1 : (want < cap ? want : cap));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// grid.y is at most 65535: larger batches go in slices of that many samples.
constexpr int64_t kMaxGridY = 65535;

dim3 sample_grid(const Plan& plan, int64_t b) {
  return dim3(unsigned(plan.chunks), unsigned(b < kMaxGridY ? b : kMaxGridY));
}

template <typename T>
LinfParams<T> linf_params(double alpha, double eps, double lo, double hi) {
  LinfParams<T> p;
  // torch stores alpha*sign(g) in the tensor's dtype: round alpha via opmath to storage.
  p.step = Tr<T>::from_double(alpha);
  p.eps = Tr<T>::from_double(eps);
  p.lo = Tr<T>::from_double(lo);
  p.hi = Tr<T>::from_double(hi);
  return p;
}

// Host-side rounding of an opmath scalar to the storage type (fp16 / bf16 only).
float host_round(float v, int dtype) {
  if (dtype == 2) return __half2float(__float2half_rn(v));
  if (dtype == 3) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

template <typename T>
const char* launch_linf_step(const void* xa, const void* g, const void* x, void* out, int64_t n,
                             double alpha, double eps, double lo, double hi, int dtype,
                             cudaStream_t st) {
  LinfParams<T> p = linf_params<T>(alpha, eps, lo, hi);
  if constexpr (sizeof(T) == 2) {
    p.step = host_round(p.step, dtype);
    p.lo = host_round(p.lo, dtype);
    p.hi = host_round(p.hi, dtype);
  }
  const T* a = static_cast<const T*>(xa);
  const T* b = static_cast<const T*>(g);
  const T* c = static_cast<const T*>(x);
  T* o = static_cast<T*>(out);
  const bool vec = aligned16(a) && aligned16(b) && aligned16(c) && aligned16(o);
  if (vec)
    linf_step_kernel<T, true><<<grid_for(n / Vec<T>::K + 1), kThreads, 0, st>>>(a, b, c, o, n, p);
  else
    linf_step_kernel<T, false><<<grid_for(n), kThreads, 0, st>>>(a, b, c, o, n, p);
  return status();
}

template <typename T>
const char* launch_linf_init(const void* x, const void* noise, void* out, int64_t n, double eps,
                             double lo, double hi, int dtype, cudaStream_t st) {
  using A = typename Tr<T>::A;
  A e = Tr<T>::from_double(eps), l = Tr<T>::from_double(lo), h = Tr<T>::from_double(hi);
  if constexpr (sizeof(T) == 2) {
    l = host_round(l, dtype);
    h = host_round(h, dtype);
  }
  const T* a = static_cast<const T*>(x);
  const T* b = static_cast<const T*>(noise);
  T* o = static_cast<T*>(out);
  if (aligned16(a) && aligned16(b) && aligned16(o))
    linf_init_kernel<T, true><<<grid_for(n / Vec<T>::K + 1), kThreads, 0, st>>>(a, b, o, n, e, l, h);
  else
    linf_init_kernel<T, false><<<grid_for(n), kThreads, 0, st>>>(a, b, o, n, e, l, h);
  return status();
}

template <typename T>
const char* launch_l2_step(const void* xa, const void* g, const void* x, void* out, int64_t b,
                           int64_t d, double alpha, double eps, double lo, double hi, int dtype,
                           double* ws, cudaStream_t st) {
  using A = typename Tr<T>::A;
  A l = Tr<T>::from_double(lo), h = Tr<T>::from_double(hi);
  if constexpr (sizeof(T) == 2) {
    l = host_round(l, dtype);
    h = host_round(h, dtype);
  }
  const Plan plan = make_plan(d);
  const bool vec = d % Vec<T>::K == 0 && aligned16(xa) && aligned16(g) && aligned16(x) &&
                   aligned16(out);
  for (int64_t s0 = 0; s0 < b; s0 += kMaxGridY) {
    const dim3 grid = sample_grid(plan, b - s0);
    const T* pa = static_cast<const T*>(xa) + s0 * d;
    const T* pg = static_cast<const T*>(g) + s0 * d;
    const T* px = static_cast<const T*>(x) + s0 * d;
    T* po = static_cast<T*>(out) + s0 * d;
    const int64_t nb = grid.y;
    double* w = ws + s0 * plan.chunks * 3;
    double* cf = ws + b * plan.chunks * 3 + s0 * 2;
    if (vec)
      l2_sums_kernel<T, true><<<grid, kThreads, 0, st>>>(pa, pg, px, d, plan, w);
    else
      l2_sums_kernel<T, false><<<grid, kThreads, 0, st>>>(pa, pg, px, d, plan, w);
    l2_coef_kernel<<<unsigned((nb + kThreads - 1) / kThreads), kThreads, 0, st>>>(
        w, plan.chunks, nb, alpha, eps, cf);
    if (vec)
      l2_apply_kernel<T, true><<<grid, kThreads, 0, st>>>(pa, pg, px, po, d, plan, cf, l, h);
    else
      l2_apply_kernel<T, false><<<grid, kThreads, 0, st>>>(pa, pg, px, po, d, plan, cf, l, h);
  }
  return status();
}

template <typename T>
const char* launch_l2_init(const void* x, const void* noise, void* out, int64_t b, int64_t d,
                           double eps, double lo, double hi, int dtype, double* ws,
                           cudaStream_t st) {
  using A = typename Tr<T>::A;
  A l = Tr<T>::from_double(lo), h = Tr<T>::from_double(hi);
  if constexpr (sizeof(T) == 2) {
    l = host_round(l, dtype);
    h = host_round(h, dtype);
  }
  const Plan plan = make_plan(d);
  for (int64_t s0 = 0; s0 < b; s0 += kMaxGridY) {
    const dim3 grid = sample_grid(plan, b - s0);
    const T* px = static_cast<const T*>(x) + s0 * d;
    const T* pn = static_cast<const T*>(noise) + s0 * (d + 1);
    T* po = static_cast<T*>(out) + s0 * d;
    const int64_t nb = grid.y;
    double* w = ws + s0 * plan.chunks * 3;
    double* cf = ws + b * plan.chunks * 3 + s0 * 2;
    l2_init_sums_kernel<T><<<grid, kThreads, 0, st>>>(pn, d, plan, w);
    l2_init_coef_kernel<T><<<unsigned((nb + kThreads - 1) / kThreads), kThreads, 0, st>>>(
        w, plan.chunks, pn, d, nb, eps, cf);
    l2_init_apply_kernel<T><<<grid, kThreads, 0, st>>>(px, pn, po, d, plan, cf, l, h);
  }
  return status();
}

const char* bad_dtype() { return "pgd_step.cu: unsupported dtype code"; }

}  // namespace

// dtype codes: 0 fp32, 1 fp64, 2 fp16, 3 bf16. Launchers return nullptr or an error string.
extern "C" {

const char* saf_pgd_step_linf(int dtype, const void* xa, const void* g, const void* x, void* out,
                              int64_t n, double alpha, double eps, double lo, double hi,
                              cudaStream_t stream) {
  if (n <= 0) return nullptr;
  switch (dtype) {
    case 0: return launch_linf_step<float>(xa, g, x, out, n, alpha, eps, lo, hi, dtype, stream);
    case 1: return launch_linf_step<double>(xa, g, x, out, n, alpha, eps, lo, hi, dtype, stream);
    case 2: return launch_linf_step<__half>(xa, g, x, out, n, alpha, eps, lo, hi, dtype, stream);
    case 3:
      return launch_linf_step<__nv_bfloat16>(xa, g, x, out, n, alpha, eps, lo, hi, dtype, stream);
    default: return bad_dtype();
  }
}

// Doubles of scratch the L2 launchers need for b samples of d elements.
int64_t saf_pgd_l2_workspace(int64_t b, int64_t d) {
  // chunk partials (3 per chunk), then 2 coefficients per sample
  return (b > 0 ? b : 1) * (int64_t(make_plan(d).chunks) * 3 + 2);
}

const char* saf_pgd_step_l2(int dtype, const void* xa, const void* g, const void* x, void* out,
                            int64_t b, int64_t d, double alpha, double eps, double lo,
                            double hi, double* workspace, cudaStream_t stream) {
  if (b <= 0 || d <= 0) return nullptr;
  switch (dtype) {
    case 0:
      return launch_l2_step<float>(xa, g, x, out, b, d, alpha, eps, lo, hi, dtype, workspace,
                                   stream);
    case 1:
      return launch_l2_step<double>(xa, g, x, out, b, d, alpha, eps, lo, hi, dtype, workspace,
                                    stream);
    case 2:
      return launch_l2_step<__half>(xa, g, x, out, b, d, alpha, eps, lo, hi, dtype, workspace,
                                    stream);
    case 3:
      return launch_l2_step<__nv_bfloat16>(xa, g, x, out, b, d, alpha, eps, lo, hi, dtype,
                                           workspace, stream);
    default: return bad_dtype();
  }
}

const char* saf_pgd_init_linf(int dtype, const void* x, const void* noise, void* out, int64_t n,
                              double eps, double lo, double hi, cudaStream_t stream) {
  if (n <= 0) return nullptr;
  switch (dtype) {
    case 0: return launch_linf_init<float>(x, noise, out, n, eps, lo, hi, dtype, stream);
    case 1: return launch_linf_init<double>(x, noise, out, n, eps, lo, hi, dtype, stream);
    case 2: return launch_linf_init<__half>(x, noise, out, n, eps, lo, hi, dtype, stream);
    case 3: return launch_linf_init<__nv_bfloat16>(x, noise, out, n, eps, lo, hi, dtype, stream);
    default: return bad_dtype();
  }
}

const char* saf_pgd_init_l2(int dtype, const void* x, const void* noise, void* out, int64_t b,
                            int64_t d, double eps, double lo, double hi, double* workspace,
                            cudaStream_t stream) {
  if (b <= 0 || d <= 0) return nullptr;
  switch (dtype) {
    case 0:
      return launch_l2_init<float>(x, noise, out, b, d, eps, lo, hi, dtype, workspace, stream);
    case 1:
      return launch_l2_init<double>(x, noise, out, b, d, eps, lo, hi, dtype, workspace, stream);
    case 2:
      return launch_l2_init<__half>(x, noise, out, b, d, eps, lo, hi, dtype, workspace, stream);
    case 3:
      return launch_l2_init<__nv_bfloat16>(x, noise, out, b, d, eps, lo, hi, dtype, workspace,
                                           stream);
    default: return bad_dtype();
  }
}

}  // extern "C"
