// Torch binding of the fused PGD step for both flavours: the cpp extension (CPU only) and,
// with -DSAF_WITH_CUDA, the cuda extension (CPU + CUDA). Dispatches on the tensors' device;
// CUDA work goes through the extern "C" launchers of pgd_step.cu on the stream passed in
// (no CUDA header is included here, so this builds against a CPU-only torch).
//
// Python contract (sparse_adv_fast/ops/pgd_step.py):
//   step(x_adv, grad, x, alpha, eps, norm, lo, hi, out, *, stream=0) -> out
//   random_init(x, noise, eps, norm, lo, hi, *, stream=0) -> Tensor

#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace saf_pgd {
void linf_step_f32(const float*, const float*, const float*, float*, int64_t, float, float,
                   float, float);
void linf_step_f64(const double*, const double*, const double*, double*, int64_t, double,
                   double, double, double);
void l2_step_f32(const float*, const float*, const float*, float*, int64_t, int64_t, double,
                 double, float, float);
void l2_step_f64(const double*, const double*, const double*, double*, int64_t, int64_t,
                 double, double, double, double);
void linf_init_f32(const float*, const float*, float*, int64_t, float, float, float);
void linf_init_f64(const double*, const double*, double*, int64_t, double, double, double);
void l2_init_f32(const float*, const float*, float*, int64_t, int64_t, double, float, float);
void l2_init_f64(const double*, const double*, double*, int64_t, int64_t, double, double,
                 double);
}  // namespace saf_pgd

#ifdef SAF_WITH_CUDA
// Same definition as CUDA's driver_types.h, so no CUDA header is needed here.
typedef struct CUstream_st* cudaStream_t;
// dtype codes shared with pgd_step.cu: 0 fp32, 1 fp64, 2 fp16, 3 bf16.
// Each launcher returns nullptr on success, else CUDA's error string.
extern "C" {
const char* saf_pgd_step_linf(int dtype, const void* xa, const void* g, const void* x, void* out,
                              int64_t n, double alpha, double eps, double lo, double hi,
                              cudaStream_t stream);
int64_t saf_pgd_l2_workspace(int64_t b, int64_t d);
const char* saf_pgd_step_l2(int dtype, const void* xa, const void* g, const void* x, void* out,
                            int64_t b, int64_t d, double alpha, double eps, double lo,
                            double hi, double* workspace, cudaStream_t stream);
const char* saf_pgd_init_linf(int dtype, const void* x, const void* noise, void* out,
                              int64_t n, double eps, double lo, double hi, cudaStream_t stream);
const char* saf_pgd_init_l2(int dtype, const void* x, const void* noise, void* out, int64_t b,
                            int64_t d, double eps, double lo, double hi, double* workspace,
                            cudaStream_t stream);
}
#endif

namespace {

enum class Norm { kLinf, kL2 };

Norm parse_norm(const std::string& norm) {
  if (norm == "linf") return Norm::kLinf;
  if (norm == "l2") return Norm::kL2;
  TORCH_CHECK_VALUE(false, "pgd_step: unknown norm '", norm, "'; choose 'linf' or 'l2'");
}

void check_scalars(double eps, double lo, double hi) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "pgd_step: eps must be a finite number >= 0, got ",
                    eps);
  TORCH_CHECK_VALUE(lo < hi, "pgd_step: clip range must have lo < hi, got (", lo, ", ", hi, ")");
}

void check_like(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "pgd_step: ", name, " is on ", t.device(),
                    ", expected ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "pgd_step: ", name, " has dtype ",
                   t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "pgd_step: ", name, " has shape ", t.sizes(),
                    ", expected ", ref.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "pgd_step: ", name, " must be contiguous");
}

void check_base(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "pgd_step: inputs need a batch dimension");
  TORCH_CHECK_VALUE(x.is_contiguous(), "pgd_step: x must be contiguous");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "pgd_step: dtype ", dt, " is not supported (float32, float64, float16, "
                   "bfloat16)");
}

// The CPU kernels are instantiated for float and double only: half types (autocast, bf16
// models) run the float32 kernel on upcast copies and round once into the caller's dtype,
// which is at least as accurate as the per-op rounding of the torch reference.
bool cpu_half(const at::Tensor& x) {
  return x.is_cpu() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
}

