// Torch binding for masked_conv2d: CPU direct sparse-convolution kernels (always) and,
// with -DSAF_WITH_CUDA, the contract functions over the extern "C" CUDA launchers. No CUDA
// headers here: the launchers are declared with CUDA's own opaque stream type.
#include <torch/extension.h>

#include "../common/csr_binding.h"
#include "../common/masked_forms.h"

#include <cstdint>
#include <vector>

namespace saf_mc {
struct Geom {
  int64_t N, C, H, W, OC, KH, KW, G, sh, sw, ph, pw, dh, dw, OH, OW;
};
template <typename T, typename I>
void conv_forward_tiled(const Geom&, const T*, const T*, const int64_t*, const I*, const T*,
                        const T*, bool, T*);
template <typename T, typename I>
void conv_grad_input(const Geom&, const T*, const int64_t*, const I*, const T*, T*);
template <typename T, typename I>
void conv_grad_input_direct(const Geom&, const T*, const T*, const int64_t*, const I*,
                            const T*, T*);
template <typename T, typename I>
void conv_grad_weight(const Geom&, const T*, const T*, const int64_t*, const I*, T*);
}  // namespace saf_mc

namespace {

using IntList = std::vector<int64_t>;

saf_mc::Geom geom(at::IntArrayRef xs, at::IntArrayRef ws, const IntList& stride,
                  const IntList& padding, const IntList& dilation, int64_t groups) {
  TORCH_CHECK(xs.size() == 4 && ws.size() == 4, "masked_conv2d: x and w must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "masked_conv2d: stride/padding/dilation must have 2 entries");
  TORCH_CHECK(groups >= 1 && xs[1] % groups == 0 && ws[0] % groups == 0 &&
                  ws[1] * groups == xs[1],
              "masked_conv2d: channels do not match groups");
  saf_mc::Geom g{xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], groups,
                 stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], 0, 0};
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "masked_conv2d: output would be empty");
  return g;
}

at::Tensor conv_forward(const at::Tensor& x_in, const at::Tensor& rowptr, const at::Tensor& col,
                        const at::Tensor& val, IntList w_shape,
                        const c10::optional<at::Tensor>& bias, IntList stride, IntList padding,
                        IntList dilation, int64_t groups, bool relu) {
  at::Tensor x = x_in.contiguous();
  auto g = geom(x.sizes(), w_shape, stride, padding, dilation, groups);
  saf_common::check_csr(rowptr, col, g.OC, "masked_conv2d");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  at::Tensor y = at::empty({g.N, g.OC, g.OH, g.OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saf_conv_forward", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_mc::conv_forward_tiled<scalar_t>(g, x.data_ptr<scalar_t>(), nullptr,
                                           rowptr.data_ptr<int64_t>(), c,
                                           val.data_ptr<scalar_t>(),
                                           b.defined() ? b.data_ptr<scalar_t>() : nullptr, relu,
                                           y.data_ptr<scalar_t>());
    });
  });
  return y;
}

