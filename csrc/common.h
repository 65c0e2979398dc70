// Rules shared by every op family (host code; included by .cpp and .cu files).
#pragma once

#include <ATen/core/Tensor.h>

namespace neptune {

// Accumulation (and saved-statistics) dtype: float64 stays float64, everything
// else accumulates in float32. The Python fake kernels follow the same rule
// (neptune_ext/_util.py: acc_dtype).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// 4-D x that is channels_last-contiguous but not NCHW-contiguous.
inline bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x in a layout the kernels read: NCHW-contiguous or channels_last-contiguous.
inline at::Tensor dense(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

}  // namespace neptune