// Per-sample view: b samples of d elements each.
int64_t per_sample(const at::Tensor& x) { return x.size(0) > 0 ? x.numel() / x.size(0) : 0; }

#ifdef SAF_WITH_CUDA
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK_TYPE(false, "pgd_step: unsupported dtype ", t);
  }
}

void check_launch(const char* err, const char* what) {
  TORCH_CHECK(err == nullptr, "pgd_step: CUDA ", what, " failed: ", err);
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }
#endif

void require_native_device(const at::Tensor& x) {
#ifdef SAF_WITH_CUDA
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), "pgd_step: tensors on ", x.device(),
                    " are not supported (cpu or cuda)");
#else
  TORCH_CHECK_VALUE(x.is_cpu(), "pgd_step: this extension was built without CUDA; tensors on ",
                    x.device(), " are not supported");
#endif
}

at::Tensor step(const at::Tensor& x_adv, const at::Tensor& grad, const at::Tensor& x,
                double alpha, double eps, const std::string& norm, double lo, double hi,
                at::Tensor out, int64_t stream) {
  const Norm nm = parse_norm(norm);
  TORCH_CHECK_VALUE(alpha > 0, "pgd_step: alpha must be > 0, got ", alpha);
  check_scalars(eps, lo, hi);
  check_base(x);
  require_native_device(x);
  check_like(x, x_adv, "x_adv");
  check_like(x, grad, "grad");
  check_like(x, out, "out");
  const int64_t n = x.numel();
  if (n == 0) return out;
  if (cpu_half(x)) {
    at::Tensor out_f = at::empty_like(x, x.options().dtype(at::kFloat));
    step(x_adv.to(at::kFloat), grad.to(at::kFloat), x.to(at::kFloat), alpha, eps, norm, lo, hi,
         out_f, stream);
    out.copy_(out_f);
    return out;
  }
  const int64_t b = x.size(0), d = per_sample(x);
  const bool f32 = x.scalar_type() == at::kFloat;

  if (x.is_cpu()) {
    (void)stream;
    if (nm == Norm::kLinf) {
      if (f32)
        saf_pgd::linf_step_f32(x_adv.data_ptr<float>(), grad.data_ptr<float>(),
                               x.data_ptr<float>(), out.data_ptr<float>(), n, float(alpha),
                               float(eps), float(lo), float(hi));
      else
        saf_pgd::linf_step_f64(x_adv.data_ptr<double>(), grad.data_ptr<double>(),
                               x.data_ptr<double>(), out.data_ptr<double>(), n, alpha, eps, lo,
                               hi);
    } else {
      if (f32)
        saf_pgd::l2_step_f32(x_adv.data_ptr<float>(), grad.data_ptr<float>(),
                             x.data_ptr<float>(), out.data_ptr<float>(), b, d, alpha, eps,
                             float(lo), float(hi));
      else
        saf_pgd::l2_step_f64(x_adv.data_ptr<double>(), grad.data_ptr<double>(),
                             x.data_ptr<double>(), out.data_ptr<double>(), b, d, alpha, eps, lo,
                             hi);
    }
    return out;
  }
#ifdef SAF_WITH_CUDA
  const c10::DeviceGuard guard(x.device());
  const int dt = dtype_code(x.scalar_type());
  if (nm == Norm::kLinf) {
    check_launch(saf_pgd_step_linf(dt, x_adv.data_ptr(), grad.data_ptr(), x.data_ptr(),
                                   out.data_ptr(), n, alpha, eps, lo, hi, as_stream(stream)),
                 "L-inf step");
  } else {
    auto ws = at::empty({saf_pgd_l2_workspace(b, d)}, x.options().dtype(at::kDouble));
    check_launch(saf_pgd_step_l2(dt, x_adv.data_ptr(), grad.data_ptr(), x.data_ptr(),
                                 out.data_ptr(), b, d, alpha, eps, lo, hi,
                                 ws.data_ptr<double>(), as_stream(stream)),
                 "L2 step");
  }
#endif
  return out;
}

