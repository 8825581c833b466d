// Closed-form LMF backward: dlogits = coef * (onehot(argmax) - 1/V) needs no GEMM, only gathers and scatters.
//
// dW is written once in the weight's dtype. Its fp32 (fp64) accumulator holds only the rows some token picked: the
// caller maps each picked vocabulary row to a compact slot, so the scatter touches [picked rows, H] instead of [V, H],
// and the final pass adds the rank-1 term -column_sum / V to every real row while casting.
//
// No kernel dereferences an index it has not checked: an argmax outside [0, weight rows) (the forward never produces
// one) gives its token a NaN dh row and no scatter (its rank-1 share stays), a slot outside [0, acc rows) is skipped
// and padded rows get no scatter, so a corrupt index can never become an illegal memory access that kills the CUDA
// context. (These kernels do not know vocab_size: an argmax on a padded row still reads that row for dh.)
#include "common.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <initializer_list>
#include <limits>
#include <type_traits>

namespace ceu {
namespace {

constexpr int kThreads = 256;
constexpr int kScatterTokens = 32;  // tokens per scatter block: column sums cost one atomic per column per block

// Elements per thread along H: a 16-byte pack when H and the row pointers allow it, else 1.
template <typename scalar_t>
int pack_width(int64_t hidden_size, std::initializer_list<const void*> rows) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  bool aligned = hidden_size % kVec == 0;
  for (const void* row : rows) {
    aligned = aligned && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  }
  return aligned ? kVec : 1;
}

// Loads and stores kVec consecutive elements; kVec is 1 or the pack size.
template <int kVec, typename scalar_t>
__device__ __forceinline__ void load(const scalar_t* source, scalar_t (&values)[kVec]) {
  if constexpr (kVec == Pack<scalar_t>::kSize && kVec > 1) {
    *reinterpret_cast<Pack<scalar_t>*>(values) = *reinterpret_cast<const Pack<scalar_t>*>(source);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      values[e] = source[e];
    }
  }
}

template <int kVec, typename scalar_t>
__device__ __forceinline__ void store(scalar_t* target, const scalar_t (&values)[kVec]) {
  if constexpr (kVec == Pack<scalar_t>::kSize && kVec > 1) {
    *reinterpret_cast<Pack<scalar_t>*>(target) = *reinterpret_cast<const Pack<scalar_t>*>(values);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      target[e] = values[e];
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void lmf_grad_hidden_kernel(const at::opmath_type<scalar_t>* __restrict__ coef,
                                       const int64_t* __restrict__ argmax, const scalar_t* __restrict__ weight,
                                       const at::opmath_type<scalar_t>* __restrict__ weight_mean,
                                       scalar_t* __restrict__ grad_hidden, int64_t n_rows, int64_t hidden_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t token = blockIdx.x;
  const acc_t scale = coef[token];
  const int64_t index = argmax[token];
  scalar_t* out = grad_hidden + token * hidden_size;
  if (index < 0 || index >= n_rows) {  // block-uniform: the whole row is NaN, the weight is not read
    const auto nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t k = threadIdx.x; k < hidden_size; k += blockDim.x) {
      out[k] = nan;
    }
    return;
  }
  const scalar_t* picked = weight + index * hidden_size;
  for (int64_t k = int64_t{threadIdx.x} * kVec; k < hidden_size; k += int64_t{blockDim.x} * kVec) {
    scalar_t values[kVec];
    load<kVec>(picked + k, values);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      values[e] = static_cast<scalar_t>(scale * (static_cast<acc_t>(values[e]) - weight_mean[k + e]));
    }
    store<kVec>(out + k, values);
  }
}