at::Tensor conv_grad_input(const at::Tensor& gy_in, IntList x_shape, const at::Tensor& rowptrT,
                           const at::Tensor& colT, const at::Tensor& valT, IntList w_shape,
                           IntList stride, IntList padding, IntList dilation, int64_t groups) {
  at::Tensor gy = gy_in.contiguous();
  auto g = geom(x_shape, w_shape, stride, padding, dilation, groups);
  TORCH_CHECK(gy.dim() == 4 && gy.size(0) == g.N && gy.size(1) == g.OC && gy.size(2) == g.OH &&
                  gy.size(3) == g.OW,
              "masked_conv2d cpp: grad_output shape does not match the convolution");
  saf_common::check_csr(rowptrT, colT, g.C, "masked_conv2d");
  at::Tensor gx = at::empty({g.N, g.C, g.H, g.W}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "saf_conv_grad_input", [&] {
    saf_common::with_col(colT, [&](auto* c) {
      saf_mc::conv_grad_input<scalar_t>(g, gy.data_ptr<scalar_t>(),
                                        rowptrT.data_ptr<int64_t>(), c,
                                        valT.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
    });
  });
  return gx;
}

// Input gradient of any stride over the forward CSR (rows = output channels), see the
// kernel. With a gate (the output of a ReLU applied to the convolution, gy's shape), gy is
// first passed back through that ReLU.
at::Tensor conv_grad_input_direct(const at::Tensor& gy_in, IntList x_shape,
                                  const at::Tensor& rowptr, const at::Tensor& col,
                                  const at::Tensor& val, IntList w_shape, IntList stride,
                                  IntList padding, IntList dilation, int64_t groups,
                                  const c10::optional<at::Tensor>& gate_in) {
  at::Tensor gy = gy_in.contiguous();
  at::Tensor gate;
  if (gate_in.has_value() && gate_in->defined()) {
    TORCH_CHECK(gate_in->sizes() == gy.sizes() && gate_in->scalar_type() == gy.scalar_type(),
                "masked_conv2d cpp: gate must match grad_output's shape and dtype");
    gate = gate_in->contiguous();
  }
  auto g = geom(x_shape, w_shape, stride, padding, dilation, groups);
  TORCH_CHECK(gy.dim() == 4 && gy.size(0) == g.N && gy.size(1) == g.OC && gy.size(2) == g.OH &&
                  gy.size(3) == g.OW,
              "masked_conv2d cpp: grad_output shape does not match the convolution");
  TORCH_CHECK(g.dh * (g.KH - 1) >= g.ph && g.dw * (g.KW - 1) >= g.pw,
              "masked_conv2d cpp: padding larger than the dilated kernel");
  saf_common::check_csr(rowptr, col, g.OC, "masked_conv2d");
  at::Tensor gx = at::empty({g.N, g.C, g.H, g.W}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "saf_conv_grad_input_direct", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_mc::conv_grad_input_direct<scalar_t>(
          g, gy.data_ptr<scalar_t>(), gate.defined() ? gate.data_ptr<scalar_t>() : nullptr,
          rowptr.data_ptr<int64_t>(), c, val.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
    });
  });
  return gx;
}

at::Tensor conv_grad_weight(const at::Tensor& gy_in, const at::Tensor& x_in,
                            const at::Tensor& rowptr, const at::Tensor& col, IntList w_shape,
                            IntList stride, IntList padding, IntList dilation, int64_t groups) {
  at::Tensor gy = gy_in.contiguous(), x = x_in.contiguous();
  auto g = geom(x.sizes(), w_shape, stride, padding, dilation, groups);
  TORCH_CHECK(gy.dim() == 4 && gy.size(1) == g.OC && gy.size(2) == g.OH && gy.size(3) == g.OW,
              "masked_conv2d cpp: grad_output shape does not match the convolution");
  saf_common::check_csr(rowptr, col, g.OC, "masked_conv2d");
  at::Tensor gw = at::zeros(w_shape, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saf_conv_grad_weight", [&] {
    saf_common::with_col(col, [&](auto* c) {
      saf_mc::conv_grad_weight<scalar_t>(g, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                         rowptr.data_ptr<int64_t>(), c, gw.data_ptr<scalar_t>());
    });
  });
  return gw;
}

}  // namespace

#ifdef SAF_WITH_CUDA
typedef struct CUstream_st* cudaStream_t;  // same opaque type cuda_runtime.h declares
extern "C" {
// geom: N, C, H, W, OC, KH, KW, G, sh, sw, ph, pw, dh, dw, OH, OW
int saf_mc_forward_f32(const int64_t* geom, const float* x, const float* w,
                       const uint8_t* mask, const float* b, float* y, cudaStream_t stream);
int saf_mc_grad_input_f32(const int64_t* geom, const float* gy, const float* w,
                          const uint8_t* mask, float* gx, cudaStream_t stream);
int saf_mc_grad_weight_f32(const int64_t* geom, const float* gy, const float* x,
                           const uint8_t* mask, float* gw, cudaStream_t stream);
const char* saf_mc_error_string(int code);
}

