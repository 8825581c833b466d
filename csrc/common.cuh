// Helpers shared by the kernels: 16-byte row traversal, block reductions, and host-side argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace ceu {

// 16 bytes of consecutive elements, loaded and stored as one vector transaction.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t values[kSize];
};

// Calls visit(j, x) for every column j of one row, the block's threads sharing the row; each thread sees its columns
// in increasing order (the argmax relies on it only for speed, not for the tie rule). The 16-byte-aligned middle of
// the row goes through Pack loads, four in flight per thread; the unaligned head and the tail are read one by one.
// When `row` points to non-const data, visit may modify x and the row is written back.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_in_row(T* row, int64_t cols, Visit visit) {
  using scalar_t = std::remove_const_t<T>;
  using PackT = std::conditional_t<std::is_const_v<T>, const Pack<scalar_t>, Pack<scalar_t>>;
  constexpr int kVec = Pack<scalar_t>::kSize;
  constexpr int kUnroll = 4;
  const auto address = reinterpret_cast<uintptr_t>(row);
  int64_t head = address % 16 == 0 ? 0 : static_cast<int64_t>((16 - address % 16) / sizeof(scalar_t));
  if (address % sizeof(scalar_t) != 0 || head > cols) {
    head = cols;
  }
  const int64_t packs = (cols - head) / kVec;
  const int64_t step = blockDim.x;

  for (int64_t j = threadIdx.x; j < head; j += step) {
    visit(j, row[j]);
  }
  PackT* body = reinterpret_cast<PackT*>(row + head);
  auto visit_pack = [&](int64_t p, Pack<scalar_t>& pack) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      visit(head + p * kVec + e, pack.values[e]);
    }
    if constexpr (!std::is_const_v<T>) {
      body[p] = pack;
    }
  };
  int64_t p = threadIdx.x;
  for (; p + (kUnroll - 1) * step < packs; p += kUnroll * step) {
    Pack<scalar_t> batch[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      batch[u] = body[p + u * step];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      visit_pack(p + u * step, batch[u]);
    }
  }
  for (; p < packs; p += step) {
    Pack<scalar_t> pack = body[p];
    visit_pack(p, pack);
  }
  for (int64_t j = head + packs * kVec + threadIdx.x; j < cols; j += step) {
    visit(j, row[j]);
  }
}

// Reduces one State per thread to thread 0 of the block: shuffles within each warp, then across warps through shared
// memory. State provides `State shfl_down(int offset) const`; merge must be associative. blockDim.x is a multiple of
// 32, at most 1024, and every thread of the block must call it.
template <typename State, typename Merge>
__device__ __forceinline__ State block_reduce(State state, Merge merge) {
  __shared__ State warp_states[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int n_warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    state = merge(state, state.shfl_down(offset));
  }
  if (n_warps == 1) {
    return state;
  }
  if (lane == 0) {
    warp_states[warp] = state;
  }
  __syncthreads();
  if (warp == 0) {
    state = warp_states[lane < n_warps ? lane : 0];
    for (int offset = 16; offset > 0; offset /= 2) {
      State other = state.shfl_down(offset);
      if (lane + offset < n_warps) {
        state = merge(state, other);
      }
    }
  }
  return state;
}

// Threads per block for a row-per-block kernel over `cols` columns: about four 16-byte packs per thread, 32 to 512.
inline int threads_for_row(int64_t cols, int64_t element_size) {
  const int64_t packs = (cols * element_size + 15) / 16;
  int threads = 32;
  while (threads < 512 && threads * 4 < packs) {
    threads *= 2;
  }
  return threads;
}

// Grid size for one block per row; CUDA allows up to 2**31 - 1 blocks along x.
inline unsigned grid_for_rows(int64_t rows) {
  TORCH_CHECK(rows < (int64_t{1} << 31), "too many rows for one launch: ", rows);
  return static_cast<unsigned>(rows);
}

// Host-side checks of an output or input vector: CUDA, on `device`, contiguous, `numel` elements of `dtype`.
inline void check_vector(const at::Tensor& tensor, const char* name, c10::ScalarType dtype, int64_t numel,
                         const c10::Device& device) {
  TORCH_CHECK(tensor.device() == device, name, " must be on ", device, ", got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must be ", dtype, ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous() && tensor.numel() == numel, name, " must be contiguous with ", numel,
              " elements, got shape ", tensor.sizes());
}

// A CUDA matrix whose rows may be strided but whose columns are contiguous, as the row kernels read it.
inline void check_rows(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor, got ", tensor.device());
  TORCH_CHECK(tensor.dim() == 2, name, " must be 2-D, got shape ", tensor.sizes());
  TORCH_CHECK(tensor.size(1) == 0 || tensor.stride(1) == 1 || tensor.size(1) == 1, name,
              " must have contiguous columns, got strides ", tensor.strides());
}

}  // namespace ceu