at::Tensor random_init(const at::Tensor& x, const at::Tensor& noise, double eps,
                       const std::string& norm, double lo, double hi, int64_t stream) {
  const Norm nm = parse_norm(norm);
  check_scalars(eps, lo, hi);
  check_base(x);
  require_native_device(x);
  const int64_t b = x.size(0), d = per_sample(x), n = x.numel();
  TORCH_CHECK_VALUE(noise.device() == x.device(), "pgd_step: noise is on ", noise.device(),
                    ", expected ", x.device());
  TORCH_CHECK_TYPE(noise.scalar_type() == x.scalar_type(), "pgd_step: noise has dtype ",
                   noise.scalar_type(), ", expected ", x.scalar_type());
  TORCH_CHECK_VALUE(noise.is_contiguous(), "pgd_step: noise must be contiguous");
  if (nm == Norm::kLinf) {
    TORCH_CHECK_VALUE(noise.numel() == n, "pgd_step: L-inf noise needs ", n,
                      " elements (x's shape), got shape ", noise.sizes());
  } else {
    TORCH_CHECK_VALUE(noise.numel() == b * (d + 1), "pgd_step: L2 noise needs shape (", b, ", ",
                      d + 1, "), got ", noise.sizes());
  }
  if (cpu_half(x) && n > 0)
    return random_init(x.to(at::kFloat), noise.to(at::kFloat), eps, norm, lo, hi, stream)
        .to(x.scalar_type());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (n == 0) return out;
  const bool f32 = x.scalar_type() == at::kFloat;

  if (x.is_cpu()) {
    (void)stream;
    if (nm == Norm::kLinf) {
      if (f32)
        saf_pgd::linf_init_f32(x.data_ptr<float>(), noise.data_ptr<float>(),
                               out.data_ptr<float>(), n, float(eps), float(lo), float(hi));
      else
        saf_pgd::linf_init_f64(x.data_ptr<double>(), noise.data_ptr<double>(),
                               out.data_ptr<double>(), n, eps, lo, hi);
    } else {
      if (f32)
        saf_pgd::l2_init_f32(x.data_ptr<float>(), noise.data_ptr<float>(),
                             out.data_ptr<float>(), b, d, eps, float(lo), float(hi));
      else
        saf_pgd::l2_init_f64(x.data_ptr<double>(), noise.data_ptr<double>(),
                             out.data_ptr<double>(), b, d, eps, lo, hi);
    }
    return out;
  }
#ifdef SAF_WITH_CUDA
  const c10::DeviceGuard guard(x.device());
  const int dt = dtype_code(x.scalar_type());
  if (nm == Norm::kLinf) {
    check_launch(saf_pgd_init_linf(dt, x.data_ptr(), noise.data_ptr(), out.data_ptr(), n, eps,
                                   lo, hi, as_stream(stream)),
                 "L-inf random_init");
  } else {
    auto ws = at::empty({saf_pgd_l2_workspace(b, d)}, x.options().dtype(at::kDouble));
    check_launch(saf_pgd_init_l2(dt, x.data_ptr(), noise.data_ptr(), out.data_ptr(), b, d, eps,
                                 lo, hi, ws.data_ptr<double>(), as_stream(stream)),
                 "L2 random_init");
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused PGD step and random start (sparse_adv_fast pgd_step backend)";
  m.def("step", &step,
        "x_adv + alpha * step direction, projected to the eps-ball around x, clipped to "
        "[lo, hi], written to out (out may be x_adv)",
        py::arg("x_adv"), py::arg("grad"), py::arg("x"), py::arg("alpha"), py::arg("eps"),
        py::arg("norm"), py::arg("lo"), py::arg("hi"), py::arg("out"), py::kw_only(),
        py::arg("stream") = 0);
  m.def("random_init", &random_init,
        "Random start inside the eps-ball around x from torch-drawn noise, clipped to [lo, hi]",
        py::arg("x"), py::arg("noise"), py::arg("eps"), py::arg("norm"), py::arg("lo"),
        py::arg("hi"), py::kw_only(), py::arg("stream") = 0);
  m.attr("with_cuda") =
#ifdef SAF_WITH_CUDA
      true;
#else
      false;
#endif
}