// Grid: (token blocks, column blocks). Each thread owns kVec columns over kScatterTokens tokens and keeps their column
// sum in registers, so the column sums take one atomic per block; tokens with coef 0 (masked) are skipped.
template <typename scalar_t, int kVec>
__global__ void lmf_scatter_kernel(const at::opmath_type<scalar_t>* __restrict__ coef,
                                   const int64_t* __restrict__ argmax, const int64_t* __restrict__ slot,
                                   int64_t n_rows, const scalar_t* __restrict__ hidden, int64_t n_tokens,
                                   int64_t hidden_size, at::opmath_type<scalar_t>* __restrict__ acc, int64_t acc_rows,
                                   at::opmath_type<scalar_t>* __restrict__ column_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = (int64_t{blockIdx.y} * blockDim.x + threadIdx.x) * kVec;
  if (k >= hidden_size) {
    return;
  }
  const int64_t first = int64_t{blockIdx.x} * kScatterTokens;
  const int64_t last = first + kScatterTokens < n_tokens ? first + kScatterTokens : n_tokens;
  acc_t partial[kVec] = {};
  for (int64_t token = first; token < last; ++token) {
    const acc_t scale = coef[token];
    if (scale == acc_t(0)) {
      continue;
    }
    scalar_t values[kVec];
    load<kVec>(hidden + token * hidden_size + k, values);
    const int64_t index = argmax[token];
    const int64_t row_slot = index >= 0 && index < n_rows ? slot[index] : -1;
    acc_t* target = row_slot >= 0 && row_slot < acc_rows ? acc + row_slot * hidden_size + k : nullptr;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const acc_t contribution = scale * static_cast<acc_t>(values[e]);
      if (target != nullptr) {
        atomicAdd(target + e, contribution);
      }
      partial[e] += contribution;
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    atomicAdd(column_sum + k + e, partial[e]);
  }
}

template <typename scalar_t, int kVec>
__global__ void lmf_grad_weight_kernel(const at::opmath_type<scalar_t>* __restrict__ acc, int64_t acc_rows,
                                       const int64_t* __restrict__ slot,
                                       const at::opmath_type<scalar_t>* __restrict__ column_sum, int64_t vocab_size,
                                       int64_t hidden_size, scalar_t* __restrict__ grad_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = blockIdx.x;
  const int64_t picked = slot[row];
  const bool real = row < vocab_size;
  scalar_t* out = grad_weight + row * hidden_size;
  for (int64_t k = int64_t{threadIdx.x} * kVec; k < hidden_size; k += int64_t{blockDim.x} * kVec) {
    scalar_t values[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      acc_t value = real ? -column_sum[k + e] / static_cast<acc_t>(vocab_size) : acc_t(0);
      if (real && picked >= 0 && picked < acc_rows) {  // a padded row is never an argmax: it stays 0
        value += acc[picked * hidden_size + k + e];
      }
      values[e] = static_cast<scalar_t>(value);
    }
    store<kVec>(out + k, values);
  }
}

void check_tokens(const at::Tensor& coef, const at::Tensor& argmax, const at::Tensor& like, int64_t n_tokens) {
  check_vector(coef, "coef", at::toOpMathType(like.scalar_type()), n_tokens, like.device());
  check_vector(argmax, "argmax", at::kLong, n_tokens, like.device());
}

void check_matrix(const at::Tensor& tensor, const char* name, const at::Tensor& like) {
  TORCH_CHECK(tensor.is_cuda() && tensor.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(tensor.dim() == 2 && tensor.is_contiguous(), name, " must be a contiguous matrix, got shape ",
              tensor.sizes(), " and strides ", tensor.strides());
}

}  // namespace

