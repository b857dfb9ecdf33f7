// CUDA kernels for masked_linear: one tiled GEMM with the mask applied as weight tiles
// load (forward / grad_input) or in the epilogue (grad_weight). fp32/fp64 accumulate in
// their own type, fp16/bf16 in fp32. Only the CUDA runtime headers (no torch); the torch
// binding calls the extern "C" launchers with raw pointers and a stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// Accumulation type and conversions: half types compute in fp32.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int THREADS = (BM / TM) * (BN / TN);  // 256
static_assert(BM * BK % THREADS == 0 && BN * BK % THREADS == 0, "tile loads must divide");

// C (M x N, row-major) = A (M x K) B (K x N) [+ bias[n]]. A(m, k) = A[m*sam + k*sak],
// B(k, n) = Bm[k*sbk + n*sbn]; bmask (same strides as B) zeroes pruned weights as the tile
// loads; cmask (M x N row-major) zeroes C entries in the epilogue.
template <typename T>
__global__ void __launch_bounds__(THREADS)
masked_gemm(int64_t M, int64_t N, int64_t K, const T* __restrict__ A, int64_t sam,
            int64_t sak, const T* __restrict__ Bm, int64_t sbk, int64_t sbn,
            const uint8_t* __restrict__ bmask, const uint8_t* __restrict__ cmask,
            const T* __restrict__ bias, T* __restrict__ C) {
  using F = typename Acc<T>::type;
  __shared__ F As[BK][BM];
  __shared__ F Bs[BK][BN];
  const int tid = threadIdx.x;
  const int tr = tid / (BN / TN), tc = tid % (BN / TN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  // Consecutive threads walk the unit-stride dimension so global loads coalesce.
  const bool a_k_fast = sak == 1, b_k_fast = sbk == 1;

  F acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = F(0);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll
    for (int l = 0; l < BM * BK / THREADS; ++l) {
      const int idx = tid + l * THREADS;
      const int kk = a_k_fast ? idx % BK : idx / BM;
      const int mm = a_k_fast ? idx / BK : idx % BM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < M && gk < K) ? to_acc(A[gm * sam + gk * sak]) : F(0);
    }
#pragma unroll
    for (int l = 0; l < BN * BK / THREADS; ++l) {
      const int idx = tid + l * THREADS;
      const int kk = b_k_fast ? idx % BK : idx / BN;
      const int nn = b_k_fast ? idx / BK : idx % BN;
      const int64_t gn = n0 + nn, gk = k0 + kk;
      F v = F(0);
      if (gn < N && gk < K) {
        const int64_t off = gk * sbk + gn * sbn;
        v = (bmask != nullptr && bmask[off] == 0) ? F(0) : to_acc(Bm[off]);
      }
      Bs[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      F a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[kk][tr * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[kk][tc * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + tr * TM + i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tc * TN + j;
      if (gn >= N) continue;
      F v = acc[i][j];
      if (bias != nullptr) v += to_acc(bias[gn]);
      if (cmask != nullptr && cmask[gm * N + gn] == 0) v = F(0);
      C[gm * N + gn] = from_acc<T>(v);
    }
  }
}

template <typename T>
int launch(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* Bm,
           int64_t sbk, int64_t sbn, const uint8_t* bmask, const uint8_t* cmask, const T* bias,
           T* C, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  const int64_t gy = (M + BM - 1) / BM, gx = (N + BN - 1) / BN;
  if (gy > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  masked_gemm<T><<<grid, THREADS, 0, stream>>>(M, N, K, A, sam, sak, Bm, sbk, sbn, bmask,
                                                cmask, bias, C);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int saf_ml_gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                    const float* Bm, int64_t sbk, int64_t sbn, const uint8_t* bmask,
                    const uint8_t* cmask, const float* bias, float* C, cudaStream_t stream) {
  return launch<float>(M, N, K, A, sam, sak, Bm, sbk, sbn, bmask, cmask, bias, C, stream);
}

int saf_ml_gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t sam,
                    int64_t sak, const double* Bm, int64_t sbk, int64_t sbn,
                    const uint8_t* bmask, const uint8_t* cmask, const double* bias, double* C,
                    cudaStream_t stream) {
  return launch<double>(M, N, K, A, sam, sak, Bm, sbk, sbn, bmask, cmask, bias, C, stream);
}

// Half types cross the C boundary as untyped pointers (the binding has no CUDA headers).
int saf_ml_gemm_f16(int64_t M, int64_t N, int64_t K, const void* A, int64_t sam, int64_t sak,
                    const void* Bm, int64_t sbk, int64_t sbn, const uint8_t* bmask,
                    const uint8_t* cmask, const void* bias, void* C, cudaStream_t stream) {
  return launch<__half>(M, N, K, static_cast<const __half*>(A), sam, sak,
                        static_cast<const __half*>(Bm), sbk, sbn, bmask, cmask,
                        static_cast<const __half*>(bias), static_cast<__half*>(C), stream);
}

int saf_ml_gemm_bf16(int64_t M, int64_t N, int64_t K, const void* A, int64_t sam,
                     int64_t sak, const void* Bm, int64_t sbk, int64_t sbn,
                     const uint8_t* bmask, const uint8_t* cmask, const void* bias, void* C,
                     cudaStream_t stream) {
  using B16 = __nv_bfloat16;
  return launch<B16>(M, N, K, static_cast<const B16*>(A), sam, sak, static_cast<const B16*>(Bm),
                     sbk, sbn, bmask, cmask, static_cast<const B16*>(bias),
                     static_cast<B16*>(C), stream);
}

const char* saf_ml_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
