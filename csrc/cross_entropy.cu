// Cross-entropy over a logits chunk: online log-sum-exp and target logit (forward), and the in-place rewrite of the
// chunk into g * (softmax - onehot) that the backward GEMMs consume.
#include "common.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <limits>
#include <type_traits>

namespace ceu {
namespace {

// A running log-sum-exp: sum of exp(x - max) over the values seen. -inf values add nothing; NaN poisons the sum.
template <typename acc_t>
struct LogSumExp {
  acc_t max;
  acc_t sum;

  __device__ void add(acc_t value) {
    if (value > max) {
      sum = sum * exp(max - value) + acc_t(1);
      max = value;
    } else if (value != -std::numeric_limits<acc_t>::infinity()) {
      sum += exp(value - max);
    }
  }

  __device__ LogSumExp shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, max, offset), __shfl_down_sync(0xffffffffu, sum, offset)};
  }

  // +-inf maxima are returned as is (exp(inf - inf) would be NaN), as torch.logsumexp does.
  __device__ acc_t value() const { return isinf(max) ? max : max + log(sum); }
};

template <typename acc_t>
__device__ __forceinline__ LogSumExp<acc_t> merge(const LogSumExp<acc_t>& a, const LogSumExp<acc_t>& b) {
  const acc_t max = a.max > b.max ? a.max : b.max;
  if (max == -std::numeric_limits<acc_t>::infinity()) {
    return {max, acc_t(0)};
  }
  return {max, a.sum * exp(a.max - max) + b.sum * exp(b.max - max)};
}

// One row of a chunk: its log-sum-exp and loss from one read of the row. With kWriteGradient (the gradients formed
// in the forward), the row is then rewritten in place into softmax - onehot(label), zero at an ignored token (a
// second read, in cache for rows that fit it, and the one write).
template <typename scalar_t, bool kWriteGradient>
__global__ void ce_rows_kernel(std::conditional_t<kWriteGradient, scalar_t, const scalar_t>* __restrict__ logits,
                               int64_t row_stride, int64_t cols, const int64_t* __restrict__ labels,
                               int64_t ignore_index, at::opmath_type<scalar_t>* __restrict__ loss,
                               at::opmath_type<scalar_t>* __restrict__ lse) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared_lse;
  const int64_t row = blockIdx.x;
  auto* row_logits = logits + row * row_stride;
  const int64_t label = labels[row];
  const bool valid = label != ignore_index;
  LogSumExp<acc_t> state{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  for_each_in_row(static_cast<const scalar_t*>(row_logits), cols,
                  [&](int64_t, const scalar_t& x) { state.add(static_cast<acc_t>(x)); });
  state = block_reduce(state, [](const LogSumExp<acc_t>& a, const LogSumExp<acc_t>& b) { return merge(a, b); });
  if (threadIdx.x == 0) {
    const acc_t row_lse = state.value();
    acc_t row_loss = 0;
    if (valid) {
      CUDA_KERNEL_ASSERT(0 <= label && label < cols);
      row_loss = row_lse - static_cast<acc_t>(row_logits[label]);
    }
    lse[row] = row_lse;
    loss[row] = row_loss;
    shared_lse = row_lse;
  }
  if constexpr (kWriteGradient) {
    __syncthreads();
    const acc_t row_lse = shared_lse;
    for_each_in_row(row_logits, cols, [&](int64_t j, scalar_t& x) {
      const acc_t probability = exp(static_cast<acc_t>(x) - row_lse);
      x = static_cast<scalar_t>(valid ? (j == label ? probability - acc_t(1) : probability) : acc_t(0));
    });
  }
}

template <typename scalar_t>
__global__ void ce_grad_kernel(scalar_t* __restrict__ logits, int64_t row_stride, int64_t cols,
                               const int64_t* __restrict__ labels, int64_t column_offset,
                               const at::opmath_type<scalar_t>* __restrict__ lse,
                               const at::opmath_type<scalar_t>* __restrict__ token_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const acc_t grad = token_grad[row];
  const acc_t row_lse = lse[row];
  const int64_t target = labels[row] - column_offset;
  for_each_in_row(logits + row * row_stride, cols, [&](int64_t j, scalar_t& x) {
    const acc_t probability = exp(static_cast<acc_t>(x) - row_lse);
    x = static_cast<scalar_t>(grad * (j == target ? probability - acc_t(1) : probability));
  });
}

}  // namespace

namespace {

// The launch shared by ce_reduce and ce_fused_grad_ (the same kernel, with and without the in-place rewrite).
template <bool kWriteGradient>
void ce_rows(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
             const at::Tensor& lse) {
  check_rows(logits, "logits");
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  TORCH_CHECK(cols > 0, "logits must have at least one column");
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  check_vector(labels, "labels", at::kLong, rows, logits.device());
  check_vector(loss, "loss", acc_type, rows, logits.device());
  check_vector(lse, "lse", acc_type, rows, logits.device());
  if (rows == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = threads_for_row(cols, logits.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::conditional_t<kWriteGradient, scalar_t, const scalar_t>* data;
    if constexpr (kWriteGradient) {
      data = logits.mutable_data_ptr<scalar_t>();
    } else {
      data = logits.const_data_ptr<scalar_t>();
    }
    ce_rows_kernel<scalar_t, kWriteGradient><<<grid_for_rows(rows), threads, 0, stream>>>(
        data, logits.stride(0), cols, labels.const_data_ptr<int64_t>(), ignore_index, loss.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void ce_reduce(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
               const at::Tensor& lse) {
  ce_rows<false>(logits, labels, ignore_index, loss, lse);
}

void ce_fused_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& loss,
                    const at::Tensor& lse) {
  ce_rows<true>(logits, labels, ignore_index, loss, lse);
}

void ce_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t column_offset, const at::Tensor& lse,
              const at::Tensor& token_grad) {
  check_rows(logits, "logits");
  const int64_t rows = logits.size(0);
  const int64_t cols = logits.size(1);
  const auto acc_type = at::toOpMathType(logits.scalar_type());
  check_vector(labels, "labels", at::kLong, rows, logits.device());
  check_vector(lse, "lse", acc_type, rows, logits.device());
  check_vector(token_grad, "token_grad", acc_type, rows, logits.device());
  if (rows == 0 || cols == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = threads_for_row(cols, logits.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_grad_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_grad_kernel<scalar_t><<<grid_for_rows(rows), threads, 0, stream>>>(
        logits.mutable_data_ptr<scalar_t>(), logits.stride(0), cols, labels.const_data_ptr<int64_t>(), column_offset,
        lse.const_data_ptr<acc_t>(), token_grad.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ceu
