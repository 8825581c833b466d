// Fused row reduction of a logits chunk for the LMF forward: max, first-index argmax and row sum in one read.
#include "common.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace ceu {
namespace {

template <typename acc_t>
struct MaxArgSum {
  acc_t max;
  int64_t index;
  acc_t sum;

  __device__ MaxArgSum shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, max, offset), __shfl_down_sync(0xffffffffu, index, offset),
            __shfl_down_sync(0xffffffffu, sum, offset)};
  }
};

// Whether (value, index) beats (best, best_index) under torch.max's rule: NaN above everything, then the larger
// value, then the lower index. Independent of the order in which candidates meet, hence of the reduction tree.
template <typename acc_t>
__device__ __forceinline__ bool beats(acc_t value, int64_t index, acc_t best, int64_t best_index) {
  const bool value_nan = isnan(value);
  const bool best_nan = isnan(best);
  if (value_nan || best_nan) {
    return value_nan && (!best_nan || index < best_index);
  }
  return value > best || (value == best && index < best_index);
}

template <typename scalar_t, bool kWithSum>
__global__ void lmf_reduce_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t cols,
                                  at::opmath_type<scalar_t>* __restrict__ row_max, int64_t* __restrict__ argmax,
                                  at::opmath_type<scalar_t>* __restrict__ row_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  // The empty state loses to every column, a -inf one included (by its lower index), so with cols >= 1 the index
  // written is always a column in [0, cols): 0 for an all -inf row, the first NaN for a row holding NaN.
  MaxArgSum<acc_t> state{-std::numeric_limits<acc_t>::infinity(), std::numeric_limits<int64_t>::max(), 0};
  for_each_in_row(logits + row * row_stride, cols, [&](int64_t j, const scalar_t& x) {
    const acc_t value = static_cast<acc_t>(x);
    if (beats(value, j, state.max, state.index)) {
      state.max = value;
      state.index = j;
    }
    if constexpr (kWithSum) {
      state.sum += value;
    }
  });
  state = block_reduce(state, [](const MaxArgSum<acc_t>& a, const MaxArgSum<acc_t>& b) {
    const bool a_wins = beats(a.max, a.index, b.max, b.index);
    return MaxArgSum<acc_t>{a_wins ? a.max : b.max, a_wins ? a.index : b.index, a.sum + b.sum};
  });
  if (threadIdx.x == 0) {
    row_max[row] = state.max;
    argmax[row] = state.index;
    if constexpr (kWithSum) {
      row_sum[row] = state.sum;
    }
  }
}

}  // namespace

void lmf_reduce(const at::Tensor& logits, const at::Tensor& row_max, const at::Tensor& argmax,
                const std::optional<at::Tensor>& row_sum) {
  check_rows(logits, "logits");
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  TORCH_CHECK(cols > 0, "logits must have at least one column");
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  check_vector(row_max, "row_max", acc_type, rows, logits.device());
  check_vector(argmax, "argmax", at::kLong, rows, logits.device());
  if (row_sum) {
    check_vector(*row_sum, "row_sum", acc_type, rows, logits.device());
  }
  if (rows == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = threads_for_row(cols, logits.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lmf_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* logits_ptr = logits.const_data_ptr<scalar_t>();
    auto* max_ptr = row_max.mutable_data_ptr<acc_t>();
    auto* argmax_ptr = argmax.mutable_data_ptr<int64_t>();
    if (row_sum) {
      lmf_reduce_kernel<scalar_t, true><<<grid_for_rows(rows), threads, 0, stream>>>(
          logits_ptr, logits.stride(0), cols, max_ptr, argmax_ptr, row_sum->mutable_data_ptr<acc_t>());
    } else {
      lmf_reduce_kernel<scalar_t, false><<<grid_for_rows(rows), threads, 0, stream>>>(
          logits_ptr, logits.stride(0), cols, max_ptr, argmax_ptr, nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ceu
