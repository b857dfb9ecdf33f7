// Torch binding for masked_linear: CPU sparse kernels (always) and, when built with
// -DSAF_WITH_CUDA, the contract functions over the extern "C" CUDA launchers. No CUDA
// headers here: the launchers are declared with CUDA's own opaque stream type.
#include <torch/extension.h>

#include "../common/csr_binding.h"
#include "../common/masked_forms.h"

#include <cstdint>

namespace saf_ml {
template <typename T> void transpose(const T*, T*, int64_t, int64_t);
template <typename T, typename I>
void spmm_xAt(const int64_t*, const I*, const T*, int64_t, const T*, int64_t, const T*, T*);
template <typename T, typename I>
void spmm_gyA(const int64_t*, const I*, const T*, int64_t, int64_t, const T*, int64_t, T*);
template <typename T, typename I>
void sddmm(const int64_t*, const I*, int64_t, int64_t, const T*, const T*, int64_t, T*);
}  // namespace saf_ml

namespace {

at::Tensor transposed(const at::Tensor& x) {
  at::Tensor t = at::empty({x.size(1), x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saf_transpose", [&] {
    saf_ml::transpose<scalar_t>(x.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), x.size(0),
                                x.size(1));
  });
  return t;
}

// y (B x rows) = x2d (B x K) A^T + bias, A in CSR (rows x K).
at::Tensor spmm(const at::Tensor& x2d, const at::Tensor& rowptr, const at::Tensor& col,
                const at::Tensor& val, int64_t rows, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x2d.dim() == 2 && x2d.device().is_cpu(), "masked_linear cpp: x must be 2-D CPU");
  saf_common::check_csr(rowptr, col, rows, "masked_linear");
  at::Tensor x = x2d.contiguous();
  TORCH_CHECK(val.scalar_type() == x.scalar_type() && val.is_contiguous(),
              "masked_linear cpp: values dtype must match x");
  at::Tensor xT = transposed(x);
  at::Tensor y = at::empty({x.size(0), rows}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saf_spmm", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_ml::spmm_xAt<scalar_t>(rowptr.data_ptr<int64_t>(), c, val.data_ptr<scalar_t>(), rows,
                                 xT.data_ptr<scalar_t>(), x.size(0),
                                 b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                 y.data_ptr<scalar_t>());
    });
  });
  return y;
}

// gx (B x cols) = gy2d (B x rows) A, A in CSR (rows x cols): the input gradient through the
// forward's CSR (no transposed CSR).
at::Tensor spmm_t(const at::Tensor& gy2d, const at::Tensor& rowptr, const at::Tensor& col,
                  const at::Tensor& val, int64_t cols) {
  TORCH_CHECK(gy2d.dim() == 2 && gy2d.device().is_cpu(),
              "masked_linear cpp: gy must be 2-D CPU");
  const int64_t rows = gy2d.size(1);
  saf_common::check_csr(rowptr, col, rows, "masked_linear");
  at::Tensor gy = gy2d.contiguous();
  TORCH_CHECK(val.scalar_type() == gy.scalar_type() && val.is_contiguous(),
              "masked_linear cpp: values dtype must match gy");
  at::Tensor gyT = transposed(gy);
  at::Tensor gx = at::empty({gy.size(0), cols}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "saf_spmm_t", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_ml::spmm_gyA<scalar_t>(rowptr.data_ptr<int64_t>(), c, val.data_ptr<scalar_t>(), rows,
                                 cols, gyT.data_ptr<scalar_t>(), gy.size(0),
                                 gx.data_ptr<scalar_t>());
    });
  });
  return gx;
}

// gw (rows x K) = (gy2d^T x2d) at the CSR's stored positions, exact zeros elsewhere.
at::Tensor sddmm(const at::Tensor& gy2d, const at::Tensor& x2d, const at::Tensor& rowptr,
                 const at::Tensor& col) {
  TORCH_CHECK(gy2d.dim() == 2 && x2d.dim() == 2 && gy2d.size(0) == x2d.size(0),
              "masked_linear cpp: gy and x must be 2-D with the same batch");
  const int64_t rows = gy2d.size(1), K = x2d.size(1), B = x2d.size(0);
  saf_common::check_csr(rowptr, col, rows, "masked_linear");
  at::Tensor gyT = transposed(gy2d.contiguous());
  at::Tensor xT = transposed(x2d.contiguous());
  at::Tensor gw = at::zeros({rows, K}, x2d.options());
  AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "saf_sddmm", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_ml::sddmm<scalar_t>(rowptr.data_ptr<int64_t>(), c, rows, K, gyT.data_ptr<scalar_t>(),
                              xT.data_ptr<scalar_t>(), B, gw.data_ptr<scalar_t>());
    });
  });
  return gw;
}

}  // namespace

#ifdef SAF_WITH_CUDA
typedef struct CUstream_st* cudaStream_t;  // same opaque type cuda_runtime.h declares
extern "C" {
int saf_ml_gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                    const float* Bm, int64_t sbk, int64_t sbn, const uint8_t* bmask,
                    const uint8_t* cmask, const float* bias, float* C, cudaStream_t stream);
int saf_ml_gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t sam,
                    int64_t sak, const double* Bm, int64_t sbk, int64_t sbn,
                    const uint8_t* bmask, const uint8_t* cmask, const double* bias, double* C,
                    cudaStream_t stream);
int saf_ml_gemm_f16(int64_t M, int64_t N, int64_t K, const void* A, int64_t sam, int64_t sak,
                    const void* Bm, int64_t sbk, int64_t sbn, const uint8_t* bmask,
                    const uint8_t* cmask, const void* bias, void* C, cudaStream_t stream);
