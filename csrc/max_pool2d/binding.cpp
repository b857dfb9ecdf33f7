// Torch binding of the window max pool's CPU kernels (max_pool2d_cpu.cpp).
//
// Python contract (sparse_adv_fast/ops/max_pool2d.py):
//   forward(x, k) -> (y, idx)         x: contiguous NCHW float32/float64; idx: uint8
//   backward(gy, idx, H, W, k) -> gx

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace saf_mp {
template <typename T>
void forward(const T*, int64_t, int64_t, int64_t, int64_t, T*, uint8_t*);
template <typename T>
void backward(const T*, const uint8_t*, int64_t, int64_t, int64_t, int64_t, T*);
}  // namespace saf_mp

namespace {

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "max_pool2d: ", name, " must be on the CPU");
  TORCH_CHECK_VALUE(t.dim() == 4, "max_pool2d: ", name, " must be 4-D (N, C, H, W), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "max_pool2d: ", name, " must be contiguous");
}

void check_k(int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k <= 16, "max_pool2d: kernel must be in [1, 16], got ", k);
}

std::vector<at::Tensor> forward(const at::Tensor& x, int64_t k) {
  check(x, "x");
  check_k(k);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto y = at::empty({N, C, H / k, W / k}, x.options());
  auto idx = at::empty({N, C, H / k, W / k}, x.options().dtype(at::kByte));
  if (x.scalar_type() == at::kFloat) {
    saf_mp::forward<float>(x.data_ptr<float>(), N * C, H, W, k, y.data_ptr<float>(),
                           idx.data_ptr<uint8_t>());
  } else {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kDouble, "max_pool2d: dtype ", x.scalar_type(),
                     " is not supported (float32, float64)");
    saf_mp::forward<double>(x.data_ptr<double>(), N * C, H, W, k, y.data_ptr<double>(),
                            idx.data_ptr<uint8_t>());
  }
  return {y, idx};
}

at::Tensor backward(const at::Tensor& gy, const at::Tensor& idx, int64_t H, int64_t W,
                    int64_t k) {
  check(gy, "gy");
  check(idx, "idx");
  check_k(k);
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kByte && idx.sizes() == gy.sizes(),
                    "max_pool2d: idx must be uint8 of gy's shape");
  TORCH_CHECK_VALUE(H / k == gy.size(2) && W / k == gy.size(3),
                    "max_pool2d: gy's plane does not match H, W and the kernel");
  const int64_t N = gy.size(0), C = gy.size(1);
  auto gx = at::empty({N, C, H, W}, gy.options());
  if (gy.scalar_type() == at::kFloat) {
    saf_mp::backward<float>(gy.data_ptr<float>(), idx.data_ptr<uint8_t>(), N * C, H, W, k,
                            gx.data_ptr<float>());
  } else {
    TORCH_CHECK_TYPE(gy.scalar_type() == at::kDouble, "max_pool2d: dtype ", gy.scalar_type(),
                     " is not supported (float32, float64)");
    saf_mp::backward<double>(gy.data_ptr<double>(), idx.data_ptr<uint8_t>(), N * C, H, W, k,
                             gx.data_ptr<double>());
  }
  return gx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Window max pool, kernel = stride (sparse_adv_fast attack path)";
  m.def("forward", &forward, "y and the pick's offset in each window", py::arg("x"),
        py::arg("k"));
  m.def("backward", &backward, "input gradient from gy and the picks", py::arg("gy"),
        py::arg("idx"), py::arg("H"), py::arg("W"), py::arg("k"));
}
