// CUDA kernels for masked_conv2d (fp32, NCHW): direct convolution that skips pruned
// weights, its input gradient, and a block-per-weight reduction for the weight gradient
// that writes exact zeros at pruned positions. Only cuda_runtime.h; extern "C" launchers.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

struct Geom {
  int64_t N, C, H, W, OC, KH, KW, G, sh, sw, ph, pw, dh, dw, OH, OW;
};

constexpr int THREADS = 256;

__global__ void __launch_bounds__(THREADS)
conv_fwd(Geom g, const float* __restrict__ x, const float* __restrict__ w,
         const uint8_t* __restrict__ mask, const float* __restrict__ bias,
         float* __restrict__ y) {
  const int64_t total = g.N * g.OC * g.OH * g.OW;
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = i % g.OW, oh = (i / g.OW) % g.OH, oc = (i / (g.OW * g.OH)) % g.OC;
    const int64_t n = i / (g.OW * g.OH * g.OC);
    const int64_t c0 = (oc / OCg) * Cg;
    float s = bias != nullptr ? bias[oc] : 0.f;
    for (int64_t cl = 0; cl < Cg; ++cl) {
      const float* xp = x + (n * g.C + c0 + cl) * g.H * g.W;
      const int64_t wbase = (oc * Cg + cl) * g.KH * g.KW;
      for (int64_t ky = 0; ky < g.KH; ++ky) {
        const int64_t ih = oh * g.sh - g.ph + ky * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kx = 0; kx < g.KW; ++kx) {
          const int64_t iw = ow * g.sw - g.pw + kx * g.dw;
          const int64_t wi = wbase + ky * g.KW + kx;
          if (iw < 0 || iw >= g.W || mask[wi] == 0) continue;
          s += w[wi] * xp[ih * g.W + iw];
        }
      }
    }
    y[i] = s;
  }
}

__global__ void __launch_bounds__(THREADS)
conv_grad_in(Geom g, const float* __restrict__ gy, const float* __restrict__ w,
             const uint8_t* __restrict__ mask, float* __restrict__ gx) {
  const int64_t total = g.N * g.C * g.H * g.W;
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = i % g.W, ih = (i / g.W) % g.H, c = (i / (g.W * g.H)) % g.C;
    const int64_t n = i / (g.W * g.H * g.C);
    const int64_t grp = c / Cg, cl = c % Cg;
    float s = 0.f;
    for (int64_t ocl = 0; ocl < OCg; ++ocl) {
      const int64_t oc = grp * OCg + ocl;
      const float* gyp = gy + (n * g.OC + oc) * g.OH * g.OW;
      const int64_t wbase = (oc * Cg + cl) * g.KH * g.KW;
      for (int64_t ky = 0; ky < g.KH; ++ky) {
        const int64_t ty = ih + g.ph - ky * g.dh;
        if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.OH) continue;
        const int64_t oh = ty / g.sh;
        for (int64_t kx = 0; kx < g.KW; ++kx) {
          const int64_t tx = iw + g.pw - kx * g.dw;
          const int64_t wi = wbase + ky * g.KW + kx;
          if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.OW || mask[wi] == 0) continue;
          s += w[wi] * gyp[oh * g.OW + tx / g.sw];
        }
      }
    }
    gx[i] = s;
  }
}

// One block per weight entry: sum over (n, oh, ow); pruned entries write 0 and skip work.
__global__ void __launch_bounds__(THREADS)
conv_grad_w(Geom g, const float* __restrict__ gy, const float* __restrict__ x,
            const uint8_t* __restrict__ mask, float* __restrict__ gw) {
  const int64_t wi = blockIdx.x;
  if (mask[wi] == 0) {
    if (threadIdx.x == 0) gw[wi] = 0.f;
    return;
  }
  const int64_t Cg = g.C / g.G, OCg = g.OC / g.G;
  const int64_t kx = wi % g.KW, ky = (wi / g.KW) % g.KH, cl = (wi / (g.KW * g.KH)) % Cg;
  const int64_t oc = wi / (g.KW * g.KH * Cg);
  const int64_t c = (oc / OCg) * Cg + cl;
  const int64_t P = g.OH * g.OW, total = g.N * P;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < total; j += blockDim.x) {
    const int64_t n = j / P, p = j % P, oh = p / g.OW, ow = p % g.OW;
    const int64_t ih = oh * g.sh - g.ph + ky * g.dh, iw = ow * g.sw - g.pw + kx * g.dw;
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
    s += gy[(n * g.OC + oc) * P + p] * x[((n * g.C + c) * g.H + ih) * g.W + iw];
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  __shared__ float warp_sums[THREADS / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (threadIdx.x == 0) gw[wi] = s;
  }
}

Geom to_geom(const int64_t* v) {
  return Geom{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7],
              v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + THREADS - 1) / THREADS;
  return static_cast<unsigned>(b < 65535 * 32 ? (b > 0 ? b : 1) : 65535 * 32);
}

}  // namespace

extern "C" {

int saf_mc_forward_f32(const int64_t* geom, const float* x, const float* w,
                       const uint8_t* mask, const float* b, float* y, cudaStream_t stream) {
  const Geom g = to_geom(geom);
  const int64_t total = g.N * g.OC * g.OH * g.OW;
  if (total == 0) return 0;
  conv_fwd<<<blocks_for(total), THREADS, 0, stream>>>(g, x, w, mask, b, y);
  return static_cast<int>(cudaGetLastError());
}

int saf_mc_grad_input_f32(const int64_t* geom, const float* gy, const float* w,
                          const uint8_t* mask, float* gx, cudaStream_t stream) {
  const Geom g = to_geom(geom);
  const int64_t total = g.N * g.C * g.H * g.W;
  if (total == 0) return 0;
  conv_grad_in<<<blocks_for(total), THREADS, 0, stream>>>(g, gy, w, mask, gx);
  return static_cast<int>(cudaGetLastError());
}

int saf_mc_grad_weight_f32(const int64_t* geom, const float* gy, const float* x,
                           const uint8_t* mask, float* gw, cudaStream_t stream) {
  const Geom g = to_geom(geom);
  const int64_t nw = g.OC * (g.C / g.G) * g.KH * g.KW;
  if (nw == 0) return 0;
  if (nw > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  conv_grad_w<<<static_cast<unsigned>(nw), THREADS, 0, stream>>>(g, gy, x, mask, gw);
  return static_cast<int>(cudaGetLastError());
}

const char* saf_mc_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