int saf_ml_gemm_bf16(int64_t M, int64_t N, int64_t K, const void* A, int64_t sam,
                     int64_t sak, const void* Bm, int64_t sbk, int64_t sbn,
                     const uint8_t* bmask, const uint8_t* cmask, const void* bias, void* C,
                     cudaStream_t stream);
const char* saf_ml_error_string(int code);
}

namespace {

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

// C (M x N) = A (M x K) B (K x N) [+ bias], B masked by bmask on load, C by cmask.
void gemm(int64_t M, int64_t N, int64_t K, const at::Tensor& A, int64_t sam, int64_t sak,
          const at::Tensor& Bm, int64_t sbk, int64_t sbn, const uint8_t* bmask,
          const uint8_t* cmask, const at::Tensor& bias, at::Tensor& C, int64_t stream) {
  int err = 0;
  if (A.scalar_type() == at::kFloat) {
    err = saf_ml_gemm_f32(M, N, K, A.data_ptr<float>(), sam, sak, Bm.data_ptr<float>(), sbk,
                          sbn, bmask, cmask, bias.defined() ? bias.data_ptr<float>() : nullptr,
                          C.data_ptr<float>(), as_stream(stream));
  } else if (A.scalar_type() == at::kDouble) {
    err = saf_ml_gemm_f64(M, N, K, A.data_ptr<double>(), sam, sak, Bm.data_ptr<double>(), sbk,
                          sbn, bmask, cmask, bias.defined() ? bias.data_ptr<double>() : nullptr,
                          C.data_ptr<double>(), as_stream(stream));
  } else if (A.scalar_type() == at::kHalf || A.scalar_type() == at::kBFloat16) {
    auto fn = A.scalar_type() == at::kHalf ? saf_ml_gemm_f16 : saf_ml_gemm_bf16;
    err = fn(M, N, K, A.data_ptr(), sam, sak, Bm.data_ptr(), sbk, sbn, bmask, cmask,
             bias.defined() ? bias.data_ptr() : nullptr, C.data_ptr(), as_stream(stream));
  } else {
    TORCH_CHECK(false, "masked_linear cuda: unsupported dtype ", A.scalar_type());
  }
  TORCH_CHECK(err == 0, "masked_linear cuda: kernel launch failed: ", saf_ml_error_string(err));
}

const uint8_t* mask_ptr(const at::Tensor& m) {
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

at::Tensor cuda_forward(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& mask,
                        const c10::optional<at::Tensor>& b, int64_t stream) {
  TORCH_CHECK(x2d.is_cuda(), "masked_linear cuda: tensors must be on a CUDA device");
  at::Tensor x = x2d.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = wc.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  at::Tensor bias;
  if (b.has_value() && b->defined()) bias = b->contiguous();
  // B(k, n) = W[n, k]
  gemm(B, N, K, x, K, 1, wc, 1, K, mask_ptr(mc), nullptr, bias, y, stream);
  return y;
}

at::Tensor cuda_grad_input(const at::Tensor& gy2d, const at::Tensor& w, const at::Tensor& mask,
                           int64_t stream) {
  at::Tensor gy = gy2d.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  const int64_t B = gy.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor gx = at::empty({B, K}, gy.options());
  // gx (B x K) = gy (B x N) Wm (N x K)
  gemm(B, K, N, gy, N, 1, wc, K, 1, mask_ptr(mc), nullptr, at::Tensor(), gx, stream);
  return gx;
}

at::Tensor cuda_grad_weight(const at::Tensor& gy2d, const at::Tensor& x2d,
                            const at::Tensor& mask, int64_t stream) {
  at::Tensor gy = gy2d.contiguous(), x = x2d.contiguous(), mc = mask.contiguous();
  const int64_t B = gy.size(0), N = gy.size(1), K = x.size(1);
  at::Tensor gw = at::empty({N, K}, x.options());
  // gw (N x K) = gy^T (N x B) x (B x K), masked in the epilogue
  gemm(N, K, B, gy, 1, N, x, K, 1, nullptr, mask_ptr(mc), at::Tensor(), gw, stream);
  return gw;
}

}  // namespace
#endif  // SAF_WITH_CUDA

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_adv_fast masked_linear kernels";
  m.def("zero_pruned_", &saf_common::zero_pruned_, "t[~mask] = 0 in place (CPU)",
        py::arg("t"), py::arg("mask"));
  m.def("csr_values", &saf_common::csr_values, "w2d values at the CSR positions (CPU)",
        py::arg("w2d"), py::arg("rowptr"), py::arg("col"));
  m.def("spmm", &spmm, "y = x A^T + bias with A in CSR (CPU)", py::arg("x"), py::arg("rowptr"),
        py::arg("col"), py::arg("val"), py::arg("rows"), py::arg("bias") = py::none());
  m.def("spmm_t", &spmm_t, "gx = gy A with A in CSR (CPU), no transposed CSR", py::arg("gy"),
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("cols"));
  m.def("sddmm", &sddmm, "(gy^T x) at the CSR positions, zeros elsewhere (CPU)", py::arg("gy"),
        py::arg("x"), py::arg("rowptr"), py::arg("col"));
#ifdef SAF_WITH_CUDA
  m.def("forward", &cuda_forward, py::arg("x2d"), py::arg("w"), py::arg("mask"), py::arg("b"),
        py::kw_only(), py::arg("stream"));
  m.def("grad_input", &cuda_grad_input, py::arg("gy2d"), py::arg("w"), py::arg("mask"),
        py::kw_only(), py::arg("stream"));
  m.def("grad_weight", &cuda_grad_weight, py::arg("gy2d"), py::arg("x2d"), py::arg("mask"),
        py::kw_only(), py::arg("stream"));
#endif
}
