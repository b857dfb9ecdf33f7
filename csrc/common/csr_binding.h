// Helpers shared by the torch bindings of the sparse (CSR) CPU paths: argument checks and
// dispatch on the stored width of the column indices. Header-only; torch headers only.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace saf_common {

inline void check_csr(const at::Tensor& rowptr, const at::Tensor& col, int64_t rows,
                      const char* op) {
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() &&
                  rowptr.numel() == rows + 1,
              op, " cpp: rowptr must be contiguous int64 of length rows+1");
  TORCH_CHECK((col.scalar_type() == at::kInt || col.scalar_type() == at::kShort) &&
                  col.is_contiguous(),
              op, " cpp: col must be contiguous int32 or int16");
}

// Runs f(index_t*) with the CSR column array at its stored width.
template <typename F>
void with_col(const at::Tensor& col, F&& f) {
  if (col.scalar_type() == at::kShort)
    f(col.data_ptr<int16_t>());
  else
    f(col.data_ptr<int32_t>());
}

}  // namespace saf_common
