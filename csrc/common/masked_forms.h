// Derived forms of a masked weight, shared by both masked-op bindings: masking a weight in
// place and gathering the CSR values. torch does both with a dtype conversion
// of the bool mask (a full-size float copy) or a nonzero() scan; these read the mask or the
// pattern directly, one pass each. Header-only; torch headers only.
#pragma once

#include <torch/extension.h>

#include <cstdint>

#include "csr_binding.h"

namespace saf_common {

// t *= mask in place (t[i] = 0 wherever mask[i] is false); t and mask contiguous, one shape.
inline void zero_pruned_(const at::Tensor& t, const at::Tensor& mask) {
  TORCH_CHECK(t.device().is_cpu() && mask.device().is_cpu(), "zero_pruned_: CPU tensors only");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && t.is_contiguous() &&
                  t.sizes() == mask.sizes(),
              "zero_pruned_: needs a contiguous tensor and a contiguous bool mask of its shape");
  // A multiply, as torch's w * mask: a non-finite pruned value gives NaN there too. The
  // mask as bytes and restrict-qualified pointers let the loop vectorise.
  // One thread: the pass is memory-bound, and splitting it measured slower on a loaded host
  // than the single streaming loop (about 1 ms for 4M floats).
  const uint8_t* __restrict__ m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "saf_zero_pruned",
                                  [&] {
    scalar_t* __restrict__ p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] * static_cast<scalar_t>(m[i]);
  });
}

// val[k] = w2d[r, col[k]] for every stored entry of row r: the values of the masked weight
// in the CSR pattern's order.
inline at::Tensor csr_values(const at::Tensor& w2d, const at::Tensor& rowptr,
                             const at::Tensor& col) {
  TORCH_CHECK(w2d.dim() == 2 && w2d.device().is_cpu(), "csr_values: w must be 2-D CPU");
  const int64_t rows = w2d.size(0), cols = w2d.size(1);
  check_csr(rowptr, col, rows, "csr_values");
  const at::Tensor w = w2d.contiguous();
  at::Tensor val = at::empty({col.numel()}, w.options());
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "saf_csr_values", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    scalar_t* dst = val.data_ptr<scalar_t>();
    with_col(col, [&](auto* c) {
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = src + r * cols;
          for (int64_t k = rp[r]; k < rp[r + 1]; ++k) dst[k] = row[static_cast<int64_t>(c[k])];
        }
      });
    });
  });
  return val;
}

}  // namespace saf_common