void lmf_grad_hidden(const at::Tensor& coef, const at::Tensor& argmax, const at::Tensor& weight,
                     const at::Tensor& weight_mean, const at::Tensor& grad_hidden) {
  check_matrix(weight, "weight", weight);
  check_matrix(grad_hidden, "grad_hidden", weight);
  TORCH_CHECK(grad_hidden.scalar_type() == weight.scalar_type() && grad_hidden.size(1) == weight.size(1),
              "grad_hidden must be [tokens, H] of the weight's dtype");
  const int64_t n_tokens = grad_hidden.size(0);
  const int64_t hidden_size = weight.size(1);
  check_tokens(coef, argmax, weight, n_tokens);
  check_vector(weight_mean, "weight_mean", at::toOpMathType(weight.scalar_type()), hidden_size, weight.device());
  if (n_tokens == 0 || hidden_size == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "lmf_grad_hidden", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec) {
      lmf_grad_hidden_kernel<scalar_t, decltype(vec)::value><<<grid_for_rows(n_tokens), kThreads, 0, stream>>>(
          coef.const_data_ptr<acc_t>(), argmax.const_data_ptr<int64_t>(), weight.const_data_ptr<scalar_t>(),
          weight_mean.const_data_ptr<acc_t>(), grad_hidden.mutable_data_ptr<scalar_t>(), weight.size(0),
          hidden_size);
    };
    if (pack_width<scalar_t>(hidden_size, {weight.const_data_ptr(), grad_hidden.const_data_ptr()}) > 1) {
      launch(std::integral_constant<int, Pack<scalar_t>::kSize>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lmf_scatter(const at::Tensor& coef, const at::Tensor& argmax, const at::Tensor& slot, const at::Tensor& hidden,
                 const at::Tensor& acc, const at::Tensor& column_sum) {
  check_matrix(hidden, "hidden", hidden);
  check_matrix(acc, "acc", hidden);
  const int64_t n_tokens = hidden.size(0);
  const int64_t hidden_size = hidden.size(1);
  const auto acc_type = at::toOpMathType(hidden.scalar_type());
  TORCH_CHECK(acc.scalar_type() == acc_type && acc.size(1) == hidden_size, "acc must be [rows, H] of ", acc_type);
  check_tokens(coef, argmax, hidden, n_tokens);
  TORCH_CHECK(slot.is_cuda() && slot.device() == hidden.device() && slot.scalar_type() == at::kLong &&
                  slot.dim() == 1 && slot.is_contiguous(),
              "slot must be a contiguous int64 vector on ", hidden.device());
  check_vector(column_sum, "column_sum", acc_type, hidden_size, hidden.device());
  if (n_tokens == 0 || hidden_size == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "lmf_scatter", [&] {
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const dim3 grid(grid_for_rows((n_tokens + kScatterTokens - 1) / kScatterTokens),
                      static_cast<unsigned>((hidden_size + kThreads * kVec - 1) / (kThreads * kVec)));
      lmf_scatter_kernel<scalar_t, kVec><<<grid, kThreads, 0, stream>>>(
          coef.const_data_ptr<at::opmath_type<scalar_t>>(), argmax.const_data_ptr<int64_t>(),
          slot.const_data_ptr<int64_t>(), slot.numel(), hidden.const_data_ptr<scalar_t>(), n_tokens, hidden_size,
          acc.mutable_data_ptr<at::opmath_type<scalar_t>>(), acc.size(0),
          column_sum.mutable_data_ptr<at::opmath_type<scalar_t>>());
    };
    if (pack_width<scalar_t>(hidden_size, {hidden.const_data_ptr()}) > 1) {
      launch(std::integral_constant<int, Pack<scalar_t>::kSize>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lmf_grad_weight(const at::Tensor& acc, const at::Tensor& slot, const at::Tensor& column_sum, int64_t vocab_size,
                     const at::Tensor& grad_weight) {
  check_matrix(grad_weight, "grad_weight", grad_weight);
  check_matrix(acc, "acc", grad_weight);
  const int64_t rows = grad_weight.size(0);
  const int64_t hidden_size = grad_weight.size(1);
  const auto acc_type = at::toOpMathType(grad_weight.scalar_type());
  TORCH_CHECK(acc.scalar_type() == acc_type && acc.size(1) == hidden_size, "acc must be [rows, H] of ", acc_type);
  TORCH_CHECK(0 < vocab_size && vocab_size <= rows, "vocab_size must lie in [1, ", rows, "], got ", vocab_size);
  check_vector(slot, "slot", at::kLong, rows, grad_weight.device());
  check_vector(column_sum, "column_sum", acc_type, hidden_size, grad_weight.device());
  if (hidden_size == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(grad_weight.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_weight.scalar_type(), "lmf_grad_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto launch = [&](auto vec) {
      lmf_grad_weight_kernel<scalar_t, decltype(vec)::value><<<grid_for_rows(rows), kThreads, 0, stream>>>(
          acc.const_data_ptr<acc_t>(), acc.size(0), slot.const_data_ptr<int64_t>(),
          column_sum.const_data_ptr<acc_t>(), vocab_size, hidden_size, grad_weight.mutable_data_ptr<scalar_t>());
    };
    if (pack_width<scalar_t>(hidden_size, {grad_weight.const_data_ptr()}) > 1) {
      launch(std::integral_constant<int, Pack<scalar_t>::kSize>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ceu