namespace {

using ConvArgs = std::tuple<IntList, IntList, IntList, int64_t>;

std::vector<int64_t> geom_vec(const saf_mc::Geom& g) {
  return {g.N, g.C, g.H, g.W, g.OC, g.KH, g.KW, g.G, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.OH,
          g.OW};
}

saf_mc::Geom geom_of(at::IntArrayRef xs, at::IntArrayRef ws, const ConvArgs& conv) {
  return geom(xs, ws, std::get<0>(conv), std::get<1>(conv), std::get<2>(conv),
              std::get<3>(conv));
}

const uint8_t* mask_ptr(const at::Tensor& m) {
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_cuda_f32(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "masked_conv2d cuda: tensors must be on a CUDA device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "masked_conv2d cuda: only float32 is supported, got ",
              t.scalar_type());
}

at::Tensor cuda_forward(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& mask,
                        const c10::optional<at::Tensor>& b, ConvArgs conv, int64_t stream) {
  check_cuda_f32(x_in);
  at::Tensor x = x_in.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  auto gv = geom_vec(geom_of(x.sizes(), wc.sizes(), conv));
  at::Tensor y = at::empty({gv[0], gv[4], gv[14], gv[15]}, x.options());
  at::Tensor bias;
  if (b.has_value() && b->defined()) bias = b->contiguous();
  int err = saf_mc_forward_f32(gv.data(), x.data_ptr<float>(), wc.data_ptr<float>(),
                               mask_ptr(mc), bias.defined() ? bias.data_ptr<float>() : nullptr,
                               y.data_ptr<float>(), as_stream(stream));
  TORCH_CHECK(err == 0, "masked_conv2d cuda: forward failed: ", saf_mc_error_string(err));
  return y;
}

at::Tensor cuda_grad_input(const at::Tensor& gy_in, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& mask, ConvArgs conv, int64_t stream) {
  check_cuda_f32(gy_in);
  at::Tensor gy = gy_in.contiguous(), wc = w.contiguous(), mc = mask.contiguous();
  auto gv = geom_vec(geom_of(x.sizes(), wc.sizes(), conv));
  at::Tensor gx = at::empty({gv[0], gv[1], gv[2], gv[3]}, gy.options());
  int err = saf_mc_grad_input_f32(gv.data(), gy.data_ptr<float>(), wc.data_ptr<float>(),
                                  mask_ptr(mc), gx.data_ptr<float>(), as_stream(stream));
  TORCH_CHECK(err == 0, "masked_conv2d cuda: grad_input failed: ", saf_mc_error_string(err));
  return gx;
}

at::Tensor cuda_grad_weight(const at::Tensor& gy_in, const at::Tensor& x_in,
                            const at::Tensor& mask, ConvArgs conv, int64_t stream) {
  check_cuda_f32(gy_in);
  at::Tensor gy = gy_in.contiguous(), x = x_in.contiguous(), mc = mask.contiguous();
  auto gv = geom_vec(geom_of(x.sizes(), mc.sizes(), conv));
  at::Tensor gw = at::empty(mc.sizes(), x.options());
  int err = saf_mc_grad_weight_f32(gv.data(), gy.data_ptr<float>(), x.data_ptr<float>(),
                                   mask_ptr(mc), gw.data_ptr<float>(), as_stream(stream));
  TORCH_CHECK(err == 0, "masked_conv2d cuda: grad_weight failed: ", saf_mc_error_string(err));
  return gw;
}

}  // namespace
#endif  // SAF_WITH_CUDA

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_adv_fast masked_conv2d kernels";
  m.def("zero_pruned_", &saf_common::zero_pruned_, "t[~mask] = 0 in place (CPU)",
        py::arg("t"), py::arg("mask"));
  m.def("csr_values", &saf_common::csr_values, "w2d values at the CSR positions (CPU)",
        py::arg("w2d"), py::arg("rowptr"), py::arg("col"));
  m.def("conv_forward", &conv_forward, "direct sparse conv forward (CPU)", py::arg("x"),
        py::arg("rowptr"), py::arg("col"), py::arg("val"), py::arg("w_shape"), py::arg("bias"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("relu") = false);
  m.def("conv_grad_input", &conv_grad_input, "direct sparse conv grad_input (CPU)",
        py::arg("gy"), py::arg("x_shape"), py::arg("rowptr_t"), py::arg("col_t"),
        py::arg("val_t"), py::arg("w_shape"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"));
  m.def("conv_grad_input_direct", &conv_grad_input_direct,
        "direct sparse conv grad_input over the forward CSR, any stride (CPU)", py::arg("gy"),
        py::arg("x_shape"), py::arg("rowptr"), py::arg("col"), py::arg("val"),
        py::arg("w_shape"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("gate") = py::none());
  m.def("conv_grad_weight", &conv_grad_weight, "sparse conv grad_weight, kept entries (CPU)",
        py::arg("gy"), py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("w_shape"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"));
#ifdef SAF_WITH_CUDA
  m.def("forward", &cuda_forward, py::arg("x"), py::arg("w"), py::arg("mask"), py::arg("b"),
        py::arg("conv"), py::kw_only(), py::arg("stream"));
  m.def("grad_input", &cuda_grad_input, py::arg("gy"), py::arg("x"), py::arg("w"),
        py::arg("mask"), py::arg("conv"), py::kw_only(), py::arg("stream"));
  m.def("grad_weight", &cuda_grad_weight, py::arg("gy"), py::arg("x"), py::arg("mask"),
        py::arg("conv"), py::kw_only(), py::arg("stream"));
#endif
}
